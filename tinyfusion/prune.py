"""Depth-prune a DiT: `python -m tinyfusion.prune` (learnable TinyFusion search, or a baseline).

With no arguments: the learnable search on the shipped digits teacher, 12 -> 6 layers, scheme 1:2.

  python -m tinyfusion.prune --ckpt DiT-XL-2-256x256.pt --data-path LATENTS/ --scheme 1:2 --epochs 1
  python -m tinyfusion.prune --groups "[[3,4],[3,4],[3,4],[3,4],[3,4],[2,4],[2,4]]" ...   (28 -> 19)
  torchrun --nproc_per_node=K -m tinyfusion.prune ...                                      (DDP)
  python -m tinyfusion.prune --method bi|fluxlite|sensitivity|oracle|random|first|last
  python -m tinyfusion.prune --method indices --kept "[0,2,4,7,9,11]"
  python -m tinyfusion.prune --method random-search --candidates 100

Writes to --out (default runs/prune-<method>-<time>/): pruned.safetensors (blocks renumbered 0..N-1,
loads as a plain DiT of depth N), decision.json, decisions.png (learnable) or scores.png, log.txt.
The search state is checkpointed atomically; `--resume --out DIR` continues a killed run.
"""
import copy
import json
import math
import os
import sys
import time

import torch

from . import checkpoint
from .data.batches import make_batches
from .diffusion import create_objective
from .errors import Parser, UserError, cli, positive
from .models.stack import block_stack
from .models.stack_base import validate_kept
from .pruning import baselines
from .pruning.calibration import CalibrationSet, calibration_loss
from .pruning.learnable import LearnableSearch, SearchConfig
from .pruning.masks import kept_from_choices, parse_groups, parse_scheme
from .pruning.plots import plot_decisions, plot_scores
from .pruning.surgery import prune_model
from .training import add_engine_args, engine_config
from .training.distributed import cleanup, setup_run
from .training.fsdp import state_exists
from .training.run_folder import add_overwrite_arg, claim, record_of
from .training.runlog import RunLog

METHODS = ["learnable", "bi", "fluxlite", "sensitivity", "oracle", "random", "first", "last", "indices", "random-search"]


