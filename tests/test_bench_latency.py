"""bench/latency.py: a small real run writes the JSON/CSV/PNG it promises; bad input is one line."""
import csv
import json
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_main

sys.path.insert(0, f"{ROOT}/bench")
import latency  # noqa: E402


@pytest.fixture(autouse=True)
def short_settle(monkeypatch):
    """The pause before each timed call kept (settle runs) but short: these runs check outputs, not speed."""
    monkeypatch.setattr(latency, "SETTLE_S", 0.01)


def test_small_run_writes_fit_and_outputs(tmp_path, capsys):
    """The fit, the half-depth speedup, its ideal and the floor fraction recomputed from the medians the run
    wrote (numpy's least squares, not the bench's own formula); the CSV holds the same medians."""
    import numpy as np

    out = tmp_path / "lat.json"
    code, stdout, err = run_main(latency.main, ["--backends", "eager", "cpp", "--depths", "4", "2", "1", "--batch", "1",
                                                "--warmup", "1", "--repeats", "2", "--json", str(out)], capsys)
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert [r["backend"] for r in summary["results"]] == ["eager", "cpp"] and summary["backends_left"] == []
    # the floor's GEMM rate is the fastest path this machine has, each one measured in the same run
    assert set(summary["gemm_paths"]) == {"torch", "onednn", "onnxruntime"} and all(v > 0 for v in summary["gemm_paths"].values())
    assert summary["gemm_gflops"] == max(summary["gemm_paths"].values())
    rows = list(csv.reader(open(tmp_path / "lat.csv")))
    assert rows[0] == ["backend", "depth", "hidden_size", "median_ms"] and len(rows) == 1 + 2 * 3
    for r in summary["results"]:
        ms = r["median_ms"]
        assert r["depths"] == [4, 2, 1] and len(ms) == 3 and all(m > 0 for m in ms)
        # no assertion on the times themselves (speed lives in bench/results, not in tests)
        b, a = np.polyfit([4, 2, 1], ms, 1)
        r2 = 1 - np.sum((np.array(ms) - (a + b * np.array([4, 2, 1]))) ** 2) / np.sum((np.array(ms) - np.mean(ms)) ** 2)
        assert r["fit"]["a"] == pytest.approx(a) and r["fit"]["b"] == pytest.approx(b) and r["fit"]["r2"] == pytest.approx(r2)
        assert r["half_depth_speedup"] == pytest.approx(ms[0] / ms[1])
        assert r["ideal_half_depth_speedup"] == pytest.approx((a + 4 * b) / (a + 2 * b))
        # each backend's floor: the fastest path timed again in that backend's interleaved rounds
        assert set(r["gemm_gflops"]) == set(summary["gemm_paths"]) and all(v > 0 for v in r["gemm_gflops"].values())
        floor_ms = latency.forward_flops(latency.make_config("cpu", 4), 1) / max(r["gemm_gflops"].values()) / 1e6
        assert r["floor_ms"] == pytest.approx(floor_ms) and r["floor_fraction"] == pytest.approx(floor_ms / ms[0])
        written = {int(row[1]): float(row[3]) for row in rows[1:] if row[0] == r["backend"]}
        assert [written[d] for d in (4, 2, 1)] == pytest.approx(ms, rel=1e-3)
    assert (tmp_path / "lat.png").stat().st_size > 0
    assert "| eager |" in stdout and "| cpp |" in stdout


def test_a_run_cut_off_keeps_every_backend_it_finished(tmp_path, capsys, monkeypatch):
    """The JSON is written after every backend: a GPU run cut off by its time limit (here: the second
    backend dies) keeps the first backend's results and says which are missing."""
    out = tmp_path / "cut.json"
    real = latency.measure_backend

    def dies_on_cpp(args, backend, gemms):
        if backend == "cpp":
            raise KeyboardInterrupt  # what a time limit's signal does to the run
        return real(args, backend, gemms)

    monkeypatch.setattr(latency, "measure_backend", dies_on_cpp)
    code, _, _ = run_main(latency.main, ["--backends", "eager", "cpp", "--depths", "2", "1", "--batch", "1",
                                         "--warmup", "1", "--repeats", "1", "--no-width", "--json", str(out)], capsys)
    assert code == 130
    summary = json.loads(out.read_text())
    assert [r["backend"] for r in summary["results"]] == ["eager"] and summary["backends_left"] == ["cpp"]


def test_one_depth_writes_a_null_fit_not_nan(tmp_path, capsys):
    """A single depth has no line: JSON null (strict parsers reject a bare NaN), '-' in the table."""
    out = tmp_path / "one.json"
    code, stdout, err = run_main(latency.main, ["--backends", "eager", "--depths", "2", "--batch", "1", "--warmup", "1",
                                                "--repeats", "1", "--json", str(out)], capsys)
    assert code == 0, err
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["results"][0]["fit"] == {"a": None, "b": None, "r2": None}
    assert "| eager | " in stdout and " | - | " in stdout


