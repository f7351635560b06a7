"""Triton kernels for the DiT block (imports torch and triton only).

    adaln.py      LayerNorm (no affine) + per-sample shift/scale, forward and backward; gate * branch +
                  residual fused with the next LayerNorm + modulation
    gelu.py       bias + tanh-GELU epilogue of the MLP's first GEMM
    attention.py  flash-attention forward (online softmax, any token count, head dims up to 128)
    ops.py        the torch.library custom ops over them (fake kernels for torch.compile and export,
                  autograd for LayerNorm + modulation) and the attention dispatch

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set
before this package is imported (tests do that); fp32 and fp16 only there.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()
