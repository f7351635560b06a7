"""Recover a pruned DiT: `python -m tinyfusion.finetune --ckpt runs/.../pruned.safetensors`.

  --kd masked   (default) 0.9 * output KD + 0.1 * diffusion loss + beta * masked hidden-state KD,
                beta decaying 1e-2 -> 0, hidden states masked where |h - mean| >= 2 std per sample
  --kd logits   output KD + diffusion loss, no hidden-state term
  --kd none     plain fine-tuning with the diffusion loss

The teacher defaults to the source model named in the pruned checkpoint; each student layer is matched
to the output of its teacher block, derived from the decision's N:M or mixed groups. Writes to --out
(default: <pruned folder>/recover-<kd>/): recovered.safetensors (EMA weights), metrics.json (loss
curve and a final evaluation), loss.png, log.txt, finetune_state.pt (`--resume` continues a killed run).
"""
import os
import sys
import time

import torch

from . import checkpoint
from .data.batches import make_batches
from .diffusion import create_objective
from .errors import Parser, UserError, cli, positive, read_json
from .recovery.finetune import FinetuneConfig, Recovery
from .recovery.kd import KDWeights, alignment
from .training import add_engine_args, engine_config
from .training.distributed import cleanup, setup_run
from .training.fsdp import state_exists
from .training.run_folder import add_overwrite_arg, claim, record_of
from .training.runlog import RunLog, plot_curve


