"""The embedded dataset: scikit-learn's 1797 real 8x8 handwritten digits (shipped with scikit-learn, offline)."""
import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digits_tensors(image_size=8):
    """Images (N, 1, S, S) scaled to [-1, 1] and labels (N,) int64; optionally bilinearly upsampled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(data.target.astype(np.int64))


def train_test_split(n, test_fraction=0.2, seed=0):
    """A fixed, seeded index split (used by the metrics classifier)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]
