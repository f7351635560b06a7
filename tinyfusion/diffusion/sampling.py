"""DDPM (ancestral) and DDIM sampling loops, with classifier-free guidance."""
import torch

from . import flow
from .gaussian import create_diffusion, randn_on

# Heun's 25 steps cost 49 network calls, about DDIM-50's 50.
# MAR's steps are its unmasking iterations (64 as the official default, at most one per token).
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "heun": 25, "euler": 50, "sde": 250, "mar": 64}
DIFFUSION_SAMPLERS = ("ddim", "ddpm")
FLOW_SAMPLERS = ("heun", "euler", "sde")
MAR_SAMPLERS = ("mar",)


def samplers_for(config):
    """The samplers that fit a model's objective, the default first."""
    objective = getattr(config, "objective", "diffusion")
    return {"flow": FLOW_SAMPLERS, "mar": MAR_SAMPLERS}.get(objective, DIFFUSION_SAMPLERS)


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
def ddpm_loop(diffusion, model_fn, x, generator=None, progress=None, temperature=1.0, clip_denoised=False):
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance_from_output(model_fn(x, diffusion.model_timesteps(t)), x, t, clip_denoised)
        noise = randn_on(x.shape, generator, x.device, x.dtype)
        x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def ddim_loop(diffusion, model_fn, x, eta=0.0, generator=None, progress=None):
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance_from_output(model_fn(x, diffusion.model_timesteps(t)), x, t)
        eps, x0 = out["eps"], out["pred_xstart"]
        a_bar = diffusion.at(diffusion.alphas_cumprod, t, x.ndim)
        a_prev = diffusion.at(diffusion.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_prev)
        x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0 and i > 0:
            x = x + sigma * randn_on(x.shape, generator, x.device, x.dtype)
        if progress is not None:
            progress.update(1)
    return x


def sample(model, labels, shape, sampler="ddim", steps=None, cfg_scale=1.5, guidance_channels=None,
           seed=0, eta=0.0, progress=None, temperature=1.0):
    """Class-conditional samples (N, C, H, W) from any DiT- or SiT-like model (forward and forward_with_cfg)."""
    allowed = samplers_for(model.config)
    if sampler not in allowed:
        kind = {FLOW_SAMPLERS: "flow-matching (SiT)", MAR_SAMPLERS: "MAR"}.get(allowed, "diffusion (DiT)")
        raise ValueError(f"sampler {sampler!r} does not fit a {kind} model; choose {', '.join(allowed)}")
    steps = steps or DEFAULT_STEPS[sampler]
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if allowed is MAR_SAMPLERS:
        return model.sample(labels, num_iter=min(steps, model.config.seq_len), cfg=cfg_scale, temperature=temperature,
                            seed=seed, progress=progress)
    device = labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((len(labels), *shape), generator=generator, device=device)
    fn = cfg_model_fn(model, labels, cfg_scale, model.config.num_classes, guidance_channels)
    if allowed is FLOW_SAMPLERS:
        return flow_sample(model.config, fn, x, sampler, steps, generator, progress)
    diffusion = create_diffusion(str(steps), learn_sigma=model.config.learn_sigma)
    loop = ddim_loop if sampler == "ddim" else ddpm_loop
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    return loop(diffusion, fn, x, generator=generator, progress=progress, **kwargs)


def flow_sample(config, fn, x0, sampler, steps, generator=None, progress=None):
    """ODE (Heun, Euler) or SDE sampling of a flow model from noise x0; any prediction type."""
    c, path, prediction = x0.shape[1], config.path, config.prediction

    def velocity(x, t):
        # noise and score predictions are singular at t = 0 (alpha = 0): read them just after it
        tt = t if prediction == "velocity" else t.clamp(min=1e-3)
        return flow.to_velocity(path, prediction, fn(x, tt)[:, :c], x, tt)

    if sampler == "sde":
        return flow.sample_sde(velocity, x0, path, steps, generator=generator, progress=progress)
    return flow.sample_ode(velocity, x0, steps, sampler, progress=progress)
