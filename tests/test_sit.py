"""SiT: the DiT network with the flow-matching objective, through load, sample, prune and finetune."""
import json

import pytest
import torch

import tinyfusion
from conftest import inputs, run_main, tiny_dit
from tinyfusion.diffusion import FlowObjective, create_objective, flow, sample
from tinyfusion.evaluate import main as evaluate_main
from tinyfusion.finetune import main as finetune_main
from tinyfusion.models import config_from_name
from tinyfusion.prune import main as prune_main
from tinyfusion.pruning.calibration import CalibrationSet, calibration_loss
from tinyfusion.sample import main as sample_main


def tiny_sit(**kw):
    m = tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2, learn_sigma=False, **kw)
    m.config.objective = "flow"
    return m


def test_objective_loss_is_the_flow_matching_mse():
    obj = FlowObjective("gvp", "velocity")
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    tc = obj.model_timesteps(t)
    assert 0 < tc.min() and tc.max() < 1 and torch.all(tc[1:] > tc[:-1])
    _, v = flow.interpolate("gvp", x1, noise, tc)
    exact = obj.training_losses(lambda xt, tt: v, x1, t, noise)
    assert exact["loss"].abs().max() == 0
    off = obj.training_losses(lambda xt, tt: v + 0.5, x1, t, noise)
    torch.testing.assert_close(off["loss"], torch.full((4,), 0.25))
    # extra learned-sigma channels (official SiT checkpoints carry them) are ignored
    padded = obj.training_losses(lambda xt, tt: torch.cat([v, torch.randn_like(v)], 1), x1, t, noise)
    assert padded["loss"].abs().max() == 0


def test_sit_names_and_objective_selection():
    cfg = config_from_name("SiT-XL/2")
    assert cfg.objective == "flow" and cfg.learn_sigma and cfg.depth == 28
    assert isinstance(create_objective(cfg), FlowObjective)
    assert create_objective(config_from_name("DiT-XL/2")).learned_variance


def test_official_layout_loads_as_sit_and_metadata_guards_the_objective(tmp_path, capsys):
    # An official SiT .pt is a plain DiT-key state dict: only --model sit can tell its objective.
    m = tiny_sit()
    pt = tmp_path / "SiT-tiny.pt"
    torch.save({"ema": m.state_dict()}, pt)
    assert tinyfusion.load(str(pt)).config.objective == "diffusion"
    loaded = tinyfusion.load(str(pt), model="sit", num_heads=2)  # heads: not in the keys
    assert loaded.config.objective == "flow"
    x, t, y = inputs(loaded.config)
    torch.testing.assert_close(loaded(x, t.float() / 1000, y), m(x, t.float() / 1000, y))
    st = tmp_path / "sit.safetensors"
    tinyfusion.save(m, str(st))
    assert tinyfusion.load(str(st)).config.objective == "flow"
    code, _, err = run_main(evaluate_main, ["--ckpt", str(st), "--model", "dit", "--samples", "20"], capsys)
    assert code == 2 and "SiT checkpoint" in err and "Traceback" not in err
    code, _, err = run_main(sample_main, ["--ckpt", str(st), "--sampler", "ddim", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "does not fit a SiT" in err


@pytest.mark.parametrize("sampler", ["heun", "euler", "sde"])
def test_flow_sampling_is_seeded_and_guided(sampler):
    m = tiny_sit()
    labels = torch.tensor([0, 3, 7])
    a = sample(m, labels, (1, 8, 8), sampler, steps=4, cfg_scale=2.0, seed=5)
    b = sample(m, labels, (1, 8, 8), sampler, steps=4, cfg_scale=2.0, seed=5)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, sample(m, labels, (1, 8, 8), sampler, steps=4, cfg_scale=1.0, seed=5))
    with pytest.raises(ValueError, match="does not fit"):
        sample(m, labels, (1, 8, 8), "ddim")


def test_calibration_loss_of_a_sit_is_its_flow_loss():
    m = tiny_sit()
    obj = create_objective(m.config)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    full = calibration_loss(m, obj, calib)
    t = calib.t
    direct = obj.training_losses(lambda xt, tt: m(xt, tt, calib.y), calib.x0, t, calib.noise)["loss"].mean().item()
    assert full == pytest.approx(direct, rel=1e-5)
    assert calibration_loss(m, obj, calib, kept=[0, 2]) != pytest.approx(full)


def test_prune_and_masked_kd_with_model_sit(tmp_path, capsys):
    teacher = tmp_path / "sit.pt"
    torch.save(tiny_sit().state_dict(), teacher)  # no metadata: --model sit says what it is
    out = tmp_path / "prune"
    code, _, err = run_main(prune_main, ["--ckpt", str(teacher), "--model", "sit", "--steps", "6", "--global-batch-size", "16",
                                         "--calib-samples", "32", "--out", str(out)], capsys)
    assert code == 0, err
    pruned = tinyfusion.load(str(out / "pruned.safetensors"))
    assert pruned.config.objective == "flow" and pruned.config.depth == 2
    rec = tmp_path / "rec"
    code, _, err = run_main(finetune_main, ["--ckpt", str(out / "pruned.safetensors"), "--model", "sit", "--steps", "4",
                                            "--global-batch-size", "16", "--log-every", "2", "--eval-samples", "0",
                                            "--out", str(rec)], capsys)
    assert code == 0, err
    m = json.loads((rec / "metrics.json").read_text())
    assert m["objective"] == "flow" and m["kd_weights"]["beta_start"] == 2e-4  # the paper's SiT setting
    assert "hidden_kd" in m["loss_curve"][0] and all(map(lambda p: p["loss"] == p["loss"], m["loss_curve"]))
    assert tinyfusion.load(str(rec / "recovered.safetensors")).config.objective == "flow"