def parse_args(argv):
    from .assets import add_model_arg

    p = Parser(prog="python -m tinyfusion.finetune", description=__doc__)
    p.add_argument("--ckpt", required=True, help="pruned checkpoint written by tinyfusion.prune")
    p.add_argument("--teacher", help="teacher checkpoint (default: the source named in the pruned checkpoint)")
    p.add_argument("--kd", choices=["masked", "logits", "none"], default=FinetuneConfig.kd)
    add_model_arg(p, default_ckpt=False)
    o = p.add_argument_group("optimization (paper defaults)")
    o.add_argument("--steps", type=positive(), default=FinetuneConfig.steps)
    o.add_argument("--global-batch-size", type=positive(), default=FinetuneConfig.global_batch_size)
    o.add_argument("--lr", type=positive(float), default=FinetuneConfig.lr)
    o.add_argument("--lr-min", type=float, default=FinetuneConfig.lr_min, help="end of the per-step cosine schedule")
    o.add_argument("--grad-clip", type=positive(float), default=FinetuneConfig.grad_clip)
    o.add_argument("--ema-decay", type=positive(float), default=FinetuneConfig.ema_decay)
    o.add_argument("--no-ema-warmup", action="store_true",
                   help="use the EMA decay from step 0 (default warms it up as min(decay, (1+t)/(10+t)))")
    k = p.add_argument_group("distillation weights")
    k.add_argument("--alpha-kd", type=float, default=KDWeights.alpha_kd, help="output KD weight")
    k.add_argument("--alpha-gt", type=float, default=KDWeights.alpha_gt, help="diffusion-loss weight")
    k.add_argument("--beta", type=float, nargs=2, metavar=("START", "END"),
                   help="hidden-state KD weight, linear over training (default 1e-2 0; a SiT: 2e-4 0, the paper's)")
    k.add_argument("--mask-k", type=positive(float), default=KDWeights.mask_k, help="mask hidden values beyond k std")
    d = p.add_argument_group("data and run")
    d.add_argument("--data-path", help="latent folder; default: the digits set")
    d.add_argument("--cond", help="diffusers PixArt/SD3/Flux folders: the conditioning bank used when pruning")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="run folder (default: <pruned folder>/recover-<kd>)")
    d.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    add_overwrite_arg(d)
    d.add_argument("--ckpt-every", type=positive(),
                   help="steps between resumable states (default 250 on digits, 10000 on latents; --ckpt-minutes also saves)")
    d.add_argument("--log-every", type=positive(), default=FinetuneConfig.log_every)
    d.add_argument("--snapshot-steps", default="", help="comma-separated steps at which to also save EMA weights")
    d.add_argument("--eval-samples", type=int, default=1000, help="digits evaluation at the end (0 skips)")
    d.add_argument("--max-bad-steps", type=positive(), default=FinetuneConfig.max_bad_steps, help="abort after this many non-finite losses in a row")
    d.add_argument("--num-workers", type=int, help="latent loader workers (default: 0 on the CPU, up to 8 per GPU)")
    add_engine_args(p)
    args = p.parse_args(argv)
    if args.ckpt_every is None:  # a multi-GB state every few hundred fast GPU steps would stall the run
        args.ckpt_every = 10000 if args.data_path else 250
    if not 0 < args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.eval_samples < 0:
        raise UserError(f"--eval-samples must be 0 (skip) or a sample count, got {args.eval_samples}")
    if args.eval_samples:  # checked now, not after the training it would follow
        from .eval.digits_metrics import check_sample_count

        check_sample_count(args.eval_samples, "--eval-samples")
    try:
        args.snapshots = sorted({int(s) for s in args.snapshot_steps.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--snapshot-steps must be comma-separated integers, got {args.snapshot_steps!r}") from None
    bad = [s for s in args.snapshots if not 0 < s < args.steps]
    if bad:  # a snapshot that can never be taken was silently skipped
        raise UserError(f"--snapshot-steps {bad}: a snapshot is a step in 1..{args.steps - 1} (the final weights are "
                        "recovered.safetensors)")
    flags = {"alpha_kd": args.alpha_kd != KDWeights.alpha_kd, "alpha_gt": args.alpha_gt != KDWeights.alpha_gt,
             "beta_start": args.beta is not None, "mask_k": args.mask_k != KDWeights.mask_k}
    unused = [k for k, given in flags.items() if given and k not in KDWeights.fields_used(args.kd)]
    if unused:  # said, not silently dropped
        names = ", ".join("--" + ("beta" if k == "beta_start" else k).replace("_", "-") for k in unused)
        print(f"note: --kd {args.kd} does not use {names}", flush=True)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"recover-{args.kd}")
    return args


def resolve_teacher(args, info):
    from .assets import MAR_TEACHER_PATH, SIT_TEACHER_PATH, TEACHER_PATH

    if info.get("kept") is None and not args.teacher:  # its "source" would name the trainer, not a teacher
        raise UserError(f"{args.ckpt} is not a pruned checkpoint (no kept indices in its metadata); give --teacher, "
                        "or --kd none to fine-tune it plainly")
    path = args.teacher or info.get("source")
    if not path:
        raise UserError(f"{args.ckpt} names no source model; give --teacher")
    for shipped in (TEACHER_PATH, SIT_TEACHER_PATH, MAR_TEACHER_PATH):
        if not os.path.exists(path) and os.path.basename(path) == os.path.basename(shipped):
            path = shipped  # pruned on another machine from a shipped teacher
    return path


def check_lineage(args, student, teacher, info):
    """The student must be the teacher's blocks: same width and geometry, kept indices inside its depth."""
    kept, source_depth = info.get("kept"), info.get("source_depth")
    if kept is None or source_depth is None:
        raise UserError(f"{args.ckpt} is not a pruned checkpoint (no kept indices in its metadata)")
    decision_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "decision.json")
    if os.path.isfile(decision_path):
        decision = read_json(decision_path, "a pruning decision (a JSON object)")
        if decision.get("kept") != kept and "pick" not in info:
            raise UserError(f"{decision_path} keeps {decision.get('kept')} but {args.ckpt} holds {kept}")
    if len(kept) != student.config.depth:
        raise UserError(f"{args.ckpt}: metadata keeps {len(kept)} layers but the weights have {student.config.depth}")
    s, t = student.config, teacher.config
    for field in ("hidden_size", "patch_size", "in_channels", "input_size", "num_classes"):
        if getattr(s, field) != getattr(t, field):
            raise UserError(f"student and teacher cannot align: {field} {getattr(s, field)} vs {getattr(t, field)}")
    if source_depth != t.depth or max(kept) >= t.depth:
        raise UserError(f"student was pruned from a depth-{source_depth} model; the teacher has depth {t.depth}")
    return alignment(info.get("groups") or [[t.depth, t.depth]], kept)


