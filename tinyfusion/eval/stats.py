"""Fréchet distance and k-NN precision/recall on feature sets (float64)."""
import numpy as np
import torch


def gaussian_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a symmetric
    PSD matrix, so symmetric eigendecompositions suffice (no complex sqrtm, no imaginary residue).
    """
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(a, b):
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _kth_radius(x, k):
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1 skips the point itself (distance 0)


def precision_recall(real, fake, k=3):
    """Improved precision/recall (Kynkäänniemi et al. 2019): k-NN balls around each set's points.

    precision: share of fake points inside some real point's k-NN ball; recall: the converse.
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None]).any(dim=1).double().mean().item()
    recall = (d.T <= r_fake[None]).any(dim=1).double().mean().item()
    return precision, recall
