"""Fused adaLN, fp32 statistics, rows grouped by sample (b = row // tokens). The forward kernels take ROWS
token rows per program as one (ROWS, BLOCK) tile (one row per program left most of an SM idle at DiT-XL/2's
1152 columns: 38-44% of copy bandwidth on an H200); the backward keeps one row per program.

Hidden sizes that are not powers of two (DiT-XL's 1152) load a power-of-two block with the tail masked
to zero, and the centred values are masked again before the variance (Liger-Kernel #518).

With QUANT the forward kernels write their output as the next FP8 GEMM's input instead: E4M3 rows and one
fp32 scale per row (e4m3.py), which saves that GEMM a separate read, reduction and write of its activations.
"""
import triton
import triton.language as tl

from .e4m3 import e4m3_rows
from .rows import row_tile


@triton.jit
def modulated_norm(x, m, cols, b, D, eps, SHIFT, SCALE, s_shift, s_scale):
    """LN(x) * (1 + scale) + shift of fp32 rows (masked tails), each row modulated by its sample b's shift
    and scale, with each row's mean and 1/std."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(SHIFT + b[:, None] * s_shift + cols[None, :], mask=m, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b[:, None] * s_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * (1.0 + scale) + shift, mean, rstd


@triton.jit
def store_rows(Y, Y_SCALE, y, offs, m, rows, rmask, QUANT: tl.constexpr):
    """y in Y's dtype, or (QUANT) as E4M3 rows with their scales in Y_SCALE."""
    if QUANT:
        q, scale = e4m3_rows(y, m)
        tl.store(Y + offs, q.to(Y.dtype.element_ty), mask=m)
        tl.store(Y_SCALE + rows, scale, mask=rmask)
    else:
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def ln_modulate_fwd_kernel(X, Y, Y_SCALE, SHIFT, SCALE, MEAN, RSTD, n_rows, tokens, D, s_shift, s_scale, eps,
                           BLOCK: tl.constexpr, ROWS: tl.constexpr, STORE_STATS: tl.constexpr, QUANT: tl.constexpr):
    """STORE_STATS: keep each row's mean and 1/std for the backward (inference stores nothing). QUANT: Y is
    the next FP8 GEMM's input, E4M3 with one scale per row in Y_SCALE (e4m3.py)."""
    rows, cols, rmask, m, offs = row_tile(n_rows, D, ROWS, BLOCK)
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    y, mean, rstd = modulated_norm(x, m, cols, rows // tokens, D, eps, SHIFT, SCALE, s_shift, s_scale)
    store_rows(Y, Y_SCALE, y, offs, m, rows, rmask, QUANT)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def ln_modulate_bwd_kernel(DY, X, SCALE, MEAN, RSTD, DX, DSCALE_ROWS, tokens, D, s_scale,
                           BLOCK: tl.constexpr):
    """dx per row; dy * xhat per row (summed over tokens afterwards into dscale; dshift is sum of dy)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * D passes 2^31 at DiT-XL/2 batch 7282
    b = row // tokens
    cols = tl.arange(0, BLOCK)
    m = cols < D
    dy = tl.load(DY + row * D + cols, mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * s_scale + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(m, (x - mean) * rstd, 0.0)
    g = dy * (1.0 + scale)
    c1 = tl.sum(xhat * g, axis=0) / D
    c2 = tl.sum(g, axis=0) / D
    dx = (g - xhat * c1 - c2) * rstd
    tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DSCALE_ROWS + row * D + cols, dy * xhat, mask=m)


@triton.jit
def residual_ln_modulate_kernel(X, BRANCH, BIAS, GATE, SHIFT, SCALE, X_OUT, Y, Y_SCALE, n_rows, tokens, D, s_gate,
                                s_shift, s_scale, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                                ROWS: tl.constexpr, QUANT: tl.constexpr):
    """x_out = x + gate * (branch + bias); y = LN(x_out) * (1 + scale) + shift. X_OUT may alias X and
    Y may alias BRANCH: each program reads its whole rows before it writes them. QUANT: as above."""
    rows, cols, rmask, m, offs = row_tile(n_rows, D, ROWS, BLOCK)
    b = rows // tokens
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    br = tl.load(BRANCH + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        br += tl.load(BIAS + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    gate = tl.load(GATE + b[:, None] * s_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x = x + gate * br
    tl.store(X_OUT + offs, x.to(X_OUT.dtype.element_ty), mask=m)
    y, _, _ = modulated_norm(x, m, cols, b, D, eps, SHIFT, SCALE, s_shift, s_scale)
    store_rows(Y, Y_SCALE, y, offs, m, rows, rmask, QUANT)

