"""GPU-only: the Triton kernels compiled for real (bf16 included) against fp32 references, and the triton
backend against eager at DiT-XL/2 shapes. Skipped on machines without CUDA; bench/gpu_check.sh runs it."""
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU (run by bench/gpu_check.sh)", allow_module_level=True)
pytest.importorskip("triton")

from tinyfusion import runtime  # noqa: E402
from tinyfusion.kernels import ops  # noqa: E402
from tinyfusion.models import DiT, DiTConfig  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def ref_ln_mod(x, shift, scale, eps=1e-6):
    x, shift, scale = x.float(), shift.float(), scale.float()
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d", [(1, 1, 32), (3, 257, 1152), (32, 256, 1152), (2, 17, 77)])
def test_adaln_kernels(b, n, d, dtype):
    x, branch = rand(b, n, d, dtype=dtype, scale=2.0), rand(b, n, d, dtype=dtype)
    mods = rand(b, 4 * d, dtype=dtype, scale=0.5)
    gate, shift, scale, bias = mods[:, :d], mods[:, d:2 * d], mods[:, 2 * d:3 * d], rand(d, dtype=dtype)
    torch.testing.assert_close(ops.ln_modulate(x, shift, scale).float(), ref_ln_mod(x, shift, scale),
                               rtol=TOL[dtype], atol=TOL[dtype])
    new_x = x.float() + gate.float()[:, None] * (branch.float() + bias.float())
    want = ref_ln_mod(new_x, shift, scale)
    ops.residual_ln_modulate_(x, branch, bias, gate, shift, scale, 1e-6)
    torch.testing.assert_close(x.float(), new_x, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(branch.float(), want, rtol=TOL[dtype], atol=TOL[dtype] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_modulate_backward(dtype):
    x = rand(4, 256, 1152, dtype=dtype).requires_grad_()
    shift, scale = rand(4, 1152, dtype=dtype).requires_grad_(), rand(4, 1152, dtype=dtype, scale=0.5).requires_grad_()
    dy = rand(4, 256, 1152, dtype=dtype)
    got = torch.autograd.grad(ops.ln_modulate(x, shift, scale), (x, shift, scale), dy)
    ref = [t.detach().float().requires_grad_() for t in (x, shift, scale)]
    want = torch.autograd.grad(ref_ln_mod(*ref), ref, dy.float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4 * max(1.0, w.abs().max().item() / 10))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu(dtype):
    h, bias = rand(8 * 256, 4608, dtype=dtype, scale=3.0), rand(4608, dtype=dtype)
    want = F.gelu(h.float() + bias.float(), approximate="tanh")
    ops.bias_gelu_(h, bias)
    torch.testing.assert_close(h.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(256, 72), (257, 72), (1024, 64), (33, 64)])
def test_flash_attention(n, d, dtype):
    qkv = rand(2, n, 3, 16, d, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    torch.testing.assert_close(ops.flash_attention(q, k, v).float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_eager_at_dit_xl_width(dtype, attention, monkeypatch):
    monkeypatch.setenv("TINYFUSION_ATTENTION", attention)
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=4, hidden_size=1152, num_heads=16, patch_size=2, input_size=32, in_channels=4,
                          num_classes=1000)).eval()  # train mode would drop labels at random (CFG dropout)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (8,))
    want = model.cuda()(x.cuda(), t.cuda(), y.cuda()).float()
    rt = runtime.load(model, "triton", "cuda", dtype)
    got = rt(x.cuda().to(dtype), t.cuda(), y.cuda()).float()
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cos > (0.99999 if dtype == torch.float32 else 0.999), cos
    # cosine alone passes a scale error; the largest deviation against the largest value does not
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 2e-2), rel


