"""`python -m tinyfusion.sample --num-samples N --npz OUT`: ADM layout, 2 gloo ranks equal 1, resume."""
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, run_main, run_module, tiny_dit, torchrun
from tinyfusion import save
from tinyfusion.eval.npz import spread_labels


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "tiny.safetensors")
    save(tiny_dit(depth=2, in_channels=3, num_classes=4), path, source="tiny")
    return path


def args(ckpt, out):
    return ["--ckpt", ckpt, "--num-samples", "22", "--npz", out, "--steps", "3", "--batch-size", "4",
            "--sampler", "ddpm"]


def test_two_ranks_write_the_npz_of_one_and_numpy_reads_it_as_adm_does(ckpt, tmp_path):
    one = run_module(["-m", "tinyfusion.sample", *args(ckpt, str(tmp_path / "one.npz"))])
    assert one.returncode == 0, one.stderr
    two = run_module([*torchrun(2), "-m",
                      "tinyfusion.sample", *args(ckpt, str(tmp_path / "two.npz"))])
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (22, 8, 8, 3) and a["arr_0"].dtype == np.uint8  # NHWC, as the ADM tools expect
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert np.bincount(a["arr_1"]).tolist() == [6, 6, 5, 5]  # spread uniformly over the classes
    assert a["arr_0"].std() > 0


def test_finished_run_removes_its_chunks_and_a_foreign_parts_folder_is_refused(ckpt, tmp_path, capsys):
    """A finished run leaves the .npz only (its chunks have done their job); chunks recorded by another run
    (here: another seed, as after `--seed 1` into the same --npz) are refused in one line naming what
    differs, not packed into a wrong .npz. Reuse of a matching run's chunks: the SIGKILL test below."""
    import json

    from tinyfusion.sample import main

    out = str(tmp_path / "s.npz")
    code, _, err = run_main(main, args(ckpt, out), capsys)
    assert code == 0, err
    assert os.path.isfile(out) and not os.path.exists(out + ".parts")
    os.remove(out)
    # an interrupted run's parts folder, recorded with seed 0; the rerun asks for seed 1: refused
    os.makedirs(out + ".parts")
    with open(os.path.join(out + ".parts", "run.json"), "w") as f:
        json.dump({"settings": {"seed": 0}, "num_samples": 22}, f)
    code, _, err = run_main(main, [*args(ckpt, out), "--seed", "1"], capsys)
    assert_one_line_error(code, err, "holds chunks of another run", "settings")
    assert not os.path.exists(out) and os.listdir(out + ".parts") == ["run.json"]


