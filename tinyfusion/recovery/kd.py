"""Masked knowledge distillation (TinyFusion eq. 8): 0.9 * output KD + 0.1 * diffusion loss + beta * masked hidden KD.

Output KD is the eps MSE against the teacher plus the learned-variance term (the KL between the
teacher's and the student's posteriors, student mean detached). Hidden KD matches each aligned student
layer to the output of its teacher block, ignoring per sample the "massive activations": positions
where |h - mean| >= k * std (mean and std over all tokens and channels of that sample), in either model.
"""
import math
from dataclasses import dataclass

import torch

from ..diffusion.gaussian import mean_flat, normal_kl
from ..pruning.masks import group_starts


@dataclass
class KDWeights:
    alpha_kd: float = 0.9
    alpha_gt: float = 0.1
    beta_start: float = 1e-2
    beta_end: float = 0.0
    mask_k: float = 2.0

    def beta(self, progress):
        """Linear decay from beta_start to beta_end over training (progress in [0, 1])."""
        return self.beta_start + (self.beta_end - self.beta_start) * progress

    @staticmethod
    def fields_used(kd):
        """The weights a --kd mode reads: none trains on the diffusion loss alone, logits adds output KD."""
        return {"none": (), "logits": ("alpha_kd", "alpha_gt"),
                "masked": ("alpha_kd", "alpha_gt", "beta_start", "beta_end", "mask_k")}[kd]

    def used(self, kd):
        return {k: getattr(self, k) for k in self.fields_used(kd)}


def alignment(groups, kept):
    """(student layer, teacher layer) pairs whose hidden states are matched.

    When the kept layers follow the N:M groups (the learnable search), the last kept layer of each group
    is matched to the output of the group's last teacher layer, as the official code does for any N:M or
    mixed groups. Masks that ignore the groups (score baselines) match each student layer to the teacher
    output just before the next kept layer: the span of teacher layers it replaces.
    """
    pairs, student = [], 0
    for (n, m), start in zip(groups, group_starts(groups)):
        inside = [k for k in kept if start <= k < start + m]
        if len(inside) != n:
            return [(j, (kept[j + 1] - 1) if j + 1 < len(kept) else sum(m for _, m in groups) - 1) for j in range(len(kept))]
        student += n
        pairs.append((student - 1, start + m - 1))
    return pairs


def outlier_mask(h, k):
    """1 where |h - mean| < k * std, per sample over tokens and channels."""
    flat = h.flatten(1)
    mean = flat.mean(1).view(-1, *([1] * (h.ndim - 1)))
    std = flat.std(1).view(-1, *([1] * (h.ndim - 1)))
    return ((h - mean).abs() < k * std).to(h.dtype)


def masked_hidden_kd(student_h, teacher_h, k):
    """mean_flat((mask_s * h_s - mask_t * h_t)^2), teacher detached."""
    t = teacher_h.detach()
    return mean_flat((outlier_mask(student_h, k) * student_h - outlier_mask(t, k) * t) ** 2)


def variance_kd(diffusion, student_out, teacher_out, x_t, t):
    """KL(teacher posterior || student posterior) in bits, through the student's variance only."""
    c = x_t.shape[1]
    frozen = torch.cat([student_out[:, :c].detach(), student_out[:, c:]], dim=1)
    s = diffusion.p_mean_variance_from_output(frozen, x_t, t)
    te = diffusion.p_mean_variance_from_output(teacher_out.detach(), x_t, t)
    return mean_flat(normal_kl(te["mean"], te["log_variance"], s["mean"], s["log_variance"])) / math.log(2.0)
