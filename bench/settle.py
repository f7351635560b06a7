"""How long a finished onnxruntime run keeps slowing the PyTorch work after it, by the pause between them.

onnxruntime's threads spin-wait after a run by default. On a machine with few cores they then hold the
cores the next call needs: this measures the cpp backend's forward (DiT-S/2 width, batch 8, --depth
blocks) timed right after an onnxruntime forward of a small DiT, with each pause in --pauses-ms between
the two, against the same forward after the same pause with nothing before it. bench/latency.py's pause
before each timed call (its SETTLE_S) is chosen from this.

  python bench/settle.py [--json bench/results/settle_cpu.json] [--pauses-ms 0 10 50 250 1000]
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from latency import PRESETS, SETTLE_S, example_inputs, make_config, random_model, time_once  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, cli, positive, writable_file  # noqa: E402
from tinyfusion.runtime import load  # noqa: E402


def pause_ms(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"a pause is 0 to 10000 ms, got {text}")
    return value


def parse_args(argv):
    p = Parser(prog="python bench/settle.py", description=__doc__)
    p.add_argument("--depth", type=positive(), default=12, help="blocks of the timed cpp forward")
    p.add_argument("--pauses-ms", nargs="+", type=pause_ms, default=[0, 10, 50, 250, 1000])
    p.add_argument("--repeats", type=positive(), default=12)
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "settle_cpu.json"))
    args = p.parse_args(argv)
    args.batch, args.device, args.dtype = PRESETS["cpu"]["batch"], "cpu", "fp32"
    writable_file(args.json)
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    x, t, y = example_inputs(args)
    cpp = load(random_model(make_config("cpu", args.depth)), backend="cpp")
    ort = load(random_model(make_config("cpu", 1)), backend="onnxruntime")
    forward = lambda: cpp(x, t, y)  # noqa: E731
    with torch.no_grad():
        for _ in range(3):  # warm-up
            forward()
            ort(x, t, y)
        cases = [(before, pause) for before in ("nothing", "onnxruntime") for pause in args.pauses_ms]
        times = {case: [] for case in cases}
        for _ in range(args.repeats):  # interleaved rounds: the machine's drift hits every case alike
            for before, pause in cases:
                time.sleep(SETTLE_S)  # the machine quiet before either case starts
                if before == "onnxruntime":
                    ort(x, t, y)
                time.sleep(pause / 1e3)
                times[before, pause].append(time_once(forward, "cpu"))
    rows = [{"before": before, "pause_ms": pause, "cpp_ms": statistics.median(times[before, pause])}
            for before, pause in cases]
    quiet = {r["pause_ms"]: r["cpp_ms"] for r in rows if r["before"] == "nothing"}
    for r in rows:
        r["slowdown"] = r["cpp_ms"] / quiet[r["pause_ms"]]
    summary = {"command": "python bench/settle.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "depth": args.depth, "batch": args.batch, "settle_s": SETTLE_S, "rows": rows}
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    print("| pause (ms) | cpp forward after nothing (ms) | after an onnxruntime run (ms) | slowdown |")
    print("|---|---|---|---|")
    for r in rows:
        if r["before"] == "onnxruntime":
            print(f"| {r['pause_ms']:g} | {quiet[r['pause_ms']]:.1f} | {r['cpp_ms']:.1f} | {r['slowdown']:.3f}x |")
    return summary


if __name__ == "__main__":
    main()
