"""FSDP2 (`--fsdp`) on the CPU with gloo: 2 sharded ranks against 1 plain process, for the learnable search
and Masked-KD finetune, on a tiny DiT and a tiny diffusers Flux transformer; a SIGKILL and --resume from the
sharded state; the consolidated artifacts load without FSDP and equal the plain run's."""
import json

import pytest
import torch

import tinyfusion
from tinyfusion.finetune import main as finetune_main
from tinyfusion.prune import main as prune_main
from tinyfusion.training.engine import KILL_AFTER_STATE

from conftest import (assert_close_weights, assert_one_line_error, failure, run_main, run_module, tiny_dit, torchrun,
                      write_latent_folder)


def decision(out):
    return json.loads((out / "decision.json").read_text())


def same_search(a, b):
    assert a["kept"] == b["kept"] and len(a["history"]) == len(b["history"]) > 0
    for pa, pb in zip(a["history"], b["history"]):
        assert pa["choice"] == pb["choice"]
        assert pa["loss"] == pytest.approx(pb["loss"], rel=1e-5)  # summation order differs across ranks


def same_recovery(a, b):
    ca, cb = (json.loads((d / "metrics.json").read_text())["loss_curve"] for d in (a, b))
    assert len(ca) == len(cb) > 0
    for pa, pb in zip(ca, cb):
        assert pa["loss"] == pytest.approx(pb["loss"], rel=1e-4)
    wa, wb = (tinyfusion.load(str(d / "recovered.safetensors")).state_dict() for d in (a, b))
    assert_close_weights(wa, wb, atol=1e-6)  # the EMA gathered from shards, written whole by rank 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "teacher.safetensors"
    tinyfusion.save(tiny_dit(in_channels=1, num_classes=10, depth=4, hidden_size=32, num_heads=2), str(path))
    return str(path)


def test_dit_search_and_masked_kd_sharded_on_two_ranks_equal_one_plain_process(tmp_path, capsys, teacher):
    """The search on 2 FSDP ranks decides as 1 plain process with the same losses; Masked KD (teacher sharded
    too) killed right after step 4's sharded state and resumed ends with the plain run's EMA weights. Catches
    gradients reduced as sums, an EMA that follows one shard only, a state that forgets a rank's shards."""
    search = ["--ckpt", teacher, "--global-batch-size", "8", "--calib-samples", "16", "--steps", "8", "--log-every", "4",
              "--seed", "3"]
    assert run_main(prune_main, [*search, "--out", str(tmp_path / "one")], capsys)[0] == 0
    two = run_module([*torchrun(2), "-m", "tinyfusion.prune", *search, "--fsdp", "--out", str(tmp_path / "two")])
    assert two.returncode == 0, failure(two)
    same_search(decision(tmp_path / "one"), decision(tmp_path / "two"))
    assert decision(tmp_path / "two")["run"]["fsdp"] and decision(tmp_path / "two")["run"]["world_size"] == 2

    pruned = str(tmp_path / "one" / "pruned.safetensors")
    kd = ["--ckpt", pruned, "--global-batch-size", "8", "--steps", "8", "--log-every", "2", "--ckpt-every", "2",
          "--eval-samples", "0"]
    assert run_main(finetune_main, [*kd, "--out", str(tmp_path / "kd1")], capsys)[0] == 0
    cut = tmp_path / "kd2"
    killed = run_module([*torchrun(2), "-m", "tinyfusion.finetune", *kd, "--fsdp", "--out", str(cut)],
                        env={KILL_AFTER_STATE: "4"})
    assert killed.returncode != 0 and not (cut / "recovered.safetensors").exists()
    assert (cut / "finetune_state.pt.dcp" / ".metadata").exists()  # every rank's shards, one folder
    resumed = run_module([*torchrun(2), "-m", "tinyfusion.finetune", *kd, "--fsdp", "--out", str(cut), "--resume"])
    assert resumed.returncode == 0 and "resuming at step 4 of 8" in resumed.stdout, failure(resumed)
    same_recovery(tmp_path / "kd1", cut)


