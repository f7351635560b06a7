"""Recovery: KD terms, alignment from decisions, the fine-tuning CLI (resume, DDP, bad input)."""
import json
import os

import pytest
import torch

import tinyfusion
from tinyfusion.assets import TEACHER_PATH
from tinyfusion.diffusion import create_diffusion
from tinyfusion.finetune import main as finetune_main
from tinyfusion.prune import main as prune_main
from tinyfusion.recovery.kd import KDWeights, alignment, masked_hidden_kd, outlier_mask, variance_kd

from conftest import assert_close_weights, assert_one_line_error, failure, run_main, run_module, tiny_dit, torchrun


def test_alignment_from_any_groups():
    assert alignment([[1, 2]] * 3, [1, 2, 5]) == [(0, 1), (1, 3), (2, 5)]
    assert alignment([[2, 4], [2, 4]], [0, 3, 4, 5]) == [(1, 3), (3, 7)]
    # the paper's D19 mapping: five 3:4 blocks then two 2:4 blocks of DiT-XL/2
    groups = [[3, 4]] * 5 + [[2, 4]] * 2
    kept = [k for b in range(5) for k in (4 * b, 4 * b + 1, 4 * b + 2)] + [20, 21, 24, 25]
    assert alignment(groups, kept) == [(2, 3), (5, 7), (8, 11), (11, 15), (14, 19), (16, 23), (18, 27)]
    # masks that ignore the blocks: each student layer stands for the teacher span up to the next kept layer
    assert alignment([[1, 2], [1, 2]], [0, 1]) == [(0, 0), (1, 3)]
    assert alignment([[1, 2]] * 6, [0, 1, 2, 3, 4, 5]) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 11)]


def test_outlier_mask_drops_massive_activations_per_sample():
    h = torch.zeros(2, 4, 8)
    h[0, 0, 0] = 100.0
    h[1] = torch.randn(4, 8)
    m = outlier_mask(h, 2.0)
    assert m[0, 0, 0] == 0 and m[0].sum() == 31
    assert m[1].sum() >= 28  # a Gaussian sample keeps most of its values within 2 std
    # per sample, not over the batch: beside a sample 1000x larger, sample 0's outlier is still an outlier
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 8, generator=g)
    h[0, 0, 0] = 6.0
    h[1] *= 1000
    assert outlier_mask(h, 2.0)[0, 0, 0] == 0


def test_hidden_kd_is_zero_for_identical_states_and_masks_outliers():
    h = torch.randn(3, 5, 8)
    assert torch.all(masked_hidden_kd(h, h.clone(), 2.0) == 0)
    spiky = h.clone()
    spiky[0, 0, 0] = 1e4  # a massive activation in the teacher only: masked out, so it does not dominate
    assert masked_hidden_kd(h, spiky, 2.0)[0] < 1.0


def test_variance_kd_vanishes_when_variances_agree():
    d = create_diffusion("")
    x_t = torch.randn(2, 1, 4, 4)
    t = torch.tensor([3, 40])  # small t: where the learned variance range is wide enough to matter
    out = torch.randn(2, 2, 4, 4)
    assert torch.allclose(variance_kd(d, out, out, x_t, t), torch.zeros(2), atol=1e-6)
    other = out.clone()
    other[:, 1:] += 0.5
    assert torch.all(variance_kd(d, out, other, x_t, t) > 0)


