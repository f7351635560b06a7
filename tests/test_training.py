"""The shared training engine: precision, accumulation, checkpointing, compile, the device-side skip and
resume, each against an independent run of the same thing (weights compared tensor by tensor)."""
import json
import math
import os

import pytest
import torch

import tinyfusion
from tinyfusion.data.batches import DigitsBatches
from tinyfusion.diffusion.gaussian import create_diffusion
from tinyfusion.pruning.learnable import LearnableSearch, SearchConfig
from tinyfusion.recovery.finetune import FinetuneConfig, Recovery
from tinyfusion.recovery.kd import alignment
from tinyfusion.training import RunOptions
from tinyfusion.training.state import load

from conftest import assert_close_weights, tiny_dit

BATCH = 8


def digits_dit(depth, seed=0):
    return tiny_dit(seed=seed, in_channels=1, num_classes=10, depth=depth, hidden_size=32, num_heads=2)


def recovery(steps=4, options=None, data=None, **cfg):
    teacher, student = digits_dit(4), digits_dit(2, seed=1)
    pairs = alignment([[1, 2], [1, 2]], [1, 3])
    c = FinetuneConfig(steps=steps, global_batch_size=BATCH, log_every=2, ckpt_every=2, **cfg)
    return Recovery(student, teacher, pairs, create_diffusion(""), data or DigitsBatches(BATCH, 0), c,
                    options=options or RunOptions(async_save=False))


def search(steps=4, options=None):
    cfg = SearchConfig(groups=[[1, 2], [1, 2]], steps=steps, global_batch_size=BATCH, log_every=2)
    return LearnableSearch(digits_dit(4), create_diffusion(""), DigitsBatches(BATCH, 0), cfg,
                           options=options or RunOptions(async_save=False))


