"""Flow matching for SiT (Ma et al. 2024): the interpolants, the training loss and the samplers.

Time runs from t = 0 (noise x0) to t = 1 (data x1) and x_t = alpha(t) x1 + sigma(t) x0 with
    linear: alpha = t,            sigma = 1 - t
    gvp:    alpha = sin(pi t / 2), sigma = cos(pi t / 2)      (variance preserving)
The network predicts the velocity dx_t/dt = alpha' x1 + sigma' x0 (default), the noise x0, or the
score -x0 / sigma; `to_velocity` converts any of them, so every sampler works with every prediction.
Samplers: the probability-flow ODE with Euler or Heun steps, and an Euler-Maruyama SDE whose diffusion
coefficient is w(t) = sigma(t) (drift v + w/2 * score), with a final deterministic step.
"""
import math

import torch

from .gaussian import prediction_mse, randn_on

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")


def coefficients(path, t):
    """alpha, sigma and their time derivatives at t (a tensor)."""
    if path == "linear":
        one = torch.ones_like(t)
        return t, 1 - t, one, -one
    if path == "gvp":
        h = math.pi / 2
        return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)
    raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")


def _expand(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(path, x1, x0, t):
    """x_t and the true velocity for data x1, noise x0 and times t (N,)."""
    a, s, da, ds = (_expand(c, x1) for c in coefficients(path, t))
    return a * x1 + s * x0, da * x1 + ds * x0


def target(path, prediction, x1, x0, t):
    """What the network regresses: the velocity, the noise x0, or the score -x0 / sigma."""
    if prediction == "velocity":
        return interpolate(path, x1, x0, t)[1]
    if prediction == "noise":
        return x0
    if prediction == "score":
        return -x0 / _expand(coefficients(path, t)[1], x0)
    raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def training_loss(model_fn, x1, path="linear", prediction="velocity", t_eps=1e-5, generator=None):
    """Per-sample flow-matching MSE at uniform t in [t_eps, 1 - t_eps] (the ends are singular for some
    predictions). model_fn(x_t, t) -> prediction. Returns the loss (N,) and the (x_t, t) used."""
    n = x1.shape[0]
    t = torch.rand(n, generator=generator, device=generator.device if generator is not None else x1.device).to(x1.device) * (1 - 2 * t_eps) + t_eps
    x0 = randn_on(x1.shape, generator, x1.device, x1.dtype)
    xt, _ = interpolate(path, x1, x0, t)
    err = (model_fn(xt, t) - target(path, prediction, x1, x0, t)) ** 2
    return err.flatten(1).mean(1), xt, t


def to_velocity(path, prediction, out, x, t):
    """The velocity implied by a noise or score prediction at x_t (velocity passes through).

    From x = alpha x1 + sigma x0: x1 = (x - sigma x0) / alpha, so v = alpha'/alpha (x - sigma x0) + sigma' x0."""
    if prediction == "velocity":
        return out
    a, s, da, ds = (_expand(c, x) for c in coefficients(path, t))
    x0 = out if prediction == "noise" else -out * s
    return da / a * (x - s * x0) + ds * x0


def score_from_velocity(path, v, x, t):
    """-E[x0 | x_t] / sigma from a velocity: solve x = alpha x1 + sigma x0, v = alpha' x1 + sigma' x0 for x0."""
    a, s, da, ds = (_expand(c, x) for c in coefficients(path, t))
    x0 = (da * x - a * v) / (da * s - a * ds)
    return -x0 / s


@torch.no_grad()
def sample_ode(velocity_fn, x0, steps=50, method="heun", t_end=1.0, progress=None):
    """Integrate dx/dt = v(x, t) from t = 0 to t_end with fixed steps (Euler or Heun)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose euler or heun")
    ts = torch.linspace(0, t_end, steps + 1, device=x0.device)
    x = x0
    for i in range(steps):
        t, dt = ts[i].expand(len(x)), ts[i + 1] - ts[i]
        v = velocity_fn(x, t)
        if method == "heun" and i < steps - 1:  # the last step stays Euler: v may be singular at t = 1
            x_next = x + dt * v
            x = x + dt * (v + velocity_fn(x_next, ts[i + 1].expand(len(x)))) / 2
        else:
            x = x + dt * v
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def sample_sde(velocity_fn, x0, path="linear", steps=250, t_eps=1e-3, generator=None, progress=None):
    """Euler-Maruyama on dx = (v + w/2 * score) dt + sqrt(w) dW with w = sigma(t), from t = 0 to
    1 - t_eps, then one deterministic velocity step to t = 1."""
    ts = torch.linspace(0, 1 - t_eps, steps, device=x0.device)
    x = x0
    for i in range(steps - 1):
        t, dt = ts[i].expand(len(x)), ts[i + 1] - ts[i]
        v = velocity_fn(x, t)
        w = _expand(coefficients(path, t)[1], x)
        drift = v + w / 2 * score_from_velocity(path, v, x, t)
        noise = randn_on(x.shape, generator, x.device, x.dtype)
        x = x + drift * dt + torch.sqrt(w * dt) * noise
        if progress is not None:
            progress.update(1)
    t = ts[-1].expand(len(x))
    return x + (1 - ts[-1]) * velocity_fn(x, t)


class FlowObjective:
    """Flow matching behind the interface the trainers use for GaussianDiffusion, so that the search,
    the baselines, calibration and Masked KD run a SiT unchanged.

    The shared machinery draws integer timesteps in [0, num_timesteps); bin i maps to the continuous
    time at its centre inside [t_eps, 1 - t_eps], which is what the network sees (SiT feeds t in [0, 1]
    to the timestep embedder). The network's extra learned-sigma channels, when it has them, are ignored.
    """

    learned_variance = False

    def __init__(self, path="linear", prediction="velocity", num_timesteps=1000, t_eps=1e-5):
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
        self.path, self.prediction, self.num_timesteps, self.t_eps = path, prediction, num_timesteps, t_eps

    def model_timesteps(self, t):
        return (t.float() + 0.5) / self.num_timesteps * (1 - 2 * self.t_eps) + self.t_eps

    def q_sample(self, x1, t, noise):
        return interpolate(self.path, x1, noise, self.model_timesteps(t))[0]

    def training_losses(self, model_fn, x1, t, noise=None):
        noise = torch.randn_like(x1) if noise is None else noise
        tc = self.model_timesteps(t)
        x_t, _ = interpolate(self.path, x1, noise, tc)
        output = model_fn(x_t, tc)
        pred = output[:, : x1.shape[1]]
        mse = ((pred - target(self.path, self.prediction, x1, noise, tc)) ** 2).flatten(1).mean(1)
        return {"mse": mse, "loss": mse, "output": output, "x_t": x_t, "model_t": tc}

    output_kd = staticmethod(prediction_mse)  # Masked KD's output term


def create_objective(config):
    """The training objective a model config names: DiT's Gaussian diffusion, SiT's flow matching, MAR's loss."""
    from .gaussian import create_diffusion

    if getattr(config, "objective", "diffusion") == "flow":
        return FlowObjective(config.path, config.prediction)
    if config.objective == "mar":
        from .mar import MARObjective

        return MARObjective()
    return create_diffusion(learn_sigma=config.learn_sigma)
