"""Pruning internals: candidate masks, Gumbel gates, LoRA, surgery, the learnable search, baselines."""
import math

import pytest
import torch

from tinyfusion.diffusion import create_diffusion
from tinyfusion.errors import UserError
from tinyfusion.models.stack_base import validate_kept
from tinyfusion.pruning import baselines
from tinyfusion.pruning.calibration import CalibrationSet, calibration_loss
from tinyfusion.pruning.gates import MaskGates
from tinyfusion.pruning.learnable import LearnableSearch, SearchConfig
from tinyfusion.pruning.lora import LoRALinear, apply_lora, merge_lora
from tinyfusion.pruning.masks import candidate_masks, kept_from_choices, parse_groups, parse_scheme
from tinyfusion.pruning.surgery import fixed_mask, masked_forward, prune_model

from conftest import inputs, tiny_dit


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 6), (7, 14), (6, 12), (3, 4), (4, 4)])
def test_candidate_enumeration(n, m):
    c = candidate_masks(n, m)
    assert c.shape == (math.comb(m, n), m)
    assert torch.all(c.sum(1) == n) and set(c.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(r.tolist()) for r in c}) == len(c)  # all distinct


def test_candidate_order_matches_paper_example():
    assert candidate_masks(2, 3).tolist() == [[1, 1, 0], [1, 0, 1], [0, 1, 1]]


def test_schemes_and_groups():
    assert parse_scheme("1:2", 12) == [[1, 2]] * 6
    assert parse_scheme("7:14", 28) == [[7, 14]] * 2
    groups = parse_groups("[[3,4],[3,4],[3,4],[3,4],[3,4],[2,4],[2,4]]", 28)
    assert sum(n for n, _ in groups) == 19
    assert kept_from_choices([[1, 2], [2, 4]], [1, 5]) == [1, 4, 5]


