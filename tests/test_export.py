"""ONNX export (onnxruntime parity, dynamic batch, mixed precision casts), the onnxruntime backend, the
TensorRT stage without TensorRT, the engine cache key, and bad input."""
import json

import onnx
import pytest
import torch

import tinyfusion

from conftest import assert_one_line_error, inputs, run_script, tiny_dit
from tinyfusion import runtime, save
from tinyfusion.diffusion import sample
from tinyfusion.errors import UserError
from tinyfusion.pruning.surgery import prune_model
from tinyfusion.runtime import onnx_export
from tinyfusion.runtime.tensorrt import engine_cache_key, parse_profile


def run_tool(script, *argv):
    """export/<script> run in-process (the same main a shell runs; see test_cli for --help as a process)."""
    return run_script("export", script[:-3], *argv)


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    """A tiny depth-4 teacher pruned to its blocks 0 and 2, saved as the prune CLI saves it."""
    path = str(tmp_path_factory.mktemp("pruned") / "pruned.safetensors")
    save(prune_model(tiny_dit(depth=4), [0, 2]), path, source="tiny", kept=[0, 2], method="fixed")
    return path


def test_export_of_a_pruned_model_is_verified_in_onnxruntime(pruned_ckpt, tmp_path):
    out = tmp_path / "onnx"
    r = run_tool("onnx.py", "--ckpt", pruned_ckpt, "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "parity.json").read_text())
    assert set(report["parity"]["onnxruntime"]) == {"batch2", "batch5"}
    for m in report["parity"]["onnxruntime"].values():
        assert m["max_abs"] < 1e-4 and m["cosine"] > 0.99999
    assert report["sha256"] == onnx_export.graph_sha256(str(out / "model.onnx"))
    # the written graph itself, opened here (not the tool's own report), against the checkpoint in eager
    model = tinyfusion.load(pruned_ckpt)
    x, t, y = inputs(model.config, n=4, seed=9)
    got = ort_forward(str(out / "model.onnx"), x, t, y)
    assert max_rel_err(got, model(x, t, y)) < 1e-5


def ort_forward(path, x, t, y):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t", "y"]
    return torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.float().numpy(), "y": y.numpy()})[0])


def max_rel_err(got, want):
    """Largest elementwise error relative to the output's largest magnitude."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_batch_is_really_dynamic(tmp_path):
    model = tiny_dit(depth=2)
    path = onnx_export.export_onnx(model, str(tmp_path / "m.onnx"), batch=3)
    for inp in onnx.load(path).graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic, not 3
    forward = onnx_export.OnnxRuntimeForward(path)
    for n in (1, 7):
        x, t, y = inputs(model.config, n=n, seed=n)
        torch.testing.assert_close(forward(x, t, y), model(x, t, y), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("gc", [None, 3])
def test_cfg_graph_equals_forward_with_cfg(tmp_path, gc):
    model = tiny_dit(depth=2)
    path = onnx_export.export_onnx(model, str(tmp_path / "cfg.onnx"), cfg=True, guidance_channels=gc)
    report = onnx_export.onnxruntime_parity(model, path, (2, 3), cfg=True, guidance_channels=gc)
    assert all(m["max_abs"] < 1e-4 for m in report.values())
    # the graph's forward is DiT.forward_with_cfg's first half
    x, t, y = inputs(model.config, n=3)
    null = torch.full_like(y, model.config.num_classes)
    want = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.5, gc)[:3]
    got = onnx_export.ExportedDiT(model, True, gc)(x, t.float(), y, torch.tensor([1.5]))
    torch.testing.assert_close(got, want)


def value_types(model):
    """name -> ONNX element type for every value in the shape-inferred graph."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def test_fp16_graph_keeps_norm_modulation_gates_and_residual_in_fp32(tmp_path):
    model = tiny_dit(depth=2)
    path = onnx_export.export_onnx(model, str(tmp_path / "h.onnx"), precision="fp16", opset=20)
    graph = onnx.load(path)
    types = value_types(graph)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    nodes = graph.graph.node
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * 2 + 1 and all(types[n.input[0]] == F32 for n in norms)
    matmuls = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    assert sum(types[n.input[0]] == F16 for n in matmuls) >= 2 * 4  # qkv, proj, fc1, fc2 per block
    casts = [n for n in nodes if n.op_type == "Cast"]
    assert casts, "explicit casts between the fp32 stream and the fp16 GEMMs"
    # every Add whose output feeds a LayerNormalization (the residual stream) is fp32
    producers = {o: n for n in nodes for o in n.output}
    for n in norms[1:]:
        src = producers.get(n.input[0])
        if src is not None and src.op_type == "Add":
            assert types[src.output[0]] == F32
    # fp16 GEMMs round at 2^-11: the largest error stays within 1% of the output's scale, far below what
    # losing a block costs (the test model's blocks each move the output by more than a third)
    x, t, y = inputs(model.config, n=4, seed=3)
    with torch.no_grad():
        want = model(x, t, y)
        err = max_rel_err(ort_forward(path, x, t, y), want)
        blocks = model.blocks
        model.blocks = blocks[:1]
        dropped = max_rel_err(model(x, t, y), want)
        model.blocks = blocks
    assert err < 1e-2 and dropped > 10 * err, (err, dropped)


