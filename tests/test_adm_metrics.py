"""The ADM protocol's numerics against independent computations, and its .npz checks."""
import numpy as np
import pytest

from tinyfusion.errors import UserError
from tinyfusion.eval import adm, stats


def test_inception_score_against_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marginal = probs.mean(0)
    direct = np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in probs]))
    assert adm.inception_score(probs, split_size=300) == pytest.approx(direct, rel=1e-10)
    assert adm.inception_score(np.eye(5)[np.arange(100) % 5]) == pytest.approx(5.0)  # confident, balanced
    assert adm.inception_score(np.full((50, 4), 0.25)) == pytest.approx(1.0)  # no information


def test_batched_precision_recall_equals_brute_force():
    rng = np.random.default_rng(1)
    ref, sample = rng.normal(size=(230, 16)), rng.normal(loc=0.4, size=(170, 16))
    want = stats.precision_recall(ref, sample, k=3)
    got = adm.precision_recall(ref, sample, k=3, batch=64)  # several row and column blocks
    assert got == pytest.approx(want, abs=1e-12)


def test_read_images_accepts_adm_layout_and_rejects_the_rest(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert adm.read_images(str(good), resolution=8).shape == (4, 8, 8, 3)
    with pytest.raises(UserError, match="16x16"):
        adm.read_images(str(good), resolution=16)
    cases = {"nokey.npz": dict(images=np.zeros((4, 8, 8, 3), np.uint8)),
             "float.npz": dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)),
             "nchw.npz": dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError, match="arr_0"):
            adm.read_images(str(tmp_path / name))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a readable"):
        adm.read_images(str(tmp_path / "junk.npz"))


def test_reference_stats_read_when_present(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3),
             mu_s=np.ones(2), sigma_s=np.eye(2))
    mu, sigma, mu_s, sigma_s = adm.reference_stats(str(tmp_path / "ref.npz"))
    assert sigma.shape == (3, 3) and mu_s.tolist() == [1, 1]
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert adm.reference_stats(str(tmp_path / "plain.npz")) is None
