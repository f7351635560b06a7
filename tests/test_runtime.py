"""tinyfusion.runtime: every CPU backend gives the eager outputs; sample and evaluate run through them."""
import pytest
import torch

from conftest import assert_one_line_error, inputs, run_main, tiny_dit
from tinyfusion import runtime
from tinyfusion.diffusion import sample
from tinyfusion.errors import UserError


CASES = [(3, 48, 3), (2, 96, 2), (0, 32, 2)]


@pytest.mark.parametrize("backend,depth,hidden,heads", [("cpp", *c) for c in CASES] +
                         [("compile", *c) for c in CASES[::2]])  # Inductor's freezing compile costs ~20 s a model
def test_backend_matches_eager(backend, depth, hidden, heads):
    model = tiny_dit(depth=depth, hidden_size=hidden, num_heads=heads, mlp_norm_eps=1e-5)
    x, t, y = inputs(model.config, n=3)
    want = model(x, t, y)
    rt = runtime.load(model, backend)
    torch.testing.assert_close(rt(x, t, y), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rt.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 2.0, 3),
                               model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 2.0, 3),
                               rtol=1e-4, atol=1e-5)


def test_cpp_sampling_equals_eager_sampling():
    model = tiny_dit(depth=2)
    labels = torch.tensor([0, 1, 4])
    a = sample(model, labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3)
    b = sample(runtime.load(model, "cpp"), labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-4)  # 5 steps of fp32 reordering on samples of order 1


def test_unknown_backend_and_cpp_off_cpu_are_one_line_errors():
    model = tiny_dit(depth=1)
    with pytest.raises(UserError, match="unknown backend 'tensorrtx'"):
        runtime.load(model, "tensorrtx")
    with pytest.raises(UserError, match="float32 on the CPU"):
        runtime.load(model, "cpp", dtype=torch.float64)


def test_unbuilt_extension_says_how_to_build(monkeypatch):
    from tinyfusion.runtime import cpu_ops

    monkeypatch.setattr(cpu_ops, "_C", None)
    monkeypatch.setattr(cpu_ops, "_IMPORT_ERROR", ImportError("No module named 'tinyfusion._C'"))
    with pytest.raises(UserError, match="pip install --no-build-isolation -e ."):
        runtime.load(tiny_dit(depth=1), "cpp")


def test_evaluate_and_sample_take_backend(tmp_path, capsys):
    from tinyfusion.evaluate import main as evaluate_main
    from tinyfusion.sample import main as sample_main

    import json

    import numpy as np
    from PIL import Image

    results = {}
    for backend in ("cpp", "eager"):  # the same samples through either backend: the same metrics and grid
        out = tmp_path / f"{backend}.json"
        code, _, err = run_main(evaluate_main, ["--samples", "40", "--steps", "4", "--backend", backend, "--splits", "2",
                                                "--json", str(out)], capsys)
        assert code == 0, err
        code, _, err = run_main(sample_main, ["--steps", "3", "--backend", backend, "--per-class", "2",
                                              "--out", str(tmp_path / f"{backend}.png")], capsys)
        assert code == 0, err
        results[backend] = json.loads(out.read_text()), np.asarray(Image.open(tmp_path / f"{backend}.png")).astype(int)
    (cpp, cpp_grid), (eager, eager_grid) = results["cpp"], results["eager"]
    assert cpp["backend"] == "cpp" and eager["backend"] == "eager" and cpp["depth"] == 12
    for key in ("digits_fid", "class_accuracy", "precision", "recall"):
        assert cpp[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-3), key
    assert cpp_grid.shape == eager_grid.shape and np.abs(cpp_grid - eager_grid).max() <= 1
    code, _, err = run_main(sample_main, ["--backend", "nope", "--out", str(tmp_path / "h.png")], capsys)
    assert_one_line_error(code, err, "--backend")


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_low_precision_runtime_samples_in_fp32_state(dtype, bound, sampler):
    """A bf16/fp16 Runtime under the fp32 samplers (guided): fp32 noise goes in (a model in its own dtype
    used to crash on it), fp32 comes out, the samples stay within the dtype's rounding of the fp32 ones,
    and the caller's model is left in fp32 (Module.to works in place)."""
    model = tiny_dit(depth=2)
    labels = torch.tensor([0, 1, 4])
    want = sample(model, labels, (4, 8, 8), sampler, 5, cfg_scale=1.5, seed=3)
    rt = runtime.load(model, "eager", dtype=dtype)
    got = sample(rt, labels, (4, 8, 8), sampler, 5, cfg_scale=1.5, seed=3)
    assert rt.dtype == dtype and next(model.parameters()).dtype == torch.float32
    assert got.dtype == torch.float32
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < err < bound, err


def test_sample_and_evaluate_take_dtype_and_device(tmp_path, capsys):
    """--dtype bf16 on the CPU samples and evaluates (fp32 samples from a bf16 model); a CUDA device that
    is not there is one line, before any output."""
    import json

    from tinyfusion.evaluate import main as evaluate_main
    from tinyfusion.sample import main as sample_main

    code, _, err = run_main(sample_main, ["--steps", "3", "--dtype", "bf16", "--per-class", "1",
                                          "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0 and (tmp_path / "g.png").exists(), err
    code, _, err = run_main(evaluate_main, ["--samples", "20", "--steps", "3", "--dtype", "bf16", "--splits", "2",
                                            "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= m["class_accuracy"] <= 1 and m["digits_fid"] > 0
    if not torch.cuda.is_available():
        code, _, err = run_main(sample_main, ["--device", "cuda", "--out", str(tmp_path / "c.png")], capsys)
        assert_one_line_error(code, err, "CUDA is not available")
        assert not (tmp_path / "c.png").exists()
    code, _, err = run_main(sample_main, ["--backend", "cpp", "--dtype", "bf16", "--out", str(tmp_path / "d.png")], capsys)
    assert_one_line_error(code, err, "float32 on the CPU")


def test_cuda_graphs_refuse_what_cannot_be_captured():
    """CUDA graphs need a CUDA device and a backend whose forward can be captured: anything else is one
    line, not a flag silently ignored (the replay itself is tested in test_gpu.py)."""
    model = tiny_dit(depth=1)
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        runtime.load(model, "eager", device="cpu", cuda_graphs=True)
    with pytest.raises(UserError, match="not onnxruntime"):
        runtime.load(model, "onnxruntime", device="cuda", cuda_graphs=True)


FAULTS_PER_FORWARD = """
import resource, torch
from tinyfusion import runtime
from tinyfusion.models.dit import DiT, DiTConfig
model = DiT(DiTConfig(depth=2, hidden_size=384, num_heads=6, input_size=32, in_channels=4, patch_size=2, num_classes=10))
rt = runtime.load(model, "eager")
x, t, y = torch.randn(8, 4, 32, 32), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
with torch.no_grad():
    rt(x, t, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        rt(x, t, y)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_a_cpu_runtime_reuses_freed_pages_instead_of_faulting_them_in_every_forward():
    """runtime/heap.py: after `load` on the CPU, a forward at DiT-S/2 width (batch 8) reuses the pages its
    predecessor freed; with glibc's defaults (TINYFUSION_KEEP_HEAP=0) each forward faults its large
    activations in afresh (about 12,000 minor faults here). Each count in a fresh process, read from the
    kernel's own accounting (getrusage)."""
    import os
    import subprocess
    import sys

    from tinyfusion.runtime.heap import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: the platform's allocator decides")

    def faults(**env):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])

    kept, default = faults(), faults(TINYFUSION_KEEP_HEAP="0")
    assert default > 4000 and kept < default / 4, (kept, default)
