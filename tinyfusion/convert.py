"""Convert between facebookresearch/DiT checkpoints and diffusers' DiTTransformer2DModel folders.

  python -m tinyfusion.convert --to diffusers --ckpt DiT-XL-2-256x256.pt --out dit-diffusers/
  python -m tinyfusion.convert --to dit --ckpt dit-diffusers/ --out model.safetensors

Input is anything `tinyfusion.load` reads. diffusers' port differs from the original DiT in its
timestep frequencies and its second LayerNorm's eps; the written config and metadata record both,
so a round trip reproduces the same outputs. Diffusers' own DiT configs use the diffusers timestep
embedding, so an official checkpoint converted to diffusers and run there differs from the original
slightly (as it does in diffusers' own conversion); loaded back through tinyfusion it is exact.
"""
import json
import os

import torch

from . import checkpoint
from .errors import Parser, UserError, cli
from .models import config_from_name
from .models.diffusers_keys import dit_to_diffusers


def diffusers_config(cfg):
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels,
        "num_layers": cfg.depth,
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": cfg.mlp_norm_eps,
        "attention_bias": True,
    }


def write_diffusers(model, out_dir):
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors), written to a temp folder first."""
    from safetensors.torch import save_file

    cfg = model.config
    if cfg.mlp_ratio != 4.0:
        raise UserError(f"diffusers' DiT has a fixed MLP ratio of 4; this model has {cfg.mlp_ratio}")
    if cfg.class_dropout_prob <= 0:
        raise UserError("diffusers' DiT always has a null-class row; this model has none")
    def write(tmp):
        sd = dit_to_diffusers(model.state_dict())
        save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(diffusers_config(cfg), f, indent=2)

    checkpoint.atomic_folder(out_dir, write)


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.convert", description=__doc__)
    p.add_argument("--to", required=True, choices=["diffusers", "dit"], help="target format")
    p.add_argument("--ckpt", required=True, help="input checkpoint (.pt, .safetensors or a diffusers folder)")
    p.add_argument("--out", required=True, help="diffusers: output folder; dit: output .safetensors or .pt file")
    p.add_argument("--num-heads", type=int, help="attention heads, when the input cannot say (non-standard widths)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="storage dtype of a .safetensors output")
    p.add_argument("--model", help="assert the weights are this model, e.g. DiT-XL/2 or DiT-XL-D14/2")
    args = p.parse_args(argv)
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    expect = None
    if args.model:
        try:
            expect = config_from_name(args.model)
        except ValueError as e:
            raise UserError(str(e)) from None
    model = checkpoint.load(args.ckpt, expect=expect, **overrides)
    if args.to == "diffusers" and type(model).__name__ != "DiT":
        raise UserError(f"{args.ckpt} is a {type(model).__name__}; only DiT has a diffusers DiTTransformer2DModel form")
    if args.to == "diffusers":
        if os.path.isfile(args.out):
            raise UserError(f"--out {args.out} is a file; diffusers models are folders")
        write_diffusers(model, args.out)
    elif args.out.endswith(".pt"):  # the official format: a plain state dict
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        checkpoint.atomic_write(args.out, lambda tmp: torch.save(sd, tmp))
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        provenance = {**getattr(model, "provenance", {}), "converted_from": os.path.basename(os.path.normpath(args.ckpt))}
        provenance.pop("config", None)
        checkpoint.save(model, args.out, dtype=dtype, **provenance)
    print(f"wrote {args.out} (depth {model.config.depth}, hidden {model.config.hidden_size}, patch {model.config.patch_size})")


if __name__ == "__main__":
    main()
