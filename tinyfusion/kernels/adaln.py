"""Fused adaLN: one program per token row, fp32 statistics, rows grouped by sample (b = row // tokens).

Hidden sizes that are not powers of two (DiT-XL's 1152) load a power-of-two block with the tail masked
to zero, and the centred values are masked again before the variance (Liger-Kernel #518).
"""
import triton
import triton.language as tl


@triton.jit
def modulated_norm(x, m, cols, D, eps, SHIFT, SCALE):
    """LN(x) * (1 + scale) + shift of one fp32 row (masked tail), with its mean and 1/std."""
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    shift = tl.load(SHIFT + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + cols, mask=m, other=0.0).to(tl.float32)
    return xc * rstd * (1.0 + scale) + shift, mean, rstd


@triton.jit
def ln_modulate_fwd_kernel(X, Y, SHIFT, SCALE, MEAN, RSTD, tokens, D, s_shift, s_scale, eps,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * D passes 2^31 at DiT-XL/2 batch 7282
    b = row // tokens
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    y, mean, rstd = modulated_norm(x, m, cols, D, eps, SHIFT + b * s_shift, SCALE + b * s_scale)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


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
def residual_ln_modulate_kernel(X, BRANCH, BIAS, GATE, SHIFT, SCALE, X_OUT, Y, tokens, D, s_gate, s_shift,
                                s_scale, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """x_out = x + gate * (branch + bias); y = LN(x_out) * (1 + scale) + shift. X_OUT may alias X and
    Y may alias BRANCH: each program reads its whole row before it writes it."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * D passes 2^31 at DiT-XL/2 batch 7282
    b = row // tokens
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    br = tl.load(BRANCH + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        br += tl.load(BIAS + cols, mask=m, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * s_gate + cols, mask=m, other=0.0).to(tl.float32)
    x = x + gate * br
    tl.store(X_OUT + row * D + cols, x.to(X_OUT.dtype.element_ty), mask=m)
    y, _, _ = modulated_norm(x, m, cols, D, eps, SHIFT + b * s_shift, SCALE + b * s_scale)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
