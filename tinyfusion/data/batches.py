"""Endless batches for training and pruning: the in-memory digits set, or a latent folder (DDP-sharded)."""
import os

import torch

from ..errors import UserError


def draw_step_noise(gen, global_batch, part, shape, num_timesteps, dropout):
    """Timesteps, noise and label-dropout flags for the whole global batch from one generator, sliced to
    this rank's part, so K ranks (and resumed runs) see exactly what one uninterrupted process would."""
    d = gen.device  # drawn where the generator lives: the training device, no host-to-device copy
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=d)[part]
    noise = torch.randn((global_batch, *shape), generator=gen, device=d)[part]
    drop = (torch.rand(global_batch, generator=gen, device=d) < dropout).long()[part]
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


def default_workers(device=None):
    """Loader workers: none on the CPU (the model needs the cores), up to 8 per GPU process on CUDA."""
    if not torch.cuda.is_available():
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // per_node - 1))


def worker_message(text):
    """The original one-line message inside a DataLoader worker's wrapped traceback (or the text itself)."""
    lines = [l for l in text.splitlines() if "UserError: " in l]
    return lines[-1].split("UserError: ", 1)[1] if lines else text


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Each epoch one seeded permutation cut into global batches; this rank yields its slice of each.

    A rank's slice of global batch j is perm[j*B + r*L : j*B + (r+1)*L], so K ranks together see exactly
    the batches one process would. Each index comes with a seeded draw (which stacked latent, e.g. flip).
    `position` (epoch, batch) lets a resumed run continue inside an epoch."""

    def __init__(self, size, global_batch, seed, rank, world):
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.local = global_batch // world
        self.offset = rank * self.local
        self.batches = size // global_batch
        self.epoch, self.start = 0, 0

    def __len__(self):
        return (self.batches - self.start) * self.local

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        draws = torch.randint(0, 2**31 - 1, (self.size,), generator=g)
        for j in range(self.start, self.batches):
            for i in perm[j * self.global_batch + self.offset: j * self.global_batch + self.offset + self.local].tolist():
                yield i, int(draws[i])


class FixedBatches:
    """The same (x, y) every step, wherever they live: benchmarks and checks that time or inspect the
    step itself, not the loader."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next(self):
        return self.x, self.y

    def state(self):
        return torch.zeros(1)

    def load_state(self, state):
        pass


class LatentBatches:
    """Batches of global_batch // world latents per rank from a latent folder (either layout)."""

    def __init__(self, path, global_batch, seed, rank, world, num_classes, workers, latent_shape):
        from .latents import LatentFolder

        ds = LatentFolder(path, num_classes)
        if any(want is not None and want != have for want, have in zip(latent_shape, ds.latent_shape)):
            raise UserError(f"{path}: latents are {ds.latent_shape}, the model expects {latent_shape} (check --image-size)")
        if len(ds) < global_batch:
            raise UserError(f"{path}: fewer latents ({len(ds)}) than one batch ({global_batch})")
        workers = default_workers() if workers is None else workers
        self.sampler = GlobalBatchSampler(len(ds), global_batch, seed, rank, world)
        cuda = torch.cuda.is_available()
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=global_batch // world, sampler=self.sampler, num_workers=workers, drop_last=True,
            pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self.it, self.consumed = None, 0

    def next(self):
        s = self.sampler
        while True:
            if self.it is None:
                self.it, self.consumed = iter(self.loader), s.start
            try:
                batch = next(self.it)
            except StopIteration:
                s.epoch, s.start, self.it = s.epoch + 1, 0, None
                continue
            except UserError as e:  # raised in a loader worker: its message arrives wrapped in a traceback
                raise UserError(worker_message(str(e))) from None
            self.consumed += 1
            return batch

    def state(self):
        return torch.tensor([self.sampler.epoch, self.consumed])

    def load_state(self, state):
        s = self.sampler
        s.epoch, s.start = int(state[0]), int(state[1]) if len(state) > 1 else 0
        self.consumed, self.it = s.start, None


def make_batches(model_config, data_path=None, global_batch=128, seed=0, rank=0, world=1, num_workers=None):
    """Digits batches for a digits model, latent-folder batches when data_path is given."""
    c = model_config
    if data_path:
        return LatentBatches(data_path, global_batch, seed, rank, world, c.num_classes, num_workers,
                             (c.in_channels, c.input_size, c.input_size))
    if (c.in_channels, c.input_size, c.num_classes) != (1, 8, 10):
        raise UserError("the model is not a digits model (1 channel, 8x8, 10 classes); give --data-path with latents for it")
    return DigitsBatches(global_batch, seed, rank, world)