def test_fp8_forward_at_dit_xl_2_stays_within_the_accuracy_goal():
    """DiT-XL/2 at full depth (28 blocks), every block Linear through _scaled_mm in E4M3 on Hopper, against the
    bf16 forward. Random weights whose blocks matter are the hard case: on the CPU the same forward reaches
    0.99839 against fp32 (E4M3's per-GEMM floor, tests/test_fp8.py); the goal of 0.999 is met by the trained
    digits teacher (0.99992). Here: the GPU path agrees with that, within bf16's own error."""
    from conftest import randomized
    from tinyfusion.models import config_from_name

    torch.manual_seed(0)
    model = randomized(DiT(config_from_name("DiT-XL/2", input_size=32)))
    x, t, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        ref = runtime.load(model, "triton", "cuda", torch.bfloat16)(x.cuda(), t.cuda(), y.cuda()).float()
        rt = runtime.load(model, "triton", "cuda", "fp8")
        got = rt(x.cuda(), t.cuda(), y.cuda()).float()
    assert rt.backend == "triton+fp8"
    from tinyfusion.runtime.fp8 import rowwise_scaled_mm

    assert rowwise_scaled_mm("cuda", torch.bfloat16)  # the scales inside _scaled_mm: the path the benchmark times
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    assert cos >= 0.997, cos


def test_e4m3_kernels_compiled_agree_with_pytorchs_quantizer():
    """The E4M3 variants compiled for Hopper (GPU division, the explicit rounding, the cast) against
    runtime/fp8.py's `quantize` of the plain kernels' fp32 output, byte for byte, at DiT-XL/2 shapes; in bf16
    from bf16 inputs the dequantized values within half a step of E4M3's grid of the fp32 reference."""
    from tinyfusion.runtime.fp8 import dequantize, quantize

    b, n, d = 4, 256, 1152
    for dtype in (torch.float32, torch.bfloat16):
        x, branch = rand(b, n, d, dtype=dtype, scale=2.0), rand(b, n, d, dtype=dtype)
        mods = rand(b, 4 * d, dtype=dtype, scale=0.5)
        gate, shift, scale, bias = mods[:, :d], mods[:, d:2 * d], mods[:, 2 * d:3 * d], rand(d, dtype=dtype)
        h, fc1_bias = rand(b * n, 4608, dtype=dtype, scale=3.0), rand(4608, dtype=dtype)
        ref_res = x.float() + gate.float()[:, None] * (branch.float() + bias.float())
        pairs = [  # (E4M3 op's output, the fp32 values it quantizes)
            (ops.ln_modulate_e4m3(x, shift, scale, 1e-6), ref_ln_mod(x, shift, scale).view(-1, d)),
            (ops.bias_gelu_e4m3(h, fc1_bias), F.gelu(h.float() + fc1_bias.float(), approximate="tanh")),
            (ops.quantize_rows(h), h.float()),
            (ops.residual_ln_modulate_e4m3_(x, branch, bias, gate, shift, scale, 1e-6),
             ref_ln_mod(ref_res, shift, scale).view(-1, d)),
        ]
        for (q, s), want in pairs:
            if dtype == torch.float32:
                q_ref, s_ref = quantize(want, -1)
                torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
                assert (q.float() != q_ref.float()).float().mean().item() < 1e-4  # only fp32 rounding ties differ
            else:
                err = (dequantize(q, s) - want).abs()
                # half a step of E4M3's grid (fp32's own rounding of the reference aside)
                assert (err <= want.abs() * (2 ** -4 + 1e-4) + s * 2 ** -10 + 1e-5 * want.abs().amax(1, keepdim=True)).all()


def test_fp8_forward_quantizing_in_the_kernels_matches_quantizing_in_pytorch_at_dit_xl_width():
    """triton+fp8 with the activations quantized in the LayerNorm/GELU kernels (the default) against the same
    forward quantizing each GEMM input in PyTorch: only the bf16 rounding before quantization differs."""
    from conftest import randomized
    from tinyfusion.runtime.fused import FusedForward

    torch.manual_seed(0)
    model = randomized(DiT(DiTConfig(depth=4, hidden_size=1152, num_heads=16, patch_size=2, input_size=32,
                                     in_channels=4, num_classes=1000))).eval().cuda().to(torch.bfloat16)
    x, t, y = torch.randn(8, 4, 32, 32, device="cuda", dtype=torch.bfloat16), torch.randint(0, 1000, (8,), device="cuda"), \
        torch.randint(0, 1000, (8,), device="cuda")
    with torch.no_grad():
        got = FusedForward(model, ops, ops.attention, fp8=True)(x, t, y).float()
        want = FusedForward(model, ops, ops.attention, fp8=True, fuse_quantization=False)(x, t, y).float()
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cos > 0.9995, cos


