"""TinyFusion's learnable depth pruning: Gumbel-softmax N:M masks co-optimized with a weight update.

Each training step draws, per sample and per block, a hard one-hot over the block's candidate masks
(straight-through gradients), runs every block as m * block(x, c) + (1 - m) * x, and minimizes the
ordinary DiT loss jointly over the mask logits and a shared update dW (LoRA by default) that stands in
for the later fine-tuning: the mask that *recovers* best wins, not the one that hurts least right now.
All randomness (data, t, noise, label dropout, Gumbel noise) comes from one seeded generator over the
global batch, each rank taking its slice, so K ranks reproduce one process and a resumed run continues
exactly.
"""
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..data.batches import draw_step_noise
from ..errors import UserError
from ..models.stack import block_stack
from .gates import MaskGates
from .lora import apply_lora
from .surgery import masked_forward


@dataclass
class SearchConfig:
    groups: list
    steps: int = 500
    global_batch_size: int = 128
    lr: float = 1e-4
    gate_lr_mult: float = 10.0
    tau_range: tuple = (4.0, 0.1)
    scaling: float = 100.0
    ema_decay: float = 0.999
    delta_w: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = None
    class_dropout_prob: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    max_bad_steps: int = 20

    def tau(self, step):
        t0, t1 = self.tau_range
        return t0 + (t1 - t0) * step / max(self.steps - 1, 1)


class SearchNet(nn.Module):
    """The model (with its weight update) and the gates, as one module so DDP syncs both."""

    def __init__(self, model, gates):
        super().__init__()
        self.model, self.gates = model, gates

    def forward(self, x, t, y, drop, uniforms, tau, scale):
        mask = self.gates.sample(uniforms, tau, scale)
        return masked_forward(self.model, x, t, y, mask, force_drop_ids=drop)


def prepare(model, cfg):
    """Attach the weight update; returns (net, weight params, gate params)."""
    model.requires_grad_(False)
    if cfg.delta_w == "lora":
        weights = [p for m in block_stack(model).lora_targets() for p in apply_lora(m, cfg.lora_rank, cfg.lora_alpha)]
    elif cfg.delta_w == "full":
        frozen = block_stack(model).frozen
        weights = [p for n, p in model.named_parameters() if n not in frozen]
        for p in weights:
            p.requires_grad_(True)
    elif cfg.delta_w == "none":
        weights = []
    else:
        raise UserError(f"--delta-w must be lora, full or none, got {cfg.delta_w!r}")
    gates = MaskGates(cfg.groups)
    return SearchNet(model, gates), weights, list(gates.parameters())