def test_beta_decays_linearly():
    w = KDWeights()
    assert w.beta(0) == 1e-2 and w.beta(1) == 0 and w.beta(0.5) == pytest.approx(5e-3)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    teacher = root / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(teacher))
    out = root / "prune"
    try:
        prune_main(["--ckpt", str(teacher), "--method", "first", "--calib-samples", "16", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    return str(out / "pruned.safetensors"), str(teacher)


FAST = ["--global-batch-size", "16", "--log-every", "2", "--eval-samples", "0"]


@pytest.mark.parametrize("kd", ["masked", "logits", "none"])
def test_finetune_modes(tmp_path, capsys, pruned, kd):
    ckpt, _ = pruned
    code, out, err = run_main(finetune_main, ["--ckpt", ckpt, "--kd", kd, "--steps", "4", *FAST, "--out", str(tmp_path / kd),
                                              "--snapshot-steps", "2", "--mask-k", "3"], capsys)
    assert code == 0, err
    assert ("note: --kd" in out and "does not use --mask-k" in out) == (kd != "masked")  # said, not dropped
    m = json.loads((tmp_path / kd / "metrics.json").read_text())
    # only the terms the mode uses are recorded (none listed alpha_kd 0.9, beta and mask_k it never read)
    assert set(m["kd_weights"]) == {"masked": {"alpha_kd", "alpha_gt", "beta_start", "beta_end", "mask_k"},
                                    "logits": {"alpha_kd", "alpha_gt"}, "none": set()}[kd]
    assert ("alignment" in m) == (kd == "masked")
    assert [p["step"] for p in m["loss_curve"]] == [2, 4]
    assert ("hidden_kd" in m["loss_curve"][0]) == (kd == "masked") and ("output_kd" in m["loss_curve"][0]) == (kd != "none")
    model = tinyfusion.load(str(tmp_path / kd / "recovered.safetensors"))
    assert model.config.depth == 2 and model.provenance["kd"] == kd and model.provenance["kept"] == [0, 1]
    assert (tmp_path / kd / "recovered-step2.safetensors").exists() and (tmp_path / kd / "loss.png").exists()


def test_finetune_on_two_gloo_ranks_killed_mid_run_and_resumed_matches_one_uninterrupted_process(tmp_path, capsys, pruned):
    """2 DDP ranks SIGKILLed right after step 10's state (of 20) and resumed end with the weights of one
    uninterrupted process, tensor by tensor to rounding (catches any state the resume forgets: optimizer, EMA,
    RNG, data position; and gradients not averaged across ranks). Bit-identical single-process resume is
    tests/test_training.py's."""
    from tinyfusion.training.engine import KILL_AFTER_STATE

    ckpt, _ = pruned
    args = ["--ckpt", ckpt, *FAST, "--steps", "20", "--ckpt-every", "5"]
    code, _, err = run_main(finetune_main, [*args, "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    out = tmp_path / "cut"
    killed = run_module([*torchrun(2), "-m", "tinyfusion.finetune", *args, "--out", str(out)], env={KILL_AFTER_STATE: "10"})
    assert killed.returncode != 0
    assert (out / "finetune_state.pt").exists() and not (out / "recovered.safetensors").exists()
    resumed = run_module([*torchrun(2), "-m", "tinyfusion.finetune", *args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0 and "resuming at step 10 of 20" in resumed.stdout, failure(resumed)
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())["loss_curve"]
    b = json.loads((out / "metrics.json").read_text())["loss_curve"]
    assert len(a) == len(b) == 10
    for pa, pb in zip(a, b):
        assert pa["loss"] == pytest.approx(pb["loss"], rel=1e-4)
    wa = tinyfusion.load(str(tmp_path / "ref" / "recovered.safetensors")).state_dict()
    wb = tinyfusion.load(str(out / "recovered.safetensors")).state_dict()
    assert_close_weights(wa, wb, atol=1e-6)  # DDP's gradient average differs from one mean only in rounding


def test_recovered_weights_are_the_ema(tmp_path, capsys, pruned):
    """recovered.safetensors holds the EMA of the final state, which differs from the student and from the
    pruned input: saving the student, or a skipped EMA, fails."""
    from tinyfusion.training.state import load

    ckpt, _ = pruned
    code, _, err = run_main(finetune_main, ["--ckpt", ckpt, "--steps", "6", *FAST, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    model = tinyfusion.load(str(tmp_path / "o" / "recovered.safetensors"))
    state = load(str(tmp_path / "o" / "finetune_state.pt"))
    names = [n for n, _ in model.named_parameters()]
    saved = model.state_dict()
    start = tinyfusion.load(ckpt).state_dict()
    trained = {n: p for n, p in zip([n for n, p in model.named_parameters() if n != "pos_embed"], state["params"])}
    assert len(state["ema"]) == len(names)
    for n, e in zip(names, state["ema"]):
        assert torch.equal(saved[n], e), n
    moved = [n for n in trained if not torch.equal(saved[n], trained[n])]
    assert moved and any(not torch.equal(saved[n], start[n]) for n in names)


def test_student_not_derived_from_teacher(tmp_path, capsys, pruned):
    ckpt, _ = pruned
    wide = tmp_path / "wide.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=64, num_heads=2), str(wide))
    code, _, err = run_main(finetune_main, ["--ckpt", ckpt, "--teacher", str(wide), *FAST, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "cannot align: hidden_size 32 vs 64")
    deep = tmp_path / "deep.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=6, hidden_size=32, num_heads=2), str(deep))
    code, _, err = run_main(finetune_main, ["--ckpt", ckpt, "--teacher", str(deep), *FAST, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "pruned from a depth-4 model; the teacher has depth 6")
    plain = tmp_path / "plain.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2), str(plain))
    code, _, err = run_main(finetune_main, ["--ckpt", str(plain), "--teacher", pruned[1], *FAST, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "not a pruned checkpoint")
    assert not (tmp_path / "o" / "recovered.safetensors").exists()


def test_refused_lineage_and_resume_write_nothing(tmp_path, capsys, pruned):
    """The branches a user meets when the pieces do not fit, each a one-line error before any output: a
    pruned file that names no source and no --teacher, a teacher of another objective (a SiT teacher for a
    DiT student would distil velocity into a noise predictor), --resume where no state was saved."""
    ckpt, teacher = pruned
    student = tinyfusion.load(ckpt)
    anonymous = tmp_path / "anonymous.safetensors"
    tinyfusion.save(student, str(anonymous), **{k: v for k, v in student.provenance.items() if k != "source"})
    flow = tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2, learn_sigma=False)
    flow.config.objective = "flow"
    flow_path = tmp_path / "flow.safetensors"
    tinyfusion.save(flow, str(flow_path))
    cases = [
        (["--ckpt", str(anonymous), "--kd", "masked"], f"{anonymous} names no source model; give --teacher"),
        (["--ckpt", ckpt, "--teacher", str(flow_path)], "student (diffusion) and teacher (flow) were trained with different objectives"),
        (["--ckpt", ckpt, "--resume"], "--resume: no state at"),
        # its metadata's source names the trainer; read as a teacher path it gave "tinyfusion.train: no such file"
        (["--ckpt", TEACHER_PATH], "is not a pruned checkpoint"),
    ]
    for argv, fragment in cases:
        code, _, err = run_main(finetune_main, [*argv, *FAST, "--steps", "2", "--out", str(tmp_path / "o")], capsys)
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "o").exists(), fragment


def test_decision_that_disagrees_with_checkpoint(tmp_path, capsys, pruned):
    ckpt, _ = pruned
    folder = tmp_path / "p"
    folder.mkdir()
    import shutil

    shutil.copy(ckpt, folder / "pruned.safetensors")
    decision = json.loads(open(os.path.join(os.path.dirname(ckpt), "decision.json")).read())
    decision["kept"] = [2, 3]
    (folder / "decision.json").write_text(json.dumps(decision))
    code, _, err = run_main(finetune_main, ["--ckpt", str(folder / "pruned.safetensors"), *FAST, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "keeps [2, 3] but")


def test_non_finite_losses_abort_after_a_bounded_run(tmp_path, capsys, pruned):
    ckpt, _ = pruned
    code, _, err = run_main(finetune_main, ["--ckpt", ckpt, *FAST, "--steps", "10", "--lr", "1e30", "--max-bad-steps", "3",
                                            "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "3 non-finite losses in a row")
    assert not (tmp_path / "o" / "recovered.safetensors").exists()
