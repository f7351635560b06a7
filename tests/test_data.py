import os

import numpy as np
import pytest
import torch

from tinyfusion.data import LatentFolder, load_digits_tensors
from tinyfusion.errors import UserError
from tinyfusion.extract_features import main as extract_main

from conftest import assert_one_line_error, run_main, run_module, torchrun

diffusers = pytest.importorskip("diffusers")


def test_digits_are_real_and_scaled():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    assert load_digits_tensors(16)[0].shape == (1797, 1, 16, 16)
    # read without importing scikit-learn, yet exactly what its load_digits returns (the peer)
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert torch.equal(x[:, 0], torch.from_numpy(ref.images.astype(np.float32) / 16.0 * 2.0 - 1.0))
    assert torch.equal(y, torch.from_numpy(ref.target.astype(np.int64)))


def make_latents(root, n=5, label=lambda i: i % 3, stack=2):
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir()
    for i in range(n):
        np.save(root / "imagenet256_features" / f"{i}.npy", np.random.randn(stack, 4, 4, 4).astype(np.float32))
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([label(i)]))


def test_latent_folder_official_layout(tmp_path):
    make_latents(tmp_path)
    ds = LatentFolder(str(tmp_path), num_classes=3)
    x, y = ds[4]
    assert len(ds) == 5 and x.shape == (4, 4, 4) and y == 1 and ds.latent_shape == (4, 4, 4)


@pytest.mark.parametrize("case,fragment", [
    ("missing", "does not exist"), ("empty", "no '\\*_features' folder"), ("no-labels", "no matching"),
    ("no-files", "no .npy files"), ("bad-label", "outside 0..2"),
])
def test_latent_folder_bad_input(tmp_path, case, fragment):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "no-labels":
        (root / "x_features").mkdir(parents=True)
    elif case == "no-files":
        (root / "x_features").mkdir(parents=True)
        (root / "x_labels").mkdir()
    elif case == "bad-label":
        make_latents(root, label=lambda i: 7)
    with pytest.raises(UserError, match=fragment):
        ds = LatentFolder(str(root), num_classes=3)
        ds[0]