def test_sigkill_then_rerun_gives_the_uninterrupted_npz(ckpt, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    argv = ["--ckpt", ckpt, "--num-samples", "80", "--batch-size", "4", "--steps", "40", "--sampler", "ddim"]
    whole = run_module(["-m", "tinyfusion.sample", *argv, "--npz", str(tmp_path / "whole.npz")])
    assert whole.returncode == 0, whole.stderr
    out = str(tmp_path / "killed.npz")
    proc = subprocess.Popen([sys.executable, "-m", "tinyfusion.sample", *argv, "--npz", out], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out + ".parts", "chunk000002.npz")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len([n for n in os.listdir(out + ".parts") if n.startswith("chunk")])
    assert not os.path.exists(out) and 3 <= done < 20  # killed part-way (of 20 chunks), no final file
    chunks = len([n for n in os.listdir(out + ".parts") if n.startswith("chunk")])
    again = run_module(["-m", "tinyfusion.sample", *argv, "--npz", out])
    assert again.returncode == 0, again.stderr
    assert f"{chunks} chunks of rank 0 kept" in again.stdout  # the killed run's chunks were reused
    assert np.array_equal(np.load(out)["arr_0"], np.load(tmp_path / "whole.npz")["arr_0"])
    assert not os.path.exists(out + ".parts")


def test_spread_labels_is_balanced_and_seeded():
    a = spread_labels(1000, 10, seed=3)
    assert np.bincount(a.numpy()).tolist() == [100] * 10
    assert a.tolist() == spread_labels(1000, 10, seed=3).tolist() != spread_labels(1000, 10, seed=4).tolist()


def test_npz_needs_num_samples(ckpt, tmp_path, capsys):
    from tinyfusion.sample import main

    code, _, err = run_main(main, ["--ckpt", ckpt, "--npz", str(tmp_path / "x.npz")], capsys)
    assert_one_line_error(code, err, "--npz and --num-samples go together")


def test_npz_defaults_to_the_papers_ddpm_250():
    import argparse

    from tinyfusion.cli.sampler_args import add_sampler_args, sampler_settings

    p = argparse.ArgumentParser()
    add_sampler_args(p)
    args = p.parse_args([])
    assert (sampler_settings(args)["name"], sampler_settings(args)["steps"]) == ("ddim", 50)
    assert sampler_settings(args, default="ddpm") == {**sampler_settings(args), "name": "ddpm", "steps": 250}
    assert sampler_settings(p.parse_args(["--sampler", "ddim"]), default="ddpm")["name"] == "ddim"


def test_latent_model_grid_and_npz_decode_through_a_real_vae(tmp_path, tiny_vae, capsys):
    """A 4-channel latent DiT sampled with --vae: the grid is the VAE's decode of exactly the latents the
    sampler draws for those labels (a decode of other latents, of unscaled latents or a missing clamp
    differs), and the .npz holds the decoded 32x32 RGB images in the ADM layout."""
    import argparse

    import torch
    from PIL import Image

    from tinyfusion.data.vae import SCALE, load_vae
    from tinyfusion.sample import main as sample_main, to_grid
    from tinyfusion.cli.sampler_args import add_sampler_args, sample_batched, sampler_settings

    path = str(tmp_path / "latent.safetensors")
    model = tiny_dit(depth=2, in_channels=4, input_size=4, num_classes=3)
    save(model, path)
    code, _, err = run_main(sample_main, ["--ckpt", path, "--vae", tiny_vae, "--classes", "0,2", "--per-class", "2",
                                          "--steps", "3", "--out", str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    p = argparse.ArgumentParser()
    add_sampler_args(p)
    settings = sampler_settings(p.parse_args(["--steps", "3"]), default="ddim", config=model.config)
    latents = sample_batched(model, torch.tensor([0, 0, 2, 2]), settings, 32)
    vae = load_vae(tiny_vae)
    with torch.no_grad():
        images = vae.decode(latents / SCALE).sample.clamp(-1, 1)
    assert images.shape == (4, 3, 32, 32)
    want = to_grid(images, rows=2, upscale=1)
    assert grid.shape == want.shape == (2 * 32 + 2, 2 * 32 + 2, 3)
    assert np.abs(grid.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding of the same floats
    code, _, err = run_main(sample_main, ["--ckpt", path, "--vae", tiny_vae, "--num-samples", "5", "--npz",
                                          str(tmp_path / "s.npz"), "--steps", "2", "--batch-size", "4"], capsys)
    assert code == 0, err
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8 and arr.std() > 0
    code, _, err = run_main(sample_main, ["--ckpt", path, "--out", str(tmp_path / "no.png")], capsys)
    assert_one_line_error(code, err, "4-channel latents; give --vae FOLDER")
    assert not (tmp_path / "no.png").exists()


def test_packing_streams_one_chunk_at_a_time(tmp_path):
    """pack_npz holds one chunk in memory, not all of them and their concatenation (2 x 9.8 GB at 50K x 256
    px): 40 chunks of 0.5 MB pack with a peak far below the 20 MB they hold, into a file numpy reads as
    np.savez's, equal to the concatenation."""
    import tracemalloc

    from tinyfusion.eval.npz import chunk_path, pack_npz, parts_dir

    out = str(tmp_path / "s.npz")
    os.makedirs(parts_dir(out))
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (10, 128, 128, 3), dtype=np.uint8) for _ in range(40)]
    for i, c in enumerate(chunks):
        np.savez(chunk_path(parts_dir(out), i), images=c, labels=np.full(10, i, np.int64))
    tracemalloc.start()
    shape = pack_npz(out, 400, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert shape == (400, 128, 128, 3) and peak < 4 * chunks[0].nbytes, peak
    with np.load(out) as d:
        assert sorted(d.keys()) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(d["arr_0"], np.concatenate(chunks))
        np.testing.assert_array_equal(d["arr_1"], np.repeat(np.arange(40), 10))
