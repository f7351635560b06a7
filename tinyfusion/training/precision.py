"""Mixed precision and TF32: one place decides what dtype a training forward runs in.

bf16 and fp16 are autocast over fp32 master weights (the optimizer state and the EMA stay fp32);
fp16 adds a dynamic loss scaler. fp32 uses TF32 tensor-core matmuls on CUDA unless turned off.
"""
import contextlib

import torch

from ..errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve(precision, device):
    """'auto' is bf16 on CUDA and fp32 elsewhere (the CPU default stays exact)."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise UserError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return precision


def configure_tf32(device, enabled):
    """TF32 for fp32 matmuls and convolutions on CUDA (what the official DiT and TinyFusion code run)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(device, precision):
    """The context a training forward runs in; fp32 is no autocast at all."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def no_autocast(device):
    """Inside an autocast forward: a part that must stay fp32 (the Gumbel gates, loss arithmetic)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def grad_scaler(device, precision):
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def to_float(out):
    """A model output (tensor, tuple or MAR's dict) with its floating tensors in fp32 for the loss."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(to_float(v) for v in out)
    return out
