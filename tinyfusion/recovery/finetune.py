"""The recovery loop: plain fine-tuning, logits KD or Masked KD of a pruned student against its teacher.

As the paper: AdamW (lr 2e-4, no weight decay) with a per-step cosine down to 1e-4, gradient clip 1.0,
an EMA of the weights that is what gets sampled and saved, class-label dropout. Randomness comes from
one generator over the global batch (each rank takes its slice), so DDP and resumed runs reproduce a
single uninterrupted process.
"""
import copy
import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..data.batches import draw_step_noise
from ..errors import UserError
from ..models.stack import block_stack
from .kd import KDWeights, masked_hidden_kd, variance_kd


@dataclass
class FinetuneConfig:
    steps: int = 1000
    global_batch_size: int = 128
    lr: float = 2e-4
    lr_min: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    kd: str = "masked"
    weights: KDWeights = field(default_factory=KDWeights)
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 250
    max_bad_steps: int = 20

    def lr_at(self, step):
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * step / max(self.steps, 1)))

    def ema_at(self, step):
        """The decay, warmed up as min(decay, (1 + step) / (10 + step)) so short runs are not stuck at the start."""
        return min(self.ema_decay, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_decay


class Collecting(nn.Module):
    """A forward that also returns the hidden outputs of chosen blocks (one module, so DDP syncs it)."""

    def __init__(self, model, layers):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, x, t, y, drop):
        with block_stack(self.model).recording(self.layers) as rec:
            out = self.model(x, t, y, force_drop_ids=drop)
        return out, [rec[i][1] for i in self.layers]


class Recovery:
    def __init__(self, student, teacher, pairs, diffusion, data, cfg: FinetuneConfig, rank=0, world=1, device="cpu"):
        self.cfg, self.diffusion, self.data = cfg, diffusion, data
        self.rank, self.world, self.device = rank, world, device
        self.student = student.to(device).train()
        self.ema = copy.deepcopy(student).eval().requires_grad_(False)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        self.pairs = pairs if cfg.kd == "masked" else []
        self.net = Collecting(self.student, [s for s, _ in self.pairs])
        self.teacher_net = Collecting(self.teacher, [t for _, t in self.pairs]) if self.teacher is not None else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.net) if world > 1 else self.net
        frozen = block_stack(self.student).frozen
        params = [p for n, p in self.student.named_parameters() if n not in frozen]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.skipped, self.bad_in_a_row, self.curve = 0, 0, 0, []
        self.local = cfg.global_batch_size // world
        self.part = slice(rank * self.local, (rank + 1) * self.local)
        self.dropout = student.config.class_dropout_prob

    def state_dict(self):
        return {"student": self.student.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "skipped": self.skipped, "gen": self.gen.get_state(), "data": self.data.state(),
                "curve": json.dumps(self.curve), "config": json.dumps(asdict(self.cfg))}

    def load_state_dict(self, s):
        saved, mine = json.loads(s["config"]), json.loads(json.dumps(asdict(self.cfg)))
        diff = [k for k in mine if k not in ("steps", "log_every", "ckpt_every") and saved.get(k) != mine[k]]
        if diff:
            raise UserError(f"--resume: the saved run used different settings ({', '.join(diff)})")
        self.student.load_state_dict(s["student"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        self.step, self.skipped = s["step"], s["skipped"]
        self.gen.set_state(s["gen"])
        self.data.load_state(s["data"])
        self.curve = json.loads(s["curve"])

    def save(self, path):
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def losses(self, x, y, t, noise, drop):
        cfg, w = self.cfg, self.cfg.weights
        captured = {}

        def student_fn(xt, tt):
            out, hidden = self.ddp(xt, tt, y, drop)
            captured["hidden"] = hidden
            return out

        terms = self.diffusion.training_losses(student_fn, x, t, noise)
        parts = {"diffusion": terms["loss"].mean()}
        if cfg.kd == "none":
            return parts["diffusion"], parts
        with torch.no_grad():
            t_out, t_hidden = self.teacher_net(terms["x_t"], terms["model_t"], y, drop)
        s_out, c = terms["output"], x.shape[1]
        kd = self.diffusion.output_kd(s_out, t_out, c)  # MAR: the diffusion head's eps on the masked tokens
        if self.diffusion.learned_variance and s_out.shape[1] == 2 * c:
            kd = kd + variance_kd(self.diffusion, s_out, t_out, terms["x_t"], t)
        parts["output_kd"] = kd.mean()
        loss = w.alpha_kd * parts["output_kd"] + w.alpha_gt * parts["diffusion"]
        if self.pairs:
            rep = torch.stack([masked_hidden_kd(hs, ht, w.mask_k) for hs, ht in zip(captured["hidden"], t_hidden)]).mean()
            parts["hidden_kd"] = rep
            loss = loss + w.beta(self.step / max(cfg.steps - 1, 1)) * rep
        return loss, parts

    def draw(self, shape):
        return draw_step_noise(self.gen, self.cfg.global_batch_size, self.part, shape, self.diffusion.num_timesteps,
                               self.dropout)

    def train_step(self):
        cfg, dev = self.cfg, self.device
        x, y = self.data.next()
        t, noise, drop = self.draw(tuple(x.shape[1:]))
        x, y, t, noise, drop = (v.to(dev) for v in (x, y, t, noise, drop))
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr_at(self.step)
        loss, parts = self.losses(x, y, t, noise, drop)
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
        if self.world > 1:
            dist.all_reduce(flag)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if flag.item() > 0:  # every rank skips together
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise UserError(f"{cfg.max_bad_steps} non-finite losses in a row at step {self.step} "
                                f"({self.skipped} skipped in all); lower --lr or the KD weights")
            return None
        self.bad_in_a_row = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        decay = cfg.ema_at(self.step)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.student.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        values = torch.stack([loss.detach(), *[v.detach() for v in parts.values()]])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return dict(zip(["loss", *parts], values.tolist()))

    def run(self, state_path=None, snapshot=None, snapshot_steps=()):
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"recover ({cfg.kd})", disable=self.rank != 0, dynamic_ncols=True)
        window = []
        while self.step < cfg.steps:
            parts = self.train_step()
            if parts is not None:
                window.append(parts)
            bar.update(1)
            if window and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
                self.curve.append({"step": self.step, **mean})
                bar.set_postfix(loss=f"{mean['loss']:.4f}")
                window = []
            if self.rank == 0 and snapshot is not None and self.step in snapshot_steps:
                snapshot(self.ema, self.step)
            if state_path and self.rank == 0 and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                self.save(state_path)
        bar.close()
        return self.ema
