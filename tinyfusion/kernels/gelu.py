"""Bias + tanh-GELU, the epilogue of the MLP's first GEMM: in place (one read and one write of the hidden
activations), or as the FP8 fc2 GEMM's input (E4M3 rows with their scales, e4m3.py; h is only read)."""
import triton
import triton.language as tl

from .e4m3 import e4m3_rows


@triton.jit
def gelu_tanh(v):
    # 0.5 v (1 + tanh(u)) = v * sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3)
    u2 = 1.5957691216057308 * (v + 0.044715 * v * v * v)
    e = tl.exp(tl.minimum(-u2, 80.0))  # clamped: exp overflows to inf (harmless, but noisy) below v = -10
    return v / (1.0 + e)


@triton.jit
def bias_gelu_kernel(H, BIAS, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * cols passes 2^31 at DiT-XL/2 batch 1821 (fc1)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < cols
    v = tl.load(H + row * cols + offs, mask=m, other=0.0).to(tl.float32)
    v += tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(H + row * cols + offs, gelu_tanh(v).to(H.dtype.element_ty), mask=m)


@triton.jit
def bias_gelu_e4m3_kernel(H, BIAS, Q, S, cols, BLOCK: tl.constexpr):
    """One whole row per program (its amax is the scale): Q <- E4M3(gelu(h + bias) / scale), S <- scale."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)[None, :]  # a (1, BLOCK) tile: e4m3_rows works on rows
    m = offs < cols
    v = tl.load(H + row * cols + offs, mask=m, other=0.0).to(tl.float32)
    v += tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
    q, scale = e4m3_rows(gelu_tanh(v), m)
    tl.store(Q + row * cols + offs, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S + row + tl.arange(0, 1), scale)
