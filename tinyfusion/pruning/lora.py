"""LoRA on every nn.Linear: W' = W + (alpha / rank) * B @ A, with B zero-initialized (no change at start).

The wrapped layer keeps the names `weight` and `bias`, so a model with LoRA still maps onto the plain
state dict, and `merge_lora` folds the update back into ordinary nn.Linear layers.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def apply_lora(module, rank=8, alpha=None):
    """Replace every nn.Linear under `module` in place; returns the LoRA parameters."""
    alpha = 2 * rank if alpha is None else alpha
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
            setattr(module, name, LoRALinear(child, rank, alpha))
        else:
            apply_lora(child, rank, alpha)
    return [p for n, p in module.named_parameters() if "lora_" in n]


@torch.no_grad()
def merge_lora(module):
    """Fold every LoRA update into its weight and turn the layer back into a plain nn.Linear."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device=child.weight.device, dtype=child.weight.dtype)
            plain.weight.copy_(child.weight + child.scaling * child.lora_B @ child.lora_A)
            if child.bias is not None:
                plain.bias.copy_(child.bias)
            setattr(module, name, plain)
        else:
            merge_lora(child)
    return module
