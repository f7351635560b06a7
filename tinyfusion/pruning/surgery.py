"""Layer masks on a full model, and the shallow model that keeps only some blocks."""
import copy

import torch

from ..models import DiT


def masked_forward(model, x, t, y, mask=None, force_drop_ids=None):
    """Run `model` with block i applied as m_i * block(x, c) + (1 - m_i) * x; mask: (B, depth) or None."""
    h, c = model.embed(x, t, y, force_drop_ids)
    for i, block in enumerate(model.blocks):
        if mask is None:
            h = block(h, c)
        else:
            m = mask[:, i].view(-1, 1, 1).to(h.dtype)
            h = m * block(h, c) + (1 - m) * h
    return model.head(h, c)


def fixed_mask(kept, depth, batch, device="cpu"):
    m = torch.zeros(batch, depth, device=device)
    m[:, kept] = 1.0
    return m


def prune_model(model, kept):
    """A plain DiT of depth len(kept) whose blocks are model.blocks[kept] renumbered 0..N-1."""
    cfg = copy.deepcopy(model.config)
    cfg.depth = len(kept)
    shallow = DiT(cfg).to(next(model.parameters()).device)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            _, idx, rest = k.split(".", 2)
            if int(idx) in kept:
                sd[f"blocks.{kept.index(int(idx))}.{rest}"] = v
        else:
            sd[k] = v
    shallow.load_state_dict(sd, strict=True)
    return shallow.eval()
