"""MAR's training objective behind the interface the trainers use for GaussianDiffusion (the model's own
masking and diffusion head do the work; this only maps the trainers' draws to per-sample seeds)."""
import torch


class MARObjective:
    """MAR's loss behind the interface the trainers use for GaussianDiffusion: `model_fn(x, t)` is the
    MAR forward on clean images with per-sample seeds t; there is no noising outside the model."""

    learned_variance = False
    num_timesteps = 1000

    def model_timesteps(self, t):
        return t

    def q_sample(self, x0, t, noise):
        return x0  # the model masks and noises its own tokens

    def training_losses(self, model_fn, x0, t, noise=None):
        """The trainers' t (in [0, 1000)) and noise, both drawn from their seeded generator, become one
        seed per sample (1000 values of t alone would repeat masks); the teacher gets the same seeds."""
        noise = torch.randn_like(x0) if noise is None else noise
        seeds = t.long().cpu() * 1_000_003 + (noise.flatten(1).double().abs().sum(1).cpu() * 1e6).long() % 1_000_003
        out = model_fn(x0, seeds)
        return {"loss": out["loss"], "mse": out["loss"], "output": out, "x_t": x0, "model_t": seeds}

    @staticmethod
    def output_kd(student_out, teacher_out, channels=None):
        """Per sample: MSE of the head's eps predictions over the masked tokens (same noised tokens)."""
        c = student_out["output"].shape[-1] // 2
        err = ((student_out["output"][..., :c] - teacher_out["output"][..., :c].detach()) ** 2).mean(-1)
        w = student_out["weight"]
        return (err * w).sum(1) / w.sum(1)
