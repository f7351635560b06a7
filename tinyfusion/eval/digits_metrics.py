"""Digits metrics: class accuracy, digits-FID beside the real-vs-real floor, precision and recall.

The floor: the real set is split at random into two disjoint halves A and B, and FID(A, B) is what a
perfect generator would score; one split is noisy, so it is averaged over `splits` random splits. The
splits come from a generator of their own, so the floor depends on the real set and the seed only, never
on the number of samples. The samples are scored against each split's B: FID(min(N, |A|) samples, B),
averaged. At N >= |A| (898 of the 1797 digits) that is the floor's footing, |A| against |B|; below it the
FID compares N samples with |B| reals and is biased upward (FID's bias grows as the sample count falls),
so FIDs are comparable at equal sample counts only.
"""
import numpy as np
import torch

from ..data import load_digits_tensors
from .classifier import embed_and_classify, load_classifier
from .stats import fid_from_features, precision_recall


MIN_SAMPLES = 20  # 2 per class: the FID needs a covariance, precision/recall a k-th (3rd) neighbour
FOOTING = 898  # half the real set: from this many samples on, the FID stands on the floor's footing


def check_sample_count(n, flag="--samples"):
    """One line for a digits evaluation too small to measure, before any sampling (or training) runs."""
    from ..errors import UserError

    if n < MIN_SAMPLES:
        raise UserError(f"{flag} {n}: a digits evaluation needs at least {MIN_SAMPLES} samples "
                        "(its FID and k-NN precision/recall are undefined below that)")
    if n < FOOTING:
        print(f"note: {flag} {n} is below {FOOTING}: the digits-FID then compares {n} samples with {FOOTING + 1} "
              f"reals and reads higher than at {FOOTING}+ samples (the floor's footing); compare FIDs at equal "
              "sample counts", flush=True)


def digits_metrics(samples, labels, splits=20, seed=0, k=3, classifier=None):
    """samples (N, 1, H, W) in [-1, 1], labels (N,) -> dict of metrics."""
    net = classifier or load_classifier()
    real_x, _ = load_digits_tensors()
    real_f, _ = embed_and_classify(net, real_x)
    fake_f, pred = embed_and_classify(net, samples.clamp(-1, 1))
    real_f, fake_f = real_f.numpy(), fake_f.numpy()
    split_rng, pick_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    half = len(real_f) // 2
    floor, fid = [], []
    for _ in range(splits):
        perm = split_rng.permutation(len(real_f))
        a, b = real_f[perm[:half]], real_f[perm[half:]]
        floor.append(fid_from_features(a, b))
        pick = pick_rng.choice(len(fake_f), size=min(half, len(fake_f)), replace=False)
        fid.append(fid_from_features(fake_f[pick], b))
    precision, recall = precision_recall(real_f, fake_f, k=k)
    floor_mean = float(np.mean(floor))
    return {
        "digits_fid": float(np.mean(fid)),
        "digits_fid_std": float(np.std(fid)),
        "real_floor_fid": floor_mean,
        "real_floor_std": float(np.std(floor)),
        "fid_over_floor": float(np.mean(fid)) / floor_mean,
        "class_accuracy": float((pred == labels.to(pred.device)).double().mean()),
        "precision": precision,
        "recall": recall,
        "samples": int(len(samples)),
        "floor_splits": splits,
    }


def format_metrics(m):
    return (f"digits-FID {m['digits_fid']:.3f} ± {m['digits_fid_std']:.3f}   "
            f"real-vs-real floor {m['real_floor_fid']:.3f} ± {m['real_floor_std']:.3f}   "
            f"(ratio {m['fid_over_floor']:.2f})\n"
            f"class accuracy {m['class_accuracy']:.4f}   precision {m['precision']:.3f}   recall {m['recall']:.3f}   "
            f"({m['samples']} samples)")


def balanced_labels(n, num_classes, device="cpu"):
    """n labels cycling through the classes (100 per class for n=1000)."""
    return torch.arange(n, device=device) % num_classes
