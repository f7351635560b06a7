"""Encode an image folder into latents for training/pruning: `python -m tinyfusion.extract_features`.

  python -m tinyfusion.extract_features --data-path IMAGES/ --vae sd-vae-ft-ema/ --out LATENTS/ --image-size 256
  torchrun --nproc_per_node=K -m tinyfusion.extract_features ...   (each rank takes every K-th image)

IMAGES/ holds one subfolder per class (sorted names give label ids). Each image is center-cropped as
ADM does, encoded together with its horizontal flip, and stored as LATENTS/<name>_features/<index>.npy
(2, C, H/8, W/8) with the label in LATENTS/<name>_labels/<index>.npy. File names are the global image
index, so ranks never collide, and finished files are skipped on a rerun (resumable).
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from .distributed import cleanup, setup
from .errors import Parser, UserError, cli, positive

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


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.extract_features", description=__doc__)
    p.add_argument("--data-path", required=True, help="image folder with one subfolder per class")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--out", required=True, help="output folder for <name>_features/ and <name>_labels/")
    p.add_argument("--image-size", type=positive(), default=256, help="crop size; must be divisible by 8")
    p.add_argument("--name", help="layout prefix (default: imagenet<size>, the official layout)")
    p.add_argument("--batch-size", type=positive(), default=16)
    args = p.parse_args(argv)
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} is not divisible by 8 (the VAE downsamples by 8)")
    items, classes = list_images(args.data_path)
    name = args.name or f"imagenet{args.image_size}"
    feat_dir = os.path.join(args.out, f"{name}_features")
    label_dir = os.path.join(args.out, f"{name}_labels")
    try:
        os.makedirs(feat_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {args.out}: {e.strerror}") from None
    rank, world, device = setup()
    from .data.vae import encode, load_vae

    vae = load_vae(args.vae, device)
    mine = [i for i in range(rank, len(items), world)
            if not (os.path.isfile(os.path.join(feat_dir, f"{i:08d}.npy")) and os.path.isfile(os.path.join(label_dir, f"{i:08d}.npy")))]
    bar = tqdm(total=len(mine), desc=f"encode (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start: start + args.batch_size]
        x = torch.stack([load_image(items[i][0], args.image_size) for i in idx]).to(device)
        z = encode(vae, torch.cat([x, x.flip(-1)])).cpu().numpy()
        n = len(idx)
        for j, i in enumerate(idx):
            save_npy(os.path.join(feat_dir, f"{i:08d}.npy"), np.stack([z[j], z[n + j]]))
            save_npy(os.path.join(label_dir, f"{i:08d}.npy"), np.array([items[i][1]], dtype=np.int64))
        bar.update(n)
    bar.close()
    if rank == 0:
        print(f"{len(items)} images in {len(classes)} classes -> {feat_dir} ({len(mine)} encoded by rank 0 this run)")
    cleanup()


if __name__ == "__main__":
    main()
