"""Depth-pruning baselines: each returns the sorted source indices it keeps.

Importance scores are measured on the calibration set's *noised* inputs at t over the full 1000-step
range (the official ShortGPT script feeds clean latents and t from the respaced [0, 250) range).
"""
import numpy as np
import torch

from ..errors import UserError
from ..models.stack import block_stack
from .calibration import calibration_loss


@torch.no_grad()
def block_io_scores(model, diffusion, calib, batch_size=256):
    """Per block: mean token cosine similarity and mean squared error between its input and output."""
    model.eval()
    device = next(model.parameters()).device
    stack = block_stack(model)
    depth = stack.depth
    # accumulated on the model's device (a CPU accumulator cannot take CUDA values); one sync at the end
    cos, mse, n = torch.zeros(depth, dtype=torch.float64, device=device), torch.zeros(depth, dtype=torch.float64, device=device), 0
    for x0, y, t, noise in calib.chunks(batch_size, device):
        xt = diffusion.q_sample(x0, t, noise)
        with stack.recording(range(depth), inputs=True) as rec:
            model(xt, diffusion.model_timesteps(t), y)
        for i, (h, out) in rec.items():
            cos[i] += torch.nn.functional.cosine_similarity(h, out, dim=-1).mean(-1).double().sum()
            mse[i] += ((out - h) ** 2).mean((1, 2)).double().sum()
        n += len(x0)
    return (cos / n).tolist(), (mse / n).tolist()


def keep_top(scores, k):
    """Indices of the k largest scores, sorted."""
    return sorted(int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k])


def block_influence(model, diffusion, calib, k):
    """ShortGPT: BI = 1 - cos(in, out); keep the k most influential blocks."""
    cos, _ = block_io_scores(model, diffusion, calib)
    bi = [1 - c for c in cos]
    return keep_top(bi, k), {"block_influence": bi}


def fluxlite(model, diffusion, calib, k):
    """Flux-Lite: drop the blocks whose input-to-output MSE is smallest."""
    _, mse = block_io_scores(model, diffusion, calib)
    return keep_top(mse, k), {"io_mse": mse}


def sensitivity(model, diffusion, calib, k, progress=None):
    """Remove one layer at a time; keep the k whose removal raises the calibration loss most."""
    depth = block_stack(model).depth
    base = calibration_loss(model, diffusion, calib)
    rise = []
    for i in range(depth):
        rise.append(calibration_loss(model, diffusion, calib, kept=[j for j in range(depth) if j != i]) - base)
        if progress is not None:
            progress.update(1)
    return keep_top(rise, k), {"loss_without_layer": [base + r for r in rise], "full_model_loss": base}


def oracle(depth, k):
    """BK-SDM's hand pattern, as the paper's 'uniform' baseline: first half keeps the first of each pair,
    second half the last of each pair (28 -> 14: 0, 2, ..., 12, 15, 17, ..., 27)."""
    if depth % 4 or k * 2 != depth:
        raise UserError(f"--method oracle halves a depth divisible by 4 (got depth {depth}, target {k})")
    half = depth // 2
    return list(range(0, half, 2)) + list(range(half + 1, depth, 2))


def keeps_every_stack(kept, depths):
    bounds = np.cumsum([0, *depths])
    return all(any(lo <= i < hi for i in kept) for lo, hi in zip(bounds[:-1], bounds[1:]))


def count_valid_masks(depths, k):
    """k-of-sum(depths) masks that keep a block in every stack (inclusion-exclusion over emptied stacks)."""
    from itertools import combinations
    from math import comb

    depth = sum(depths)
    return sum((-1) ** r * comb(depth - sum(s), k) for r in range(len(depths) + 1) for s in combinations(depths, r))


def random_mask(depth, k, seed, depths=None):
    """A seeded random k-of-depth mask; with several stacks (`depths`), one that keeps every stack alive."""
    g = np.random.default_rng(seed)
    while True:
        kept = sorted(int(i) for i in g.choice(depth, size=k, replace=False))
        if keeps_every_stack(kept, depths or [depth]):
            return kept


def random_search(model, diffusion, calib, depth, k, candidates, seed, progress=None, depths=None):
    """Score `candidates` random k-of-depth masks (each keeping every stack of `depths` alive); return the
    min-, median- and max-loss ones."""
    g = np.random.default_rng(seed)
    seen, scored = set(), []
    depths = depths or [depth]
    total = min(candidates, count_valid_masks(depths, k))
    while len(scored) < total:
        kept = tuple(sorted(int(i) for i in g.choice(depth, size=k, replace=False)))
        if kept in seen or not keeps_every_stack(kept, depths):
            continue
        seen.add(kept)
        scored.append((calibration_loss(model, diffusion, calib, kept=list(kept)), list(kept)))
        if progress is not None:
            progress.update(1)
    scored.sort()
    picks = {"min": scored[0], "median": scored[len(scored) // 2], "max": scored[-1]}
    return picks, [s for s, _ in scored]
