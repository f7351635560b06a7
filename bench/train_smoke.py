"""The training commands end to end under torchrun, as a user runs them: for each shipped digits teacher
(DiT, SiT, MAR), prune (learnable, bi, fluxlite) -> finetune -> SIGKILL mid-run -> `--resume` -> sample.

On a GPU every command runs `torchrun --nproc_per_node=1` (NCCL, bf16 by default); on the CPU the same
chain runs on gloo in fp32. Each command's exit code, seconds and last error line go to --json as it
finishes; the killed-and-resumed finetune must give the uninterrupted run's weights (compared tensor by
tensor), which is the one check beyond "it ran".

  python bench/train_smoke.py --json bench/results/train_smoke.json        # all three families
  python bench/train_smoke.py --families dit --quick                       # the shortest chain
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, writable_file  # noqa: E402


def torchrun(*args):
    """One rank under torchrun: NCCL on a GPU, gloo on the CPU; the launcher binds its own free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]


def run(cmd, timeout, env=None):
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, err, stdout = res.returncode, res.stderr, res.stdout
    except subprocess.TimeoutExpired as e:
        code, err, stdout = 124, (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), ""
    lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]
    return {"exit": code, "seconds": round(time.time() - t0, 1), "last_error": lines[-1][-300:] if code and lines else None,
            "stdout": stdout}


def killed_then_resumed(cmd, kill_at, timeout):
    """Run cmd so that it SIGKILLs itself right after writing step kill_at's state, then rerun with --resume."""
    from tinyfusion.training.engine import KILL_AFTER_STATE

    t0 = time.time()
    killed = run(cmd, timeout, env={**os.environ, KILL_AFTER_STATE: str(kill_at)})
    out = run([*cmd, "--resume"], timeout)
    out.update(killed_mid_run=killed["exit"] != 0 and f"resuming at step {kill_at} " in out["stdout"],
               seconds=round(time.time() - t0, 1))
    return out


def same_weights(a, b):
    import tinyfusion

    sa, sb = tinyfusion.load(a).state_dict(), tinyfusion.load(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@cli
def main(argv=None):
    ap = Parser(prog="python bench/train_smoke.py", description=__doc__)
    ap.add_argument("--families", nargs="+", choices=["dit", "sit", "mar"], default=["dit", "sit", "mar"])
    ap.add_argument("--quick", action="store_true", help="fewest steps and only the learnable search")
    ap.add_argument("--json", help="output (default bench/results/train_smoke_<device>.json)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per command")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    out = args.json or os.path.join(ROOT, "bench", "results", f"train_smoke_{'cuda' if cuda else 'cpu'}.json")
    writable_file(out)
    search_steps, ft_steps = (8, 12) if args.quick else (40, 60)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "runs": []}

    def record(family, name, res):
        res.pop("stdout", None)
        res.update(family=family, step=name)
        results["runs"].append(res)
        print(json.dumps(res), flush=True)
        atomic_write(out, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=2)))
        return res["exit"] == 0

    with tempfile.TemporaryDirectory(prefix="tinyfusion-smoke-") as tmp:
        for family in args.families:
            base = os.path.join(tmp, family)
            common = ["--model", family, "--global-batch-size", "16", "--log-every", "4", "--num-workers", "0"]
            prune = os.path.join(base, "prune")
            ok = record(family, "prune learnable", run(torchrun("-m", "tinyfusion.prune", *common, "--steps",
                                                                 str(search_steps), "--calib-samples", "32", "--out", prune),
                                                       args.timeout))
            if not args.quick:
                for method in ("bi", "fluxlite"):
                    record(family, f"prune {method}", run(torchrun("-m", "tinyfusion.prune", "--model", family,
                                                                   "--method", method, "--calib-samples", "32", "--out",
                                                                   os.path.join(base, method)), args.timeout))
            if not ok:
                continue
            ft = [*common[2:], "--ckpt", os.path.join(prune, "pruned.safetensors"), "--steps", str(ft_steps),
                  "--ckpt-every", "4", "--eval-samples", "0"]
            ref, cut = os.path.join(base, "ref"), os.path.join(base, "cut")
            ok = record(family, "finetune", run(torchrun("-m", "tinyfusion.finetune", *ft, "--out", ref),
                                                args.timeout))
            res = killed_then_resumed(torchrun("-m", "tinyfusion.finetune", *ft, "--out", cut), 8,
                                      args.timeout)
            if ok and res["exit"] == 0:
                res["resumed_equals_uninterrupted"] = same_weights(os.path.join(ref, "recovered.safetensors"),
                                                                   os.path.join(cut, "recovered.safetensors"))
            record(family, "finetune SIGKILL + --resume", res)
            record(family, "sample --npz", run(torchrun("-m", "tinyfusion.sample", "--ckpt",
                                                        os.path.join(cut, "recovered.safetensors"), "--npz",
                                                        os.path.join(base, "samples.npz"), "--num-samples", "8",
                                                        "--steps", "4" if family != "mar" else "2", "--batch-size", "8"),
                                               args.timeout))
    bad = [r for r in results["runs"] if r["exit"] != 0 or r.get("resumed_equals_uninterrupted") is False
           or r.get("killed_mid_run") is False]
    print(f"{len(results['runs'])} commands, {len(bad)} failed -> {out}")
    if bad:
        raise UserError(f"{len(bad)} smoke commands failed, first: {bad[0]['family']} {bad[0]['step']}: "
                        f"{bad[0].get('last_error') or 'resumed weights differ'}")


if __name__ == "__main__":
    main()
