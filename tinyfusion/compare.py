"""Side-by-side table of evaluation results: `python -m tinyfusion.compare NAME=metrics.json ...`.

Reads the JSON that `tinyfusion.evaluate --json` writes, or a `finetune` run's metrics.json (its final
evaluation), and prints depth, parameters, digits-FID beside the floor, class accuracy and sampling
time per image, with each model's speed relative to the first.
"""
import os

from .errors import Parser, UserError, cli, read_json


def read_metrics(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such metrics file")
    data = read_json(path, "a metrics file (a JSON object)")
    data = data.get("evaluation", data)
    if "digits_fid" not in data:
        raise UserError(f"{path}: holds no evaluation (digits_fid missing)")
    return data


def table(named):
    base = named[0][1].get("sampling_seconds_per_image")
    lines = ["| model | depth | params | digits-FID (floor) | FID / floor | class acc. | ms / image | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in named:
        t = m.get("sampling_seconds_per_image")
        ms = f"{t * 1e3:.2f}" if t else "-"
        speed = f"{base / t:.2f}x" if base and t else "-"
        params = f"{m['params'] / 1e6:.2f}M" if "params" in m else "-"
        lines.append(f"| {name} | {m.get('depth', '-')} | {params} | {m['digits_fid']:.2f} ({m['real_floor_fid']:.2f}) | "
                     f"{m['digits_fid'] / m['real_floor_fid']:.2f} | {m['class_accuracy']:.3f} | {ms} | {speed} |")
    return "\n".join(lines)


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.compare", description=__doc__)
    p.add_argument("entries", nargs="+", metavar="NAME=PATH", help="a label and a metrics JSON")
    args = p.parse_args(argv)
    named = []
    for entry in args.entries:
        name, sep, path = entry.partition("=")
        if not sep:
            raise UserError(f"expected NAME=PATH, got {entry!r}")
        named.append((name, read_metrics(path)))
    print(table(named))


if __name__ == "__main__":
    main()
