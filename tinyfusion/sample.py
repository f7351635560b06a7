"""Sample a class-conditional grid, or many samples into an ADM-format .npz.

  python -m tinyfusion.sample [--ckpt PATH] --out grid.png
  torchrun --nproc_per_node=K -m tinyfusion.sample --ckpt PATH --num-samples 50000 --npz OUT.npz

Grid: one row per class, --per-class columns. .npz: class labels spread uniformly, each rank writing its
chunks to OUT.npz.parts/ (kept on a rerun: resumable), rank 0 packing `arr_0` (uint8 NHWC RGB, as the
ADM evaluator reads it) and `arr_1` (labels); the result does not depend on the number of ranks. Models
on 1- or 3-channel images are written directly; latent models (4 channels) need --vae, a local diffusers
AutoencoderKL folder, to decode.
"""

import os

import torch

from . import checkpoint
from .errors import Parser, UserError, cli, positive, writable_file
from .cli.sampler_args import add_sampler_args, load_runtime, sample_batched, sampler_settings


def to_grid(images, rows, upscale=4):
    """(N, C, H, W) in [-1, 1] -> uint8 HxWxC grid with `rows` rows and a 1-pixel gap."""
    n, c, h, w = images.shape
    cols = n // rows
    from .eval.npz import to_uint8

    img = to_uint8(images)
    img = img.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    h, w, gap = h * upscale, w * upscale, 2
    grid = torch.full((c, rows * (h + gap) - gap, cols * (w + gap) - gap), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * (h + gap): r * (h + gap) + h, k * (w + gap): k * (w + gap) + w] = img[i]
    return grid.permute(1, 2, 0).squeeze(-1).numpy()


def parse_classes(text, num_classes):
    try:
        classes = [int(c) for c in text.split(",")] if text else list(range(min(num_classes, 10)))
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes {bad} outside 0..{num_classes - 1}")
    return classes


def sample_npz(args, model, settings, vae):
    from .training import distributed
    import shutil

    from .eval.npz import pack_npz, parts_dir, sample_to_npz

    rank, world, device = distributed.setup()
    try:
        rt = load_runtime(model, args, default_device=device)  # under torchrun: this rank's GPU
        where = next(rt.parameters()).device
        decode = None if vae is None else vae_decoder(vae, where)
        record = {"ckpt": os.path.abspath(args.ckpt), "ckpt_sha256": checkpoint.file_sha256(args.ckpt),
                  "backend": args.backend, "dtype": str(getattr(rt, "dtype", "float32")).replace("torch.", ""),
                  "device": where.type, "vae": os.path.abspath(args.vae) if args.vae else None}
        kept = sample_to_npz(rt, args.num_samples, settings, args.batch_size, args.npz, rank, world, decode,
                             progress=rank == 0, record=record)
        # ranks finish their last chunk up to a chunk apart: wait on a gloo group that can wait hours (NCCL's
        # watchdog would end a barrier after its 10-minute default), and again while rank 0 packs
        distributed.wait_for_all()
        if rank == 0:
            shape = pack_npz(args.npz, args.num_samples, args.batch_size)
            print(f"wrote {args.npz}: arr_0 {shape} uint8 ({settings['name']} {settings['steps']} steps, "
                  f"cfg {settings['cfg_scale']}; {world} rank{'s' * (world > 1)}, {kept} chunks of rank 0 kept from an earlier run)")
        distributed.wait_for_all()
        if rank == 0:  # the final file holds everything: the chunks have done their job
            shutil.rmtree(parts_dir(args.npz), ignore_errors=True)
    finally:
        distributed.cleanup()


def vae_decoder(vae, device, batch=32):
    """latents (N, C, h, w) on `device` -> images (N, 3, H, W) in [-1, 1] on `device`, decoded there in
    batches by an fp32 VAE (an fp16 SD VAE overflows)."""
    from .data.vae import decode

    vae = vae.to(device)
    return lambda z: torch.cat([decode(vae, c.float()) for c in z.split(batch)])


@cli
def main(argv=None):
    from PIL import Image

    from .assets import add_model_arg, default_teacher

    p = Parser(prog="python -m tinyfusion.sample", description=__doc__)
    p.add_argument("--ckpt", help="checkpoint (default: the shipped digits teacher)")
    add_model_arg(p)
    p.add_argument("--out", default="grid.png", help="PNG to write")
    p.add_argument("--per-class", type=positive(), default=10)
    p.add_argument("--classes", help="comma-separated class ids (default: the first 10)")
    p.add_argument("--upscale", type=positive(), default=4, help="nearest-neighbour zoom of each image")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder, to decode latent models")
    p.add_argument("--num-samples", type=positive(), help="with --npz: how many samples")
    p.add_argument("--npz", help="write --num-samples samples to this ADM-format .npz instead of a grid")
    add_sampler_args(p)
    args = p.parse_args(argv)
    if (args.npz is None) != (args.num_samples is None):
        raise UserError("--npz and --num-samples go together")
    writable_file(args.npz or args.out)
    args.ckpt = args.ckpt or default_teacher(args.model)
    model = checkpoint.load(args.ckpt, model=args.model)
    # --npz: the paper's protocol, DDPM 250 (a SiT: SDE 250)
    settings = sampler_settings(args, default="ddpm" if args.npz else "ddim", config=model.config)
    vae = None
    if model.config.in_channels not in (1, 3):
        if not args.vae:
            raise UserError(f"{args.ckpt} generates {model.config.in_channels}-channel latents; give --vae FOLDER to decode them")
        from .data.vae import load_vae

        vae = load_vae(args.vae)
    if args.npz:
        return sample_npz(args, model, settings, vae)
    classes = parse_classes(args.classes, model.config.num_classes)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    rt = load_runtime(model, args)
    images = sample_batched(rt, labels, settings, args.batch_size)
    if vae is not None:
        where = next(rt.parameters()).device
        images = vae_decoder(vae, where)(images.to(where)).cpu()
    grid = to_grid(images, rows=len(classes), upscale=args.upscale if vae is None else 1)
    checkpoint.atomic_write(args.out, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    print(f"wrote {args.out} ({len(classes)} classes x {args.per_class}, {settings['name']} {settings['steps']} steps, cfg {settings['cfg_scale']})")


if __name__ == "__main__":
    main()
