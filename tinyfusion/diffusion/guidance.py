"""Classifier-free guidance's combine step, shared by DiT's forward_with_cfg (every runtime backend and
the ONNX graph trace it) and MAR's diffusion head."""
import torch


def guide(out, channels, scale):
    """`out` is a batch whose second half is the unconditional copy of the first: its first `channels`
    channels become uncond + scale * (cond - uncond) in both halves; the rest (a learned variance) stay
    as each half computed them."""
    eps, rest = out[:, :channels], out[:, channels:]
    cond, uncond = eps.chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)
