"""FP8 block GEMMs for the fused forward (`runtime.load(..., dtype="fp8")`): every block Linear (qkv, proj,
fc1, fc2) through `torch._scaled_mm` with E4M3 operands.

- Weights: E4M3 with one fp32 scale per output channel (amax / 448), quantized once at load.
- Activations: quantized per row (per token) on the fly, scale amax / 448. With the Triton ops the kernel
  that produces a GEMM's input writes it in E4M3 (kernels/e4m3.py): LayerNorm + modulate before qkv and
  fc1, bias + GELU before fc2; the attention output is quantized by one pass of its own (before proj).
- The GEMM accumulates in fp32 and applies both scales; its output is the model's dtype (bf16 on CUDA,
  fp32 on the CPU), where LayerNorm, adaLN, the residual, attention and bias+GELU stay.

On Hopper (and Ada) the GEMMs run on FP8 tensor cores; on the CPU `_scaled_mm` is PyTorch's reference
implementation: slow, but the same arithmetic, so accuracy (cosine to the unquantized forward, the digits
teacher's FID) is measured on the CPU. `qdq_linear` is the quantize-dequantize reference in fp32 the tests
hold the real path to.
"""
import functools

import torch

from ..errors import UserError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize(t, dim=-1):
    """(E4M3 tensor, fp32 scales) with one scale per slice along `dim` (keepdim): t ~ q * scale."""
    amax = t.detach().abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(q, scale):
    return q.float() * scale


def qdq_linear(x, weight, bias=None):
    """The reference: x and W rounded to E4M3 with the same scales, multiplied in fp32."""
    xs = dequantize(*quantize(x, -1))
    ws = dequantize(*quantize(weight, 1))
    out = xs @ ws.t()
    return out + bias.float() if bias is not None else out


def check_device(device):
    """FP8 GEMMs run on the CPU (PyTorch's reference) or on FP8 tensor cores: CUDA compute capability 8.9 or
    later (Ada, Hopper, Blackwell); an older GPU is refused in one line instead of failing inside a kernel."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"FP8 needs a GPU of CUDA compute capability 8.9 or later (Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


@functools.lru_cache(maxsize=None)
def rowwise_scaled_mm(device_type, out_dtype):
    """Whether `_scaled_mm` takes per-row and per-column scales on this device type for this output dtype.
    PyTorch 2.11's CPU implementation takes one scale per operand only (an internal assert otherwise), 2.13's
    takes both; on CUDA row-wise scales need a bf16 output."""
    a = torch.zeros(16, 16, device=device_type).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device_type),
                         scale_b=torch.ones(1, 16, device=device_type), out_dtype=out_dtype)
    except RuntimeError:
        return False
    return True


def block_linears(model):
    return [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]


class Fp8Gemms:
    """The fused forward's block GEMMs in FP8 (the interface of fused.TorchGemms). An input is a tensor, or
    an (E4M3, scales) pair that a kernel has already quantized. `fused`: quantize in the Triton ops (the ops
    need bias_gelu_e4m3 and quantize_rows), else in PyTorch (`quantize`)."""

    def __init__(self, model, ops, fused=False):
        self.ops, self.fused = ops, fused
        self.quantize_rows = ops.quantize_rows if fused else lambda x: quantize(x, -1)
        first = next(model.parameters())
        self.out_dtype = first.dtype
        self.rowwise = rowwise_scaled_mm(first.device.type, first.dtype)
        self.unit = torch.ones((), device=first.device)
        # weight (N, K) row-major: its transpose is the column-major (K, N) operand _scaled_mm wants
        self.weights = {}
        for m in block_linears(model):
            wq, ws = quantize(m.weight, 1)
            self.weights[id(m)] = wq, ws.t().contiguous()  # scales as the (1, N) row _scaled_mm wants

    def linear(self, x, layer, bias=True):
        wq, ws = self.weights[id(layer)]
        xq, xs = x if isinstance(x, tuple) else self.quantize_rows(x)
        b = layer.bias.to(self.out_dtype) if bias and layer.bias is not None else None
        if self.rowwise:
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=self.out_dtype)
        # unit scales, then the row and column scales on the fp32 sums: the same products and sums
        out = torch._scaled_mm(xq, wq.t(), scale_a=self.unit, scale_b=self.unit, out_dtype=torch.float32)
        out = out.mul_(xs).mul_(ws)
        return (out if b is None else out.add_(b)).to(self.out_dtype)

    def linear_gelu(self, x, layer):
        h = self.linear(x, layer, bias=False)
        if self.fused:  # fc2's input, quantized where GELU is computed
            return self.ops.bias_gelu_e4m3(h, layer.bias)
        self.ops.bias_gelu_(h, layer.bias)
        return h
