"""Learnable categorical distributions over each N:M group's candidate masks, sampled with Gumbel-softmax."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import candidate_masks


class MaskGates(nn.Module):
    """One logit vector per group over its C(M, N) candidates, starting uniform (the official 0.02 constant).

    sample() draws a hard one-hot per sample and per group (straight-through gradients), and returns the
    per-sample layer mask (B, depth) that selects rows of the candidate matrices.
    """

    def __init__(self, groups, init=0.02):
        super().__init__()
        self.groups = [list(g) for g in groups]
        self.logits = nn.ParameterList([nn.Parameter(torch.full((len(candidate_masks(n, m)),), init)) for n, m in groups])
        for i, (n, m) in enumerate(groups):
            self.register_buffer(f"candidates_{i}", candidate_masks(n, m), persistent=False)

    def candidates(self, i):
        return getattr(self, f"candidates_{i}")

    def sample(self, uniforms, tau, scale):
        """uniforms: per group a (B, C) tensor in (0, 1), the source of the Gumbel noise (caller-seeded)."""
        masks = []
        for i, (logit, u) in enumerate(zip(self.logits, uniforms)):
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
            soft = torch.softmax((logit * scale + gumbel) / tau, dim=-1)
            hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
            onehot = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
            masks.append(onehot @ self.candidates(i))
        return torch.cat(masks, dim=1)

    @torch.no_grad()
    def probabilities(self, scale):
        return [torch.softmax(logit * scale, dim=0) for logit in self.logits]

    @torch.no_grad()
    def decision(self):
        """Index of the most probable candidate per group."""
        return [int(logit.argmax()) for logit in self.logits]
