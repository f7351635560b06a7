"""The ADM evaluator's protocol (openai/guided-diffusion `evaluations/evaluator.py`) without TensorFlow:
the sample/reference .npz format, Inception Score, and batched k-NN precision/recall that scale to
50,000 x 10,000 feature sets. FID and sFID are `stats.frechet_distance` over pool and spatial features.

`evaluate_npz` runs the whole protocol with the FID Inception network (`inception.py`).
"""
import numpy as np
import torch

from ..errors import UserError


def read_images(path, resolution=None):
    """arr_0 of an ADM-format .npz: uint8 (N, H, W, 3). Anything else is a one-line UserError."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npz ({e})") from None
    if "arr_0" not in data:
        raise UserError(f"{path}: no arr_0 (ADM batches keep their images in arr_0); keys: {sorted(data.keys())}")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3), NHWC RGB")
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        raise UserError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, the other batch's are "
                        f"{resolution}x{resolution}")
    return images


def reference_stats(path):
    """Precomputed (mu, sigma, mu_s, sigma_s) of an ADM reference batch, or None when it has none."""
    data = np.load(path)
    if "mu" not in data:
        return None
    return data["mu"], data["sigma"], data["mu_s"], data["sigma_s"]


def inception_score(probs, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of split_size samples, averaged (ADM / improved-GAN)."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sq_dists(a, b):
    return (a.pow(2).sum(1)[:, None] - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def knn_radii(features, k=3, batch=10000):
    """Squared distance of each point to its k-th nearest neighbour (the point itself excluded), computed
    where the features are (a tensor on the GPU stays there)."""
    x = features if torch.is_tensor(features) else torch.as_tensor(np.asarray(features), dtype=torch.float32)
    out = torch.empty(len(x), device=x.device)
    for i in range(0, len(x), batch):
        out[i:i + batch] = _sq_dists(x[i:i + batch], x).kthvalue(k + 1, dim=1).values
    return out


def _inside(points, centers, radii, batch):
    """For each point: is it inside some center's ball?"""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for i in range(0, len(points), batch):
        for j in range(0, len(centers), batch):
            d = _sq_dists(points[i:i + batch], centers[j:j + batch])
            inside[i:i + batch] |= (d <= radii[None, j:j + batch]).any(1)
    return inside


def precision_recall(ref, sample, k=3, batch=10000, device="cpu"):
    """ADM's improved precision/recall (k = 3): samples inside the reference manifold, and the converse;
    the distance blocks run on `device`."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32).to(device)
    sample = torch.as_tensor(np.asarray(sample), dtype=torch.float32).to(device)
    r_ref, r_sample = knn_radii(ref, k, batch), knn_radii(sample, k, batch)
    precision = _inside(sample, ref, r_ref, batch).double().mean().item()
    recall = _inside(ref, sample, r_sample, batch).double().mean().item()
    return precision, recall


def weights_fingerprint(model):
    """SHA-1 of every tensor of a network's state dict, in key order (about 0.2 s for Inception-v3)."""
    import hashlib

    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_reference_stats(ref_path, model, batch_size, device):
    """(mu, sigma, mu_s, sigma_s, pool features) of the reference batch. Precomputed statistics in the
    batch (ADM's reference batches carry them, over the whole dataset) are used as the ADM evaluator
    does; otherwise ours are computed once and cached beside it as REF.npz.tinyfusion-stats.npz."""
    import os

    from .inception import features
    from .stats import gaussian_stats

    images = read_images(ref_path)
    cache = ref_path + ".tinyfusion-stats.npz"
    key = weights_fingerprint(model)  # statistics of other Inception weights are not these
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(ref_path):
        with np.load(cache) as c:
            if "weights" in c and str(c["weights"]) == key:
                return c["mu"], c["sigma"], c["mu_s"], c["sigma_s"], c["pool"]
    pool, spatial, _ = features(model, images, batch_size, device)
    stats = reference_stats(ref_path) or (*gaussian_stats(pool), *gaussian_stats(spatial))
    tmp = f"{cache}.tmp{os.getpid()}.npz"
    np.savez(tmp, mu=stats[0], sigma=stats[1], mu_s=stats[2], sigma_s=stats[3], pool=pool, weights=np.array(key))
    os.replace(tmp, cache)
    return (*stats, pool)


def evaluate_npz(ref_path, sample_path, inception_path, batch_size=64, device="cpu"):
    """FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch."""
    from .inception import features, load_inception
    from .stats import frechet_distance, gaussian_stats

    ref_images = read_images(ref_path)  # the user's two files are checked before the weights are looked for
    samples = read_images(sample_path, resolution=ref_images.shape[1])
    model = load_inception(inception_path).to(device)
    if len(samples) < 2 or len(ref_images) < 2:
        raise UserError(f"need at least 2 images in each batch for covariances; got {len(ref_images)} reference "
                        f"and {len(samples)} samples")
    mu, sigma, mu_s, sigma_s, ref_pool = cached_reference_stats(ref_path, model, batch_size, device)
    pool, spatial, probs = features(model, samples, batch_size, device)
    precision, recall = precision_recall(ref_pool, pool, device=device)
    return {"fid": frechet_distance(*gaussian_stats(pool), mu, sigma),
            "sfid": frechet_distance(*gaussian_stats(spatial), mu_s, sigma_s),
            "inception_score": inception_score(probs), "precision": precision, "recall": recall,
            "num_samples": len(samples), "num_reference": len(ref_images)}
