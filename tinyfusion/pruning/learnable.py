"""TinyFusion's learnable depth pruning: Gumbel-softmax N:M masks co-optimized with a weight update.

Each training step draws, per sample and per block, a hard one-hot over the block's candidate masks
(straight-through gradients), runs every block as m * block(x, c) + (1 - m) * x, and minimizes the
ordinary DiT loss jointly over the mask logits and a shared update dW (LoRA by default) that stands in
for the later fine-tuning: the mask that *recovers* best wins, not the one that hurts least right now.
The loop is the shared training engine (`tinyfusion.training`): its seeded generator draws data order,
t, noise, label dropout and the Gumbel noise over the global batch, each rank taking its slice, so K
ranks reproduce one process and a resumed run continues exactly. The EMA of all trainable state (gates
included) makes the decision.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from ..models.stack import block_stack
from ..training import Engine, RunOptions
from ..training.denoising import DenoisingTask
from ..training.fsdp import full
from ..training.precision import no_autocast, to_float
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


class GatedModel(nn.Module):
    """The model (with its weight update) and the gates, as one module so DDP syncs both."""

    def __init__(self, model, gates):
        super().__init__()
        self.model, self.gates = model, gates

    def forward(self, x, t, y, drop, uniforms, tau, scale):
        with no_autocast(x.device):  # the Gumbel draw and its straight-through softmax stay fp32
            mask = self.gates.sample(uniforms, tau, scale)
        return masked_forward(self.model, x, t, y, mask, force_drop_ids=drop)


def attach_weight_update(model, cfg):
    """Freeze the model, attach the recoverability update (what stays trainable in the model) and the gates."""
    model.requires_grad_(False)
    if cfg.delta_w == "lora":
        for m in block_stack(model).lora_targets():
            apply_lora(m, cfg.lora_rank, cfg.lora_alpha)
    elif cfg.delta_w == "full":
        frozen = block_stack(model).frozen
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
    elif cfg.delta_w != "none":
        raise UserError(f"--delta-w must be lora, full or none, got {cfg.delta_w!r}")
    return GatedModel(model, MaskGates(cfg.groups))


class LearnableSearch(DenoisingTask):
    name = "search"

    def __init__(self, model, diffusion, data, cfg: SearchConfig, rank=0, world=1, device="cpu", options=None, log=None):
        self.cfg = cfg
        self.use_data(data, diffusion, cfg.class_dropout_prob, rank, world)
        self.grad_clip = cfg.grad_clip
        self.net = attach_weight_update(model, cfg)
        self.model = self.net.model
        self.net.to(device)
        self.history = []
        self.rank = rank
        self.engine = Engine(self, options or RunOptions(), rank, world, device, log)

    # The trainable tensors are read from the modules, not kept: FSDP replaces the parameters with sharded ones.
    @property
    def weights(self):
        """The recoverability update (LoRA, or the unfrozen weights): what is trainable in the model."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def gate_params(self):
        return list(self.net.gates.parameters())

    @property
    def trainable(self):
        return self.weights + self.gate_params

    # --- what the engine asks --------------------------------------------------------------------
    def param_groups(self):
        groups = [{"params": self.weights, "lr": self.cfg.lr},
                  {"params": self.gate_params, "lr": self.cfg.lr * self.cfg.gate_lr_mult}]
        return [g for g in groups if g["params"]]

    def clip_params(self):
        return self.weights

    def ema_pairs(self):
        return [p.detach().clone() for p in self.trainable], self.trainable  # EMA of all trainable state, gates too

    def ema_decay(self, step):
        return self.cfg.ema_decay

    def inputs(self, gen, step):
        """The data and diffusion draws, then the Gumbel noise: per block, uniforms over its candidates."""
        n = self.cfg.global_batch_size
        return [*super().inputs(gen, step),
                *[torch.rand(n, len(l), generator=gen, device=gen.device)[self.part] for l in self.gate_params]]

    def loss(self, net, inputs, step):
        x, y, t, noise, drop, *uniforms = inputs
        tau = self.cfg.tau(step)
        terms = self.diffusion.training_losses(
            lambda xt, tt: to_float(net(xt, tt, y, drop, uniforms, tau, self.cfg.scaling)), x, t, noise)
        return terms["loss"].mean(), {}

    def state(self):
        return {**super().state(), "history": self.history}

    def load_state(self, s):
        super().load_state(s)
        self.history = s["history"]

    def on_log(self, step, entry):
        probs = self.probabilities()
        entry["tau"] = round(self.cfg.tau(step - 1), 4)
        entry["min_conf"] = round(min(p.max().item() for p in probs), 5)
        self.history.append({
            "step": step, "tau": entry["tau"], "loss": entry.get("loss", float("nan")),
            "probs": [[round(v, 5) for v in p.tolist()] for p in probs],
            "confidence": [round(p.max().item(), 5) for p in probs],
            "choice": self.decision(),
        })

    # --- the decision ----------------------------------------------------------------------------
    def ema_logits(self):
        """The gates' EMA logits, whole (under FSDP a gather: every rank calls it)."""
        return [full(l) for l in self.engine.ema[len(self.weights):]]

    def decision(self):
        return [int(l.argmax()) for l in self.ema_logits()]

    def probabilities(self):
        return [torch.softmax(l.float() * self.cfg.scaling, 0) for l in self.ema_logits()]

    def run(self, ckpt_path=None, progress=True):
        self.engine.show_progress = progress and self.rank == 0
        self.engine.run(ckpt_path)
        return self.decision()