def test_sampling_defaults_to_the_gpu_in_bf16_and_stays_near_fp32(tmp_path):
    """sample/evaluate's defaults on a GPU machine: cuda and bf16 (the Runtime casts the fp32 sampler state
    in and the output back), for eager and triton; the samples near the fp32 ones on the same device, the
    grid written, and the ADM k-NN distances computed on the GPU equal to the CPU's."""
    import argparse

    import numpy as np

    from tinyfusion.cli.sampler_args import add_sampler_args, device_and_dtype, load_runtime
    from tinyfusion.diffusion import sample
    from tinyfusion.eval.adm import precision_recall
    from tinyfusion.sample import main as sample_main

    p = argparse.ArgumentParser()
    add_sampler_args(p)
    for backend in ("eager", "triton"):
        args = p.parse_args(["--backend", backend])
        assert device_and_dtype(args) == (torch.device("cuda"), torch.bfloat16)
        torch.manual_seed(0)
        model = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=5))
        for prm in model.parameters():
            torch.nn.init.normal_(prm, std=0.05)
        labels = torch.tensor([0, 1, 4], device="cuda")
        want = sample(runtime.load(model, backend, device="cuda"), labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3)
        got = sample(load_runtime(model, args), labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3)
        assert got.dtype == torch.float32 and got.is_cuda
        assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
    try:
        sample_main(["--steps", "3", "--per-class", "1", "--out", str(tmp_path / "g.png")])
    except SystemExit as e:
        assert e.code in (0, None)
    assert (tmp_path / "g.png").exists()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(200, 16)).astype(np.float32)
    assert precision_recall(a, b, device="cuda") == pytest.approx(precision_recall(a, b), abs=1e-9)


def test_kernels_index_past_two_to_the_31_elements():
    """int64 offsets: bias+GELU at DiT-XL/2's fc1 width past batch 1821 and LayerNorm+modulate past batch
    7282 (2^31 elements each, bf16): the rows beyond the int32 range come out like the first ones (with
    int32 offsets they would wrap and read or overwrite the start of the tensor)."""
    cols = 4608
    rows = (2 ** 31) // cols + 4096
    h = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    head, tail = h[:64].clone(), h[-64:].clone()
    ops.bias_gelu_(h, bias)
    for got, before in ((h[:64], head), (h[-64:], tail)):
        want = F.gelu(before.float() + bias.float(), approximate="tanh")
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    del h
    d, n = 1152, 256
    b = (2 ** 31) // (n * d) + 8
    x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
    shift, scale = rand(b, d, dtype=torch.bfloat16, scale=0.5), rand(b, d, dtype=torch.bfloat16, scale=0.5)
    y = ops.ln_modulate(x, shift, scale)
    for sl in (slice(0, 2), slice(b - 2, b)):
        torch.testing.assert_close(y[sl].float(), ref_ln_mod(x[sl], shift[sl], scale[sl]), rtol=8e-2, atol=8e-2)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_cuda_graph_replay_equals_the_forward(backend):
    """One graph per batch shape: replayed outputs equal the plain forward's at two shapes and after the
    inputs change (static buffers refilled), and a whole guided DDIM run matches."""
    from tinyfusion.diffusion import sample

    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=5))
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    plain = runtime.load(model, backend, device="cuda")
    graphs = runtime.load(model, backend, device="cuda", cuda_graphs=True)
    for n in (3, 6, 3):
        x = torch.randn(n, 4, 8, 8, device="cuda")
        t = torch.randint(0, 1000, (n,), device="cuda")
        y = torch.randint(0, 5, (n,), device="cuda")
        torch.testing.assert_close(graphs(x, t, y), plain(x, t, y), rtol=1e-4, atol=1e-4)
    assert len(graphs._forward.graphs) == 2
    labels = torch.tensor([0, 1, 4], device="cuda")
    torch.testing.assert_close(sample(graphs, labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3),
                               sample(plain, labels, (4, 8, 8), "ddim", 5, cfg_scale=1.5, seed=3), rtol=1e-3, atol=1e-3)
