"""Triton kernels in the interpreter (TRITON_INTERPRET=1, CPU) against PyTorch fp64 references.

fp32 and fp16 only: the interpreter's bf16 is unreliable (bf16 is covered by bench/gpu_check.sh).
Shapes stay small because the interpreter runs one program at a time in numpy.
"""
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from tinyfusion import runtime  # noqa: E402
from tinyfusion.errors import UserError  # noqa: E402
from tinyfusion.kernels import INTERPRET, ops  # noqa: E402

from conftest import inputs, tiny_dit  # noqa: E402

if not INTERPRET:
    pytest.skip("TRITON_INTERPRET is not 1 (conftest sets it unless told otherwise; the GPU runs "
                "tests/test_gpu.py instead)", allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}
HIDDEN = [32, 96, 384, 1152, 77]


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(requires_grad)


def rows(b, d, k, seed, dtype):
    """k (B, D) views into one (B, k*D) tensor, as the fused forward passes them."""
    mods = rand(b, k * d, seed=seed, scale=0.5, dtype=dtype)
    return [mods[:, i * d:(i + 1) * d] for i in range(k)]


def ln_mod_ref(x, shift, scale, eps=1e-6):
    x, shift, scale = x.double(), shift.double(), scale.double()
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("b,n", [(1, 1), (3, 17), (1, 256)])
def test_ln_modulate_forward(b, n, d, dtype):
    if n == 256 and d > 384:
        pytest.skip("interpreter time: 256 tokens are covered at hidden <= 384")
    x = (rand(b, n, d, seed=1, scale=2.0) + 1.0).to(dtype)
    shift, scale = rows(b, d, 2, seed=2, dtype=dtype)
    out = ops.ln_modulate(x, shift, scale, 1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ln_mod_ref(x, shift, scale), **TOL[dtype])


