"""The run-folder contract of every training command (train, prune, finetune): a folder in use by a live run
is refused, a folder holding another run is refused unless --resume (same settings) or --overwrite (its files
go first), a folder that is not a run is never cleared, and a killed run leaves no lock behind."""
import json
import os

import pytest

import tinyfusion
from tinyfusion.finetune import main as finetune_main
from tinyfusion.prune import main as prune_main
from tinyfusion.train import main as train_main
from tinyfusion.training import run_folder

from conftest import assert_one_line_error, run_main, tiny_dit


@pytest.fixture(scope="module")
def teacher_and_pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfolder")
    teacher = root / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(teacher))
    try:
        prune_main(["--ckpt", str(teacher), "--method", "first", "--calib-samples", "16", "--out", str(root / "p")])
    except SystemExit as e:
        assert e.code in (0, None)
    return str(teacher), str(root / "p" / "pruned.safetensors")


def command(name, files, out, seed=0):
    """(main, argv) of a two-step run of `name` into `out`; `seed` is a setting that changes the result."""
    teacher, pruned = files
    if name == "prune":
        return prune_main, ["--ckpt", teacher, "--global-batch-size", "8", "--calib-samples", "16", "--steps", "2",
                            "--seed", str(seed), "--out", str(out)]
    if name == "finetune":
        return finetune_main, ["--ckpt", pruned, "--global-batch-size", "8", "--steps", "2", "--eval-samples", "0",
                               "--seed", str(seed), "--out", str(out)]
    return train_main, ["--preset", "digits", "--depth", "2", "--global-batch-size", "8", "--steps", "2",
                        "--seed", str(seed), "--results-dir", str(out.parent), "--name", out.name]


COMMANDS = ["prune", "finetune", "train"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_folder_in_use_is_refused(tmp_path, capsys, teacher_and_pruned, name):
    """Two runs into one --out at once both wrote (interleaved log.txt, the last writer's artifacts won)."""
    out = tmp_path / "busy"
    run_folder.claim(str(out), {"command": "someone else"})  # this process holds the lock, as a live run would
    main, argv = command(name, teacher_and_pruned, out)
    code, _, err = run_main(main, argv, capsys)
    assert_one_line_error(code, err, "in use by another running process")
    assert os.listdir(out) == ["run.json"]  # the holder's record, nothing of the refused run
    run_folder.release()


@pytest.mark.parametrize("name", COMMANDS)
def test_another_run_is_refused_resumed_only_alike_and_overwritten_whole(tmp_path, capsys, teacher_and_pruned, name):
    """(A killed run's lock: see test_prune_cli's kill-and-resume test, which resumes right after a SIGKILL.)
    A rerun into an old --out mixed with the earlier run's files (a stale plot, a search state that
    --resume would pick up); --resume with other settings continued a different run."""
    out = tmp_path / "run"
    main, argv = command(name, teacher_and_pruned, out)
    assert run_main(main, argv, capsys)[0] == 0
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == name and record["seed"] == 0
    if name != "train":
        assert len(record["ckpt_sha256"]) == 64

    _, other = command(name, teacher_and_pruned, out, seed=1)
    code, _, err = run_main(main, other, capsys)
    assert_one_line_error(code, err, "holds an earlier run", "--resume", "--overwrite")
    code, _, err = run_main(main, [*other, "--resume"], capsys)
    assert_one_line_error(code, err, "other settings", "seed: 0 there, 1 now")
    code, _, err = run_main(main, [*other, "--resume", "--overwrite"], capsys)
    assert_one_line_error(code, err, "give one")
    assert json.loads((out / "run.json").read_text()) == record  # nothing of the refused runs was written

    (out / "stale.png").write_bytes(b"an earlier run's plot")
    code, _, err = run_main(main, [*other, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "stale.png").exists()
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert run_main(main, [*other, "--resume"], capsys)[0] == 0  # same settings: a finished run resumes as done


@pytest.mark.parametrize("name", COMMANDS)
def test_a_folder_that_is_not_a_run_is_never_cleared(tmp_path, capsys, teacher_and_pruned, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    main, argv = command(name, teacher_and_pruned, out)
    code, _, err = run_main(main, [*argv, "--overwrite"], capsys)
    assert_one_line_error(code, err, "not a tinyfusion run")
    assert os.listdir(out) == ["notes.txt"]


def test_a_corrupt_record_is_one_line(tmp_path, capsys, teacher_and_pruned):
    out = tmp_path / "run"
    main, argv = command("prune", teacher_and_pruned, out)
    assert run_main(main, argv, capsys)[0] == 0
    (out / "run.json").write_text("{broken")
    code, _, err = run_main(main, [*argv, "--resume"], capsys)
    assert_one_line_error(code, err, "run.json is not valid JSON")


def test_a_corrupt_decision_is_one_line(tmp_path, capsys, teacher_and_pruned):
    """finetune read the pruned folder's decision.json with a bare json.load: a JSONDecodeError traceback."""
    import shutil

    _, pruned = teacher_and_pruned
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(pruned, folder / "pruned.safetensors")
    (folder / "decision.json").write_text("{broken")
    code, _, err = run_main(finetune_main, ["--ckpt", str(folder / "pruned.safetensors"), "--steps", "2",
                                            "--eval-samples", "0", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "decision.json is not valid JSON")
    assert not (tmp_path / "o").exists()
