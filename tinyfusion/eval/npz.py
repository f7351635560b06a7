"""Many samples into one ADM-format .npz (`arr_0`: uint8, NHWC, RGB), on one process or many.

The global sample indices are cut into chunks of `batch_size`; chunk i goes to rank i % world, draws its
noise from seed + i and its labels from a fixed seeded spread of the classes, so the result depends on
neither the number of ranks nor interruptions. Each finished chunk is a file in OUT.npz.parts/ (written
atomically, kept on a rerun: that is the resume); rank 0 packs them in order into OUT.npz at the end.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..diffusion import sample


def spread_labels(num_samples, num_classes, seed=0):
    """Every class num_samples / num_classes times (+-1), in a seeded random order."""
    labels = torch.arange(num_samples) % num_classes
    return labels[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]


def to_uint8(images):
    """[-1, 1] -> uint8 pixel values (0..255), rounded."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(images):
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3); 1-channel images are repeated to RGB for Inception."""
    x = to_uint8(images)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def parts_dir(out):
    return out + ".parts"


def sample_to_npz(model, num_samples, settings, batch_size, out, rank=0, world=1, decode=None, progress=True):
    """Write this rank's chunks; rank 0 (after the caller's barrier) packs them with `pack_npz`."""
    c = model.config
    labels = spread_labels(num_samples, c.num_classes, settings["seed"])
    shape = (c.in_channels, c.input_size, c.input_size)
    gc = None if settings["guidance_channels"] == "all" else 3
    folder = parts_dir(out)
    os.makedirs(folder, exist_ok=True)
    chunks = [i for i in range(-(-num_samples // batch_size)) if i % world == rank]
    todo = [i for i in chunks if not os.path.isfile(chunk_path(folder, i))]
    with tqdm(total=len(todo) * settings["steps"], desc=f"sampling (rank {rank})", dynamic_ncols=True,
              disable=not progress) as bar:
        for i in todo:
            chunk = labels[i * batch_size:(i + 1) * batch_size]
            x = sample(model, chunk.to(next(model.parameters()).device), shape, settings["name"], settings["steps"],
                       settings["cfg_scale"], gc, seed=settings["seed"] + i, progress=bar).cpu()
            if decode is not None:
                x = decode(x)
            images = to_uint8_nhwc(x)
            atomic_write(chunk_path(folder, i), lambda tmp: np.savez(open(tmp, "wb"), images=images,
                                                                      labels=chunk.numpy()))
    return len(chunks) - len(todo)


def chunk_path(folder, i):
    return os.path.join(folder, f"chunk{i:06d}.npz")


def pack_npz(out, num_samples, batch_size):
    """Concatenate every chunk in index order into OUT.npz (arr_0 images, arr_1 labels)."""
    folder = parts_dir(out)
    images, labels = [], []
    for i in range(-(-num_samples // batch_size)):
        with np.load(chunk_path(folder, i)) as part:
            images.append(part["images"])
            labels.append(part["labels"])
    images, labels = np.concatenate(images), np.concatenate(labels)
    atomic_write(out, lambda tmp: np.savez(open(tmp, "wb"), arr_0=images, arr_1=labels))
    return images.shape
