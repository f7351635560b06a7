"""Many samples into one ADM-format .npz (`arr_0`: uint8, NHWC, RGB), on one process or many.

The global sample indices are cut into chunks of `batch_size`; chunk i goes to rank i % world, draws its
noise from seed + i and its labels from a fixed seeded spread of the classes, so the result depends on
neither the number of ranks nor interruptions. Each finished chunk is a file in OUT.npz.parts/ (written
atomically, kept on a rerun: that is the resume); rank 0 packs them in order into OUT.npz at the end.
"""
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..diffusion import sample
from ..errors import UserError


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


def check_record(folder, record, rank=0):
    """The parts folder records what made its chunks (checkpoint, sampler settings, sizes, precision); a
    rerun reuses them only when that matches, else one line naming what differs (reused chunks of another
    checkpoint or setting would pack into a wrong .npz silently). Rank 0 writes the record."""
    from ..training.run_folder import RECORD, differing, read_record, write_record

    earlier = read_record(folder) if os.path.isdir(folder) else None
    if earlier is not None:
        diff = differing(record, earlier)
        if diff:
            raise UserError(f"{folder} holds chunks of another run (its {', '.join(diff)} differ from this one's, "
                            f"see {RECORD} there); remove the folder to start over")
    elif rank == 0:
        os.makedirs(folder, exist_ok=True)
        write_record(folder, record)


def sample_to_npz(model, num_samples, settings, batch_size, out, rank=0, world=1, decode=None, progress=True,
                  record=None):
    """Write this rank's chunks; rank 0 (after the caller's barrier) packs them with `pack_npz`. `record`:
    what makes these samples (see check_record), kept beside the chunks."""
    c = model.config
    labels = spread_labels(num_samples, c.num_classes, settings["seed"])
    shape = (c.in_channels, c.input_size, c.input_size)
    gc = None if settings["guidance_channels"] == "all" else 3
    folder = parts_dir(out)
    os.makedirs(folder, exist_ok=True)
    if record is not None:
        check_record(folder, {**record, "settings": settings, "num_samples": num_samples, "batch_size": batch_size}, rank)
    chunks = [i for i in range(-(-num_samples // batch_size)) if i % world == rank]
    todo = [i for i in chunks if not os.path.isfile(chunk_path(folder, i))]
    with tqdm(total=len(todo) * settings["steps"], desc=f"sampling (rank {rank})", dynamic_ncols=True,
              disable=not progress) as bar:
        for i in todo:
            chunk = labels[i * batch_size:(i + 1) * batch_size]
            x = sample(model, chunk.to(next(model.parameters()).device), shape, settings["name"], settings["steps"],
                       settings["cfg_scale"], gc, seed=settings["seed"] + i, progress=bar)
            if decode is not None:  # on the model's device, before the copy to the host
                x = decode(x)
            images = to_uint8_nhwc(x.float().cpu())
            atomic_write(chunk_path(folder, i), lambda tmp: np.savez(open(tmp, "wb"), images=images,
                                                                      labels=chunk.numpy()))
    return len(chunks) - len(todo)


def chunk_path(folder, i):
    return os.path.join(folder, f"chunk{i:06d}.npz")


def pack_npz(out, num_samples, batch_size):
    """Every chunk in index order into OUT.npz (arr_0 images, arr_1 labels), streamed: one chunk in memory at
    a time, not every chunk and their concatenation (2 x 9.8 GB for 50K samples at 256 px). The file is
    what np.savez writes (a stored zip of .npy members), so numpy and the ADM evaluator read it as one."""
    folder = parts_dir(out)
    paths = [chunk_path(folder, i) for i in range(-(-num_samples // batch_size))]
    with np.load(paths[0]) as part:
        image_shape, label_dtype = part["images"].shape[1:], part["labels"].dtype
    shape = (num_samples, *image_shape)

    def chunks(key):
        for p in paths:
            with np.load(p) as part:
                yield part[key]

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, dtype, full, key in (("arr_0", np.uint8, shape, "images"), ("arr_1", label_dtype, (num_samples,), "labels")):
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": full}
                    np.lib.format.write_array_header_1_0(f, header)
                    written = 0
                    for part in chunks(key):
                        f.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
                        written += len(part)
                    if written != num_samples:
                        raise UserError(f"{folder}: the chunks hold {written} samples, not {num_samples}")

    atomic_write(out, write)
    return shape