def test_onnxruntime_backend_and_sampling_match_eager():
    model = tiny_dit(depth=2)
    rt = runtime.load(model, "onnxruntime")
    x, t, y = inputs(model.config, n=4)
    torch.testing.assert_close(rt(x, t, y), model(x, t, y), rtol=1e-4, atol=5e-5)
    labels = torch.tensor([0, 3, 4])
    a = sample(model, labels, (4, 8, 8), "ddim", 6, cfg_scale=2.0, seed=5)
    b = sample(rt, labels, (4, 8, 8), "ddim", 6, cfg_scale=2.0, seed=5)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # 6 guided steps amplify fp32 reordering


def test_trt_without_tensorrt_leaves_a_valid_onnx_and_says_what_to_run(pruned_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: the GPU check covers the engine path")
    except ImportError:
        pass
    import shlex

    out = tmp_path / "trt"
    r = run_tool("trt.py", "--ckpt", pruned_ckpt, "--out", str(out), "--batch", "1:2:4", "--max-abs", "1e-3")
    assert r.returncode == 3
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed" in err[0] and "is written and checked" in err[0]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert json.loads((out / "parity.json").read_text())["parity"]["onnxruntime"]["batch5"]["max_abs"] < 1e-4
    # the command to run on a GPU repeats every flag given (a dropped --max-abs would hold the engine to
    # another bar), with --onnx at the graph; rerun, it says "checked" and keeps the onnxruntime parity
    argv = shlex.split(err[0].split("on a GPU machine run: ", 1)[1])[2:]
    assert argv == ["--ckpt", pruned_ckpt, "--out", str(out), "--batch", "1:2:4", "--max-abs", "1e-3",
                    "--onnx", str(out / "model.onnx")]
    again = run_tool("trt.py", *argv)
    assert again.returncode == 3 and "is checked;" in again.stderr and "written" not in again.stderr
    assert set(json.loads((out / "parity.json").read_text())["parity"]["onnxruntime"]) == {"batch2", "batch5"}


def test_engine_cache_key_changes_with_each_input():
    base = dict(onnx_sha256="a" * 64, profile=(1, 8, 64), precision="fp16", trt_version="10.13", gpu_name="H200")
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base)
    for field, other in [("onnx_sha256", "b" * 64), ("profile", (1, 16, 64)), ("precision", "bf16"),
                         ("trt_version", "10.14"), ("gpu_name", "A100")]:
        assert engine_cache_key(**{**base, field: other}) != key, field


@pytest.mark.parametrize("text", ["4:2:8", "0:1:2", "1:2", "a:b:c", "2:2:1"])
def test_bad_batch_profiles(text):
    with pytest.raises(UserError, match="--batch"):
        parse_profile(text)
    assert parse_profile("1:1:1") == (1, 1, 1)


