"""The Triton kernels as torch.library custom ops (fake kernels, so torch.compile and export see them;
autograd for LayerNorm + modulation), and the attention dispatch.

    ln_modulate(x, shift, scale, eps)                       LN(x) * (1 + scale) + shift, differentiable
    residual_ln_modulate_(x, branch, bias, gate, shift, scale, eps)   x += gate * (branch + bias);
                                                            branch <- LN(x) * (1 + scale) + shift
    bias_gelu_(h, bias)                                     h <- gelu_tanh(h + bias)
    ln_modulate_e4m3, residual_ln_modulate_e4m3_, bias_gelu_e4m3, quantize_rows
                                                            the same (inference), written as an FP8 GEMM's
                                                            input: E4M3 rows and their fp32 scales
    attention(q, k, v)  (B, H, N, d) views -> (B, N, H, d): flash-attn, else SDPA (our Triton kernel in the
                        interpreter, or when TINYFUSION_ATTENTION=triton)

x is (B, N, D) contiguous; shift/scale/gate are (B, D) rows with unit stride along D (views into the
batched adaLN output are fine). Statistics and accumulation are fp32 for fp32/fp16/bf16 inputs.
"""
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from . import INTERPRET, next_power_of_2
from .adaln import ln_modulate_bwd_kernel, ln_modulate_fwd_kernel, residual_ln_modulate_kernel
from .attention import flash_attention_fwd_kernel
from .e4m3 import quantize_rows_kernel
from .gelu import bias_gelu_e4m3_kernel, bias_gelu_kernel

log = logging.getLogger("tinyfusion.kernels")


def _warps(d):
    return 4 if d <= 1024 else 8