def assert_same_weights(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if atol:
            torch.testing.assert_close(x, y, rtol=0, atol=atol)
        else:
            assert torch.equal(x, y)


def named_weights(task):
    """(weights, EMA) of a task as name -> tensor, named by the model's parameters they are or follow."""
    names = {p.data_ptr(): n for n, p in task.model.named_parameters()}
    name = lambda i, p: names.get(p.data_ptr(), f"#{i}")  # noqa: E731
    return ({name(i, p): p.detach() for i, p in enumerate(task.engine.params)},
            {name(i, s): e.detach() for i, (e, s) in enumerate(zip(task.engine.ema, task.engine.ema_src))})


def ema_of(task):
    return [e.detach().clone() for e in task.engine.ema]


@pytest.mark.parametrize("make", [recovery, search], ids=["masked_kd", "search"])
def test_grad_accum_equals_the_whole_batch(make):
    """K micro-batches of B/K give the step one batch of B gives (up to fp32 summation order)."""
    one, two = make(options=RunOptions(async_save=False)), make(options=RunOptions(grad_accum=2, async_save=False))
    one.engine.run()
    two.engine.run()
    for a, b in zip(named_weights(one), named_weights(two)):
        assert_close_weights(a, b, atol=2e-6)
    for a, b in zip(one.engine.curve, two.engine.curve):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_grad_accum_must_divide_the_batch():
    from tinyfusion.errors import UserError

    with pytest.raises(UserError, match="does not divide the per-rank batch"):
        recovery(options=RunOptions(grad_accum=3))


def test_grad_checkpoint_changes_memory_not_results():
    plain, ckpt = recovery(), recovery(options=RunOptions(grad_checkpoint=True, async_save=False))
    plain.engine.run()
    ckpt.engine.run()
    assert_same_weights(ema_of(plain), ema_of(ckpt), atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_the_cpu_trains_and_keeps_fp32_state(precision):
    """bf16/fp16 autocast runs (finite, the fp32 weights move, optimizer state and EMA stay fp32); bf16's
    logged losses stay near the fp32 run's. fp16 skips its first steps while the loss scale backs off
    from 2^16 (one halving per skipped step, checked), so its curve runs those steps behind fp32's."""
    fp32, low = recovery(steps=6), recovery(steps=6, options=RunOptions(precision=precision, async_save=False))
    before = [p.detach().clone() for p in low.engine.params]
    fp32.engine.run()
    low.engine.run()
    assert low.engine.precision == precision
    assert all(p.dtype == torch.float32 for p in low.engine.params) and all(e.dtype == torch.float32 for e in low.engine.ema)
    assert all(v.dtype == torch.float32 for s in low.engine.opt.state.values() for k, v in s.items() if k != "step")
    assert any(not torch.equal(a, p) for a, p in zip(before, low.engine.params))
    if precision == "bf16":
        assert low.engine.skipped_steps == 0
    else:  # fp16: every skipped step is one overflow of the loss scale, which halves it (no growth in 6 steps)
        skipped = low.engine.skipped_steps
        assert 0 <= skipped < 6 and low.engine.scaler.get_scale() == 2.0 ** (16 - skipped), skipped
    assert all(math.isfinite(p["loss"]) for p in low.engine.curve) and low.engine.curve
    if precision == "bf16":
        assert len(fp32.engine.curve) == len(low.engine.curve)
        for a, b in zip(fp32.engine.curve, low.engine.curve):
            assert b["loss"] == pytest.approx(a["loss"], rel=0.1)


def test_bf16_search_decides_like_fp32():
    """On the shipped digits teacher, 12 -> 6 at 1:2, the bf16 search keeps the fp32 search's layer in every
    block the fp32 search has decided (confidence > 0.8). A shortened search (48 steps, faster EMA and
    lr) leaves a block near a tie, where either precision's rounding may tip it; the full default
    500-step comparison, where all six agree, is in docs/training.md."""
    from tinyfusion.assets import TEACHER_PATH
    from tinyfusion.pruning.masks import parse_scheme

    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = SearchConfig(groups=parse_scheme("1:2", 12), steps=48, global_batch_size=24, log_every=48, ema_decay=0.9,
                           lr=3e-4)
        s = LearnableSearch(tinyfusion.load(TEACHER_PATH), create_diffusion(""), DigitsBatches(24, 0), cfg,
                            options=RunOptions(precision=precision, async_save=False))
        runs[precision] = (s.run(progress=False), [p.max().item() for p in s.probabilities()])
    (fp32, confidence), (bf16, _) = runs["fp32"], runs["bf16"]
    decided = [i for i, c in enumerate(confidence) if c > 0.8]
    assert len(decided) >= 4, confidence
    assert [bf16[i] for i in decided] == [fp32[i] for i in decided]


class PoisonedBatches(DigitsBatches):
    """Digits batches whose k-th batch is NaN: that step's loss is non-finite."""

    def __init__(self, k):
        super().__init__(BATCH, 0)
        self.k, self.n = k, 0

    def next(self):
        x, y = super().next()
        self.n += 1
        return (torch.full_like(x, float("nan")) if self.n == self.k + 1 else x), y


def test_a_non_finite_step_changes_nothing_and_is_counted():
    """The skip is decided on the device: weights, optimizer moments and EMA after the NaN step equal those before."""
    task = recovery(steps=2, data=PoisonedBatches(1))
    task.engine.train_step()
    weights, ema = [p.detach().clone() for p in task.engine.params], ema_of(task)
    moments = [s["exp_avg"].clone() for s in task.engine.opt.state.values()]
    task.engine.train_step()  # the poisoned one
    assert_same_weights(weights, [p.detach() for p in task.engine.params])
    assert_same_weights(ema, ema_of(task))
    assert_same_weights(moments, [s["exp_avg"] for s in task.engine.opt.state.values()])
    assert int(task.engine.skipped.item()) == 1 and int(task.engine.bad_run.item()) == 1


def test_resume_from_a_saved_state_is_bit_identical(tmp_path):
    """Save at step 4 of 8, build everything anew, resume: the same weights, EMA and curve as 8 straight steps."""
    path = str(tmp_path / "state.pt")
    ref = recovery(steps=8)
    ref.engine.run()
    cut = recovery(steps=8)

    def kill(step):  # the run dies after step 5; the state on disk is step 4's
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cut.engine.run(path, kill)
    state = load(path)  # every tensor on the CPU, whatever device trained: RNG states are CPU ByteTensors
    tensors = [state["gen"], *state["params"], *state["ema"], state["task"]["data"]]
    assert all(t.device.type == "cpu" for t in tensors) and state["gen"].dtype == torch.uint8
    resumed = recovery(steps=8)
    resumed.resume(path)
    assert resumed.step == 4
    resumed.engine.run()
    assert_same_weights(ema_of(ref), ema_of(resumed))
    assert_same_weights([p.detach() for p in ref.engine.params], [p.detach() for p in resumed.engine.params])
    assert [e["loss"] for e in ref.curve] == [e["loss"] for e in resumed.curve]


def test_async_save_writes_complete_states(tmp_path):
    """The background writer: the file on disk after the run is the last state, whole and loadable."""
    path = str(tmp_path / "state.pt")
    task = recovery(steps=6, options=RunOptions(async_save=True))
    task.engine.run(path)
    assert load(path)["step"] == 6 and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_compile_does_not_recompile_when_masks_and_recordings_change():
    """Blocks compiled once: new Gumbel masks every step (search) and recording hooks (KD) add no graphs."""
    import torch._dynamo

    for make in (search, recovery):
        torch._dynamo.reset()
        task = make(steps=5, options=RunOptions(compile=True, compile_backend="eager", async_save=False))
        counters = torch._dynamo.utils.counters
        task.engine.train_step()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # the blocks did compile
        for _ in range(4):
            task.engine.train_step()
        assert counters["stats"]["unique_graphs"] == graphs, make.__name__


def test_train_resume_gives_the_uninterrupted_weights(tmp_path, capsys):
    """`train` 20 steps straight and 10 + `--resume` to 20: the same EMA weights, tensor by tensor."""
    from conftest import run_main
    from tinyfusion.train import main as train_main

    base = ["--preset", "digits", "--depth", "2", "--global-batch-size", "16", "--log-every", "5",
            "--results-dir", str(tmp_path), "--ckpt-every", "10"]
    for extra in (["--name", "ref", "--steps", "20"], ["--name", "cut", "--steps", "10"],
                  ["--name", "cut", "--steps", "20", "--resume"]):
        code, _, err = run_main(train_main, [*base, *extra], capsys)
        assert code == 0, err
    a = tinyfusion.load(str(tmp_path / "ref" / "model.safetensors")).state_dict()
    b = tinyfusion.load(str(tmp_path / "cut" / "model.safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert m["run"]["precision"] == "fp32" and m["run"]["images_per_s"] > 0


def test_train_speed_dry_run(tmp_path, capsys):
    """bench/train_speed.py at tiny shapes on the CPU: every variant of both steps measured, none failed."""
    from conftest import bench_module, run_main

    out = tmp_path / "speed.json"
    code, _, err = run_main(bench_module("train_speed").main, ["--dry-run", "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert {(r["step"], r["variant"], r["mode"]) for r in rows} >= {("search", "bf16", "compile"), ("masked_kd", "fp32", "eager")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_train_cli_in_bf16_with_accumulation_and_checkpointing(tmp_path, capsys):
    """The `train` command with every execution flag at once: finite losses, the flags recorded in metrics.json."""
    from conftest import run_main
    from tinyfusion.train import main as train_main

    code, _, err = run_main(train_main, ["--preset", "digits", "--depth", "2", "--global-batch-size", "8", "--steps", "4",
                                         "--log-every", "2", "--precision", "bf16", "--grad-accum", "2", "--grad-checkpoint",
                                         "--results-dir", str(tmp_path), "--name", "b"], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["run"]["precision"] == "bf16" and m["run"]["grad_accum"] == 2 and m["run"]["grad_checkpoint"]
    assert all(0 < p["loss"] < 10 for p in m["loss_curve"]) and m["run"]["skipped_steps"] == 0


def test_resume_refuses_a_pre_engine_or_foreign_state(tmp_path):
    from tinyfusion.errors import UserError

    old = tmp_path / "old.pt"
    torch.save({"trainable": [torch.zeros(2)], "step": 3, "config": "{}"}, old)  # the pre-engine layout
    with pytest.raises(UserError, match="written before the training engine"):
        recovery().resume(str(old))
    path = str(tmp_path / "search.pt")
    s = search(steps=2)
    s.engine.run(path)
    with pytest.raises(UserError, match="different settings"):  # a search state is not a recovery's
        recovery().resume(path)


def test_masked_kd_loss_is_its_formula_at_every_logged_step():
    """Logged every step, loss = 0.9 * output KD + 0.1 * diffusion + beta(step) * hidden KD with beta falling
    linearly 1e-2 -> 0: catches swapped weights, a beta schedule off by a step, or a term left out."""
    task = recovery(steps=5)
    task.cfg.log_every = 1
    task.engine.run()
    assert [e["step"] for e in task.curve] == [1, 2, 3, 4, 5]
    for e in task.curve:
        beta = 1e-2 * (1 - (e["step"] - 1) / 4)
        want = 0.9 * e["output_kd"] + 0.1 * e["diffusion"] + beta * e["hidden_kd"]
        assert e["loss"] == pytest.approx(want, rel=1e-5), e
    assert task.curve[-1]["hidden_kd"] > 0 and task.curve[0]["output_kd"] > 0
