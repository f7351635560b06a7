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


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A generated state dict in pytorch-fid's key layout: random weights whose BatchNorm statistics are
    measured on random images, so features vary with the input (with made-up statistics the signal dies
    with depth: every image got the same features to 1e-9, and every FID was 0)."""
    import torch

    from tinyfusion.eval.inception import FIDInception

    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 64, 64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_inception_shapes_and_standard_keys(inception_weights):
    import torch

    from tinyfusion.eval.inception import load_inception

    model = load_inception(inception_weights)
    keys = set(model.state_dict())
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_6d.branch1x1.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight",
            "fc.weight", "fc.bias"} <= keys
    # torchvision's Inception3 (27,161,264) without AuxLogits (3,326,696), with 1008 classes (+16,392)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    pool, spatial, logits = model(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)


def test_wrong_weights_are_one_line_errors(tmp_path, inception_weights):
    import torch

    from tinyfusion.eval.inception import load_inception

    with pytest.raises(UserError, match="no Inception weights"):
        load_inception(str(tmp_path / "missing.pth"))
    state = torch.load(inception_weights, weights_only=True)
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(UserError, match="not FID Inception weights"):
        load_inception(str(tmp_path / "renamed.pth"))


def test_evaluate_cli_on_npz_batches(tmp_path, inception_weights, capsys):
    """FID 0 against itself, > 0 against darker images, and reference statistics cached per Inception
    weights (a cache keyed by file time alone would reuse the first weights' statistics)."""
    import json

    from conftest import assert_one_line_error, run_main
    from tinyfusion.evaluate import main

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "same.npz", arr_0=ref)
    np.savez(tmp_path / "dark.npz", arr_0=(ref // 4).astype(np.uint8))
    np.savez(tmp_path / "small.npz", arr_0=ref[:, :16, :16])
    base = ["--ref", str(tmp_path / "ref.npz"), "--inception", inception_weights, "--batch-size", "10"]
    code, out, err = run_main(main, base + ["--samples", str(tmp_path / "same.npz"), "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    same = json.loads((tmp_path / "m.json").read_text())
    assert same["precision"] == same["recall"] == 1.0
    assert (tmp_path / "ref.npz.tinyfusion-stats.npz").exists()  # cached beside the reference
    code, out, err = run_main(main, base + ["--samples", str(tmp_path / "dark.npz"), "--json", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    dark = json.loads((tmp_path / "d.json").read_text())
    assert "FID" in out and dark["fid"] > 1e-3 and dark["sfid"] > 1e-3  # darker images are measurably far
    # against itself: zero up to sqrtm's error on a rank-9 covariance of 2048 features, far below the dark FID
    assert abs(same["fid"]) < 1e-3 * dark["fid"] and abs(same["sfid"]) < 1e-3 * dark["sfid"], (same, dark)
    # other Inception weights: the cached reference statistics (of the first weights) are not reused
    import torch

    from tinyfusion.eval.adm import cached_reference_stats
    from tinyfusion.eval.inception import load_inception

    other = load_inception(inception_weights)
    with torch.no_grad():
        other.Conv2d_1a_3x3.conv.weight.mul_(1.5)
    with np.load(tmp_path / "ref.npz.tinyfusion-stats.npz") as c:
        first_mu = c["mu"].copy()
    mu = cached_reference_stats(str(tmp_path / "ref.npz"), other, 10, "cpu")[0]
    assert not np.allclose(mu, first_mu)
    with np.load(tmp_path / "ref.npz.tinyfusion-stats.npz") as c:  # the cache now holds the new weights' statistics
        np.testing.assert_array_equal(c["mu"], mu)
    code, _, err = run_main(main, base + ["--samples", str(tmp_path / "small.npz")], capsys)
    assert_one_line_error(code, err, "16x16")


def test_too_few_samples_for_statistics(tmp_path, inception_weights):
    from tinyfusion.eval.adm import evaluate_npz

    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((3, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(UserError, match="at least 2 images"):
        evaluate_npz(str(tmp_path / "ref.npz"), str(tmp_path / "one.npz"), inception_weights)


def test_missing_batches_are_named_before_the_inception_weights(tmp_path, capsys):
    """With no weights and a mistyped --ref, the error named the weights: the user's batch comes first."""
    from conftest import assert_one_line_error, run_main
    from tinyfusion.evaluate import main

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((3, 16, 16, 3), np.uint8))
    code, _, err = run_main(main, ["--ref", str(tmp_path / "typo.npz"), "--samples", str(tmp_path / "s.npz"),
                                   "--inception", str(tmp_path / "no-weights.pth")], capsys)
    assert_one_line_error(code, err, "typo.npz")