def row_launch(d, n_rows):
    """(ROWS, num_warps) of the forward adaLN kernels: about 4096 elements per program (ROWS = 2 at DiT-XL/2's
    1152 columns, 32 at the digits model's 128), never more rows than there are; TINYFUSION_ADALN_ROWS and
    TINYFUSION_ADALN_WARPS override both (bench/kernels.py --adaln-sweep measures the choices on a GPU)."""
    block = next_power_of_2(d)
    rows = int(os.environ.get("TINYFUSION_ADALN_ROWS") or max(1, min(32, 4096 // block)))
    if rows & (rows - 1):
        raise ValueError(f"TINYFUSION_ADALN_ROWS must be a power of two, got {rows}")
    rows = min(rows, next_power_of_2(n_rows))
    warps = int(os.environ.get("TINYFUSION_ADALN_WARPS") or (4 if rows * block <= 2048 else 8))
    return rows, warps


def launch_ln_modulate(x, shift, scale, eps, store_stats, quant=False):
    B, N, D = x.shape
    n = B * N
    y, y_scale = quantized_output(x) if quant else (torch.empty_like(x), x)
    mean = torch.empty(n if store_stats else 0, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    rows, warps = row_launch(D, n)
    ln_modulate_fwd_kernel[(-(-n // rows),)](x, y, y_scale, shift, scale, mean, rstd, n, N, D, shift.stride(0),
                                             scale.stride(0), eps, BLOCK=next_power_of_2(D), ROWS=rows,
                                             STORE_STATS=store_stats, QUANT=quant, num_warps=warps)
    return y, y_scale, mean, rstd


def quantized_output(x):
    """The (rows, columns) E4M3 buffer and (rows, 1) fp32 scales a kernel writes an FP8 GEMM's input into."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    return (torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn),
            torch.empty(rows, 1, device=x.device, dtype=torch.float32))


# The kernels index raw pointers with the strides these shapes imply: a wrong layout would read the wrong
# elements silently, so each op checks its inputs first, as the C++ ops do (one-line ValueErrors).
def check_tokens(x, name="x"):
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (B, N, D) tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")


def check_rows(m, x, name):
    """A (B, D) modulation row block with unit stride along D (a view into the adaLN output is fine)."""
    if m.dim() != 2 or m.shape[0] != x.shape[0] or m.shape[1] != x.shape[2] or m.stride(1) != 1:
        raise ValueError(f"{name} must be (B, D) = ({x.shape[0]}, {x.shape[2]}) with unit stride along D, got "
                         f"shape {tuple(m.shape)} with strides {m.stride()}")
    if m.device != x.device:
        raise ValueError(f"{name} is on {m.device}, x on {x.device}")


def check_bias(bias, d, name="bias"):
    if bias.dim() != 1 or bias.shape[0] != d or not bias.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({d},) vector, got shape {tuple(bias.shape)}")


@torch.library.custom_op("tinyfusion_triton::ln_modulate_fwd", mutates_args=())
def ln_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    check_tokens(x)
    check_rows(shift, x, "shift")
    check_rows(scale, x, "scale")
    y, _, mean, rstd = launch_ln_modulate(x, shift, scale, eps, store_stats=True)
    return y, mean, rstd


@ln_modulate_fwd.register_fake
def _(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("tinyfusion_triton::ln_modulate_bwd", mutates_args=())
def ln_modulate_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    dx = torch.empty_like(x)
    dscale_rows = torch.empty(B * N, D, device=x.device, dtype=torch.float32)
    ln_modulate_bwd_kernel[(B * N,)](dy, x, scale, mean, rstd, dx, dscale_rows, N, D, scale.stride(0),
                                     BLOCK=next_power_of_2(D), num_warps=_warps(D))
    dshift = dy.float().view(B, N, D).sum(1).to(scale.dtype)
    return dx, dshift, dscale_rows.view(B, N, D).sum(1).to(scale.dtype)


@ln_modulate_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    return torch.empty_like(x), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _setup(ctx, inputs, output):
    x, _, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = ln_modulate_bwd(dy.contiguous(), x, scale, mean, rstd)
    return dx, dshift, dscale, None


ln_modulate_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("tinyfusion_triton::ln_modulate_infer", mutates_args=())
def ln_modulate_infer(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """The forward alone: no statistics written (nothing will run a backward)."""
    check_tokens(x)
    check_rows(shift, x, "shift")
    check_rows(scale, x, "scale")
    return launch_ln_modulate(x, shift, scale, eps, store_stats=False)[0]


@ln_modulate_infer.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x)


@torch.library.custom_op("tinyfusion_triton::ln_modulate_e4m3", mutates_args=())
def ln_modulate_e4m3(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LN(x) * (1 + scale) + shift as an FP8 GEMM's input: (B*N, D) E4M3 rows and their (B*N, 1) scales."""
    check_tokens(x)
    check_rows(shift, x, "shift")
    check_rows(scale, x, "scale")
    return launch_ln_modulate(x, shift, scale, eps, store_stats=False, quant=True)[:2]


@ln_modulate_e4m3.register_fake
def _(x, shift, scale, eps):
    return quantized_output(x)


def ln_modulate(x, shift, scale, eps=1e-6):
    if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad):
        return ln_modulate_fwd(x, shift, scale, eps)[0]
    return ln_modulate_infer(x, shift, scale, eps)


def launch_residual_ln_modulate(x, branch, bias, gate, shift, scale, eps, y, y_scale, quant):
    check_tokens(x)
    check_tokens(branch, "branch")
    if branch.shape != x.shape:
        raise ValueError(f"branch must have the shape of x {tuple(x.shape)}, got {tuple(branch.shape)}")
    if bias is not None:
        check_bias(bias, x.shape[2])
    for name, m in (("gate", gate), ("shift", shift), ("scale", scale)):
        check_rows(m, x, name)
    B, N, D = x.shape
    n = B * N
    rows, warps = row_launch(D, n)
    residual_ln_modulate_kernel[(-(-n // rows),)](x, branch, bias if bias is not None else x, gate, shift, scale, x,
                                                  y, y_scale, n, N, D, gate.stride(0), shift.stride(0),
                                                  scale.stride(0), eps, HAS_BIAS=bias is not None,
                                                  BLOCK=next_power_of_2(D), ROWS=rows, QUANT=quant, num_warps=warps)


@torch.library.custom_op("tinyfusion_triton::residual_ln_modulate_", mutates_args=("x", "branch"))
def residual_ln_modulate_(x: Tensor, branch: Tensor, bias: Tensor | None, gate: Tensor, shift: Tensor, scale: Tensor,
                          eps: float) -> None:
    launch_residual_ln_modulate(x, branch, bias, gate, shift, scale, eps, branch, x, quant=False)


@residual_ln_modulate_.register_fake
def _(x, branch, bias, gate, shift, scale, eps):
    return None


@torch.library.custom_op("tinyfusion_triton::residual_ln_modulate_e4m3_", mutates_args=("x",))
def residual_ln_modulate_e4m3_(x: Tensor, branch: Tensor, bias: Tensor | None, gate: Tensor, shift: Tensor,
                               scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x += gate * (branch + bias); LN(x) * (1 + scale) + shift returned as an FP8 GEMM's input (E4M3 rows
    and their scales, as ln_modulate_e4m3); branch is only read."""
    y, y_scale = quantized_output(x)
    launch_residual_ln_modulate(x, branch, bias, gate, shift, scale, eps, y, y_scale, quant=True)
    return y, y_scale


@residual_ln_modulate_e4m3_.register_fake
def _(x, branch, bias, gate, shift, scale, eps):
    return quantized_output(x)


def check_hidden(h, bias):
    if not h.is_contiguous() or h.shape[-1] != bias.numel():
        raise ValueError(f"h must be contiguous with its last dimension the bias's {bias.numel()}, got shape "
                         f"{tuple(h.shape)} with strides {h.stride()}")
    check_bias(bias, h.shape[-1])


@torch.library.custom_op("tinyfusion_triton::bias_gelu_", mutates_args=("h",))
def bias_gelu_(h: Tensor, bias: Tensor) -> None:
    check_hidden(h, bias)
    cols = bias.shape[0]
    block = min(1024, next_power_of_2(cols))
    bias_gelu_kernel[(h.numel() // cols, -(-cols // block))](h, bias, cols, BLOCK=block, num_warps=4)


@bias_gelu_.register_fake
def _(h, bias):
    return None


@torch.library.custom_op("tinyfusion_triton::bias_gelu_e4m3", mutates_args=())
def bias_gelu_e4m3(h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """gelu_tanh(h + bias) as an FP8 GEMM's input: (rows, cols) E4M3 and (rows, 1) scales; h is only read."""
    check_hidden(h, bias)
    q, s = quantized_output(h)
    cols = bias.shape[0]
    block = next_power_of_2(cols)  # the whole row in one program: its amax is the scale
    bias_gelu_e4m3_kernel[(q.shape[0],)](h, bias, q, s, cols, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s


@bias_gelu_e4m3.register_fake
def _(h, bias):
    return quantized_output(h)


@torch.library.custom_op("tinyfusion_triton::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(E4M3 rows, (rows, 1) fp32 scales) of a contiguous tensor, one scale per row of its last dimension:
    runtime/fp8.py's `quantize(x, -1)` in one pass."""
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got shape {tuple(x.shape)} with strides {x.stride()}")
    q, s = quantized_output(x)
    n, d = q.shape
    rows, warps = row_launch(d, n)
    quantize_rows_kernel[(-(-n // rows),)](x, q, s, n, d, BLOCK=next_power_of_2(d), ROWS=rows, num_warps=warps)
    return q, s


@quantize_rows.register_fake
def _(x):
    return quantized_output(x)


@torch.library.custom_op("tinyfusion_triton::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, N, d) views in, (B, N, H, d) contiguous out (so the output projection reads it as is)."""
    return launch_flash_attention(q, k, v, *((16, 16) if INTERPRET else (64, 64)))


def launch_flash_attention(q, k, v, block_m, block_n, num_warps=4, num_stages=None):
    """The kernel launch behind flash_attention, with its tile sizes open (bench/kernels.py sweeps them)."""
    B, H, N, d = q.shape
    out = torch.empty(B, N, H, d, device=q.device, dtype=q.dtype)
    o = out.transpose(1, 2)
    grid = (-(-N // block_m), B * H)
    flash_attention_fwd_kernel[grid](q, k, v, o, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                     k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1),
                                     o.stride(2), H, N, d, d ** -0.5, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_D=max(16, next_power_of_2(d)), IEEE=q.dtype == torch.float32,
                                     num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    return out


@flash_attention.register_fake
def _(q, k, v):
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d)


@functools.cache  # asked on every attention call: a failed import would search sys.path each time
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


_logged = set()


ATTENTION_CHOICES = ("flash-attn", "sdpa", "triton")


def attention_choice(q):
    """flash-attn for fp16/bf16 on CUDA when installed; else PyTorch's SDPA (its own flash kernel) on CUDA,
    which ran 3.3-3.6x faster than our Triton kernel at DiT-XL/2 shapes on an H200 (bench/kernels.py,
    bench/results/gpu_h200.md); our kernel in the interpreter (tests). TINYFUSION_ATTENTION overrides.
    Logged once per choice."""
    choice = os.environ.get("TINYFUSION_ATTENTION")
    if choice not in (None, "", *ATTENTION_CHOICES):
        raise UserError(f"TINYFUSION_ATTENTION={choice!r}: choose from {', '.join(ATTENTION_CHOICES)}")
    if not choice:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None:
            choice = "flash-attn"
        else:
            choice = "triton" if INTERPRET else "sdpa"
    elif choice == "flash-attn" and _flash_attn_func() is None:
        raise UserError("TINYFUSION_ATTENTION=flash-attn: the flash-attn package is not installed")
    if choice not in _logged:
        _logged.add(choice)
        log.info("attention: %s", choice)
    return choice


def attention(q, k, v):
    choice = attention_choice(q)
    if choice == "flash-attn":
        return _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if choice == "triton":
        return flash_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