def parse_args(argv):
    from .assets import add_model_arg, default_teacher

    p = Parser(prog="python -m tinyfusion.prune", description=__doc__)
    p.add_argument("--ckpt", help="model to prune (default: the shipped digits teacher)")
    add_model_arg(p)
    p.add_argument("--method", default="learnable", help=f"one of: {', '.join(METHODS)}")
    g = p.add_argument_group("what to keep")
    g.add_argument("--scheme", default="1:2", help="uniform local N:M blocks (keep N of every M consecutive layers)")
    g.add_argument("--groups", help='mixed blocks as JSON, e.g. "[[3,4],[2,4]]"; overrides --scheme')
    g.add_argument("--target-depth", type=positive(), help="layers kept by score baselines (default: what the scheme keeps)")
    g.add_argument("--kept", help='--method indices: source layers to keep, JSON list, e.g. "[0,2,4]"')
    g.add_argument("--candidates", type=positive(), default=100, help="--method random-search: masks to score")
    s = p.add_argument_group("learnable search (paper defaults)")
    s.add_argument("--steps", type=positive(), help="search steps (default: 500 on digits, one epoch on latents)")
    s.add_argument("--epochs", type=positive(float), help="search length in passes over the data, instead of --steps")
    s.add_argument("--global-batch-size", type=positive(), default=SearchConfig.global_batch_size)
    s.add_argument("--lr", type=positive(float), default=SearchConfig.lr, help="weight-update learning rate")
    s.add_argument("--gate-lr-mult", type=positive(float), default=SearchConfig.gate_lr_mult, help="gate lr = this x --lr")
    s.add_argument("--tau-range", type=positive(float), nargs=2, default=list(SearchConfig.tau_range), metavar=("START", "END"),
                   help="Gumbel temperature, annealed linearly")
    s.add_argument("--scaling", type=positive(float), default=SearchConfig.scaling, help="logit scale (one-hotness)")
    s.add_argument("--ema-decay", type=positive(float), default=SearchConfig.ema_decay, help="EMA of all trainable state; decides")
    s.add_argument("--delta-w", default=SearchConfig.delta_w, choices=["lora", "full", "none"], help="recoverability update")
    s.add_argument("--lora-rank", type=positive(), default=SearchConfig.lora_rank)
    s.add_argument("--lora-alpha", type=positive(float), help="default 2 x rank")
    s.add_argument("--keep-update", action="store_true", help="merge the update into the saved weights (default: discard)")
    d = p.add_argument_group("data and run")
    d.add_argument("--data-path", help="latent folder (<name>_features/, <name>_labels/); default: the digits set")
    d.add_argument("--cond", help="diffusers PixArt/SD3/Flux: conditioning bank (.pt/.safetensors) of prompt "
                                  "embeddings, last row the null prompt; latent labels index its rows")
    d.add_argument("--calib-samples", type=positive(), default=512, help="fixed samples for the calibration loss")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="run folder (default runs/prune-<method>-<time>/)")
    d.add_argument("--resume", action="store_true", help="continue the search saved in --out")
    add_overwrite_arg(d)
    d.add_argument("--ckpt-every", type=positive(),
                   help="steps between resumable states (default 100 on digits, 2000 on latents; --ckpt-minutes also saves)")
    d.add_argument("--log-every", type=positive(), default=SearchConfig.log_every)
    d.add_argument("--num-workers", type=int, help="latent loader workers (default: 0 on the CPU, up to 8 per GPU)")
    add_engine_args(p)
    args = p.parse_args(argv)
    if args.ckpt_every is None:  # a multi-GB state every few hundred fast GPU steps would stall the run
        args.ckpt_every = 2000 if args.data_path else 100
    args.ckpt = args.ckpt or default_teacher(args.model)
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.resume and not args.out:
        raise UserError("--resume needs --out, the run folder to continue")
    if not 0 < args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.method == "indices" and not args.kept:
        raise UserError("--method indices needs --kept")
    # a flag the chosen method cannot honour is refused, not silently dropped
    if args.kept and args.method != "indices":
        raise UserError(f"--kept applies to --method indices; --method {args.method} chooses its own layers")
    if args.target_depth and args.method == "learnable":
        raise UserError("--target-depth sets the score baselines' depth; the learnable search keeps what "
                        "--scheme/--groups keep (e.g. --scheme 1:2 halves the depth)")
    if args.fsdp and args.keep_update:
        raise UserError("--keep-update with --fsdp is not supported: the merged update would need the sharded "
                        "search model gathered whole; run the search without --keep-update (the paper's default)")
    if args.fsdp and args.method != "learnable":
        raise UserError(f"--fsdp shards a training run; --method {args.method} does not train")
    if args.steps and args.epochs:
        raise UserError("--steps and --epochs both set the search's length: give one")
    if (args.steps or args.epochs) and args.method != "learnable":
        print(f"note: --steps/--epochs set the learnable search's length; --method {args.method} does not train",
              flush=True)
    args.out = args.out or os.path.join("runs", f"prune-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def params(model):
    return sum(p.numel() for p in model.parameters())


def claim_out(args, rank, device):
    """Claim --out (refused while in use or holding another run): after every input is checked, so a
    refused run writes nothing."""
    claim(args.out, record_of("prune", args, files=("ckpt",)), args.resume, args.overwrite, rank, device)


def run_learnable(args, model, groups, diffusion, rank, world, device, log, command):
    data = make_batches(model.config, args.data_path, args.global_batch_size, args.seed, rank, world, args.num_workers)
    steps = args.steps
    if args.epochs:
        n = len(data.loader.dataset) if hasattr(data, "loader") else len(data.x)
        steps = max(1, math.ceil(args.epochs * n / args.global_batch_size))
    steps = steps or (500 if not args.data_path else math.ceil(len(data.loader.dataset) / args.global_batch_size))
    cfg = SearchConfig(groups=groups, steps=steps, global_batch_size=args.global_batch_size, lr=args.lr,
                       gate_lr_mult=args.gate_lr_mult, tau_range=tuple(args.tau_range), scaling=args.scaling,
                       ema_decay=args.ema_decay, delta_w=args.delta_w, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, class_dropout_prob=model.config.class_dropout_prob,
                       seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every)
    search = LearnableSearch(model, diffusion, data, cfg, rank, world, device, engine_config(args), log)
    state_path = os.path.join(args.out, "search_state.pt")
    if args.resume:
        if not state_exists(state_path):
            raise UserError(f"--resume: no search state at {state_path}")
    claim_out(args, rank, device)
    if args.resume:
        search.resume(state_path)
    log.write(command, echo=False)
    if args.resume:
        log.write(f"resuming the search at step {search.step} of {steps}")
    choices = search.run(state_path)
    kept = kept_from_choices(groups, choices)
    extra = {"history": search.history, "choices": choices, "skipped_steps": search.skipped, "steps": steps,
             "run": search.engine.summary()}
    return kept, extra, search


def baseline_target(args, groups, depths):
    """(k, kept): the target depth and, for the methods that need no model (oracle, random, first, last,
    indices), the kept layers. Every way a baseline can refuse its arguments is here, checked before the
    run writes anything."""
    depth = sum(depths)
    k = args.target_depth or sum(n for n, _ in groups)
    if k >= depth:
        raise UserError(f"target depth {k} is not below the model's depth {depth}")
    m = args.method
    if m == "oracle":
        return k, baselines.oracle(depth, k)
    if m == "random":
        return k, baselines.random_mask(depth, k, args.seed, depths)
    if m == "first":
        return k, list(range(k))
    if m == "last":
        return k, list(range(depth - k, depth))
    if m == "indices":
        try:
            kept = json.loads(args.kept)
            kept = [int(i) for i in kept]
        except (ValueError, TypeError):
            raise UserError(f"--kept must be a JSON list of integers, got {args.kept!r}") from None
        return k, validate_kept(kept, depth)
    return k, None


def run_baseline(args, model, k, diffusion, calib):
    """The score baselines and the random search: they measure the model."""
    depths = block_stack(model).depths
    depth = sum(depths)
    m = args.method
    if m == "bi":
        return baselines.block_influence(model, diffusion, calib, k)
    if m == "fluxlite":
        return baselines.fluxlite(model, diffusion, calib, k)
    if m == "sensitivity":
        from tqdm import tqdm

        with tqdm(total=depth, desc="sensitivity", dynamic_ncols=True) as bar:
            return baselines.sensitivity(model, diffusion, calib, k, bar)
    if m == "random-search":
        from tqdm import tqdm

        total = min(args.candidates, baselines.count_valid_masks(depths, k))
        if total < args.candidates:
            print(f"note: only {total} distinct masks keep {k} of {depth} layers; scoring all {total}, "
                  f"not --candidates {args.candidates}", flush=True)
        with tqdm(total=total, desc="random-search", dynamic_ncols=True) as bar:
            picks, all_losses = baselines.random_search(model, diffusion, calib, depth, k, total, args.seed, bar,
                                                        depths)
        return picks["min"][1], {"picks": {n: {"calibration_loss": l, "kept": kp} for n, (l, kp) in picks.items()},
                                 "all_losses": all_losses, "candidates_scored": total}
    raise AssertionError(m)


@cli
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_run(args.global_batch_size, args.out, args.fsdp)
    torch.manual_seed(args.seed)  # LoRA initialization: the same on every rank and in every run
    source = checkpoint.load_trainable(args.ckpt, args.model, args.data_path, args.cond)
    stack = block_stack(source)
    depth = stack.depth
    if args.groups:
        groups = parse_groups(args.groups, depth)
    else:  # the scheme tiles every stack on its own (Flux: double- and single-stream)
        groups = [g for d in stack.depths for g in parse_scheme(args.scheme, d)]
    stack.check_groups(groups)
    diffusion = create_objective(source.config)
    log = RunLog(args.out, enabled=rank == 0)
    # the command line opens log.txt only once the inputs are checked: a refused run writes nothing
    command = "command: " + " ".join(["python -m tinyfusion.prune", *(argv if argv is not None else sys.argv[1:])])
    calib_data = make_batches(source.config, args.data_path, args.calib_samples, args.seed + 7919, num_workers=args.num_workers)
    calib = CalibrationSet.from_batches(calib_data, args.calib_samples, seed=args.seed)
    if args.method == "learnable":
        # The search trains a copy on the device while the source waits on the host: no second full
        # model on the GPU. The paper's default saves the source's original weights of the kept layers.
        kept, extra, search = run_learnable(args, copy.deepcopy(source), groups, diffusion, rank, world, device, log, command)
        final = None
        if args.keep_update:
            from .pruning.lora import merge_lora

            final = merge_lora(search.net.model).requires_grad_(False)
        del search
        source = source.to(device)
        final = source if final is None else final
    else:
        k, fixed = baseline_target(args, groups, stack.depths)
        claim_out(args, rank, device)
        log.write(command, echo=False)
        source = source.to(device)
        kept, extra = (fixed, {}) if fixed is not None else run_baseline(args, source, k, diffusion, calib)
        final = source
    loss = calibration_loss(final, diffusion, calib, kept=kept)
    if rank == 0:
        write_artifacts(args, source, final, kept, groups, loss, extra)
    cleanup()


def write_artifacts(args, source, final, kept, groups, loss, extra):
    depth = block_stack(source).depth
    scheme = None if args.groups else args.scheme
    shallow = prune_model(final, kept)
    provenance = {"source": os.path.abspath(args.ckpt), "kept": kept, "source_depth": depth, "method": args.method,
                  "scheme": scheme, "groups": groups, "keep_update": bool(args.keep_update)}
    written = checkpoint.save_model(shallow, args.out, "pruned", **provenance)
    if args.method == "random-search":
        for name in ("median", "max"):
            pick = extra["picks"][name]
            checkpoint.save_model(prune_model(final, pick["kept"]), args.out, f"pruned-{name}",
                                  **{**provenance, "kept": pick["kept"], "pick": name})
    decision = {"method": args.method, "scheme": scheme, "groups": groups, "kept": kept, "source_depth": depth,
                "calibration_loss": loss, "calibration_samples": args.calib_samples, "source": provenance["source"],
                "args": {k: v for k, v in vars(args).items()}, **extra}
    log = RunLog(args.out)
    log.metrics(decision, "decision.json")
    if args.method == "learnable":
        plot_decisions(extra["history"], groups, kept, os.path.join(args.out, "decisions.png"))
    else:
        for key, label in (("block_influence", "block influence (1 - cos)"), ("io_mse", "input-output MSE"),
                           ("loss_without_layer", "calibration loss without the layer")):
            if key in extra:
                plot_scores(extra[key], kept, label, os.path.join(args.out, "scores.png"))
    log.write(f"method {args.method}: kept {len(kept)}/{depth} layers {kept}")
    log.write(f"params {params(source) / 1e6:.3f}M -> {params(shallow) / 1e6:.3f}M; calibration loss {loss:.5f} "
              f"({args.calib_samples} fixed samples)")
    log.write(f"run: {args.out} ({os.path.basename(written)}, decision.json)")


if __name__ == "__main__":
    main()
