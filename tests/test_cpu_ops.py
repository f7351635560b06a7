"""The C++ fused CPU ops against PyTorch fp64 references, over a shape grid with DiT-XL's hidden 1152,
odd token counts and batch 1; strided modulation rows and q/k/v views as the cpp backend passes them."""
import pytest
import torch
import torch.nn.functional as F

from tinyfusion.runtime import cpu_ops

ops = cpu_ops.require()
SHAPES = [(1, 1, 32), (3, 17, 96), (2, 256, 384), (1, 7, 1152), (2, 33, 1152), (3, 5, 77)]


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def mod_rows(b, d, k, seed):
    """k (B, D) views into one (B, k*D) tensor: the layout of the cpp backend's batched adaLN output."""
    mods = rand(b, k * d, seed=seed, scale=0.5)
    return [mods[:, i * d:(i + 1) * d] for i in range(k)]


def ln_mod_ref(x, shift, scale, eps):
    x, shift, scale = x.double(), shift.double(), scale.double()
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


@pytest.mark.parametrize("b,n,d", SHAPES)
def test_ln_modulate_matches_fp64(b, n, d):
    x = rand(b, n, d, seed=1, scale=3.0) + 2.0  # an offset mean: the two-pass variance must not cancel
    shift, scale = mod_rows(b, d, 2, seed=2)
    out = ops.ln_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(out.double(), ln_mod_ref(x, shift, scale, 1e-6), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_ln_modulate_matches_fp64(b, n, d, with_bias):
    x, branch = rand(b, n, d, seed=3), rand(b, n, d, seed=4, scale=2.0)
    bias = rand(d, seed=5) if with_bias else None
    gate, shift, scale = mod_rows(b, d, 3, seed=6)
    new_x = x.double() + gate.double()[:, None] * (branch.double() + (bias.double() if with_bias else 0))
    want = ln_mod_ref(new_x, shift, scale, 1e-5)
    ops.residual_ln_modulate_(x, branch, bias, gate, shift, scale, 1e-5)
    torch.testing.assert_close(x.double(), new_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(branch.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rows,d", [(1, 32), (17, 96), (512, 1536), (7, 4608), (5, 77)])
def test_bias_gelu_matches_fp64(rows, d):
    h, bias = rand(rows, d, seed=7, scale=4.0), rand(d, seed=8)
    want = F.gelu(h.double() + bias.double(), approximate="tanh")
    ops.bias_gelu_(h, bias)
    torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-6)


def test_bias_gelu_saturates_without_nan():
    h = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]])
    ops.bias_gelu_(h, torch.zeros(7))
    torch.testing.assert_close(h, F.gelu(torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]]), approximate="tanh"))


def attention_ref(q, k, v):
    """softmax(q k^T / sqrt(d)) v in fp64, as (B, N, H, d)."""
    q, k, v = q.double(), k.double(), v.double()
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2)


# (B, H, N, d): one token; odd counts; DiT-S/2 (d 64) and DiT-XL/2 (d 72) heads; N 300 and 1100 split the
# queries into blocks of 218 and 59 rows with a partial last block, so a thread starts inside a head
ATTENTION_SHAPES = [(1, 1, 1, 8), (2, 3, 17, 32), (8, 6, 256, 64), (1, 16, 7, 72), (1, 2, 300, 64), (2, 1, 1100, 16)]


@pytest.mark.parametrize("b,h,n,d", ATTENTION_SHAPES)
def test_attention_matches_fp64_on_qkv_views(b, h, n, d):
    """q, k, v as the cpp backend passes them: strided views into one (B*N, 3*H*d) qkv GEMM output."""
    qkv = rand(b * n, 3 * h * d, seed=9)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = ops.attention(q, k, v)
    assert out.shape == (b, n, h, d) and out.is_contiguous()
    torch.testing.assert_close(out.double(), attention_ref(q, k, v), rtol=1e-5, atol=2e-5)


def test_attention_one_token_with_any_row_stride():
    """One token: its row stride is whatever the view says (here 1, below d); the GEMMs must not read it."""
    q = rand(2, 3, 8, 1, seed=13).transpose(2, 3)  # (2, 3, 1, 8), stride along N is 1
    assert q.stride(2) == 1
    torch.testing.assert_close(ops.attention(q, q, q).double(), attention_ref(q, q, q), rtol=1e-5, atol=2e-5)


def test_attention_contiguous_inputs_and_large_logits():
    """Separate contiguous q, k, v, and scores up to ~1e3: the row max keeps every exp finite."""
    q, k, v = (rand(2, 4, 65, 32, seed=s, scale=sc) for s, sc in ((10, 6.0), (11, 6.0), (12, 1.0)))
    out = ops.attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), attention_ref(q, k, v), rtol=1e-4, atol=1e-4)


def test_ops_reject_bad_inputs():
    x = rand(2, 3, 8)
    shift, scale = mod_rows(2, 8, 2, seed=0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.ln_modulate(x.double(), shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ln_modulate(x.transpose(1, 2), shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match=r"\(B, D\)"):
        ops.ln_modulate(x, shift[:1], scale, 1e-6)
    q = rand(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="float32"):
        ops.attention(q, q.double(), q)
    with pytest.raises(RuntimeError, match="like q"):
        ops.attention(q, q[:, :, :4], q)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.attention(q, q, q.transpose(2, 3))
    with pytest.raises(RuntimeError, match="must not overlap"):
        ops.attention(q, q[:, :, :1].expand(1, 2, 5, 8), q)


def test_ops_trace_under_torch_compile():
    """The fake kernels let torch.compile see the ops (fullgraph: no graph break)."""
    x = rand(2, 5, 16)
    shift, scale = mod_rows(2, 16, 2, seed=1)
    fn = torch.compile(lambda x, s, c: ops.ln_modulate(x, s, c, 1e-6) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x, shift, scale), ops.ln_modulate(x, shift, scale, 1e-6) * 2)
    q = rand(2, 3, 5, 8)
    attend = torch.compile(lambda q: ops.attention(q, q, q) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(attend(q), ops.attention(q, q, q) + 1)


def test_isa_is_reported():
    assert cpu_ops.isa() in ("avx512", "avx2", "portable")
