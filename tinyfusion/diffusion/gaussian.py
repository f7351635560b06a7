"""Gaussian diffusion as DiT trains and samples it (Ho et al. 2020; Nichol & Dhariwal 2021).

Schedule arrays are float64 numpy; each is copied to a device once (cached per device) and gathered there
in float64, then cast to fp32, so a training or sampling step makes no host-to-device copy and no sync.
The model is passed as a callable `model_fn(x_t, t) -> output` so that any runtime backend, a CFG
wrapper or a teacher/student pair plugs in without this module knowing about DiT.
"""
import math

import numpy as np
import torch


def linear_betas(num_timesteps=1000):
    """DiT's linear schedule, scaled so that any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps=1000, max_beta=0.999):
    """Improved DDPM's cosine schedule (MAR's diffusion head): alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def space_timesteps(num_timesteps, spacing):
    """Timesteps kept by respacing: 'ddimN' takes a stride that yields exactly N, an int N spreads N evenly."""
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        n = int(spacing[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {n} strided steps from {num_timesteps}")
    n = int(spacing)
    if not 2 <= n <= num_timesteps:
        raise ValueError(f"steps must be in 2..{num_timesteps}, got {n}")
    frac = (num_timesteps - 1) / max(n - 1, 1)
    return {round(i * frac) for i in range(n)}


def _gather(arr, t, ndim):
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def randn_on(shape, generator, device, dtype=torch.float32):
    """Standard normal noise drawn on the generator's own device (a CPU generator included) and delivered
    on `device`: a CPU generator never feeds a CUDA op, and a seeded CPU generator gives the same noise
    whichever device samples."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantized to 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def prediction_mse(student_out, teacher_out, channels):
    """Per sample: MSE of two outputs' predictions (their first `channels` channels; the rest is variance)."""
    return mean_flat((student_out[:, :channels] - teacher_out[:, :channels]) ** 2)


class GaussianDiffusion:
    """Epsilon prediction with learned-range variance (learn_sigma) or fixed small variance."""

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.learned_variance = learn_sigma
        # Respaced processes call the model with the original timestep indices.
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; clip the log to its t=1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self._tables = {}

    def _table(self, arr, device):
        """arr (a schedule array of this object) on `device`, copied there once."""
        key = (id(arr), device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(arr).to(device)
        return self._tables[key]

    def at(self, arr, t, ndim):
        """arr[t] as fp32, shaped to broadcast over an ndim tensor, from a device-resident table."""
        return self._table(arr, t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t):
        return self._table(self.timestep_map, t.device)[t]

    def q_sample(self, x_start, t, noise):
        return self.at(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start + self.at(
            self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim
        ) * noise

    def q_posterior(self, x_start, x_t, t):
        n = x_t.ndim
        mean = self.at(self.posterior_mean_coef1, t, n) * x_start + self.at(self.posterior_mean_coef2, t, n) * x_t
        return mean, self.at(self.posterior_log_variance_clipped, t, n)

    def predict_xstart(self, x_t, t, eps):
        n = x_t.ndim
        return self.at(self.sqrt_recip_alphas_cumprod, t, n) * x_t - self.at(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def split_output(self, output, x_t):
        """(eps, variance values in [-1, 1] or None) from the raw network output."""
        if self.learn_sigma:
            return torch.split(output, x_t.shape[1], dim=1)
        return output, None

    def p_mean_variance_from_output(self, output, x_t, t, clip_denoised=False):
        eps, var_values = self.split_output(output, x_t)
        n = x_t.ndim
        if var_values is not None:
            min_log = self.at(self.posterior_log_variance_clipped, t, n)
            max_log = self.at(self.log_betas, t, n)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = self.at(self.posterior_log_variance_clipped, t, n).expand_as(x_t)
        pred_xstart = self.predict_xstart(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    def vb_terms_bpd(self, output, x_start, x_t, t):
        """Variational-bound term in bits per dim (KL at t>0, decoder NLL at t=0)."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x_start, t, noise=None):
        """DiT's loss: eps-MSE plus the VB term that trains the variance (mean detached from the VB)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_t = self.model_timesteps(t)
        output = model_fn(x_t, model_t)
        eps, var_values = self.split_output(output, x_t)
        terms = {"mse": mean_flat((noise - eps) ** 2), "output": output, "x_t": x_t, "model_t": model_t}
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    output_kd = staticmethod(prediction_mse)  # Masked KD's output term


def create_diffusion(timestep_respacing="", learn_sigma=True, num_timesteps=1000, schedule="linear"):
    """The 1000-step process (DiT's linear schedule, or MAR's cosine), optionally respaced ('250', 'ddim50', ...)."""
    betas = SCHEDULES[schedule](num_timesteps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma)
    keep = sorted(space_timesteps(num_timesteps, timestep_respacing))
    alphas_cumprod = np.cumprod(1.0 - betas)
    last, new_betas = 1.0, []
    for i in keep:
        new_betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return GaussianDiffusion(np.array(new_betas), learn_sigma, timestep_map=keep)
