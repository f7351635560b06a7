"""FSDP beside DDP: the same training commands under torchrun with and without `--fsdp`, side by side in one
run: median step time (the engine's own, first window dropped), images/s and, on a GPU, peak memory.

On the CPU (gloo, 2 ranks by default) this is the price of sharding on a tiny model: every block gathered
and reduce-scattered instead of one all-reduce. On one GPU (`--nproc 1`) it is FSDP's single-rank overhead
and its memory against DDP's (nothing is sharded over one rank; the multi-GPU saving is the memory model's,
`python -m tinyfusion.plan`).

  python bench/fsdp_step.py --json bench/results/fsdp_step_cpu.json
  python bench/fsdp_step.py --nproc 1 --steps 60 --json $OUT/fsdp_step_h200.json       (bench/gpu_check.sh)
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive, writable_file  # noqa: E402


def launch(nproc, args, timeout=900):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        lines = [l for l in res.stderr.splitlines() if "error" in l.lower()]
        raise UserError(f"{' '.join(args[:2])} failed (exit {res.returncode}): {(lines or ['?'])[-1][:200]}")


def measure(task, nproc, steps, batch, folder):
    """{mode: run summary} for one task; task: train (the digits preset) or finetune (Masked KD, teacher sharded)."""
    rows = {}
    for mode in ("ddp", "fsdp"):
        out = os.path.join(folder, f"{task}-{mode}")
        common = ["--steps", str(steps), "--global-batch-size", str(batch), "--log-every", str(max(1, steps // 6)),
                  "--ckpt-every", str(steps)] + (["--fsdp"] if mode == "fsdp" else [])
        if task == "train":
            launch(nproc, ["-m", "tinyfusion.train", "--preset", "digits", *common, "--results-dir", folder,
                           "--name", f"{task}-{mode}"])
        else:
            launch(nproc, ["-m", "tinyfusion.finetune", "--ckpt", os.path.join(folder, "pruned", "pruned.safetensors"),
                           "--eval-samples", "0", *common, "--out", out])
        with open(os.path.join(out, "metrics.json")) as f:
            rows[mode] = json.load(f)["run"]
    return rows


@cli
def main(argv=None):
    p = Parser(prog="python bench/fsdp_step.py", description=__doc__)
    p.add_argument("--nproc", type=positive(), help="ranks (default 2 on the CPU, 1 on a GPU machine)")
    p.add_argument("--steps", type=positive(), default=30)
    p.add_argument("--global-batch-size", type=positive(), default=64)
    p.add_argument("--tasks", nargs="+", choices=["train", "finetune"], default=["train", "finetune"])
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    if args.json:
        writable_file(args.json)
    nproc = args.nproc or (1 if torch.cuda.is_available() else 2)
    if args.global_batch_size % nproc:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {nproc} ranks")
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "nproc": nproc,
               "steps": args.steps, "global_batch_size": args.global_batch_size, "torch": torch.__version__, "tasks": {}}
    with tempfile.TemporaryDirectory() as folder:
        if "finetune" in args.tasks:  # a student of the shipped teacher: 12 -> 6 layers
            subprocess.run([sys.executable, "-m", "tinyfusion.prune", "--method", "first", "--calib-samples", "16",
                            "--out", os.path.join(folder, "pruned")], cwd=ROOT, check=True, capture_output=True)
        for task in args.tasks:
            rows = measure(task, nproc, args.steps, args.global_batch_size, folder)
            ratio = rows["fsdp"]["median_step_s"] / rows["ddp"]["median_step_s"]
            results["tasks"][task] = {**rows, "fsdp_over_ddp_step_time": round(ratio, 3)}
            mem = {m: rows[m].get("peak_gpu_gb") for m in rows}
            print(f"{task:<9} DDP {rows['ddp']['median_step_s'] * 1e3:8.1f} ms/step   FSDP "
                  f"{rows['fsdp']['median_step_s'] * 1e3:8.1f} ms/step   FSDP/DDP {ratio:.2f}x"
                  + (f"   peak GB DDP {mem['ddp']} FSDP {mem['fsdp']}" if mem["ddp"] is not None else ""), flush=True)
            if args.json:
                atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=2)))
    return results


if __name__ == "__main__":
    main()
