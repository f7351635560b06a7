"""Calibration loss: the diffusion loss of a (masked) model on a fixed, seeded set of (x0, y, t, noise).

Every method is scored on the same tensors, so their calibration losses compare directly.
"""
import torch

from ..models.stack import block_stack
from .surgery import fixed_mask, masked_forward


class CalibrationSet:
    def __init__(self, x0, y, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x0, self.y = x0, y
        self.t = torch.randint(0, 1000, (len(x0),), generator=g)
        self.noise = torch.randn(x0.shape, generator=g)

    @classmethod
    def from_batches(cls, batches, n, seed=0):
        xs, ys, have = [], [], 0
        while have < n:
            x, y = batches.next()
            xs.append(x)
            ys.append(y)
            have += len(x)
        return cls(torch.cat(xs)[:n], torch.cat(ys)[:n], seed)

    def __len__(self):
        return len(self.x0)

    def chunks(self, size, device):
        for i in range(0, len(self), size):
            s = slice(i, i + size)
            yield self.x0[s].to(device), self.y[s].to(device), self.t[s].to(device), self.noise[s].to(device)


@torch.no_grad()
def calibration_loss(model, diffusion, calib, kept=None, batch_size=256):
    """Mean training loss (DiT: eps-MSE + VB; SiT: flow matching) of `model` keeping only `kept` blocks (all when None)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    depth, total = block_stack(model).depth, 0.0
    for x0, y, t, noise in calib.chunks(batch_size, device):
        mask = None if kept is None else fixed_mask(kept, depth, len(x0), device)
        terms = diffusion.training_losses(lambda xt, tt: masked_forward(model, xt, tt, y, mask), x0, t, noise)
        total += terms["loss"].sum().item()
    model.train(was_training)
    return total / len(calib)
