"""bench/cpu_ops.py: a small real run writes a row per implementation; implementations that disagree are
refused before any timing; bad input is one line."""
import json
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_main

sys.path.insert(0, f"{ROOT}/bench")
import cpu_ops  # noqa: E402
import latency  # noqa: E402

from tinyfusion.models.dit import DiTConfig  # noqa: E402


def test_small_run_writes_every_implementation(tmp_path, capsys):
    out = tmp_path / "ops.json"
    code, stdout, err = run_main(cpu_ops.main, ["--batch", "2", "--tokens", "16", "--hidden", "64", "--heads", "2",
                                                "--depth", "2", "--warmup", "1", "--repeats", "2", "--json", str(out)],
                                 capsys)
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert [(r["case"], r["implementation"]) for r in summary["rows"]] == [
        ("attention", "cpp attention"), ("attention", "torch SDPA"), ("adaln", "oneDNN"), ("adaln", "torch addmm"),
        ("fc1", "oneDNN + GELU post-op"), ("fc1", "oneDNN, then bias_gelu_"), ("fc1", "torch mm, then bias_gelu_"),
        ("fc1 GEMM", "oneDNN, bias, no GELU"), ("forward", "cpp backend"), ("forward", "cpp with torch SDPA")]
    config = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8)
    mlp = 2 * 2 * 16 * 64 * 256
    flops = {"attention": 4 * 2 * 16 * 16 * 64, "adaln": 2 * 2 * 64 * (2 * 6 * 64 + 2 * 64), "fc1": mlp, "fc1 GEMM": mlp,
             "forward": latency.forward_flops(config, 2)}
    for r in summary["rows"]:
        assert r["median_ms"] > 0 and r["gflops"] == pytest.approx(flops[r["case"]] / r["median_ms"] / 1e6)
    firsts = [r for r in summary["rows"] if r["implementation"] in ("cpp attention", "oneDNN", "oneDNN + GELU post-op",
                                                                  "oneDNN, bias, no GELU", "cpp backend")]
    assert all(r["speedup_of_first"] == 1.0 for r in firsts)
    assert "| attention | cpp attention |" in stdout


def test_implementations_that_disagree_are_refused():
    cases = {"twice": (1, {"right": lambda: torch.ones(3), "wrong": lambda: torch.ones(3) * 1.01})}
    with pytest.raises(AssertionError, match="twice"):
        cpu_ops.check_agreement(cases)


@pytest.mark.parametrize("argv,fragment", [
    (["--hidden", "64", "--heads", "5"], "--heads"),
    (["--hidden", "66", "--heads", "2"], "of 4"),
    (["--tokens", "17"], "not a square"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_input_is_one_line(argv, fragment, capsys, tmp_path):
    code, _, err = run_main(cpu_ops.main, argv + ["--json", str(tmp_path / "x.json")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.json").exists()
