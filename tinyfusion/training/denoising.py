"""The plain training task: a denoiser (DiT, SiT or MAR) from scratch on its objective, with an EMA."""
import copy
from dataclasses import dataclass

from ..data.batches import draw_step_noise
from .engine import Task
from .precision import to_float


@dataclass
class TrainConfig:
    steps: int
    global_batch_size: int
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    max_bad_steps: int = 20


class DenoiserTraining(Task):
    name = "train"

    def __init__(self, model, diffusion, data, cfg: TrainConfig, rank=0, world=1):
        self.cfg, self.diffusion, self.data = cfg, diffusion, data
        self.model = self.net = model.train()
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.grad_clip, self.weight_decay = cfg.grad_clip, cfg.weight_decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        local = cfg.global_batch_size // world
        self.part = slice(rank * local, (rank + 1) * local)
        self.dropout = model.config.class_dropout_prob

    def param_groups(self):
        return [{"params": self.params, "lr": self.cfg.lr}]

    def lrs(self, step):
        c = self.cfg
        return [c.lr * min(1.0, (step + 1) / c.warmup) if c.warmup else c.lr]

    def ema_pairs(self):
        return list(self.ema.parameters()), list(self.model.parameters())

    def ema_decay(self, step):
        return self.cfg.ema_decay

    def settings(self):
        c = self.cfg
        return {"lr": c.lr, "warmup": c.warmup, "weight_decay": c.weight_decay, "grad_clip": c.grad_clip,
                "ema_decay": c.ema_decay, "config": self.model.config.to_dict()}

    def state(self):
        return {"data": self.data.state()}

    def load_state(self, s):
        self.data.load_state(s["data"])

    def inputs(self, gen, step):
        x, y = self.data.next()
        x, y = x.to(gen.device, non_blocking=True), y.to(gen.device, non_blocking=True)
        t, noise, drop = draw_step_noise(gen, self.cfg.global_batch_size, self.part, tuple(x.shape[1:]),
                                         self.diffusion.num_timesteps, self.dropout)
        return [x, y, t, noise, drop]

    def loss(self, net, inputs, step):
        x, y, t, noise, drop = inputs
        terms = self.diffusion.training_losses(lambda xt, tt: to_float(net(xt, tt, y, force_drop_ids=drop)), x, t, noise)
        return terms["loss"].mean(), {}