@pytest.mark.parametrize("text,depth,fragment", [
    ("3:2", 12, "must not exceed"), ("0:2", 12, "positive"), ("1:5", 12, "does not divide"), ("12", 12, "N:M"),
])
def test_bad_schemes(text, depth, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_scheme(text, depth)


@pytest.mark.parametrize("text,fragment", [
    ("[[1,2],[1,2]]", "sum to 4"), ("[[3,2]]", "keeps more"), ("[[0,12]]", "positive"), ("nope", "JSON"), ("[]", "empty"),
])
def test_bad_groups(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_groups(text, 12)


def test_validate_kept():
    assert validate_kept([4, 0, 2], 6) == [0, 2, 4]
    with pytest.raises(UserError, match="outside"):
        validate_kept([0, 6], 6)
    with pytest.raises(UserError, match="duplicates"):
        validate_kept([1, 1], 6)


def test_gate_masks_are_hard_one_candidate_per_block_and_carry_gradients():
    groups = [[1, 2], [2, 4], [2, 3]]
    gates = MaskGates(groups)
    g = torch.Generator().manual_seed(0)
    uniforms = [torch.rand(5, len(l), generator=g) for l in gates.logits]
    mask = gates.sample(uniforms, tau=1.0, scale=100.0)
    assert mask.shape == (5, 9) and set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert mask[:, :2].sum(1).tolist() == [1] * 5 and mask[:, 2:6].sum(1).tolist() == [2] * 5
    assert mask[:, 6:9].sum(1).tolist() == [2] * 5  # the last group too (an off-by-one on the final slice)
    for i, (start, width) in enumerate([(0, 2), (2, 4), (6, 3)]):  # each row of a group is one of its candidates
        rows = {tuple(r.tolist()) for r in gates.candidates(i)}
        assert all(tuple(r.tolist()) in rows for r in mask[:, start:start + width].detach())
    (mask * torch.arange(9.0)).sum().backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for l in gates.logits)
    # per-sample draws: different samples can pick different candidates
    big = gates.sample([torch.rand(64, len(l), generator=g) for l in gates.logits], 1.0, 100.0)
    assert len({tuple(r.tolist()) for r in big.detach()}) > 1


def test_lora_starts_as_identity_trains_and_merges():
    m = tiny_dit()
    x, t, y = inputs(m.config)
    ref = m(x, t, y)
    lora = apply_lora(m.blocks, rank=4)
    assert all(isinstance(l, LoRALinear) for l in [m.blocks[0].attn.qkv, m.blocks[0].mlp.fc2, m.blocks[0].adaLN_modulation[1]])
    torch.testing.assert_close(m(x, t, y), ref)
    out = m(x, t, y)
    out.square().sum().backward()
    assert all(p.grad is not None for p in lora) and m.blocks[0].attn.qkv.weight.grad is None
    with torch.no_grad():
        for p in lora:
            p.add_(torch.randn_like(p) * 0.05)
    changed = m(x, t, y)
    merge_lora(m)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    torch.testing.assert_close(m(x, t, y), changed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kept", [[0, 2], [1], [0, 1, 2]])
def test_pruned_model_equals_full_model_with_fixed_mask(kept):
    m = tiny_dit()
    x, t, y = inputs(m.config)
    shallow = prune_model(m, kept)
    assert shallow.config.depth == len(kept)
    with torch.no_grad():
        torch.testing.assert_close(shallow(x, t, y), masked_forward(m, x, t, y, fixed_mask(kept, 3, len(x))), atol=1e-6, rtol=1e-6)


def digits_setup(depth=4, seed=0):
    from tinyfusion.data.batches import DigitsBatches

    m = tiny_dit(seed=seed, in_channels=1, num_classes=10, depth=depth, hidden_size=32, num_heads=2)
    calib = CalibrationSet.from_batches(DigitsBatches(64, 99), 64)
    return m, create_diffusion(""), calib


def search(model, steps=12, seed=0, **kw):
    from tinyfusion.data.batches import DigitsBatches

    cfg = SearchConfig(groups=[[1, 2], [1, 2]], steps=steps, global_batch_size=16, seed=seed, log_every=4, **kw)
    return LearnableSearch(model, create_diffusion(""), DigitsBatches(16, seed), cfg)


def test_search_gradients_reach_gates_and_lora():
    m, _, _ = digits_setup()
    s = search(m)
    before = [p.detach().clone() for p in s.trainable]
    s.engine.train_step()  # one optimizer step moves every gate and the LoRA update: gradients reached them
    moved = [not torch.equal(a, p) for a, p in zip(before, s.trainable)]
    assert all(moved[len(s.weights):]) and any(moved[: len(s.weights)])
    assert all("lora_" in n for n, p in s.net.model.named_parameters() if p.requires_grad)


def test_search_ema_follows_every_trainable_tensor():
    """After one step each EMA tensor is 0.999 * its start + 0.001 * the trained value, gates included:
    a frozen, skipped or gates-only EMA (the decision's source) fails."""
    m, _, _ = digits_setup()
    s = search(m)
    start = [p.detach().clone() for p in s.trainable]
    s.engine.train_step()
    assert len(s.engine.ema) == len(s.trainable) == len(start)
    for e, p0, p in zip(s.engine.ema, start, s.trainable):
        torch.testing.assert_close(e, 0.999 * p0 + 0.001 * p.detach(), rtol=0, atol=1e-7)
    assert any(not torch.equal(e, p0) for e, p0 in zip(s.ema_logits(), start[len(s.weights):]))


def test_search_decision_is_deterministic_under_a_seed():
    a = search(digits_setup()[0], seed=3)
    b = search(digits_setup()[0], seed=3)
    assert a.run(progress=False) == b.run(progress=False)
    assert a.history == b.history and len(a.history) == 3
    assert [p["step"] for p in a.history] == [4, 8, 12]


@pytest.mark.parametrize("delta_w", ["full", "none"])
def test_search_weight_update_modes(delta_w):
    m, _, _ = digits_setup()
    s = search(m, steps=2, delta_w=delta_w)
    s.run(progress=False)
    assert (len(s.weights) > 0) == (delta_w == "full")


def test_calibration_loss_matches_pruned_model():
    m, d, calib = digits_setup()
    kept = [0, 3]
    shallow = prune_model(m, kept)
    assert calibration_loss(m, d, calib, kept=kept) == pytest.approx(calibration_loss(shallow, d, calib), rel=1e-5)


def test_score_baselines_keep_the_right_count():
    m, d, calib = digits_setup(depth=4)
    for fn in (baselines.block_influence, baselines.fluxlite, baselines.sensitivity):
        kept, scores = fn(m, d, calib, 2)
        assert len(kept) == 2 and kept == sorted(kept)
        values = next(iter(scores.values()))
        assert len(values) == 4
    kept, info = baselines.block_influence(m, d, calib, 2)
    assert kept == baselines.keep_top(info["block_influence"], 2)
    assert baselines.oracle(12, 6) == [0, 2, 4, 7, 9, 11]
    assert baselines.oracle(28, 14) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert baselines.random_mask(12, 6, 1) == baselines.random_mask(12, 6, 1)


def test_score_baselines_drop_the_block_that_does_nothing():
    """Block 2 made exactly the identity (its adaLN output zeroed): BI and Flux-Lite score it 0 and keep the
    other three; sensitivity drops the layer whose removal costs least. A sign flip in the ranking (keeping
    the least important) fails."""
    m, d, calib = digits_setup(depth=4)
    with torch.no_grad():
        m.blocks[2].adaLN_modulation[-1].weight.zero_()
        m.blocks[2].adaLN_modulation[-1].bias.zero_()
    for fn in (baselines.block_influence, baselines.fluxlite):
        kept, scores = fn(m, d, calib, 3)
        assert kept == [0, 1, 3] and abs(next(iter(scores.values()))[2]) < 1e-6, (fn.__name__, scores)
    # sensitivity: removing the identity block leaves the loss unchanged, and the layer it drops is the one
    # whose removal raises the loss least (on random weights that can be a block that hurts, rise < 0)
    kept, scores = baselines.sensitivity(m, d, calib, 3)
    rise = [v - scores["full_model_loss"] for v in scores["loss_without_layer"]]
    assert rise[2] == pytest.approx(0, abs=1e-6)
    assert [i for i in range(4) if i not in kept] == [min(range(4), key=lambda i: rise[i])]
    assert baselines.keep_top([0.1, 0.9, 0.5], 2) == [1, 2]


def test_random_search_orders_min_median_max():
    m, d, calib = digits_setup(depth=4)
    picks, losses = baselines.random_search(m, d, calib, 4, 2, candidates=100, seed=0)
    assert len(losses) == 6  # only C(4, 2) distinct masks exist
    assert picks["min"][0] <= picks["median"][0] <= picks["max"][0]
    assert picks["min"][0] == pytest.approx(calibration_loss(m, d, calib, kept=picks["min"][1]))


def test_random_baselines_keep_every_stack_alive():
    from math import comb

    from tinyfusion.pruning.baselines import count_valid_masks, keeps_every_stack, random_mask

    assert count_valid_masks([12], 6) == comb(12, 6) and count_valid_masks([4, 4], 4) == comb(8, 4) - 2
    assert count_valid_masks([2, 3], 3) == comb(5, 3) - 1  # only {2, 3, 4} empties the first stack
    assert not keeps_every_stack([0, 1, 2, 3], [4, 4]) and keeps_every_stack([0, 1, 2, 4], [4, 4])
    masks = [random_mask(8, 4, seed, [4, 4]) for seed in range(300)]
    assert all(keeps_every_stack(m, [4, 4]) for m in masks) and len({tuple(m) for m in masks}) > 30
    assert random_mask(12, 6, 3) == random_mask(12, 6, 3, [12])  # one stack: the draw is unchanged


def test_gumbel_draws_follow_the_softmax_of_the_scaled_logits():
    """Over 20K per-sample draws each candidate is picked with frequency softmax(scale * logits) (the
    Gumbel-max property, whatever tau): catches a wrong sign of the noise, the scale applied after the
    noise, or a draw shared across samples."""
    gates = MaskGates([[2, 4]])  # 6 candidates
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([0.012, 0.0, -0.005, 0.004, -0.01, 0.008]))
    g = torch.Generator().manual_seed(0)
    n = 20_000
    mask = gates.sample([torch.rand(n, 6, generator=g)], tau=0.5, scale=100.0).detach()
    picks = (mask[:, None, :] == gates.candidates(0)[None]).all(-1).float().argmax(-1)
    freq = torch.bincount(picks, minlength=6).double() / n
    want = torch.softmax(gates.logits[0].detach().double() * 100.0, 0)
    assert (freq - want).abs().max() < 0.02, (freq, want)


def test_schedules_at_their_end_points():
    """tau anneals 4 -> 0.1 over the search's steps, the recovery lr runs a cosine 2e-4 -> 1e-4, and the EMA
    warm-up starts at 0.1 and reaches the decay: the paper's schedules, not off by a step or a factor."""
    from tinyfusion.recovery.finetune import FinetuneConfig

    s = SearchConfig(groups=[[1, 2]], steps=500)
    assert s.tau(0) == 4.0 and s.tau(499) == pytest.approx(0.1) and s.tau(250) == pytest.approx(4.0 - 3.9 * 250 / 499)
    f = FinetuneConfig(steps=1000)
    assert f.lr_at(0) == pytest.approx(2e-4) and f.lr_at(1000) == pytest.approx(1e-4) and f.lr_at(500) == pytest.approx(1.5e-4)
    assert f.ema_at(0) == pytest.approx(0.1) and f.ema_at(10**6) == 0.9999 and f.ema_at(89_991) == pytest.approx(0.9999, abs=1e-8)
    assert FinetuneConfig(ema_warmup=False).ema_at(0) == 0.9999


def test_a_harmful_layer_is_dropped_by_the_search_and_sensitivity_but_kept_by_bi_and_fluxlite():
    """The shipped (trained) digits teacher with layer 5's attention output scaled by 50: its calibration
    loss rises several-fold. The learnable search (which minimizes the loss under the masks) and sensitivity
    (the loss without each layer) drop it; BI and Flux-Lite measure how much a layer *changes* its input, so
    they rank it most important and keep it, the blind spot the paper's recoverability criterion avoids.
    Catches a search whose gates do not follow the loss, or a baseline whose ranking is reversed. (A random
    test model has no predictions to wreck: its loss is already that of noise.)"""
    import tinyfusion
    from tinyfusion.assets import TEACHER_PATH
    from tinyfusion.data.batches import DigitsBatches
    from tinyfusion.pruning.masks import kept_from_choices

    m, d = tinyfusion.load(TEACHER_PATH), create_diffusion("")
    calib = CalibrationSet.from_batches(DigitsBatches(64, 99), 64)
    with torch.no_grad():
        m.blocks[5].attn.proj.weight.mul_(50)
    kept, info = baselines.sensitivity(m, d, calib, 6)
    assert 5 not in kept and info["loss_without_layer"][5] < info["full_model_loss"] / 3
    assert 5 in baselines.block_influence(m, d, calib, 6)[0] and 5 in baselines.fluxlite(m, d, calib, 6)[0]
    groups = [[1, 2]] * 6
    cfg = SearchConfig(groups=groups, steps=40, global_batch_size=16, seed=0, log_every=4, ema_decay=0.9)
    s = LearnableSearch(m, d, DigitsBatches(16, 0), cfg)
    kept = kept_from_choices(groups, s.run(progress=False))
    assert 5 not in kept and 4 in kept
    assert s.probabilities()[2][0] > 0.9  # decided, not a coin flip