@pytest.mark.parametrize("per_program", ["1", "4", "16"])
def test_several_rows_per_program_cross_samples_and_a_partial_last_tile(per_program, monkeypatch):
    """The forward kernels take ROWS rows per program: a tile that spans two samples (17 tokens each) must
    modulate each row by its own sample's shift/scale, and the last, partial tile must write only its rows.
    Inference (no gradient) and training launch the same tile without and with the statistics."""
    monkeypatch.setenv("TINYFUSION_ADALN_ROWS", per_program)
    b, n, d = 3, 17, 77
    x = rand(b, n, d, seed=11, scale=2.0)
    shift, scale = rows(b, d, 2, seed=14, dtype=torch.float32)
    with torch.no_grad():
        inferred = ops.ln_modulate(x, shift, scale, 1e-6)
    y, mean, rstd = ops.ln_modulate_fwd(x, shift, scale, 1e-6)
    torch.testing.assert_close(inferred.double(), ln_mod_ref(x, shift, scale), **TOL[torch.float32])
    assert torch.equal(inferred, y) and mean.shape == rstd.shape == (b * n,)
    torch.testing.assert_close(mean, x.mean(-1).flatten())
    xr, br = x.clone(), rand(b, n, d, seed=12)
    gate = rand(b, d, seed=13, scale=0.5)
    ops.residual_ln_modulate_(xr, br, None, gate, shift, scale, 1e-6)
    want = x + gate[:, None] * rand(b, n, d, seed=12)
    torch.testing.assert_close(xr, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(br.double(), ln_mod_ref(want, shift, scale), **TOL[torch.float32])


@pytest.mark.parametrize("d", [32, 77, 1152])
@pytest.mark.parametrize("b,n", [(1, 1), (3, 17)])
def test_ln_modulate_backward(b, n, d):
    x = rand(b, n, d, seed=3, requires_grad=True)
    shift = rand(b, d, seed=4, scale=0.5, requires_grad=True)
    scale = rand(b, d, seed=5, scale=0.5, requires_grad=True)
    dy = rand(b, n, d, seed=6)
    grads = torch.autograd.grad(ops.ln_modulate(x, shift, scale, 1e-6), (x, shift, scale), dy)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    want = torch.autograd.grad(ln_mod_ref(*ref_inputs), ref_inputs, dy.double())
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_ln_modulate(d, dtype, with_bias):
    b, n = 3, 17
    x, branch = rand(b, n, d, seed=7, dtype=dtype), rand(b, n, d, seed=8, scale=2.0, dtype=dtype)
    bias = rand(d, seed=9, dtype=dtype) if with_bias else None
    gate, shift, scale = rows(b, d, 3, seed=10, dtype=dtype)
    new_x = x.double() + gate.double()[:, None] * (branch.double() + (bias.double() if with_bias else 0))
    want = ln_mod_ref(new_x, shift, scale, 1e-5)
    ops.residual_ln_modulate_(x, branch, bias, gate, shift, scale, 1e-5)
    torch.testing.assert_close(x.double(), new_x, **TOL[dtype])
    torch.testing.assert_close(branch.double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r,d", [(1, 32), (17, 96), (3, 1536), (5, 77), (2, 4608)])
def test_bias_gelu(r, d, dtype):
    h, bias = rand(r, d, seed=11, scale=3.0, dtype=dtype), rand(d, seed=12, dtype=dtype)
    want = F.gelu(h.double() + bias.double(), approximate="tanh")
    ops.bias_gelu_(h, bias)
    torch.testing.assert_close(h.double(), want, **TOL[dtype])


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,n,d", [(1, 2, 1, 64), (3, 2, 17, 72), (1, 1, 33, 64), (2, 3, 20, 32)])
def test_flash_attention_against_sdpa(b, h, n, d, dtype):
    """Odd token counts leave a masked tail in the last key block; head dim 72 pads to 128."""
    qkv = rand(b, n, 3, h, d, seed=13, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided (B, H, N, d) views, as the backend passes them
    out = ops.flash_attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    assert out.shape == (b, n, h, d) and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_attention_dispatch_uses_triton_in_the_interpreter_and_obeys_the_override(monkeypatch):
    q = torch.zeros(1, 1, 2, 4)
    assert ops.attention_choice(q) == "triton"
    monkeypatch.setenv("TINYFUSION_ATTENTION", "sdpa")
    assert ops.attention_choice(q) == "sdpa"
    monkeypatch.setenv("TINYFUSION_ATTENTION", "cudnn")
    with pytest.raises(UserError, match="choose from flash-attn, sdpa, triton"):
        ops.attention_choice(q)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_flash_attention_tiles_other_than_the_default(block_m, block_n):
    qkv = rand(2, 37, 3, 2, 24, seed=5, dtype=torch.float32)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = ops.launch_flash_attention(q, k, v, block_m, block_n)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


@pytest.mark.usefixtures("interpreter_loops")
def test_triton_backend_matches_eager():
    model = tiny_dit(depth=2, hidden_size=64, num_heads=2)
    x, t, y = inputs(model.config, n=2)
    torch.testing.assert_close(runtime.load(model, "triton")(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-4)


def test_ops_trace_under_torch_compile():
    x = rand(2, 5, 32)
    shift, scale = rows(2, 32, 2, seed=1, dtype=torch.float32)
    fn = torch.compile(lambda x, s, c: ops.ln_modulate(x, s, c, 1e-6) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x, shift, scale), ops.ln_modulate(x, shift, scale, 1e-6) + 1)


def test_ops_refuse_layouts_they_would_misread():
    """The kernels index raw pointers with the strides a contiguous (B, N, D) input implies: a transposed x,
    modulation rows of another shape, a strided bias or a GELU input whose last dimension is not the
    bias's would be read wrongly without an error, so each op refuses them in one line (as the C++ ops do)."""
    x = torch.randn(2, 5, 8)
    rows = torch.randn(2, 8)
    cases = [
        (lambda: ops.ln_modulate(x.transpose(0, 1), rows[:1].expand(5, 8), rows[:1].expand(5, 8)), "contiguous (B, N, D)"),
        (lambda: ops.ln_modulate(x, torch.randn(2, 7), rows), "shift must be (B, D) = (2, 8)"),
        (lambda: ops.ln_modulate(x, rows, torch.randn(8, 2).t()), "unit stride"),
        (lambda: ops.residual_ln_modulate_(x.clone(), torch.randn(2, 5, 7), None, rows, rows, rows, 1e-6), "shape of x"),
        (lambda: ops.residual_ln_modulate_(x.clone(), x.clone(), torch.randn(16)[::2], rows, rows, rows, 1e-6), "contiguous (8,)"),
        (lambda: ops.bias_gelu_(torch.randn(10, 6), torch.randn(8)), "last dimension"),
        (lambda: ops.bias_gelu_(torch.randn(6, 10).t(), torch.randn(6)), "contiguous"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match=re.escape(fragment)) as e:
            call()
        assert "\n" not in str(e.value)


# The E4M3 variants (the FP8 GEMMs' inputs, written by the kernel that computes them). Their reference is
# runtime/fp8.py's `quantize` (itself held to E4M3 rounding written out in numpy, tests/test_fp8.py) applied
# to the fp32 output of the plain op: the same fp32 values, so the E4M3 bytes must agree exactly.

def assert_same_quantization(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)


def test_quantize_rows_rounds_every_binade_and_tie_as_pytorch_does():
    """Rows whose amax is 448 (scale 1) hold E4M3's hard cases: ties between grid points (31 lies between 30
    and 32: to even, 32; 124 between 120 and 128), rounding up across a power of two, subnormals and their
    ties (2^-10 -> 0, 3 * 2^-10 -> 2^-8), values near the maximum; the others scale random rows over five
    decades. The interpreter's own fp32 -> E4M3 cast turns 31.2 into 16: the kernel must round by itself."""
    hard = torch.tensor([448.0, 31.0, 31.2, -124.0, 124.2, 17.0, 2.0 ** -10, 3 * 2.0 ** -10, -2.0 ** -7,
                         440.0, 432.0, 0.0, 1.0625, 1.1875, -0.0146, 240.0])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([hard[None], torch.randn(20, 16, generator=g) * torch.logspace(-4, 1, 20)[:, None]])
    from tinyfusion.runtime.fp8 import quantize

    q, s = ops.quantize_rows(x)
    assert_same_quantization((q, s), quantize(x, -1))
    assert q[0, :3].float().tolist() == [448.0, 32.0, 32.0] and q[0, 6:8].float().tolist() == [0.0, 2.0 ** -8]


@pytest.mark.parametrize("d", [96, 1152, 77])
def test_e4m3_variants_of_the_adaln_kernels_quantize_their_own_output(d):
    """ln_modulate_e4m3 and residual_ln_modulate_e4m3_ write the E4M3 form of what the plain kernels write;
    the residual update of x is the plain kernel's, and branch is left as it was."""
    from tinyfusion.runtime.fp8 import quantize

    b, n = 3, 17
    x, branch = rand(b, n, d, seed=7), rand(b, n, d, seed=8, scale=2.0)
    bias = rand(d, seed=9)
    gate, shift, scale = rows(b, d, 3, seed=10, dtype=torch.float32)
    assert_same_quantization(ops.ln_modulate_e4m3(x, shift, scale, 1e-6),
                             quantize(ops.ln_modulate(x, shift, scale, 1e-6).view(b * n, d), -1))
    x_plain, branch_plain = x.clone(), branch.clone()
    ops.residual_ln_modulate_(x_plain, branch_plain, bias, gate, shift, scale, 1e-5)
    branch_before = branch.clone()
    got = ops.residual_ln_modulate_e4m3_(x, branch, bias, gate, shift, scale, 1e-5)
    torch.testing.assert_close(x, x_plain, rtol=0, atol=0)
    assert torch.equal(branch, branch_before)
    assert_same_quantization(got, quantize(branch_plain.view(b * n, d), -1))


@pytest.mark.parametrize("r,d", [(5, 77), (3, 1536), (2, 4608)])
def test_bias_gelu_e4m3_quantizes_the_gelu_output_per_row(r, d):
    """A whole row per program (its amax is the scale), 4608 being DiT-XL/2's MLP width; h is only read."""
    from tinyfusion.runtime.fp8 import quantize

    h, bias = rand(r, d, seed=11, scale=3.0), rand(d, seed=12)
    plain = h.clone()
    ops.bias_gelu_(plain, bias)
    h_before = h.clone()
    assert_same_quantization(ops.bias_gelu_e4m3(h, bias), quantize(plain, -1))
    assert torch.equal(h, h_before)


@pytest.mark.usefixtures("interpreter_loops")
def test_fp8_forward_with_quantization_in_the_kernels_equals_quantizing_in_pytorch():
    """The fused forward with FP8 GEMMs, its activations quantized by the kernels that produce them, against
    the same forward quantizing each GEMM input in PyTorch (the cpp backend's way): the same E4M3 operands,
    so the same output up to fp32 rounding; the final layer's input stays unquantized in both."""
    from conftest import randomized
    from tinyfusion.runtime.fused import FusedForward

    model = randomized(tiny_dit(depth=2, hidden_size=64, num_heads=2)).eval()
    x, t, y = inputs(model.config, n=2)
    fused = FusedForward(model, ops, ops.attention, fp8=True)
    plain = FusedForward(model, ops, ops.attention, fp8=True, fuse_quantization=False)
    assert fused.quantized and not plain.quantized
    with torch.no_grad():
        got, want, exact = fused(x, t, y), plain(x, t, y), model(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, exact, rtol=1e-3, atol=1e-3)  # the GEMMs did run in FP8
