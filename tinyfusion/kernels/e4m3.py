"""Per-row E4M3 quantization inside the kernels: the FP8 GEMMs' activations (runtime/fp8.py), written by the
kernel that produces them (LayerNorm + modulate, bias + GELU) or by `quantize_rows_kernel` (the attention
output). Each row's scale is its amax / 448 in fp32; row / scale is clamped to +-448 and rounded to nearest
even on E4M3's grid in fp32 before the cast, the arithmetic of runtime/fp8.py's `quantize`.

The explicit rounding makes the cast exact: the kernels then agree with PyTorch's `.to(torch.float8_e4m3fn)`
on a GPU and in Triton's interpreter alike (the interpreter's own fp32 -> E4M3 cast drops the carry when
rounding up crosses a power of two, 31.2 -> 16 in Triton 3.9).
"""
import triton
import triton.language as tl

from .rows import row_tile


@triton.jit
def round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded to nearest even on E4M3's grid: spacing 2^(e-3) in [2^e, 2^(e+1)) for
    e >= -6, 2^-9 below 2^-6 (subnormals)."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    # 1.5 * 2^(e+20) has that spacing as its fp32 ulp: adding it rounds v in fp32's own round-to-nearest-even
    magic = ((e + 147) << 23).to(tl.float32, bitcast=True) * 1.5
    return (v + magic) - magic


@triton.jit
def e4m3_rows(y, m):
    """(E4M3 values as fp32, one fp32 scale per row) of a (ROWS, BLOCK) fp32 tile; masked entries ignored."""
    amax = tl.max(tl.where(m, tl.abs(y), 0.0), axis=1)
    scale = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / scale[:, None], -448.0), 448.0)
    return round_to_e4m3(q), scale


@triton.jit
def quantize_rows_kernel(X, Q, S, n_rows, D, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows, cols, rmask, m, offs = row_tile(n_rows, D, ROWS, BLOCK)
    q, scale = e4m3_rows(tl.load(X + offs, mask=m, other=0.0).to(tl.float32), m)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S + rows, scale, mask=rmask)
