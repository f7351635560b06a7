"""Flow matching (SiT): interpolants, targets, conversions, and samplers against closed forms."""
import math

import pytest
import torch

from tinyfusion.diffusion import flow


@pytest.mark.parametrize("path", flow.PATHS)
def test_interpolant_ends_and_velocity_is_the_time_derivative(path):
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    xt0, _ = flow.interpolate(path, x1, x0, torch.zeros(4))
    xt1, _ = flow.interpolate(path, x1, x0, torch.ones(4))
    torch.testing.assert_close(xt0, x0)
    torch.testing.assert_close(xt1, x1, atol=1e-6, rtol=0)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    h = 1e-6
    num = (flow.interpolate(path, x1.double(), x0.double(), t + h)[0] -
           flow.interpolate(path, x1.double(), x0.double(), t - h)[0]) / (2 * h)
    torch.testing.assert_close(flow.interpolate(path, x1.double(), x0.double(), t)[1], num, atol=1e-8, rtol=0)


@pytest.mark.parametrize("path", flow.PATHS)
@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_every_prediction_converts_to_the_true_velocity(path, prediction):
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(5, 2, 4, 4, generator=g).double(), torch.randn(5, 2, 4, 4, generator=g).double()
    t = torch.rand(5, generator=g).double() * 0.9 + 0.05
    xt, v = flow.interpolate(path, x1, x0, t)
    out = flow.target(path, prediction, x1, x0, t)
    torch.testing.assert_close(flow.to_velocity(path, prediction, out, xt, t), v)
    torch.testing.assert_close(flow.score_from_velocity(path, v, xt, t), -x0 / flow._expand(flow.coefficients(path, t)[1], x0))


def test_training_loss_vanishes_for_the_true_target_only():
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(6, 3, generator=g)
    oracle = {}

    def model_fn(xt, t):  # knows x1, so it can return the true velocity at (xt, t)
        oracle["t"] = t
        a, s, da, ds = (flow._expand(c, xt) for c in flow.coefficients("linear", t))
        x0 = (xt - a * x1) / s
        return da * x1 + ds * x0

    loss, _, _ = flow.training_loss(model_fn, x1, generator=g)
    assert loss.shape == (6,) and loss.max() < 1e-10
    wrong, _, _ = flow.training_loss(lambda xt, t: torch.zeros_like(xt), x1, generator=g)
    assert wrong.min() > 1e-3


def point_mass_velocity(path, c):
    """The exact velocity field when the data is the single point c."""
    def v(x, t):
        a, s, da, ds = (flow._expand(q, x) for q in flow.coefficients(path, t))
        return da * c + ds * (x - a * c) / s
    return v


@pytest.mark.parametrize("path", flow.PATHS)
@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 2e-2), ("heun", 50, 2e-2)])
def test_ode_reaches_the_data_under_the_exact_field(path, method, steps, tol):
    c = torch.tensor([[1.5, -2.0, 0.25]])
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(3)).double()
    x = flow.sample_ode(point_mass_velocity(path, c.double()), x0, steps=steps, method=method)
    assert (x - c).abs().max() < tol


def test_sde_reaches_the_data_under_the_exact_field():
    c = torch.tensor([[0.5, 1.0]]).double()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 2, generator=g).double()
    x = flow.sample_sde(point_mass_velocity("linear", c), x0, "linear", steps=400, generator=g)
    assert (x - c).abs().max() < 0.1


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown path"):
        flow.coefficients("cosine", torch.zeros(1))
    with pytest.raises(ValueError, match="unknown prediction"):
        flow.target("linear", "x0", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="euler or heun"):
        flow.sample_ode(lambda x, t: x, torch.zeros(1, 1), method="rk4")
    assert math.isclose(float(flow.coefficients("gvp", torch.tensor(1.0))[0]), 1.0)
