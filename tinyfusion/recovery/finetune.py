"""The recovery task: plain fine-tuning, logits KD or Masked KD of a pruned student against its teacher.

As the paper: AdamW (lr 2e-4, no weight decay) with a per-step cosine down to 1e-4, gradient clip 1.0,
an EMA of the weights that is what gets sampled and saved, class-label dropout. The loop is the shared
training engine (`tinyfusion.training`), whose seeded generator draws over the global batch, so DDP
and resumed runs reproduce a single uninterrupted process. The teacher runs under the same autocast as
the student, without gradients.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.stack import block_stack
from ..training import Engine, RunOptions
from ..training.denoising import DenoisingTask
from ..training.precision import to_float
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


class WithHiddenStates(nn.Module):
    """A forward that also returns the hidden outputs of chosen blocks (one module, so DDP syncs it)."""

    def __init__(self, model, layers):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, x, t, y, drop):
        with block_stack(self.model).recording(self.layers) as rec:
            out = self.model(x, t, y, force_drop_ids=drop)
        return to_float(out), [rec[i][1].float() for i in self.layers]


class Recovery(DenoisingTask):
    name = "recover"
    hint = "lower --lr or the KD weights"

    def __init__(self, student, teacher, pairs, diffusion, data, cfg: FinetuneConfig, rank=0, world=1, device="cpu",
                 options=None, log=None):
        self.cfg = cfg
        self.use_data(data, diffusion, student.config.class_dropout_prob, rank, world)
        self.name = f"recover ({cfg.kd})"
        self.grad_clip = cfg.grad_clip
        self.model = self.student = student.to(device).train()
        self.ema = copy.deepcopy(student).eval().requires_grad_(False)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        self.pairs = pairs if cfg.kd == "masked" else []
        self.net = WithHiddenStates(self.student, [s for s, _ in self.pairs])
        self.teacher_net = WithHiddenStates(self.teacher, [t for _, t in self.pairs]) if self.teacher is not None else None
        self.engine = Engine(self, options or RunOptions(), rank, world, device, log)

    # --- what the engine asks --------------------------------------------------------------------
    def param_groups(self):  # read from the module: FSDP replaces the parameters with sharded ones
        frozen = block_stack(self.student).frozen
        return [{"params": [p for n, p in self.student.named_parameters() if n not in frozen], "lr": self.cfg.lr}]

    def teacher_nets(self):
        return [] if self.teacher is None else [(self.teacher_net, block_stack(self.teacher).blocks)]

    def ema_module(self):
        return self.ema

    def lrs(self, step):
        return [self.cfg.lr_at(step)]

    def ema_pairs(self):
        return list(self.ema.parameters()), list(self.student.parameters())

    def ema_decay(self, step):
        return self.cfg.ema_at(step)

    def loss(self, net, inputs, step):
        x, y, t, noise, drop = inputs
        cfg, w = self.cfg, self.cfg.weights
        captured = {}

        def student_fn(xt, tt):
            out, hidden = net(xt, tt, y, drop)
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
            loss = loss + w.beta(step / max(cfg.steps - 1, 1)) * rep
        return loss, parts

    # --- the run ---------------------------------------------------------------------------------
    def run(self, state_path=None, snapshot=None, snapshot_steps=()):
        """Train to cfg.steps; `snapshot(ema, step)` is called on rank 0 at each of snapshot_steps."""
        wanted = set(snapshot_steps)

        def on_step(step):
            if snapshot is not None and step in wanted:
                ema = self.engine.ema_model()  # under FSDP a gather every rank joins
                if self.engine.rank == 0:
                    snapshot(ema, step)

        self.engine.run(state_path, on_step)
        return self.engine.ema_model()
