"""bench/sampling.py's dry run: every (variant, depth, batch, sampler) case measured on tiny shapes, the
JSON rewritten after each case, images/s consistent with the step time it reports."""
import json

import pytest

from conftest import assert_one_line_error, bench_module, run_main


def test_dry_run_measures_every_case(tmp_path, capsys):
    bench = bench_module("sampling")
    out = tmp_path / "sampling.json"
    code, stdout, err = run_main(bench.main, ["--dry-run", "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["variant"], r["depth"], r["batch"], r["sampler"]) for r in rows}
    assert cases == {(v, d, 2, s) for v in ("eager", "cpp") for d in (4, 2) for s in ("ddim", "ddpm")}
    for r in rows:
        assert r["seconds_per_step"] > 0 and "error" not in r, r
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["seconds_per_step"] * r["full_steps"]))
    assert "| cpp | 2 | 2 | ddpm-250 |" in stdout


def test_a_variant_that_cannot_run_here_is_a_row_saying_why(tmp_path, capsys):
    """triton+graphs on the CPU: the rows record the runtime's one-line reason instead of a crash."""
    out = tmp_path / "s.json"
    code, _, err = run_main(bench_module("sampling").main, ["--dry-run", "--variants", "triton+graphs", "--samplers", "ddim",
                                                            "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all("CUDA graphs need a CUDA device" in r["error"] for r in rows)


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_main(bench_module("sampling").main, ["--preset", "xl", "--json", str(tmp_path / "x.json")], capsys)
    assert_one_line_error(code, err, "CUDA is not available")
    assert not (tmp_path / "x.json").exists()
