"""`python -m tinyfusion.prune` end to end on a tiny digits model: artifacts, baselines, DDP, resume, bad input."""
import json
import os

import pytest
import torch

import tinyfusion
from tinyfusion.prune import main as prune_main

from conftest import assert_one_line_error, failure, run_main, run_module, tiny_dit, torchrun, write_latent_folder

FAST = ["--global-batch-size", "16", "--calib-samples", "32", "--log-every", "5"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(path))
    return str(path)


def decision(out):
    return json.loads(open(os.path.join(out, "decision.json")).read())


def test_learnable_artifacts(tmp_path, capsys, tiny_teacher):
    out = str(tmp_path / "run")
    code, stdout, err = run_main(prune_main, ["--ckpt", tiny_teacher, *FAST, "--steps", "10", "--out", out], capsys)
    assert code == 0, err
    d = decision(out)
    assert d["method"] == "learnable" and d["scheme"] == "1:2" and d["source_depth"] == 4 and len(d["kept"]) == 2
    assert d["kept"][0] in (0, 1) and d["kept"][1] in (2, 3)  # one per 1:2 block
    assert len(d["history"]) == 2 and len(d["history"][-1]["probs"]) == 2 and math_ok(d["calibration_loss"])
    pruned = tinyfusion.load(os.path.join(out, "pruned.safetensors"))
    assert pruned.config.depth == 2 and pruned.provenance["kept"] == d["kept"] and pruned.provenance["method"] == "learnable"
    assert os.path.getsize(os.path.join(out, "decisions.png")) > 1000
    assert f"kept 2/4 layers {d['kept']}" in stdout and "calibration loss" in stdout


def math_ok(v):
    return v == v and 0 < v < 100


@pytest.mark.parametrize("method,extra", [
    ("bi", []), ("fluxlite", []), ("sensitivity", []), ("oracle", []), ("random", []), ("first", []), ("last", []),
    ("indices", ["--kept", "[3,1]"]), ("random-search", ["--candidates", "4"]), ("random-search", ["--candidates", "100"]),
])
def test_baselines(tmp_path, capsys, tiny_teacher, method, extra):
    out = str(tmp_path / method)
    code, stdout, err = run_main(prune_main, ["--ckpt", tiny_teacher, *FAST, "--method", method, *extra, "--out", out], capsys)
    assert code == 0, err
    d = decision(out)
    want = {"first": [0, 1], "last": [2, 3], "indices": [1, 3], "oracle": [0, 3]}.get(method)
    assert len(d["kept"]) == 2 and (want is None or d["kept"] == want)
    assert tinyfusion.load(os.path.join(out, "pruned.safetensors")).config.depth == 2
    if method == "random-search":
        picks = d["picks"]
        assert picks["min"]["calibration_loss"] <= picks["median"]["calibration_loss"] <= picks["max"]["calibration_loss"]
        assert d["calibration_loss"] == pytest.approx(picks["min"]["calibration_loss"], rel=1e-6)
        assert os.path.exists(os.path.join(out, "pruned-max.safetensors"))
        # 2 of 4 layers have 6 masks: --candidates 100 scores those 6, says so, and records it
        scored = min(int(extra[1]), 6)
        assert d["candidates_scored"] == scored and len(d["all_losses"]) == scored
        assert ("only 6 distinct masks" in stdout) == (scored < int(extra[1]))