class LearnableSearch:
    def __init__(self, model, diffusion, data, cfg: SearchConfig, rank=0, world=1, device="cpu"):
        self.cfg, self.diffusion, self.data = cfg, diffusion, data
        self.rank, self.world, self.device = rank, world, device
        self.net, self.weights, self.gate_params = prepare(model, cfg)
        self.net.to(device)
        self.trainable = self.weights + self.gate_params
        self.opt = torch.optim.AdamW(
            [{"params": self.weights, "lr": cfg.lr}, {"params": self.gate_params, "lr": cfg.lr * cfg.gate_lr_mult}],
            weight_decay=0.0,
        )
        self.ema = [p.detach().clone() for p in self.trainable]  # EMA of all trainable state, gates included
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.net) if world > 1 else self.net
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.history, self.bad_in_a_row, self.skipped = 0, [], 0, 0
        self.local = cfg.global_batch_size // world
        self.part = slice(rank * self.local, (rank + 1) * self.local)

    # --- state -----------------------------------------------------------------------------------
    def ema_logits(self):
        return self.ema[len(self.weights):]

    def decision(self):
        return [int(l.argmax()) for l in self.ema_logits()]

    def probabilities(self):
        return [torch.softmax(l * self.cfg.scaling, 0) for l in self.ema_logits()]

    def state_dict(self):
        return {"trainable": [p.detach().clone() for p in self.trainable], "ema": self.ema, "opt": self.opt.state_dict(),
                "step": self.step, "gen": self.gen.get_state(), "data": self.data.state(),
                "history": json.dumps(self.history), "skipped": self.skipped,
                "config": json.dumps(asdict(self.cfg), default=list)}

    def load_state_dict(self, s):
        saved = json.loads(s["config"])
        mine = json.loads(json.dumps(asdict(self.cfg), default=list))
        diff = [k for k in mine if k not in ("steps", "log_every", "ckpt_every") and saved.get(k) != mine[k]]
        if diff:
            raise UserError(f"--resume: the saved search used different settings ({', '.join(diff)})")
        with torch.no_grad():
            for p, v in zip(self.trainable, s["trainable"]):
                p.copy_(v)
        self.ema = [v.clone() for v in s["ema"]]
        self.opt.load_state_dict(s["opt"])
        self.step, self.skipped = s["step"], s["skipped"]
        self.gen.set_state(s["gen"])
        self.data.load_state(s["data"])
        self.history = json.loads(s["history"])

    def save(self, path):
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    # --- one step ----------------------------------------------------------------------------------
    def draw(self, shape):
        """Global-batch randomness from the shared generator, this rank's slice."""
        g, n = self.gen, self.cfg.global_batch_size
        t, noise, drop = draw_step_noise(g, n, self.part, shape, self.diffusion.num_timesteps, self.cfg.class_dropout_prob)
        uniforms = [torch.rand(n, len(l), generator=g)[self.part] for l in self.gate_params]
        return t, noise, drop, uniforms

    def train_step(self):
        cfg, dev = self.cfg, self.device
        x, y = self.data.next()
        t, noise, drop, uniforms = self.draw(tuple(x.shape[1:]))
        x, y, t, noise, drop = (v.to(dev) for v in (x, y, t, noise, drop))
        uniforms = [u.to(dev) for u in uniforms]
        tau = cfg.tau(self.step)
        terms = self.diffusion.training_losses(
            lambda xt, tt: self.ddp(xt, tt, y, drop, uniforms, tau, cfg.scaling), x, t, noise)
        loss = terms["loss"].mean()
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
        if self.world > 1:
            dist.all_reduce(flag)
        self.opt.zero_grad(set_to_none=True)
        if flag.item() > 0:  # every rank skips together
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise UserError(f"{cfg.max_bad_steps} non-finite losses in a row at step {self.step}; lower --lr")
            self.step += 1
            return float("nan"), tau
        self.bad_in_a_row = 0
        loss.backward()
        if self.weights and cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.weights, cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema, self.trainable):
                e.mul_(cfg.ema_decay).add_(p.detach(), alpha=1 - cfg.ema_decay)
        value = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        self.step += 1
        return value.item(), tau

    def log_point(self, loss, tau):
        probs = self.probabilities()
        self.history.append({
            "step": self.step, "tau": round(tau, 4), "loss": loss,
            "probs": [[round(v, 5) for v in p.tolist()] for p in probs],
            "confidence": [round(p.max().item(), 5) for p in probs],
            "choice": self.decision(),
        })

    def run(self, ckpt_path=None, progress=True):
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc="search", disable=not progress or self.rank != 0,
                   dynamic_ncols=True)
        losses = []
        while self.step < cfg.steps:
            loss, tau = self.train_step()
            if math.isfinite(loss):
                losses.append(loss)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mean = sum(losses) / len(losses) if losses else float("nan")
                losses = []
                self.log_point(mean, tau)
                conf = min(self.history[-1]["confidence"])
                bar.set_postfix(loss=f"{mean:.4f}", tau=f"{tau:.2f}", min_conf=f"{conf:.2f}")
            if ckpt_path and self.rank == 0 and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                self.save(ckpt_path)
        bar.close()
        return self.decision()
