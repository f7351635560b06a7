"""The C++ fused CPU ops (csrc/fused_ops.cpp) as torch.library ops, with fake kernels for torch.compile.

    ln_modulate(x, shift, scale, eps) -> LN(x) * (1 + scale) + shift
    residual_ln_modulate_(x, branch, bias, gate, shift, scale, eps): x += gate * (branch + bias);
        branch <- LN(x) * (1 + scale) + shift          (both in place: no allocation per block)
    bias_gelu_(h, bias): h <- gelu_tanh(h + bias)       (in place, after the fc1 GEMM)
    attention(q, k, v) -> softmax(q k^T / sqrt(d)) v    ((B, H, N, d) views, unit stride along d -> (B, N, H, d))
"""
import torch

from ..errors import UserError

try:
    from .. import _C
except ImportError as e:  # not built: say how, once, where the backend is asked for
    _C, _IMPORT_ERROR = None, e
else:
    _IMPORT_ERROR = None

    @torch.library.register_fake("tinyfusion_cpu::ln_modulate")
    def _(x, shift, scale, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("tinyfusion_cpu::residual_ln_modulate_")
    def _(x, branch, bias, gate, shift, scale, eps):
        return None

    @torch.library.register_fake("tinyfusion_cpu::bias_gelu_")
    def _(h, bias):
        return None

    @torch.library.register_fake("tinyfusion_cpu::attention")
    def _(q, k, v):
        B, H, N, d = q.shape
        return q.new_empty(B, N, H, d)


def require():
    """The op namespace, or a one-line UserError that says how to build the extension."""
    if _C is None:
        raise UserError(f"the C++ CPU ops are not built ({_IMPORT_ERROR}); build them with "
                        "`pip install --no-build-isolation -e .` (needs a C++ compiler)")
    return torch.ops.tinyfusion_cpu


def isa():
    """The instruction set the fused row loops run with on this CPU: avx512, avx2 or portable."""
    require()
    return _C.isa()
