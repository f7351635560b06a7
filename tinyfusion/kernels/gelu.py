"""Bias + tanh-GELU, in place on the fc1 GEMM output: one read and one write of the hidden activations."""
import triton
import triton.language as tl


@triton.jit
def bias_gelu_kernel(H, BIAS, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * cols passes 2^31 at DiT-XL/2 batch 1821 (fc1)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < cols
    v = tl.load(H + row * cols + offs, mask=m, other=0.0).to(tl.float32)
    v += tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
    # 0.5 v (1 + tanh(u)) = v * sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3)
    u2 = 1.5957691216057308 * (v + 0.044715 * v * v * v)
    e = tl.exp(tl.minimum(-u2, 80.0))  # clamped: exp overflows to inf (harmless, but noisy) below v = -10
    tl.store(H + row * cols + offs, (v / (1.0 + e)).to(H.dtype.element_ty), mask=m)