def test_onnxruntime_gemm_path_computes_the_product_and_does_not_spin():
    """The floor's MLAS path is a @ w.T, and its threads do not spin-wait after a run: they took the cores from
    the call timed next (bench/settle.py)."""
    import torch

    w, a = torch.randn(48, 32), torch.randn(5, 32)
    session = latency.onnxruntime_matmul(w)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"a": a.numpy()})[0]), a @ w.t(), rtol=1e-5, atol=1e-5)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_flops_count_matches_dit_xl():
    # The DiT paper's 118.6 "Gflops" for DiT-XL/2 counts multiply-adds (fvcore): we count 2 FLOPs each.
    c = latency.make_config("xl", 28)
    assert latency.forward_flops(c, 1) / 2e9 == pytest.approx(118.6, rel=0.01)


def test_width_pruned_config_has_half_the_block_parameters():
    full, half_depth = latency.make_config("cpu", 12), latency.make_config("cpu", 6)
    width = latency.make_config("cpu", 12, 2 ** -0.5)
    per_block = lambda c: 12 * c.hidden_size**2  # noqa: E731
    assert width.hidden_size % width.num_heads == 0
    ratio = (width.depth * per_block(width)) / (half_depth.depth * per_block(half_depth))
    # 384 / sqrt(2) = 271.5 rounds to 276 (a multiple of 12): 3.4% more than the half-depth model
    assert ratio == pytest.approx(1.0, abs=0.04) and full.hidden_size == 384 and width.hidden_size == 276


@pytest.mark.parametrize("argv,fragment", [
    (["--depths", "13"], "outside 1..12"),
    (["--depths", "0", "6"], "outside 1..12"),
    (["--batch", "0"], "--batch"),
    (["--repeats", "-1"], "--repeats"),
    (["--backends", "warp"], "--backends"),
])
def test_bad_input_is_one_line(argv, fragment, capsys, tmp_path):
    code, _, err = run_main(latency.main, argv + ["--json", str(tmp_path / "x.json")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.json").exists()


def test_block_stack_families_small_run(tmp_path, capsys):
    import latency_stacks

    out = tmp_path / "stacks.json"
    code, stdout, err = run_main(latency_stacks.main, ["--preset", "tiny", "--families", "sd3", "flux", "--fractions", "1", "0.5",
                                                       "--repeats", "2", "--json", str(out)], capsys)
    assert code == 0, err
    s = json.loads(out.read_text())
    sd3, flux = s["results"]
    assert sd3["depths"] == [4, 2] and flux["stack_depths"] == [1, 3] and flux["depths"] == [4, 3]
    assert all(m > 0 for r in s["results"] for m in r["median_ms"]) and "half_depth_speedup" in sd3
    assert (tmp_path / "stacks.png").stat().st_size > 0 and "| flux |" in stdout
    code, _, err = run_main(latency_stacks.main, ["--fractions", "0.5", "--json", str(out)], capsys)
    assert code == 2 and "--fractions must start at 1" in err


def test_fp8_backends_record_their_accuracy_and_the_torchao_peer_is_refused_off_hopper(tmp_path, capsys):
    """An FP8 row carries the cosine of its full-depth forward to eager on the same random model, computed
    here independently (a result copied from the wrong backend, or left unquantized, fails); torchao's
    float8 peer needs CUDA at compute capability 8.9+: on the CPU one line, exit 2, nothing written."""
    import torch

    from tinyfusion import runtime

    out = tmp_path / "fp8.json"
    code, stdout, err = run_main(latency.main, ["--backends", "cpp+fp8", "--depths", "2", "1", "--batch", "2",
                                                "--warmup", "1", "--repeats", "1", "--no-width", "--json", str(out)], capsys)
    assert code == 0, err
    (row,) = json.loads(out.read_text())["results"]
    args = latency.parse_args(["--depths", "2", "--batch", "2", "--json", str(tmp_path / "x.json")])
    model = latency.random_model(latency.make_config("cpu", 2))
    inputs = latency.example_inputs(args)
    with torch.no_grad():
        ref = runtime.load(model, "eager")(*inputs).flatten()
        fp8 = runtime.load(model, "cpp", dtype="fp8")(*inputs).flatten()
    cosine = torch.nn.functional.cosine_similarity(fp8, ref, dim=0).item()
    assert row["cosine_to_eager"] == pytest.approx(cosine, abs=1e-6) and 0.99 < cosine < 1 - 1e-6
    assert f"{cosine:.5f} |" in stdout

    code, _, err = run_main(latency.main, ["--backends", "torchao+fp8", "--json", str(tmp_path / "ao.json")], capsys)
    assert_one_line_error(code, err, "torchao")
    assert not (tmp_path / "ao.json").exists()