def test_flux_search_and_masked_kd_sharded_on_two_ranks_equal_one_plain_process(tmp_path, capsys):
    """A diffusers Flux transformer (double- and single-stream blocks, each its own FSDP unit): the same."""
    from test_diffusers_stacks import bank, flux

    from tinyfusion.models.diffusers_stacks import load_folder
    from tinyfusion.models.stack import block_stack

    flux().save_pretrained(tmp_path / "flux")
    torch.save(bank(), tmp_path / "bank.pt")
    write_latent_folder(tmp_path / "lat", 16, (1, 2, 8, 8), 4, name="p")
    data = ["--cond", str(tmp_path / "bank.pt"), "--data-path", str(tmp_path / "lat"), "--global-batch-size", "8",
            "--num-workers", "0", "--log-every", "2"]
    search = ["--ckpt", str(tmp_path / "flux"), *data, "--steps", "4", "--calib-samples", "8"]
    assert run_main(prune_main, [*search, "--out", str(tmp_path / "one")], capsys)[0] == 0
    two = run_module([*torchrun(2), "-m", "tinyfusion.prune", *search, "--fsdp", "--out", str(tmp_path / "two")])
    assert two.returncode == 0, failure(two)
    same_search(decision(tmp_path / "one"), decision(tmp_path / "two"))

    kd = ["--ckpt", str(tmp_path / "one" / "pruned"), *data, "--steps", "4"]
    assert run_main(finetune_main, [*kd, "--out", str(tmp_path / "kd1")], capsys)[0] == 0
    res = run_module([*torchrun(2), "-m", "tinyfusion.finetune", *kd, "--fsdp", "--fsdp-teacher", "replicate",
                      "--out", str(tmp_path / "kd2")])
    assert res.returncode == 0, failure(res)
    ca, cb = (json.loads((tmp_path / d / "metrics.json").read_text())["loss_curve"] for d in ("kd1", "kd2"))
    assert [p["loss"] for p in ca] == pytest.approx([p["loss"] for p in cb], rel=1e-4) and "hidden_kd" in cb[0]
    a, b = (load_folder(str(tmp_path / d / "recovered")) for d in ("kd1", "kd2"))  # plain diffusers folders
    assert block_stack(b).depths == [1, 2]
    assert_close_weights(a.state_dict(), b.state_dict(), atol=1e-6)


@pytest.mark.parametrize("argv,fragment", [
    (["--fsdp", "--keep-update"], "--keep-update with --fsdp"),
    (["--fsdp", "--method", "bi"], "does not train"),
    (["--fsdp-offload"], "apply with --fsdp"),
    (["--fsdp", "--fsdp-offload"], "needs CUDA"),
])
def test_fsdp_bad_input_is_one_line(tmp_path, capsys, teacher, argv, fragment):
    code, _, err = run_main(prune_main, ["--ckpt", teacher, "--steps", "2", "--global-batch-size", "8",
                                         "--calib-samples", "8", *argv, "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_one_process_fsdp_runs_and_its_state_refuses_another_rank_count(tmp_path, teacher):
    """One process may shard (a single GPU measuring FSDP's memory); the sharded state it writes names its
    world size, and resuming it on another rank count is one line, not a wrong resume. (In a subprocess: a
    finished FSDP run leaves this process's later bf16 autograd measurably slower, which would only cost the
    suite time.)"""
    args = ["--ckpt", teacher, "--global-batch-size", "8", "--calib-samples", "8", "--steps", "4", "--ckpt-every", "2",
            "--fsdp", "--out", str(tmp_path / "o")]
    one = run_module(["-m", "tinyfusion.prune", *args])
    assert one.returncode == 0, failure(one)
    res = run_module([*torchrun(2), "-m", "tinyfusion.prune", *args, "--resume"])
    assert res.returncode != 0 and "written by 1 rank(s); resume it on 1, not 2" in res.stderr, failure(res)


def test_train_sharded_on_two_ranks_equals_one_plain_process(tmp_path, capsys):
    """`train --fsdp`: the EMA kept as shards and gathered into model.safetensors by rank 0 equals the plain
    run's (an EMA that followed one rank's shard, or a gather in the wrong order, fails)."""
    from tinyfusion.train import main as train_main

    args = ["--preset", "digits", "--depth", "2", "--global-batch-size", "8", "--steps", "4", "--log-every", "2",
            "--results-dir", str(tmp_path)]
    assert run_main(train_main, [*args, "--name", "one"], capsys)[0] == 0
    two = run_module([*torchrun(2), "-m", "tinyfusion.train", *args, "--fsdp", "--name", "two"])
    assert two.returncode == 0, failure(two)
    wa, wb = (tinyfusion.load(str(tmp_path / n / "model.safetensors")).state_dict() for n in ("one", "two"))
    assert_close_weights(wa, wb, atol=1e-6)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["run"]["fsdp"]
