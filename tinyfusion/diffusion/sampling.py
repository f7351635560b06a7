"""DDPM (ancestral) and DDIM sampling loops, with classifier-free guidance."""
import torch

from .gaussian import _gather, create_diffusion

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}


def cfg_model_fn(model, labels, cfg_scale, null_label, guidance_channels=None):
    """A `(x, t) -> output` callable; with cfg_scale > 1 the batch is doubled with the null label."""
    if cfg_scale <= 1.0:
        return lambda x, t: model(x, t, labels)
    y = torch.cat([labels, torch.full_like(labels, null_label)])

    def fn(x, t):
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y, cfg_scale, guidance_channels)
        return out[: len(x)]

    return fn


@torch.no_grad()
def ddpm_loop(diffusion, model_fn, x, generator=None, progress=None):
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance_from_output(model_fn(x, diffusion.model_timesteps(t)), x, t)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * noise
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def ddim_loop(diffusion, model_fn, x, eta=0.0, generator=None, progress=None):
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance_from_output(model_fn(x, diffusion.model_timesteps(t)), x, t)
        eps, x0 = out["eps"], out["pred_xstart"]
        a_bar = _gather(diffusion.alphas_cumprod, t, x.ndim)
        a_prev = _gather(diffusion.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_prev)
        x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if progress is not None:
            progress.update(1)
    return x


def sample(model, labels, shape, sampler="ddim", steps=None, cfg_scale=1.5, guidance_channels=None,
           seed=0, eta=0.0, progress=None):
    """Class-conditional samples (N, C, H, W) from any DiT-like model (forward and forward_with_cfg)."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    steps = steps or DEFAULT_STEPS[sampler]
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    learn_sigma = model.config.learn_sigma
    diffusion = create_diffusion(str(steps), learn_sigma=learn_sigma)
    device = labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((len(labels), *shape), generator=generator, device=device)
    fn = cfg_model_fn(model, labels, cfg_scale, model.config.num_classes, guidance_channels)
    loop = ddim_loop if sampler == "ddim" else ddpm_loop
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    return loop(diffusion, fn, x, generator=generator, progress=progress, **kwargs)
