"""Pre-extracted latents, in either of two layouts:

- files (the official one): `<root>/<name>_features/<i>.npy` + `<root>/<name>_labels/<i>.npy`;
- shards (ours, for speed): `<root>/<name>_shards/features-rRRR.npy` (N, K, C, H, W) memory-mapped,
  with `labels-rRRR.npy` (N,) and `filled-rRRR.npy` (N,) beside each, as `extract_features --layout
  shards` writes them (one shard per rank). Opening one is three reads, not 2N file opens.

Each sample holds one latent (C, H, W) or a stack (K, C, H, W), e.g. the image and its horizontal flip;
the sampler hands each index a seeded draw that picks one of the K (the official code uses an unseeded
np.random), so data order and flips replay exactly on K ranks and after a resume.
"""
import glob
import io
import os

import numpy as np
import torch

from ..errors import UserError


def find_layout(root):
    """('shards', folder) or ('files', features folder, labels folder)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: data folder does not exist")
    shards = sorted(glob.glob(os.path.join(root, "*_shards")))
    if shards and glob.glob(os.path.join(shards[0], "features-*.npy")):
        return ("shards", shards[0])
    feats = sorted(glob.glob(os.path.join(root, "*_features")))
    if not feats:
        raise UserError(f"{root}: no '*_features' folder (expected <name>_features/ and <name>_labels/, or <name>_shards/)")
    labels = feats[0][: -len("_features")] + "_labels"
    if not os.path.isdir(labels):
        raise UserError(f"{root}: {os.path.basename(feats[0])} has no matching {os.path.basename(labels)} folder")
    return ("files", feats[0], labels)


def shard_files(folder):
    """(features, labels, filled) paths of every shard in folder, in rank order."""
    out = []
    for f in sorted(glob.glob(os.path.join(folder, "features-*.npy"))):
        tag = os.path.basename(f)[len("features-"):]
        out.append((f, os.path.join(folder, f"labels-{tag}"), os.path.join(folder, f"filled-{tag}")))
    return out


def read_labels(folder, names, threads=16):
    """Every one-integer label file of the official layout. A pool of threads only reads the bytes (file
    opens, not compute, are the cost); the .npy headers are parsed here, once per distinct header: numpy
    parses them with `ast`, which CPython 3.11 does not make safe across threads (it raised "AST
    constructor recursion depth mismatch" under the pool)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(name):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                return f.read(4096)  # a label file is a header and one integer
        except OSError as e:
            raise UserError(f"{path}: not a label file ({e})") from None

    layouts = {}  # header bytes -> (dtype, data offset)

    def value(name, data):
        try:
            start = {1: 10, 2: 12, 3: 12}[data[6]] if data[:6] == b"\x93NUMPY" else None
            if start is None:
                raise ValueError("no .npy magic")
            size = int.from_bytes(data[8:start], "little")
            header = data[:start + size]
            if header not in layouts:
                first = np.load(io.BytesIO(data))
                if not first.size:
                    raise ValueError("an empty array")
                layouts[header] = (first.dtype, len(header))
            dtype, offset = layouts[header]
            return int(np.frombuffer(data, dtype=dtype, count=1, offset=offset)[0])
        except (ValueError, IndexError, KeyError, TypeError, SyntaxError) as e:
            raise UserError(f"{os.path.join(folder, name)}: not a label file ({e or type(e).__name__})") from None

    with ThreadPoolExecutor(threads) as pool:
        return np.fromiter((value(n, d) for n, d in zip(names, pool.map(read, names, chunksize=256))),
                           dtype=np.int64, count=len(names))


class LatentFolder(torch.utils.data.Dataset):
    def __init__(self, root, num_classes=None):
        self.layout = find_layout(root)
        self.num_classes = num_classes
        self._arrays = None  # shard memory maps, opened lazily in each worker process
        if self.layout[0] == "files":
            _, self.features_dir, self.labels_dir = self.layout
            self.names = sorted(n for n in os.listdir(self.features_dir) if n.endswith(".npy") and not n.startswith("."))
            if not self.names:
                raise UserError(f"{self.features_dir}: no .npy files")
            have = set(os.listdir(self.labels_dir))  # one listing, not one stat per sample
            missing = [n for n in self.names if n not in have]
            if missing:
                raise UserError(f"{self.labels_dir}: no label file for {len(missing)} features (e.g. {missing[0]})")
            self.size = len(self.names)
            self.labels = read_labels(self.labels_dir, self.names)  # checked now, before loader workers start
            self.check_labels(self.labels, f"{self.labels_dir}: a label")
        else:
            self.shards = shard_files(self.layout[1])
            labels = []
            for feats, labs, filled in self.shards:
                if not (os.path.isfile(labs) and os.path.isfile(filled)):
                    raise UserError(f"{feats}: its labels or filled file is missing (rerun extract_features)")
                done = np.load(filled)
                if not done.all():
                    raise UserError(f"{feats}: {int((~done).sum())} of {len(done)} latents not written yet "
                                    "(rerun extract_features to finish it)")
                labels.append(np.load(labs).astype(np.int64))
            self.labels = np.concatenate(labels)
            self.offsets = np.cumsum([0, *[len(l) for l in labels]])
            self.size = len(self.labels)
            if not self.size:
                raise UserError(f"{self.layout[1]}: the shards hold no latents")
            self.check_labels(self.labels, f"{self.layout[1]}: a label")
        self.latent_shape = tuple(self.features(0).shape[1:])

    def __len__(self):
        return self.size

    def check_labels(self, y, where):
        bad = (y < 0) | (y >= self.num_classes) if self.num_classes is not None else (y < 0)
        if np.any(bad):
            raise UserError(f"{where} {int(np.asarray(y).reshape(-1)[np.argmax(bad)])} is outside 0..{self.num_classes - 1}")

    def features(self, i):
        if self.layout[0] == "files":
            x = np.load(os.path.join(self.features_dir, self.names[i]))
        else:
            if self._arrays is None:
                self._arrays = [np.load(f, mmap_mode="r") for f, _, _ in self.shards]
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            x = self._arrays[s][i - self.offsets[s]]
        return x[None] if x.ndim == 3 else x

    def label(self, i):
        return int(self.labels[i])

    def __getitem__(self, item):
        """item: an index, or (index, draw) from the sampler; the draw picks one of the stacked latents."""
        i, draw = item if isinstance(item, tuple) else (item, 0)
        x = self.features(i)
        if tuple(x.shape[1:]) != self.latent_shape:
            where = os.path.join(self.features_dir, self.names[i]) if self.layout[0] == "files" else f"latent {i}"
            raise UserError(f"{where}: shape {tuple(x.shape[1:])}, the folder's first latent has {self.latent_shape}")
        return torch.from_numpy(np.array(x[draw % len(x)], dtype=np.float32)), self.label(i)  # a copy, off the memory map