def test_label_files_read_as_numpy_reads_them(tmp_path):
    """Labels in every form np.save writes (int64/int32/uint8, shape (1,) or (), header v1 and v2) read back
    as np.load reads them, 3000 of them through the thread pool (whose header parsing once raced in
    CPython 3.11's `ast`); a file that is not one integer is a one-line error naming it."""
    from tinyfusion.data.latents import read_labels

    forms = [np.array([5]), np.array([7], np.int32), np.uint8(3), np.array([[2]], np.int16)]
    names = []
    for i in range(3000):
        names.append(f"{i}.npy")
        np.save(tmp_path / names[-1], np.asarray(forms[i % 4]) + i % 5)
    np.lib.format.write_array(open(tmp_path / "v2.npy", "wb"), np.array([9]), version=(2, 0))
    names.append("v2.npy")
    want = [int(np.load(tmp_path / n).reshape(-1)[0]) for n in names]
    assert read_labels(str(tmp_path), names).tolist() == want
    for bad, content in [("text.npy", b"not numpy"), ("empty.npy", None), ("pickle.npy", None)]:
        if content is not None:
            (tmp_path / bad).write_bytes(content)
        elif bad == "empty.npy":
            np.save(tmp_path / bad, np.zeros(0, np.int64))
        else:
            np.save(tmp_path / bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(UserError, match=f"{bad}: not a label file"):
            read_labels(str(tmp_path), ["0.npy", bad])


def make_images(root, per_class=3, classes=("cat", "dog"), size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_extract_features_layout_flip_and_resume(tmp_path, tiny_vae, capsys):
    make_images(tmp_path / "imgs")
    args = ["--data-path", str(tmp_path / "imgs"), "--vae", tiny_vae, "--out", str(tmp_path / "lat"), "--image-size", "16"]
    code, out, err = run_main(extract_main, args, capsys)
    assert code == 0, err
    ds = LatentFolder(str(tmp_path / "lat"), num_classes=2)
    assert len(ds) == 6 and ds.latent_shape == (4, 2, 2)
    feats = np.load(tmp_path / "lat" / "imagenet16_features" / "00000003.npy")
    assert feats.shape == (2, 4, 2, 2) and not np.allclose(feats[0], feats[1])
    # the second latent is the flipped image's encoding (its own seeded posterior sample, 2i + 1)
    from tinyfusion.data.vae import encode, load_vae
    from tinyfusion.extract_features import list_images, load_image

    image = load_image(list_images(str(tmp_path / "imgs"))[0][3][0], 16)[None]
    with torch.no_grad():
        vae = load_vae(tiny_vae, "cpu")
        np.testing.assert_allclose(feats[0], encode(vae, image, seeds=[6])[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[1], encode(vae, image.flip(-1), seeds=[7])[0].numpy(), atol=1e-5)
    assert [ds.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    os.remove(tmp_path / "lat" / "imagenet16_features" / "00000004.npy")
    code, out, err = run_main(extract_main, args, capsys)
    assert code == 0 and "(1 encoded by rank 0 this run)" in out


def test_extract_features_two_ranks_match_one(tmp_path, tiny_vae):
    """torchrun with 2 gloo ranks writes the same files as one process: names, labels and latent values
    (each posterior sample seeded by the image's index; an unseeded sample would differ run to run)."""
    make_images(tmp_path / "imgs", per_class=2)
    common = ["--data-path", str(tmp_path / "imgs"), "--vae", tiny_vae, "--image-size", "16"]
    one = run_module(["-m", "tinyfusion.extract_features", *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_module([*torchrun(2), "-m",
                      "tinyfusion.extract_features", *common, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    names = sorted(os.listdir(tmp_path / "one" / "imagenet16_features"))
    assert names == sorted(os.listdir(tmp_path / "two" / "imagenet16_features")) and len(names) == 4
    for n in names:
        a = np.load(tmp_path / "one" / "imagenet16_labels" / n)
        b = np.load(tmp_path / "two" / "imagenet16_labels" / n)
        assert np.array_equal(a, b)
        np.testing.assert_allclose(np.load(tmp_path / "two" / "imagenet16_features" / n),
                                   np.load(tmp_path / "one" / "imagenet16_features" / n), atol=1e-5)  # values, seeded by index


@pytest.mark.parametrize("case,fragment", [
    ("size", "not divisible by 8"), ("empty", "no class subfolders"), ("no-images", "hold no images"),
    ("not-image", "not a readable image"), ("bad-vae", "not a local diffusers AutoencoderKL"),
])
def test_extract_features_bad_input(tmp_path, tiny_vae, capsys, case, fragment):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    size, vae = "16", tiny_vae
    if case == "size":
        size = "20"
    elif case == "no-images":
        (imgs / "a").mkdir()
        (imgs / "a" / "readme.txt").write_text("x")
    elif case == "not-image":
        (imgs / "a").mkdir()
        (imgs / "a" / "broken.png").write_text("not a png")
    elif case == "bad-vae":
        make_images(imgs, per_class=1)
        vae = str(tmp_path)
    code, _, err = run_main(extract_main, ["--data-path", str(imgs), "--vae", vae, "--out", str(tmp_path / "o"), "--image-size", size], capsys)
    assert_one_line_error(code, err, fragment)


def test_shards_read_like_the_official_files(tmp_path, tiny_vae, capsys):
    """`--layout shards` holds exactly the latents and labels of the one-file layout, and the loader draws
    the same batches from either; a shard with unwritten rows is refused, and a rerun fills it."""
    from tinyfusion.data.batches import LatentBatches

    make_images(tmp_path / "imgs")
    common = ["--data-path", str(tmp_path / "imgs"), "--vae", tiny_vae, "--image-size", "16"]
    for layout in ("files", "shards"):
        code, _, err = run_main(extract_main, [*common, "--out", str(tmp_path / layout), "--layout", layout], capsys)
        assert code == 0, err
    files, shards = LatentFolder(str(tmp_path / "files"), 2), LatentFolder(str(tmp_path / "shards"), 2)
    assert shards.layout[0] == "shards" and len(files) == len(shards) == 6
    for i in range(6):
        assert np.array_equal(files.features(i), shards.features(i)) and files.label(i) == shards.label(i)
    a = LatentBatches(str(tmp_path / "files"), 4, 0, 0, 1, 2, 0, (4, 2, 2))
    b = LatentBatches(str(tmp_path / "shards"), 4, 0, 0, 1, 2, 0, (4, 2, 2))
    for _ in range(5):  # across an epoch boundary (one batch of 4 per epoch of 6)
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    filled = tmp_path / "shards" / "imagenet16_shards" / "filled-r000.npy"
    flags = np.load(filled)
    flags[2] = False
    np.save(filled, flags)
    with pytest.raises(UserError, match="1 of 6 latents not written yet"):
        LatentFolder(str(tmp_path / "shards"), 2)
    code, out, err = run_main(extract_main, [*common, "--out", str(tmp_path / "shards"), "--layout", "shards"], capsys)
    assert code == 0 and "(1 encoded by rank 0 this run)" in out
    refilled = LatentFolder(str(tmp_path / "shards"), 2).features(2)
    assert refilled.shape == (2, 4, 2, 2) and np.isfinite(refilled).all() and np.abs(refilled).sum() > 0


def test_latent_batches_split_one_process_across_ranks_and_resume_inside_an_epoch(tmp_path):
    """Two ranks' batches, concatenated, are the one-process batch (data and flip draws); a loader restored
    from a mid-epoch state continues with the batches the uninterrupted one draws next."""
    from conftest import write_latent_folder
    from tinyfusion.data.batches import LatentBatches

    write_latent_folder(tmp_path, 20, (2, 4, 2, 2), 5)
    shape = (4, 2, 2)
    one = LatentBatches(str(tmp_path), 8, 3, 0, 1, 5, 0, shape)
    ranks = [LatentBatches(str(tmp_path), 8, 3, r, 2, 5, 0, shape) for r in range(2)]
    seen = []
    for _ in range(5):  # 2 batches per epoch: crosses two epochs
        x, y = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        seen.append(x)
    assert not torch.equal(seen[0], seen[2])  # a new permutation each epoch
    ref = LatentBatches(str(tmp_path), 8, 3, 0, 1, 5, 0, shape)
    ref.next()
    state = ref.state()
    ahead = [ref.next() for _ in range(3)]
    resumed = LatentBatches(str(tmp_path), 8, 3, 0, 1, 5, 0, shape)
    resumed.load_state(state)
    for x, y in ahead:
        rx, ry = resumed.next()
        assert torch.equal(x, rx) and torch.equal(y, ry)
