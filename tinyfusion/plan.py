"""Will it fit? `python -m tinyfusion.plan --model flux-dev --gpus 8 --gpu-memory 80`

Prints, for DDP and for FSDP (`--fsdp` on train, prune and finetune), the bytes one GPU holds: fp32
parameters, gradients and AdamW state of what is trained, the EMA, the Masked-KD teacher, the working set of
gathered or autocast weights and an activation estimate at --batch, and says which fits. The model is built
on the meta device from its shapes (nothing is loaded): a preset, a DiT name, or --ckpt (a checkpoint or a
diffusers transformer folder). How each term is counted: tinyfusion/training/memory.py.

  python -m tinyfusion.plan --model DiT-XL/2 --task train --gpus 8 --batch 32
  python -m tinyfusion.plan --model sd3-medium --task finetune --keep 0.5 --gpus 8 --gpu-memory 80
  python -m tinyfusion.plan --ckpt FLUX_FOLDER/ --task search --tokens 4608
"""
import json
import os

import torch

from .errors import Parser, UserError, cli, positive, writable_file

# Published configurations (diffusers class, keyword arguments, tokens per sample at the native resolution:
# latent patches plus text tokens)
PRESETS = {
    "sd3-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                 attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                                 caption_projection_dim=1536, pooled_projection_dim=2048,
                                                 out_channels=16, pos_embed_max_size=192), 4096 + 333),
    "flux-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                                pooled_projection_dim=768, guidance_embeds=True,
                                                axes_dims_rope=(16, 56, 56)), 4096 + 512),
}
TASKS = ["train", "search", "finetune"]
GIB = 1024 ** 3
USABLE = 0.92  # of the GPU's memory: the CUDA context and the allocator's fragmentation take the rest


def on_meta(build):
    with torch.device("meta"):
        return build()


def diffusers_model(class_name, config):
    try:
        import diffusers
    except ImportError:
        raise UserError("this model is a diffusers transformer: pip install diffusers") from None
    return on_meta(lambda: getattr(diffusers, class_name)(**config))


def build(args):
    """(model on the meta device, tokens per sample)."""
    from .models import DiT, config_from_name

    if args.model in PRESETS:
        name, config, tokens = PRESETS[args.model]
        return diffusers_model(name, config), tokens
    if args.model:
        try:
            cfg = config_from_name(args.model, input_size=args.image_size // 8)
        except ValueError as e:
            raise UserError(str(e)) from None
        return on_meta(lambda: DiT(cfg)), (cfg.input_size // cfg.patch_size) ** 2
    path = args.ckpt
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        from .errors import read_json

        config = read_json(os.path.join(path, "config.json"))
        name = config.pop("_class_name", None)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if not args.tokens:
            raise UserError(f"{path} is a diffusers folder: give --tokens (latent patches plus text tokens per sample)")
        try:
            return diffusers_model(name, config), args.tokens
        except (TypeError, AttributeError) as e:
            raise UserError(f"{path}: diffusers cannot build a {name} from its config.json ({e})") from None
    from . import checkpoint

    model = checkpoint.load(path)
    c = model.config
    return model, (c.input_size // c.patch_size) ** 2


def table(est, world, memory):
    rows = sorted({k for mode in est.values() for k in mode}, key=list(est["ddp"]).index)
    lines = [f"{'per GPU (GiB)':<16}{'DDP':>14}{'FSDP x' + str(world):>14}"]
    for r in rows:
        lines.append(f"{r:<16}{est['ddp'].get(r, 0) / GIB:>14.2f}{est['fsdp'].get(r, 0) / GIB:>14.2f}")
    totals = {m: sum(v.values()) / GIB for m, v in est.items()}
    lines.append(f"{'total':<16}{totals['ddp']:>14.2f}{totals['fsdp']:>14.2f}")
    verdict = {m: "fits" if t <= USABLE * memory else "does not fit" for m, t in totals.items()}
    lines.append(f"{'on ' + str(memory) + ' GiB':<16}{verdict['ddp']:>14}{verdict['fsdp']:>14}")
    return "\n".join(lines), totals, verdict


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.plan", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a DiT/SiT name (DiT-XL/2, DiT-XL-D14/2)")
    src.add_argument("--ckpt", help="a checkpoint file or a diffusers transformer folder (its config.json is read)")
    p.add_argument("--task", choices=TASKS, default="finetune",
                   help="train: the whole model; search: the learnable search (LoRA on frozen weights); "
                        "finetune: Masked KD of a student keeping --keep of the blocks, taught by the model")
    p.add_argument("--gpus", type=positive(), default=8, help="ranks (FSDP shards over them)")
    p.add_argument("--gpu-memory", type=positive(float), default=80.0, help="GiB per GPU")
    p.add_argument("--batch", type=positive(), default=1, help="samples per GPU per step")
    p.add_argument("--tokens", type=positive(), help="tokens per sample (default: the model's patches; presets add text)")
    p.add_argument("--image-size", type=positive(), default=256, help="DiT names: the image size (latent = size / 8)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--keep", type=positive(float), default=0.5, help="finetune: the fraction of blocks the student keeps")
    p.add_argument("--lora-rank", type=positive(), default=8)
    p.add_argument("--fsdp-teacher", choices=["shard", "replicate"], default="shard")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.keep > 1:
        raise UserError(f"--keep is a fraction of the blocks, in (0, 1]; got {args.keep}")
    if args.json:
        writable_file(args.json)
    model, tokens = build(args)
    from .training.memory import estimate

    est = estimate(model, args.task, args.gpus, args.batch, args.tokens or tokens, precision=args.precision,
                   grad_checkpoint=args.grad_checkpoint, keep=args.keep, lora_rank=args.lora_rank,
                   teacher=args.fsdp_teacher)
    params = sum(p.numel() for p in model.parameters())
    text, totals, verdict = table(est, args.gpus, args.gpu_memory)
    print(f"{args.model or args.ckpt}: {params / 1e9:.3f}B parameters; {args.task}, batch {args.batch} x "
          f"{args.tokens or tokens} tokens per GPU, {args.precision}{', grad checkpoint' if args.grad_checkpoint else ''}")
    print(text)
    if args.json:
        from .checkpoint import atomic_write

        record = {"params": params, "args": vars(args), "bytes": est, "total_gib": totals, "verdict": verdict}
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(record, indent=2)))
    return est


if __name__ == "__main__":
    main()