@cli
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_run(args.global_batch_size, args.out, args.fsdp)
    torch.manual_seed(args.seed)
    student = checkpoint.load_trainable(args.ckpt, args.model, args.data_path, args.cond)
    info = student.provenance
    teacher, pairs = None, []
    teacher_path = resolve_teacher(args, info) if args.kd != "none" or args.teacher else None
    if teacher_path is None and info.get("source") and os.path.exists(info["source"]):
        teacher_path = info["source"]  # plain fine-tuning needs no teacher, but checks lineage when it can
    if teacher_path is not None:
        teacher = checkpoint.load_trainable(teacher_path, args.model, args.data_path, args.cond)
        if teacher.config.objective != student.config.objective:
            raise UserError(f"student ({student.config.objective}) and teacher ({teacher.config.objective}) "
                            "were trained with different objectives")
        pairs = check_lineage(args, student, teacher, info)
    if args.kd == "none":
        teacher = None
    data = make_batches(student.config, args.data_path, args.global_batch_size, args.seed, rank, world, args.num_workers)
    if args.beta is None:
        args.beta = [2e-4, 0.0] if student.config.objective == "flow" else [1e-2, 0.0]
    cfg = FinetuneConfig(steps=args.steps, global_batch_size=args.global_batch_size, lr=args.lr, lr_min=args.lr_min,
                         grad_clip=args.grad_clip, ema_decay=args.ema_decay, ema_warmup=not args.no_ema_warmup,
                         kd=args.kd, weights=KDWeights(args.alpha_kd, args.alpha_gt, args.beta[0], args.beta[1], args.mask_k),
                         seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every,
                         max_bad_steps=args.max_bad_steps)
    diffusion = create_objective(student.config)
    log = RunLog(args.out, enabled=rank == 0)
    rec = Recovery(student, teacher, pairs, diffusion, data, cfg, rank, world, device, engine_config(args), log)
    state_path = os.path.join(args.out, "finetune_state.pt")
    if args.resume:
        if not state_exists(state_path):
            raise UserError(f"--resume: no state at {state_path}")
    args.teacher = teacher_path
    claim(args.out, record_of("finetune", args, files=("ckpt", "teacher")), args.resume, args.overwrite, rank, device)
    if args.resume:
        rec.resume(state_path)
    # log.txt opens only once the inputs are checked: a refused run writes nothing
    log.write("command: " + " ".join(["python -m tinyfusion.finetune", *(argv if argv is not None else sys.argv[1:])]), echo=False)
    if args.resume:
        log.write(f"resuming at step {rec.step} of {args.steps}")
    provenance = {k: v for k, v in info.items() if k != "config"}
    provenance.update(recovered_from=os.path.abspath(args.ckpt), kd=args.kd, teacher=getattr(teacher, "provenance", {}).get("source"))

    def snapshot(ema, step):
        checkpoint.save_model(ema, args.out, f"recovered-step{step}", **provenance, recovery_steps=step)

    t0 = time.time()
    ema = rec.run(state_path, snapshot, args.snapshots)
    if rank == 0:
        wall = time.time() - t0
        written = checkpoint.save_model(ema, args.out, "recovered", **provenance, recovery_steps=args.steps)
        metrics = {"kd": args.kd, "objective": ema.config.objective, "kd_weights": cfg.weights.used(args.kd),
                   "steps": args.steps, "skipped_steps": rec.skipped, "wall_seconds_this_run": round(wall, 1),
                   **({"alignment": pairs} if args.kd == "masked" else {}), "run": rec.engine.summary(),
                   "loss_curve": rec.curve}
        plot_curve([(p["step"], p["loss"]) for p in rec.curve], os.path.join(args.out, "loss.png"), f"recovery loss ({args.kd})")
        c = ema.config
        if args.eval_samples > 0 and (c.in_channels, c.input_size, c.num_classes) == (1, 8, 10):
            from .evaluate import evaluate
            from .cli.sampler_args import default_settings

            metrics["evaluation"] = evaluate(ema, args.eval_samples, default_settings(c))
            m = metrics["evaluation"]
            log.write(f"digits-FID {m['digits_fid']:.3f} (floor {m['real_floor_fid']:.3f}), class accuracy {m['class_accuracy']:.4f}")
        log.metrics(metrics)
        log.write(f"recovered {c.depth}-layer model ({args.kd}, {args.steps} steps, {wall:.0f}s): {written}")
    cleanup()


if __name__ == "__main__":
    main()
