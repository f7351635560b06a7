"""Evaluate a digits model: `python -m tinyfusion.evaluate [--ckpt PATH] [--samples N] [--json OUT]`.

Samples N class-conditional digits (N/10 per class), then reports class accuracy (the shipped digits
classifier), digits-FID in its penultimate features beside the real-vs-real floor (both averaged over
random half splits of the real set), and k-NN precision/recall. With no --ckpt it evaluates the
shipped teacher.
"""
import json
import time

from . import checkpoint, runtime
from .errors import Parser, UserError, cli, positive, writable_file
from .eval.digits_metrics import balanced_labels, digits_metrics, format_metrics
from .sampler_args import add_sampler_args, sample_batched, sampler_settings


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


@cli
def main(argv=None):
    from .assets import TEACHER_PATH

    p = Parser(prog="python -m tinyfusion.evaluate", description=__doc__)
    p.add_argument("--ckpt", default=TEACHER_PATH, help="checkpoint (default: the shipped digits teacher)")
    p.add_argument("--samples", type=positive(), default=1000, help="number of samples (balanced over classes)")
    p.add_argument("--splits", type=positive(), default=20, help="random real half-splits for the floor")
    p.add_argument("--json", help="write the metrics here")
    add_sampler_args(p)
    args = p.parse_args(argv)
    settings = sampler_settings(args)
    if args.json:
        writable_file(args.json)
    model = checkpoint.load(args.ckpt)
    require_digits_model(model, args.ckpt)
    model = runtime.load(model, args.backend)
    metrics = evaluate(model, args.samples, settings, args.batch_size, args.splits)
    metrics["ckpt"] = args.ckpt
    print(format_metrics(metrics))
    if args.json:
        checkpoint.atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
    return metrics


if __name__ == "__main__":
    main()
