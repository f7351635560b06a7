"""Per-block activation checkpointing and torch.compile, through the block-stack adapter (any family).

Only each block's own `forward` is replaced: the masking and recording forward hooks stay outside the
compiled region, so drawing a new mask every step (or recording other layers) never invalidates a
compiled graph. Blocks of one family share one graph (their parameters are graph inputs).
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..models.stack import block_stack


def _checkpointed(forward, *args, **kwargs):
    # use_reentrant=False: works with kwargs, with inputs that need no grad, and under the hooks
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def wrap_blocks(model, grad_checkpoint=False, compile=False, compile_backend="inductor"):
    """Apply checkpointing and/or compilation to every block of model's stacks, in place; returns the count."""
    blocks = block_stack(model).blocks
    for block in blocks:
        forward = block.forward
        if compile:
            forward = torch.compile(forward, backend=compile_backend, dynamic=False)
        if grad_checkpoint:
            forward = functools.partial(_checkpointed, forward)
        if compile or grad_checkpoint:
            block.forward = forward
    return len(blocks)
