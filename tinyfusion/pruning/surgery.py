"""Layer masks on a full model, and the shallow model that keeps only some blocks (any block stack)."""
import torch

from ..models.stack import block_stack


def masked_forward(model, x, t, y, mask=None, force_drop_ids=None):
    """Run a DiT/SiT with block i applied as m_i * block(x, c) + (1 - m_i) * x; mask: (B, depth) or None."""
    with block_stack(model).masked(mask):
        return model(x, t, y, force_drop_ids)


def fixed_mask(kept, depth, batch, device="cpu"):
    m = torch.zeros(batch, depth, device=device)
    m[:, kept] = 1.0
    return m


def prune_model(model, kept):
    """A model of the same class whose blocks are the kept ones, renumbered from 0 in every stack."""
    return block_stack(model).prune(kept)