def test_two_gloo_ranks_killed_mid_run_and_resumed_decide_as_one_uninterrupted_process(tmp_path, capsys, tiny_teacher):
    """One launch pair checks both claims: 2 DDP ranks reproduce one process (the global batch and every draw
    sliced per rank), and a run SIGKILLed right after step 10's state (of 20) and resumed continues it (catches
    a resume that restarts, or forgets the gates' EMA or the generator; and a run-folder lock that a killed
    run would leave stuck: the kernel drops it with the process)."""
    from tinyfusion.training.engine import KILL_AFTER_STATE

    args = ["--ckpt", tiny_teacher, *FAST, "--steps", "20", "--ckpt-every", "5", "--seed", "2"]
    code, _, err = run_main(prune_main, [*args, "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    out = tmp_path / "killed"
    killed = run_module([*torchrun(2), "-m", "tinyfusion.prune", *args, "--out", str(out)], env={KILL_AFTER_STATE: "10"})
    assert killed.returncode != 0
    assert (out / "search_state.pt").exists() and not (out / "decision.json").exists()
    resumed = run_module([*torchrun(2), "-m", "tinyfusion.prune", *args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, failure(resumed)
    assert "resuming the search at step 10 of 20" in resumed.stdout  # mid-run, not after the last state
    a, b = decision(tmp_path / "ref"), decision(out)
    assert a["kept"] == b["kept"] and len(a["history"]) == len(b["history"]) == 4
    for pa, pb in zip(a["history"], b["history"]):
        assert pa["choice"] == pb["choice"]
        assert [v for g in pa["probs"] for v in g] == pytest.approx([v for g in pb["probs"] for v in g], abs=1e-5)
        assert pa["loss"] == pytest.approx(pb["loss"], rel=1e-5)  # float summation order differs across ranks


@pytest.mark.parametrize("argv,fragment", [
    (["--scheme", "3:2"], "must not exceed"),
    (["--scheme", "0:2"], "positive"),
    (["--scheme", "1:3"], "does not divide"),
    (["--groups", "[[1,2]]"], "sum to 2, the depth is 4"),
    (["--method", "indices", "--kept", "[0,9]"], "outside 0..3"),
    (["--method", "indices", "--kept", "[1,1]"], "duplicates"),
    (["--method", "first", "--target-depth", "4"], "not below the model's depth"),
    (["--method", "oracle", "--target-depth", "3"], "halves"),
    (["--tau-range", "4", "0"], "must be positive"),
    (["--scaling", "-1"], "must be positive"),
    (["--lr", "0"], "must be positive"),
    (["--method", "magic"], "unknown --method"),
    (["--method", "bi", "--kept", "[0,1]"], "--kept applies to --method indices"),  # was silently ignored
    (["--target-depth", "2"], "the learnable search keeps what"),
    (["--steps", "3", "--epochs", "1"], "give one"),
    (["--data-path", "/nonexistent/latents"], "does not exist"),
    (["--resume"], "needs --out"),
])
def test_bad_input(tmp_path, capsys, tiny_teacher, argv, fragment):
    out = tmp_path / "o"
    code, _, err = run_main(prune_main, ["--ckpt", tiny_teacher, *FAST, "--steps", "2", *argv] + (["--out", str(out)] if "--resume" not in argv else []), capsys)
    assert_one_line_error(code, err, fragment)
    assert not (out / "pruned.safetensors").exists() and not (out / "decision.json").exists()


def test_teacher_that_is_not_a_dit(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    code, _, err = run_main(prune_main, ["--ckpt", str(tmp_path / "resnet.pt"), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "not a DiT checkpoint")


def test_bad_latents_are_one_line_with_loader_workers_and_leave_nothing(tmp_path, capsys):
    """With loader worker processes (the GPU default): a label outside the classes is found when the folder
    is opened, and a latent of another shape inside a worker; both end as one error line and exit 2 (not
    the DataLoader's wrapped "Caught UserError in DataLoader worker" traceback), and the refused run
    leaves no run folder behind."""
    import numpy as np

    root = write_latent_folder(tmp_path / "lat", 40, (4, 8, 8), 5)
    ckpt = tmp_path / "latent.safetensors"
    tinyfusion.save(tiny_dit(depth=4), str(ckpt))
    argv = ["--ckpt", str(ckpt), "--data-path", str(root), "--calib-samples", "40", "--num-workers", "2"]
    np.save(root / "imagenet64_labels" / "7.npy", np.array([99]))
    code, _, err = run_main(prune_main, [*argv, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "label 99 is outside 0..4")
    assert not (tmp_path / "o").exists()
    np.save(root / "imagenet64_labels" / "7.npy", np.array([2]))
    np.save(root / "imagenet64_features" / "7.npy", np.zeros((4, 4, 4), dtype=np.float32))
    code, _, err = run_main(prune_main, [*argv, "--out", str(tmp_path / "o2")], capsys)
    assert_one_line_error(code, err, "7.npy: shape (4, 4, 4), the folder's first latent has (4, 8, 8)")


def test_empty_latent_folder(tmp_path, capsys, tiny_teacher):
    (tmp_path / "lat" / "x_features").mkdir(parents=True)
    (tmp_path / "lat" / "x_labels").mkdir()
    code, _, err = run_main(prune_main, ["--ckpt", tiny_teacher, "--data-path", str(tmp_path / "lat"), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "no .npy files")


def test_learnable_on_a_latent_folder_with_epochs(tmp_path, capsys):
    """The ImageNet-scale path: a 4-channel latent model, latents in the official layout, --epochs."""
    write_latent_folder(tmp_path / "lat", 24, (2, 4, 8, 8), 5)
    ckpt = tmp_path / "latent.safetensors"
    tinyfusion.save(tiny_dit(depth=4), str(ckpt))
    out = tmp_path / "run"
    code, stdout, err = run_main(prune_main, ["--ckpt", str(ckpt), "--data-path", str(tmp_path / "lat"), "--epochs", "2",
                                              "--global-batch-size", "8", "--calib-samples", "16", "--num-workers", "0",
                                              "--scheme", "2:4", "--out", str(out)], capsys)
    assert code == 0, err
    d = decision(out)
    assert d["steps"] == 6 and len(d["kept"]) == 2 and d["scheme"] == "2:4"
    assert tinyfusion.load(str(out / "pruned.safetensors")).config.in_channels == 4


@pytest.mark.parametrize("keep_update", [False, True])
def test_saved_weights_are_the_originals_unless_keep_update(tmp_path, capsys, tiny_teacher, keep_update):
    out = tmp_path / "run"
    argv = ["--ckpt", tiny_teacher, *FAST, "--steps", "4", "--lr", "1e-2", "--out", str(out)] + (["--keep-update"] if keep_update else [])
    code, _, err = run_main(prune_main, argv, capsys)
    assert code == 0, err
    source = tinyfusion.load(tiny_teacher).state_dict()
    pruned = tinyfusion.load(str(out / "pruned.safetensors"))
    kept = pruned.provenance["kept"]
    same = all(torch.equal(v, source[f"blocks.{kept[int(k.split('.')[1])]}.{k.split('.', 2)[2]}"])
               for k, v in pruned.state_dict().items() if k.startswith("blocks."))
    assert same != keep_update and pruned.provenance["keep_update"] == keep_update
