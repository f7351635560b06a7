"""Train a DiT: `python -m tinyfusion.train --preset digits` (the embedded teacher) or on latents.

The shared training engine (`tinyfusion.training`): AdamW (fused), EMA, gradient clipping, bf16
autocast on CUDA, periodic atomic checkpoints by step and wall time, `--resume` (exact: the same
weights as an uninterrupted run), progress bar, and torchrun DDP (the global batch is split across
ranks, rank 0 writes). Output in `runs/<name>/`: `model.safetensors` (EMA weights with config and
provenance), `checkpoints/last.pt` (full state), `metrics.json` (loss curve, images/s), `loss.png`, `log.txt`.
"""
import copy
import json
import os
import sys
import time

import torch

from . import checkpoint
from .data.batches import make_batches
from .diffusion import create_objective
from .errors import Parser, UserError, cli, positive
from .models import DiT, DiTConfig, config_from_name
from .models.mar import MAR, MARConfig
from .training import Engine, add_engine_args, engine_config
from .training.denoising import DenoiserTraining, TrainConfig
from .training.distributed import cleanup, setup_run
from .training.fsdp import state_exists
from .training.run_folder import add_overwrite_arg, claim, record_of
from .training.runlog import RunLog, plot_curve

PRESETS = {
    # The embedded teacher: depth 12 so that 1:2, 2:4, 3:6 and 6:12 all apply (12 -> 6 mirrors 28 -> 14).
    "digits": dict(
        config=DiTConfig(depth=12, hidden_size=128, patch_size=2, num_heads=4, input_size=8, in_channels=1, num_classes=10),
        steps=5000, global_batch_size=128, lr=5e-4, ema_decay=0.999, warmup=200, name="digits-teacher",
    ),
    # The SiT teacher: the same network and recipe, trained with linear-path velocity flow matching.
    "digits-sit": dict(
        config=DiTConfig(depth=12, hidden_size=128, patch_size=2, num_heads=4, input_size=8, in_channels=1, num_classes=10,
                         learn_sigma=False, objective="flow"),
        steps=5000, global_batch_size=128, lr=5e-4, ema_decay=0.999, warmup=200, name="digits-sit-teacher",
    ),
    # A tiny MAR: 2x2-pixel tokens (16 per digit), encoder and decoder 6 blocks each (12 -> 6 in all).
    "digits-mar": dict(
        config=MARConfig(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, encoder_embed_dim=128, encoder_depth=6,
                         encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=6, decoder_num_heads=4, class_num=10,
                         class_rows=10, buffer_size=4, diffloss_d=3, diffloss_w=128, clip_tokens=True),
        steps=5000, global_batch_size=128, lr=5e-4, ema_decay=0.999, warmup=200, name="digits-mar-teacher",
    ),
}