def test_bad_inputs_are_one_line_errors(pruned_ckpt, tmp_path):
    not_a_ckpt = tmp_path / "notes.safetensors"
    not_a_ckpt.write_text("hello")
    r = run_tool("onnx.py", "--ckpt", str(not_a_ckpt), "--out", str(tmp_path / "a"))
    assert_one_line_error(r.returncode, r.stderr, "notes.safetensors")
    r = run_tool("onnx.py", "--ckpt", pruned_ckpt, "--out", str(tmp_path / "b"), "--opset", "13")
    assert_one_line_error(r.returncode, r.stderr, "--opset")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_tool("onnx.py", "--ckpt", pruned_ckpt, "--out", str(blocker / "sub"))
    assert_one_line_error(r.returncode, r.stderr, "sub")
    r = run_tool("trt.py", "--ckpt", pruned_ckpt, "--out", str(tmp_path / "c"), "--batch", "8:4:2")
    assert_one_line_error(r.returncode, r.stderr, "MIN <= OPT <= MAX")
    good = onnx_export.export_onnx(tiny_dit(depth=1), str(tmp_path / "g.onnx"))
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(open(good, "rb").read()[:2000])
    r = run_tool("trt.py", "--onnx", str(truncated), "--out", str(tmp_path / "d"))
    assert_one_line_error(r.returncode, r.stderr, "not a valid ONNX model")
    assert not (tmp_path / "a" / "model.onnx").exists() and not (tmp_path / "b").exists()


def test_parity_above_threshold_rejects_the_graph(pruned_ckpt, tmp_path):
    out = tmp_path / "strict"
    r = run_tool("onnx.py", "--ckpt", pruned_ckpt, "--out", str(out), "--max-abs", "1e-12")
    assert_one_line_error(r.returncode, r.stderr, "parity above the thresholds", "model.onnx.rejected")
    assert not (out / "model.onnx").exists() and (out / "model.onnx.rejected").exists()
    assert json.loads((out / "parity.json").read_text())["parity"]["onnxruntime"]["batch2"]["max_abs"] > 1e-12


@pytest.mark.parametrize("script", ["onnx.py", "trt.py"])
def test_scripts_run_as_processes(script):
    """`python export/<script>` as a shell runs it: its folder first on sys.path, where export/onnx.py would
    shadow the onnx package if the script did not put the repository root there (the tests above call the
    same main in-process)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, os.path.join(ROOT, "export", script), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_external_data_keeps_its_name_and_is_hashed(tmp_path):
    """A graph whose weights live beside it (as every graph over 2 GiB does): the weights file carries the
    graph's final name (saving to a temporary name and renaming left the graph pointing at that name), no
    temporary file or folder is left, onnxruntime runs it from its folder, the graph hash covers the
    weights (an edited weights file changes the engine-cache key) and trt.py's check reads it by path."""
    from conftest import script_module

    model = tiny_dit(depth=2)
    path = onnx_export.export_onnx(model, str(tmp_path / "model.onnx"), external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    from tinyfusion.runtime.onnx_common import external_data_files

    assert external_data_files(path) == [str(tmp_path / "model.onnx.data")]
    x, t, y = inputs(model.config, n=3)
    assert max_rel_err(ort_forward(path, x, t, y), model(x, t, y)) < 1e-5
    before = onnx_export.graph_sha256(path)
    data = bytearray((tmp_path / "model.onnx.data").read_bytes())
    data[-1] ^= 1
    (tmp_path / "model.onnx.data").write_bytes(bytes(data))
    assert onnx_export.graph_sha256(path) != before
    shapes = script_module("export", "trt").validate_onnx(path)
    assert shapes["x"] == (4, 8, 8)


def test_tensorrt_profile_and_timing_cache_follow_the_run():
    """The runtime's engine profile reaches the sampler's CFG batch (a fixed max of 512 failed the default
    --batch-size 500 doubled to 1000), and timing caches are kept per TensorRT version and GPU."""
    from tinyfusion.runtime.tensorrt import batch_profile, timing_cache_path

    assert batch_profile(1000) == (1, 500, 1000) and batch_profile(1) == (1, 1, 1)
    with pytest.raises(UserError, match="positive batch"):
        batch_profile(0)
    a = timing_cache_path("/c", "10.13", "NVIDIA H200")
    assert a == "/c/timing-trt10.13-NVIDIA-H200.cache"
    assert len({a, timing_cache_path("/c", "10.14", "NVIDIA H200"), timing_cache_path("/c", "10.13", "A100")}) == 3
