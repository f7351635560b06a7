"""A local diffusers AutoencoderKL (e.g. sd-vae-ft-ema) for latents <-> images; never downloads."""
import os

import torch

from ..errors import UserError

SCALE = 0.18215  # Stable Diffusion VAE latent scale, as DiT uses


def load_vae(path, device="cpu"):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not a local diffusers AutoencoderKL folder (no config.json)")
    from diffusers import AutoencoderKL
    from diffusers.utils import logging

    logging.set_verbosity_error()  # no advice about optional accelerate on every load

    try:
        return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load the VAE ({str(e).splitlines()[0][:160]})") from None


@torch.no_grad()
def encode(vae, images, seeds=None):
    """images in [-1, 1] (N, 3, H, W) -> scaled latent samples (N, C, H/8, W/8). With `seeds` (one per image)
    each posterior sample comes from its own seeded generator, so an image encodes the same way whatever
    batch or rank it lands in (without, the global RNG draws, as the official script does)."""
    dist = vae.encode(images).latent_dist
    if seeds is None:
        return dist.sample() * SCALE
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)) * SCALE


@torch.no_grad()
def decode(vae, latents):
    return vae.decode(latents / SCALE).sample.clamp(-1, 1)
