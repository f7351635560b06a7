"""Encode an image folder into latents for training/pruning: `python -m tinyfusion.extract_features`.

  python -m tinyfusion.extract_features --data-path IMAGES/ --vae sd-vae-ft-ema/ --out LATENTS/ --image-size 256
  torchrun --nproc_per_node=K -m tinyfusion.extract_features ...   (each rank takes every K-th image)

IMAGES/ holds one subfolder per class (sorted names give label ids). Each image is center-cropped as
ADM does, encoded together with its horizontal flip, and stored as LATENTS/<name>_features/<index>.npy
(2, C, H/8, W/8) with the label in LATENTS/<name>_labels/<index>.npy. File names are the global image
index, so ranks never collide, and finished files are skipped on a rerun (resumable). Each posterior
sample is seeded by the image's index, so any rank count and any rerun write the same latents.

`--layout shards` writes instead one memory-mapped array per rank, LATENTS/<name>_shards/features-rRRR.npy
(N, 2, C, H/8, W/8), with labels-rRRR.npy and filled-rRRR.npy (which rows are written; a rerun fills
the rest). The loaders read it with three file opens per shard instead of two per sample.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from .errors import Parser, UserError, cli, positive
from .training.distributed import cleanup, setup

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


def list_images(root):
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise UserError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    items = []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            if name.endswith(IMAGE_EXTS):
                items.append((os.path.join(root, cls, name), label))
    if not items:
        raise UserError(f"{root}: class folders hold no images ({', '.join(IMAGE_EXTS[:4])}, ...)")
    return items, classes


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with BOX while the image is at least twice the size, then BICUBIC."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y: y + image_size, x: x + image_size]


def load_image(path, image_size):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = center_crop_arr(im.convert("RGB"), image_size)
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{path}: not a readable image") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


def save_npy(path, arr):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp.npy")  # hidden until renamed
    np.save(tmp, arr)
    os.replace(tmp, path)


class ShardWriter:
    """This rank's shard: features (memory-mapped, created at the first batch, when the latent shape is
    known), labels (known from the folder listing) and the filled flags, flushed after every batch."""

    def __init__(self, folder, rank, labels):
        tag = f"r{rank:03d}.npy"
        self.features_path = os.path.join(folder, f"features-{tag}")
        self.filled_path = os.path.join(folder, f"filled-{tag}")
        self.n = len(labels)
        labels_path = os.path.join(folder, f"labels-{tag}")
        if not os.path.isfile(labels_path):
            save_npy(labels_path, np.asarray(labels, dtype=np.int64))
        if os.path.isfile(self.filled_path) and os.path.isfile(self.features_path):
            self.filled = np.load(self.filled_path, mmap_mode="r+")
            self.features = np.load(self.features_path, mmap_mode="r+")
            if len(self.filled) != self.n:
                raise UserError(f"{self.features_path} holds {len(self.filled)} rows, this rank now has {self.n} "
                                "images (a different folder or rank count): remove the shards to start over")
        else:
            self.filled, self.features = np.zeros(self.n, dtype=bool), None

    def write(self, rows, pairs):
        if self.features is None:
            self.features = np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32,
                                                      shape=(self.n, *pairs.shape[1:]))
            save_npy(self.filled_path, self.filled)
            self.filled = np.load(self.filled_path, mmap_mode="r+")
        self.features[rows] = pairs
        self.features.flush()
        self.filled[rows] = True  # only after the rows are on disk
        self.filled.flush()


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.extract_features", description=__doc__)
    p.add_argument("--data-path", required=True, help="image folder with one subfolder per class")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--out", required=True, help="output folder for <name>_features/ and <name>_labels/")
    p.add_argument("--image-size", type=positive(), default=256, help="crop size; must be divisible by 8")
    p.add_argument("--name", help="layout prefix (default: imagenet<size>, the official layout)")
    p.add_argument("--batch-size", type=positive(), default=16)
    p.add_argument("--layout", choices=["files", "shards"], default="files",
                   help="files: the official one .npy per sample; shards: one memory-mapped array per rank")
    args = p.parse_args(argv)
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} is not divisible by 8 (the VAE downsamples by 8)")
    items, classes = list_images(args.data_path)
    name = args.name or f"imagenet{args.image_size}"
    feat_dir = os.path.join(args.out, f"{name}_features")
    label_dir = os.path.join(args.out, f"{name}_labels")
    shard_dir = os.path.join(args.out, f"{name}_shards")
    try:
        for d in ((shard_dir,) if args.layout == "shards" else (feat_dir, label_dir)):
            os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {args.out}: {e.strerror}") from None
    rank, world, device = setup()
    from .data.vae import encode, load_vae

    vae = load_vae(args.vae, device)
    if args.layout == "shards":
        writer = ShardWriter(shard_dir, rank, [items[i][1] for i in range(rank, len(items), world)])
        mine = [i for j, i in enumerate(range(rank, len(items), world)) if not writer.filled[j]]
    else:
        have_f, have_l = set(os.listdir(feat_dir)), set(os.listdir(label_dir))
        mine = [i for i in range(rank, len(items), world) if not (f"{i:08d}.npy" in have_f and f"{i:08d}.npy" in have_l)]
    bar = tqdm(total=len(mine), desc=f"encode (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start: start + args.batch_size]
        x = torch.stack([load_image(items[i][0], args.image_size) for i in idx]).to(device)
        # posterior samples seeded by global image index (2i: the image, 2i+1: its flip): reruns and rank
        # counts give the same latents
        z = encode(vae, torch.cat([x, x.flip(-1)]), seeds=[2 * i for i in idx] + [2 * i + 1 for i in idx]).cpu().numpy()
        n = len(idx)
        pairs = np.stack([z[:n], z[n:]], axis=1)  # (n, 2, C, h, w): the image and its flip
        if args.layout == "shards":
            writer.write([(i - rank) // world for i in idx], pairs)
        else:
            for j, i in enumerate(idx):
                save_npy(os.path.join(feat_dir, f"{i:08d}.npy"), pairs[j])
                save_npy(os.path.join(label_dir, f"{i:08d}.npy"), np.array([items[i][1]], dtype=np.int64))
        bar.update(n)
    bar.close()
    if rank == 0:
        where = shard_dir if args.layout == "shards" else feat_dir
        print(f"{len(items)} images in {len(classes)} classes -> {where} ({len(mine)} encoded by rank 0 this run)")
    cleanup()


if __name__ == "__main__":
    main()
