"""Endless batches for training and pruning: the in-memory digits set, or a latent folder (DDP-sharded)."""
import torch

from ..errors import UserError


def draw_step_noise(gen, global_batch, part, shape, num_timesteps, dropout):
    """Timesteps, noise and label-dropout flags for the whole global batch from one generator, sliced to
    this rank's part, so K ranks (and resumed runs) see exactly what one uninterrupted process would."""
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen)[part]
    noise = torch.randn((global_batch, *shape), generator=gen)[part]
    drop = (torch.rand(global_batch, generator=gen) < dropout).long()[part]
    return t, noise, drop


class DigitsBatches:
    """Random batches from the in-memory digits set.

    Every rank draws the same global batch from one seeded generator and keeps its own slice, so K ranks
    see exactly the data one process would; the generator state makes a resumed run continue identically.
    """

    def __init__(self, global_batch, seed, rank=0, world=1):
        from .digits import load_digits_tensors

        self.x, self.y = load_digits_tensors()
        self.global_batch, self.local = global_batch, global_batch // world
        self.part = slice(rank * self.local, (rank + 1) * self.local)
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        idx = torch.randint(len(self.x), (self.global_batch,), generator=self.g)[self.part]
        return self.x[idx], self.y[idx]

    def state(self):
        return self.g.get_state()

    def load_state(self, state):
        self.g.set_state(state)


class LatentBatches:
    """Batches of `batch` latents per rank from a DistributedSampler over the folder."""

    def __init__(self, path, batch, seed, rank, world, num_classes, workers, latent_shape):
        from .latents import LatentFolder

        ds = LatentFolder(path, num_classes)
        if any(want is not None and want != have for want, have in zip(latent_shape, ds.latent_shape)):
            raise UserError(f"{path}: latents are {ds.latent_shape}, the model expects {latent_shape} (check --image-size)")
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
        if len(self.loader) == 0:
            raise UserError(f"{path}: fewer latents ({len(ds)}) than one batch per rank ({batch})")
        self.sampler, self.epoch, self.it = sampler, 0, None

    def next(self):
        while True:
            if self.it is None:
                self.sampler.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.epoch, self.it = self.epoch + 1, None

    def state(self):
        return torch.tensor([self.epoch])

    def load_state(self, state):
        self.epoch, self.it = int(state[0]), None  # resumes at the start of the saved epoch


def make_batches(model_config, data_path=None, global_batch=128, seed=0, rank=0, world=1, num_workers=2):
    """Digits batches for a digits model, latent-folder batches when data_path is given."""
    c = model_config
    if data_path:
        return LatentBatches(data_path, global_batch // world, seed, rank, world, c.num_classes, num_workers,
                             (c.in_channels, c.input_size, c.input_size))
    if (c.in_channels, c.input_size, c.num_classes) != (1, 8, 10):
        raise UserError("the model is not a digits model (1 channel, 8x8, 10 classes); give --data-path with latents for it")
    return DigitsBatches(global_batch, seed, rank, world)
