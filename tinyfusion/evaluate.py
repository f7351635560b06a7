"""Evaluate a digits model, or a sample batch against a reference batch with the ADM protocol.

  python -m tinyfusion.evaluate [--ckpt PATH] [--samples N] [--json OUT]
  python -m tinyfusion.evaluate --ref REF.npz --samples OUT.npz --inception WEIGHTS [--json OUT]

Digits: samples N class-conditional digits (N/10 per class), then reports class accuracy (the shipped
digits classifier), digits-FID in its penultimate features beside the real-vs-real floor (both averaged
over random half splits of the real set), and k-NN precision/recall. With no --ckpt it evaluates the
shipped teacher. The floor depends on the real set and --splits only. The FID compares min(N, 898)
samples with each split's held-out 899 reals: from N = 898 on it stands on the floor's footing (898 vs 899);
below that it reads higher (FID's bias grows as samples fall), so compare FIDs at equal N. N >= 20.

ADM: FID, sFID, Inception Score, precision and recall (k = 3) of an ADM-format .npz (`arr_0` uint8
NHWC, as `python -m tinyfusion.sample --npz` writes) against a reference batch such as ADM's
VIRTUAL_imagenet256_labeled.npz, with the FID Inception-v3 from a local weights file (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth; default $TINYFUSION_INCEPTION). The reference statistics are
cached beside the reference batch.
"""
import json
import os
import time

from . import checkpoint
from .errors import Parser, UserError, cli, positive, writable_file
from .eval.inception import WEIGHTS_NAME
from .eval.digits_metrics import balanced_labels, check_sample_count, digits_metrics, format_metrics
from .cli.sampler_args import add_sampler_args, device_and_dtype, load_runtime, sample_batched, sampler_settings


def require_digits_model(model, path):
    c = model.config
    if (c.in_channels, c.input_size, c.num_classes) != (1, 8, 10):
        raise UserError(f"{path}: digits metrics need a digits model (1 channel, 8x8, 10 classes); this one has "
                        f"{c.in_channels} channels, {c.input_size}x{c.input_size}, {c.num_classes} classes")


def evaluate(model, num_samples, settings, batch_size=500, splits=20):
    labels = balanced_labels(num_samples, model.config.num_classes)
    start = time.perf_counter()
    images = sample_batched(model, labels, settings, batch_size, desc="evaluate")
    seconds = time.perf_counter() - start
    metrics = digits_metrics(images, labels, splits=splits)
    metrics.update(sampler=settings, backend=getattr(model, "backend", "eager"), depth=model.config.depth, params=sum(p.numel() for p in model.parameters()),
                   sampling_seconds_per_image=seconds / num_samples)
    return metrics


def evaluate_adm(args):
    from .eval.adm import evaluate_npz

    device, _ = device_and_dtype(args)  # Inception and the k-NN distances run there, in fp32
    metrics = evaluate_npz(args.ref, args.samples, args.inception, batch_size=min(args.batch_size, 256 if device.type == "cuda" else 64),
                           device=device)
    metrics.update(ref=args.ref, samples=args.samples)
    print(f"FID {metrics['fid']:.3f}   sFID {metrics['sfid']:.3f}   IS {metrics['inception_score']:.2f}   "
          f"precision {metrics['precision']:.4f}   recall {metrics['recall']:.4f}   ({metrics['num_samples']} samples, "
          f"{metrics['num_reference']} reference images)")
    if args.json:
        checkpoint.atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
    return metrics


@cli
def main(argv=None):
    from .assets import add_model_arg, default_teacher

    p = Parser(prog="python -m tinyfusion.evaluate", description=__doc__)
    p.add_argument("--ckpt", help="checkpoint (default: the shipped digits teacher)")
    add_model_arg(p)
    p.add_argument("--samples", default="1000",
                   help="digits: number of samples (balanced over classes; at least 20, 898+ for the floor's footing); "
                        "with --ref: the sample batch .npz")
    p.add_argument("--ref", help="ADM reference batch .npz: evaluate --samples (an .npz) against it")
    p.add_argument("--inception", default=os.environ.get("TINYFUSION_INCEPTION",
                                                         os.path.expanduser(f"~/.cache/tinyfusion/{WEIGHTS_NAME}")),
                   help="FID Inception weights (with --ref)")
    p.add_argument("--splits", type=positive(), default=20, help="random real half-splits for the floor")
    p.add_argument("--json", help="write the metrics here")
    add_sampler_args(p)
    args = p.parse_args(argv)
    if args.json:
        writable_file(args.json)
    if args.ref:
        return evaluate_adm(args)
    try:
        args.samples = positive()(args.samples)
    except Exception:
        raise UserError(f"--samples must be positive (a number of digits samples), got {args.samples!r}") from None
    check_sample_count(args.samples)
    args.ckpt = args.ckpt or default_teacher(args.model)
    model = checkpoint.load(args.ckpt, model=args.model)
    settings = sampler_settings(args, config=model.config)
    require_digits_model(model, args.ckpt)
    model = load_runtime(model, args)
    metrics = evaluate(model, args.samples, settings, args.batch_size, args.splits)
    metrics["ckpt"] = args.ckpt
    print(format_metrics(metrics))
    if args.json:
        checkpoint.atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
    return metrics


if __name__ == "__main__":
    main()