def parse_args(argv):
    p = Parser(prog="python -m tinyfusion.train", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a complete recipe; flags given explicitly override it")
    p.add_argument("--model", help="DiT-{S,B,L,XL}/{2,4,8}, or DiT-XL-D14/2 for another depth; SiT-XL/2 etc. train "
                                    "the same network with flow matching (latent training)")
    p.add_argument("--path", choices=["linear", "gvp"], help="SiT interpolant (default linear)")
    p.add_argument("--prediction", choices=["velocity", "noise", "score"], help="SiT target (default velocity)")
    p.add_argument("--depth", type=positive(), help="override the model's depth")
    p.add_argument("--data-path", help="folder of pre-extracted latents (<name>_features/, <name>_labels/)")
    p.add_argument("--image-size", type=positive(), default=256, help="image size the latents come from (latent = size/8)")
    p.add_argument("--num-classes", type=positive(), default=1000)
    p.add_argument("--steps", type=positive())
    p.add_argument("--global-batch-size", type=positive())
    p.add_argument("--lr", type=positive(float))
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=positive(float), default=1.0)
    p.add_argument("--ema-decay", type=positive(float))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default="runs")
    p.add_argument("--name", help="run folder name under --results-dir")
    p.add_argument("--ckpt-every", type=positive(),
                   help="steps between resumable states (default 500 on digits, 10000 on latents; --ckpt-minutes also saves)")
    p.add_argument("--log-every", type=positive(), default=50)
    p.add_argument("--resume", action="store_true", help="continue from <run>/checkpoints/last.pt")
    add_overwrite_arg(p)
    p.add_argument("--max-bad-steps", type=positive(), default=20, help="abort after this many non-finite losses in a row")
    p.add_argument("--num-workers", type=int, help="latent loader workers (default: 0 on the CPU, up to 8 per GPU)")
    add_engine_args(p)
    args = p.parse_args(argv)
    if args.ckpt_every is None:  # a multi-GB state every few hundred fast GPU steps would stall the run
        args.ckpt_every = 10000 if args.data_path and not args.preset else 500
    preset = PRESETS.get(args.preset, {})
    for key in ("steps", "global_batch_size", "lr", "ema_decay", "warmup", "name"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, {"steps": 400_000, "global_batch_size": 256, "lr": 1e-4,
                                                "ema_decay": 0.9999, "warmup": 0, "name": "train"}[key]))
    if args.preset:
        args.config = copy.deepcopy(preset["config"])
    elif args.model and args.data_path:
        try:
            args.config = config_from_name(args.model, input_size=args.image_size // 8, num_classes=args.num_classes)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        raise UserError("give --preset digits, or --model and --data-path for latent training")
    if args.depth:
        if isinstance(args.config, MARConfig):
            raise UserError("--depth sets a DiT's depth; a MAR's encoder and decoder depths come from its preset")
        args.config.depth = args.depth
    for key in ("path", "prediction"):
        if getattr(args, key):
            if args.config.objective != "flow":
                raise UserError(f"--{key} applies to SiT (flow matching) models only")
            setattr(args.config, key, getattr(args, key))
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    run_dir = os.path.join(args.results_dir, args.name)
    rank, world, device = setup_run(args.global_batch_size, run_dir, args.fsdp)
    state_path = os.path.join(run_dir, "checkpoints", "last.pt")
    if args.resume and not state_exists(state_path):
        raise UserError(f"--resume: no checkpoint at {state_path}")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run

    cfg = args.config
    model = (MAR(cfg) if isinstance(cfg, MARConfig) else DiT(cfg)).to(device)
    tc = TrainConfig(steps=args.steps, global_batch_size=args.global_batch_size, lr=args.lr, warmup=args.warmup,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
                     log_every=args.log_every, ckpt_every=args.ckpt_every, max_bad_steps=args.max_bad_steps)
    data = make_batches(cfg, None if args.preset else args.data_path, args.global_batch_size, args.seed, rank, world,
                        args.num_workers)
    task = DenoiserTraining(model, create_objective(cfg), data, tc, rank, world)
    log = RunLog(run_dir, enabled=rank == 0)
    engine = Engine(task, engine_config(args), rank, world, device, log)
    # training at a constant rate (after warm-up) may be continued past its --steps, as the official DiT's is
    claim(run_dir, record_of("train", args, ignore=("steps",)), args.resume, args.overwrite, rank, device)
    if args.resume:
        engine.resume(state_path)
    if rank == 0:
        start = engine.step
        log.write(f"{'resuming at step ' + str(start) if start else 'starting'}: {json.dumps(cfg.to_dict())}")
        log.write("command: " + " ".join(["python -m tinyfusion.train", *(argv if argv is not None else sys.argv[1:])]))
        log.write(f"{engine.precision} on {device}, {world} rank(s), grad-accum {args.grad_accum}", echo=False)
    t0 = time.time()
    engine.run(state_path)
    ema = engine.ema_model()  # under FSDP gathered whole from the shards, by every rank
    if rank == 0:
        wall = time.time() - t0
        checkpoint.save(ema, os.path.join(run_dir, "model.safetensors"), source="tinyfusion.train",
                        preset=args.preset, steps=args.steps, seed=args.seed, global_batch_size=args.global_batch_size,
                        lr=args.lr, ema_decay=args.ema_decay, precision=engine.precision)
        curve = engine.curve
        log.metrics({"steps": args.steps, "wall_seconds_this_run": round(wall, 1), "world_size": world,
                     "run": engine.summary(), "loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else None})
        plot_curve([(p["step"], p["loss"]) for p in curve], os.path.join(run_dir, "loss.png"), "training loss (eps-MSE + VB)")
        log.write(f"done: {run_dir}/model.safetensors ({wall:.0f}s this run)")
    cleanup()


if __name__ == "__main__":
    main()
