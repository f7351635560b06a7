"""The embedded dataset: scikit-learn's 1797 real 8x8 handwritten digits (shipped with scikit-learn, offline)."""
import functools
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """(images (1797, 8, 8) in 0..16, labels): read from the file scikit-learn ships, as its load_digits does,
    without importing scikit-learn (1.7 s of every training process's start-up, for a 24 ms read)."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout: scikit-learn's own reader

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def load_digits_tensors(image_size=8):
    """Images (N, 1, S, S) scaled to [-1, 1] and labels (N,) int64; optionally bilinearly upsampled."""
    images, labels = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(labels.copy())


def train_test_split(n, test_fraction=0.2, seed=0):
    """A fixed, seeded index split (used by the metrics classifier)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]
