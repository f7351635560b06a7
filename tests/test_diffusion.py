import numpy as np
import pytest
import torch

from tinyfusion.diffusion import create_diffusion, linear_betas, sample, space_timesteps
from tinyfusion.diffusion.gaussian import _gather

from conftest import tiny_dit


def test_linear_schedule():
    b = linear_betas(1000)
    assert len(b) == 1000 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.all(np.diff(b) > 0)


@pytest.mark.parametrize("steps", [2, 25, 50, 250, 1000])
def test_respacing_keeps_the_marginals(steps):
    """A respaced process has the same alpha_bar at the kept steps, and starts at t=0, ends at t=999."""
    full = create_diffusion("")
    spaced = create_diffusion(str(steps))
    kept = sorted(space_timesteps(1000, steps))
    assert len(kept) == steps and kept[-1] == 999 and kept[0] == 0
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert list(spaced.timestep_map) == kept


def test_ddim_strided_spacing():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


def test_q_sample_matches_closed_form():
    d = create_diffusion("")
    x0 = torch.randn(4, 1, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    ab = torch.tensor(d.alphas_cumprod[[0, 10, 500, 999]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_vb_term_is_zero_for_the_true_posterior():
    """With the true noise and variance values that pick the posterior variance, the KL term vanishes."""
    d = create_diffusion("")
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 300, 999])
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # var value -1 -> posterior log-variance
    kl = d.vb_terms_bpd(out, x0, xt, t)
    assert torch.all(kl.abs() < 1e-4), kl
    worse = d.vb_terms_bpd(torch.cat([noise + 0.3, -torch.ones_like(noise)], 1), x0, xt, t)
    assert torch.all(worse > kl)


def test_training_loss_has_mse_and_vb_and_decreases():
    torch.manual_seed(0)
    from tinyfusion.data import load_digits_tensors
    from tinyfusion.models import DiT

    from conftest import tiny_config

    model = DiT(tiny_config(in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2))
    d = create_diffusion("")
    x, y = load_digits_tensors()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        idx = torch.randint(len(x), (64,), generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        terms = d.training_losses(lambda a, b: model(a, b, y[idx]), x[idx], t)
        assert set(terms) >= {"mse", "vb", "loss"}
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])  # DiT's hybrid loss, per sample
        loss = terms["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_are_deterministic_under_a_seed(sampler):
    m = tiny_dit(in_channels=1, num_classes=10)
    labels = torch.tensor([0, 3, 7])
    a = sample(m, labels, (1, 8, 8), sampler, steps=6, cfg_scale=1.5, seed=3)
    b = sample(m, labels, (1, 8, 8), sampler, steps=6, cfg_scale=1.5, seed=3)
    c = sample(m, labels, (1, 8, 8), sampler, steps=6, cfg_scale=1.5, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def perfect_denoiser(d, x0):
    """A model that knows x0: eps from x_t and x0 at the respaced timestep."""
    def oracle(x, t_model):
        t = torch.from_numpy(np.searchsorted(d.timestep_map, t_model.numpy()))
        ab = _gather(d.alphas_cumprod, t, x.ndim)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return oracle


def test_ddim_inverts_a_perfect_denoiser():
    """A model that knows x0 (eps from x_t and x0) takes DDIM straight to x0 from any noise."""
    d = create_diffusion("20", learn_sigma=False)
    from tinyfusion.diffusion.sampling import ddim_loop

    x0 = torch.rand(2, 1, 4, 4) * 2 - 1

    oracle = perfect_denoiser(d, x0)
    out = ddim_loop(d, oracle, torch.randn(2, 1, 4, 4))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddpm_ends_at_x0_with_a_perfect_denoiser():
    """Ancestral DDPM with a model that knows x0 lands on x0 whatever the noise: the last step's posterior
    mean is x0 exactly (coef2 = 0 at t = 0) and no noise is added there. Catches a sampler that adds noise
    at the last step or mixes up the posterior coefficients."""
    d = create_diffusion("25", learn_sigma=False)
    from tinyfusion.diffusion.sampling import ddpm_loop

    x0 = torch.rand(2, 1, 4, 4) * 2 - 1

    oracle = perfect_denoiser(d, x0)
    out = ddpm_loop(d, oracle, torch.randn(2, 1, 4, 4), torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_sampler_rejects_bad_settings():
    m = tiny_dit(in_channels=1, num_classes=10)
    with pytest.raises(ValueError):
        sample(m, torch.tensor([0]), (1, 8, 8), "euler")
    with pytest.raises(ValueError):
        sample(m, torch.tensor([0]), (1, 8, 8), "ddim", steps=-1)
