"""Tasks that train a denoiser on data: the shared data-and-draws part, and plain training from scratch
(DiT, SiT or MAR on its objective, with an EMA)."""
import copy
from dataclasses import asdict, dataclass

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


RUN_FIELDS = ("steps", "log_every", "ckpt_every", "max_bad_steps")  # a resumed run may change these


class DenoisingTask(Task):
    """A task whose step is a batch of data plus the diffusion draws for it (timesteps, noise, label
    dropout) over the global batch, this rank's slice; its resumable state is the data position."""

    def use_data(self, data, diffusion, dropout, rank, world):
        self.data, self.diffusion, self.dropout = data, diffusion, dropout
        local = self.cfg.global_batch_size // world
        self.part = slice(rank * local, (rank + 1) * local)

    def settings(self):
        return {k: v for k, v in asdict(self.cfg).items() if k not in RUN_FIELDS}

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


class DenoiserTraining(DenoisingTask):
    name = "train"

    def __init__(self, model, diffusion, data, cfg: TrainConfig, rank=0, world=1):
        self.cfg = cfg
        self.use_data(data, diffusion, model.config.class_dropout_prob, rank, world)
        self.model = self.net = model.train()
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.grad_clip, self.weight_decay = cfg.grad_clip, cfg.weight_decay

    def param_groups(self):  # read from the module: FSDP replaces the parameters with sharded ones
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.cfg.lr}]

    def ema_module(self):
        return self.ema

    def lrs(self, step):
        c = self.cfg
        return [c.lr * min(1.0, (step + 1) / c.warmup) if c.warmup else c.lr]

    def ema_pairs(self):
        return list(self.ema.parameters()), list(self.model.parameters())

    def ema_decay(self, step):
        return self.cfg.ema_decay

    def settings(self):
        return {**super().settings(), "config": self.model.config.to_dict()}

    def loss(self, net, inputs, step):
        x, y, t, noise, drop = inputs
        terms = self.diffusion.training_losses(lambda xt, tt: to_float(net(xt, tt, y, force_drop_ids=drop)), x, t, noise)
        return terms["loss"].mean(), {}
