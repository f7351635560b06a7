"""The CLIs end to end on tiny settings, and their bad-input behaviour."""
import json

import pytest

import tinyfusion
from tinyfusion.evaluate import main as evaluate_main
from tinyfusion.sample import main as sample_main
from tinyfusion.train import main as train_main

from conftest import assert_one_line_error, failure, run_main, run_module, tiny_dit, torchrun, write_latent_folder

TINY = ["--preset", "digits", "--depth", "2", "--global-batch-size", "16", "--log-every", "5"]


def test_train_resume_continues_where_it_stopped(tmp_path, capsys):
    args = [*TINY, "--results-dir", str(tmp_path), "--name", "r", "--ckpt-every", "5"]
    code, out, err = run_main(train_main, [*args, "--steps", "10"], capsys)
    assert code == 0, err
    code, out, err = run_main(train_main, [*args, "--steps", "20", "--resume"], capsys)
    assert code == 0, err
    assert "resuming at step 10" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [p["step"] for p in metrics["loss_curve"]] == [5, 10, 15, 20]
    model = tinyfusion.load(str(tmp_path / "r" / "model.safetensors"))
    assert model.config.depth == 2 and model.provenance["steps"] == 20
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000


def test_train_ddp_two_gloo_ranks(tmp_path, capsys):
    """2 gloo ranks train the weights one process trains (the global batch sliced per rank, gradients
    averaged): removing DDP, or per-rank randomness, fails."""
    import torch

    common = [*TINY, "--steps", "6", "--results-dir", str(tmp_path)]
    assert run_main(train_main, [*common, "--name", "one"], capsys)[0] == 0
    res = run_module([*torchrun(2), "-m", "tinyfusion.train",
                      *common, "--name", "ddp"])
    assert res.returncode == 0, failure(res)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())["loss_curve"]
    assert [p["step"] for p in ref] == [p["step"] for p in metrics["loss_curve"]] == [5, 6]
    for a, b in zip(ref, metrics["loss_curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa = tinyfusion.load(str(tmp_path / "one" / "model.safetensors")).state_dict()
    wb = tinyfusion.load(str(tmp_path / "ddp" / "model.safetensors")).state_dict()
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


@pytest.mark.parametrize("argv,fragment", [
    (["--steps", "0"], "must be positive"),
    (["--global-batch-size", "-4"], "must be positive"),
    ([], "give --preset digits"),
    (["--model", "DiT-Q/2", "--data-path", "x"], "unknown model name"),
    (["--resume", "--name", "never"], "no checkpoint"),
])
def test_train_bad_input(tmp_path, capsys, argv, fragment):
    base = ["--results-dir", str(tmp_path)] + (["--preset", "digits"] if argv and argv[0] in ("--steps", "--global-batch-size", "--resume") else [])
    code, _, err = run_main(train_main, [*base, *argv], capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("command", ["train", "prune", "finetune"])
def test_a_global_batch_that_does_not_split_over_the_ranks(tmp_path, capsys, monkeypatch, command):
    """Under torchrun with 3 ranks a global batch of 16 is refused in one line, before any process group
    waits for peers that a bad launch would never start."""
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = {"train": [*TINY, "--steps", "2", "--results-dir", str(tmp_path)],
            "prune": ["--global-batch-size", "16", "--out", str(tmp_path / "p")],
            "finetune": ["--ckpt", str(tmp_path / "none.safetensors"), "--global-batch-size", "16", "--out", str(tmp_path / "f")]}
    code, _, err = run_main(importlib.import_module(f"tinyfusion.{command}").main, argv[command], capsys)
    assert_one_line_error(code, err, "--global-batch-size 16 is not divisible by 3 ranks")


def test_train_unwritable_results_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(train_main, [*TINY, "--results-dir", str(tmp_path / "file" / "sub")], capsys)
    assert_one_line_error(code, err, "cannot create output folder")


@pytest.fixture
def digits_ckpt(tmp_path):
    m = tiny_dit(in_channels=1, num_classes=10, depth=2)
    path = tmp_path / "d.safetensors"
    tinyfusion.save(m, str(path))
    return str(path)


def test_sample_grid_and_evaluate_json(tmp_path, capsys, digits_ckpt):
    code, out, err = run_main(sample_main, ["--ckpt", digits_ckpt, "--out", str(tmp_path / "g.png"), "--steps", "3",
                                            "--per-class", "2", "--classes", "1,4,9"], capsys)
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (2 * 32 + 2, 3 * 32 + 2 * 2)
    code, out, err = run_main(evaluate_main, ["--ckpt", digits_ckpt, "--samples", "50", "--steps", "3", "--splits", "3",
                                              "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"digits_fid", "real_floor_fid", "real_floor_std", "class_accuracy", "precision", "recall", "samples", "sampler"} <= set(m)
    assert m["samples"] == 50 and m["sampler"]["steps"] == 3 and "real-vs-real floor" in out


@pytest.mark.parametrize("main,extra,fragment", [
    (sample_main, ["--classes", "3,12"], "outside 0..9"),
    (sample_main, ["--steps", "-2"], "must be positive"),
    (sample_main, ["--guidance-channels", "2"], "must be 'all' or '3'"),
    (evaluate_main, ["--samples", "0"], "must be positive"),
    (evaluate_main, ["--cfg-scale", "0.5"], "at least 1"),
    (evaluate_main, ["--samples", "3"], "at least 20 samples"),  # FID / k-NN undefined: was a LinAlgError
    (sample_main, ["--cfg-scale", "nan"], "finite"),  # was a black grid and exit 0
    (sample_main, ["--cfg-scale", "inf"], "finite"),
    (sample_main, ["--steps", "1"], "2..1000"),  # was a ValueError traceback
    (sample_main, ["--steps", "2000"], "2..1000"),
])
def test_sample_evaluate_bad_input(tmp_path, capsys, digits_ckpt, main, extra, fragment):
    code, _, err = run_main(main, ["--ckpt", digits_ckpt, "--out" if main is sample_main else "--json",
                                   str(tmp_path / "o"), *extra], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_finetune_checks_its_final_evaluation_before_training(tmp_path, capsys):
    """--eval-samples too small for a digits evaluation is refused before the training it would follow
    (it used to fail after the whole run)."""
    from tinyfusion.finetune import main as finetune_main

    code, _, err = run_main(finetune_main, ["--ckpt", str(tmp_path / "x.safetensors"), "--eval-samples", "5",
                                            "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "--eval-samples 5", "at least 20")
    assert not (tmp_path / "o").exists()


def test_outputs_in_unwritable_places_fail_before_work(tmp_path, capsys, digits_ckpt):
    (tmp_path / "f").write_text("x")
    code, _, err = run_main(sample_main, ["--ckpt", digits_ckpt, "--out", str(tmp_path / "f" / "g.png")], capsys)
    assert_one_line_error(code, err, "cannot create output folder")
    code, _, err = run_main(evaluate_main, ["--ckpt", digits_ckpt, "--json", str(tmp_path / "f" / "m.json")], capsys)
    assert_one_line_error(code, err, "cannot create output folder")


def test_evaluate_refuses_non_digits_models(tmp_path, capsys):
    path = tmp_path / "latent.safetensors"
    tinyfusion.save(tiny_dit(), str(path))
    code, _, err = run_main(evaluate_main, ["--ckpt", str(path)], capsys)
    assert_one_line_error(code, err, "digits metrics need a digits model")
    code, _, err = run_main(sample_main, ["--ckpt", str(path), "--out", str(tmp_path / "g.png")], capsys)
    assert_one_line_error(code, err, "give --vae")


COMMANDS = ("train", "sample", "evaluate", "convert", "extract_features", "train_classifier", "prune", "finetune", "compare", "plan")
BENCH = ("latency", "latency_stacks", "kernels", "prune_compare", "train_speed", "train_smoke", "sampling", "fsdp_step")


def test_every_command_has_help(capsys):
    """`--help` of every command and bench script prints usage and exits 0 (an argument table that fails
    to build, e.g. a bad default or a duplicated flag, fails here before any user meets it)."""
    import importlib
    from conftest import bench_module

    mains = [(m, importlib.import_module(f"tinyfusion.{m}").main) for m in COMMANDS]
    mains += [(name, bench_module(name).main) for name in BENCH]
    for name, main in mains:
        code, out, err = run_main(main, ["--help"], capsys)
        assert code == 0 and "usage:" in out, (name, err)


def test_every_option_shows_its_default(monkeypatch, capsys):
    """Every option of every command and bench script whose default is a value (not None or False, which
    mean "not given") says that default in --help: written in its help text or added by the parser."""
    import importlib

    from conftest import bench_module
    from tinyfusion.errors import HelpFormatter, Parser

    seen = []
    format_help = Parser.format_help
    monkeypatch.setattr(Parser, "format_help", lambda self: (seen.append(self), format_help(self))[1])
    mains = [importlib.import_module(f"tinyfusion.{m}").main for m in COMMANDS]
    mains += [bench_module(name).main for name in BENCH]
    for main in mains:
        run_main(main, ["--help"], capsys)
    assert len(seen) == len(mains)
    missing = []
    for parser in seen:
        for action in parser._actions:
            if HelpFormatter.default_text(action):
                rendered = parser._get_formatter()._format_action(action)
                if "default" not in rendered.lower():
                    missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing


def test_train_on_a_latent_folder(tmp_path, capsys):
    """The generic path: a named DiT on latents in the official layout (here DiT-S/2 at depth 1, 64px)."""
    write_latent_folder(tmp_path / "lat", 8, (2, 4, 8, 8), 3)
    argv = ["--model", "DiT-S/2", "--depth", "1", "--data-path", str(tmp_path / "lat"), "--image-size", "64",
            "--num-classes", "3", "--steps", "3", "--global-batch-size", "4", "--num-workers", "0",
            "--results-dir", str(tmp_path), "--name", "run"]  # not the data folder: a run into it is refused
    code, _, err = run_main(train_main, argv, capsys)
    assert code == 0, err
    m = tinyfusion.load(str(tmp_path / "run" / "model.safetensors"))
    assert (m.config.hidden_size, m.config.depth, m.config.input_size, m.config.num_classes) == (384, 1, 8, 3)
    code, _, err = run_main(train_main, [*argv[:-4], "--image-size", "128", "--results-dir", str(tmp_path), "--name", "bad"], capsys)
    assert_one_line_error(code, err, "latents are (4, 8, 8), the model expects (4, 16, 16)")


BAD_INPUT = [  # (command, argv with {X} the output that must not appear and {T} the test folder, error fragment)
    ("prune", ["--scheme", "3:2", "--out", "{X}"], "N must not exceed M"),
    ("prune", ["--ckpt", "{T}/missing.safetensors", "--out", "{X}"], "no such file"),
    ("prune", ["--method", "indices", "--kept", "0,0,1", "--out", "{X}"], "--kept"),
    ("finetune", ["--ckpt", "{T}/missing.safetensors", "--out", "{X}"], "no such file"),
    ("finetune", ["--steps", "0", "--out", "{X}"], "--steps"),
    ("train", ["--preset", "digits", "--steps", "0", "--results-dir", "{X}"], "--steps"),
    ("sample", ["--classes", "99", "--out", "{X}/grid.png"], "outside 0..9"),
    ("sample", ["--steps", "0", "--out", "{X}/grid.png"], "--steps"),
    ("evaluate", ["--samples", "0", "--json", "{X}/m.json"], "--samples"),
    ("convert", ["--to", "diffusers", "--ckpt", "{T}/missing.pt", "--out", "{X}"], "no such file"),
    ("extract_features", ["--data-path", "{T}/nothing", "--vae", "{T}/novae", "--out", "{X}"], "does not exist"),
    ("train_classifier", ["--epochs", "0", "--out", "{X}/c.safetensors"], "--epochs"),
    ("plan", ["--model", "DiT-XL/2", "--keep", "3", "--json", "{X}/plan.json"], "--keep"),
    ("export/onnx", ["--ckpt", "{T}/missing.safetensors", "--out", "{X}"], "no such file"),
    ("export/trt", ["--batch", "8:4:2", "--out", "{X}"], "MIN <= OPT <= MAX"),
    ("bench/latency", ["--batch", "0", "--json", "{X}/lat.json"], "--batch"),
]


@pytest.mark.parametrize("command,argv,fragment", BAD_INPUT, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_leaves_no_output_behind(tmp_path, capsys, command, argv, fragment):
    """Every command checks its arguments and inputs before it creates anything: a refused run leaves no
    output folder or file, not even an empty one."""
    import importlib

    from conftest import script_module

    out = tmp_path / "X"
    argv = [a.format(X=out, T=tmp_path) for a in argv]
    if "/" in command:
        main = script_module(*command.split("/")).main
    else:
        main = importlib.import_module(f"tinyfusion.{command}").main
    code, _, err = run_main(main, argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_flags_a_run_cannot_honour_are_refused(tmp_path, capsys, digits_ckpt):
    """Flags that used to be dropped silently: --temperature on a DiT (no diffusion head), --guidance-channels
    3 on a one-channel model (its 2nd output channel is the variance), finetune snapshots outside 1..steps-1."""
    from tinyfusion.finetune import main as finetune_main

    code, _, err = run_main(sample_main, ["--ckpt", digits_ckpt, "--temperature", "0.5", "--out", str(tmp_path / "a.png")], capsys)
    assert_one_line_error(code, err, "--temperature")
    code, _, err = run_main(sample_main, ["--ckpt", digits_ckpt, "--guidance-channels", "3", "--out", str(tmp_path / "b.png")], capsys)
    assert_one_line_error(code, err, "needs 3 noise channels; this model has 1")
    for snaps in ("0", "-1", "9999"):
        code, _, err = run_main(finetune_main, ["--ckpt", digits_ckpt, "--steps", "10", "--snapshot-steps", snaps,
                                                "--out", str(tmp_path / "o")], capsys)
        assert_one_line_error(code, err, "--snapshot-steps", "1..9")
    assert not any((tmp_path / n).exists() for n in ("a.png", "b.png", "o"))


def test_an_output_path_that_is_a_folder_is_refused_before_work(tmp_path, capsys, digits_ckpt):
    """`--out` naming an existing folder failed at the final rename, after all the sampling, with a traceback."""
    code, _, err = run_main(sample_main, ["--ckpt", digits_ckpt, "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a folder")
    code, _, err = run_main(evaluate_main, ["--ckpt", digits_ckpt, "--json", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a folder")
