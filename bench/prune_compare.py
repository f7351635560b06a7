"""The paper's comparison at small scale: which 12 -> 6 mask of the digits teacher recovers best?

For every method and seed: prune, record the calibration loss, recover with the same budget (plain
fine-tuning, as the paper's Table 3; the learnable mask also with Masked KD), and evaluate the EMA
weights after the short budget (a snapshot of the long run) and after the long one. Then the
calibration-loss versus recovered-FID scatter over random masks with Kendall's tau.

  python bench/prune_compare.py                 # the full run: hours on a 2-core CPU; resumable
  python bench/prune_compare.py --quick         # minutes: a smoke version (tests run it on a tiny model)

Every finished (method, seed) is stored in the results JSON at once and skipped on a rerun, so the run
can be interrupted and continued over several sittings.
"""
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive  # noqa: E402

# (row name, prune arguments, recovery mode)
METHODS = [
    ("learnable-1:2-lora", ["--method", "learnable", "--scheme", "1:2", "--delta-w", "lora"], "none"),
    ("learnable-2:4-lora", ["--method", "learnable", "--scheme", "2:4", "--delta-w", "lora"], "none"),
    ("learnable-1:2-full", ["--method", "learnable", "--scheme", "1:2", "--delta-w", "full"], "none"),
    ("learnable-1:2-frozen", ["--method", "learnable", "--scheme", "1:2", "--delta-w", "none"], "none"),
    ("bi", ["--method", "bi"], "none"),
    ("fluxlite", ["--method", "fluxlite"], "none"),
    ("sensitivity", ["--method", "sensitivity"], "none"),
    ("oracle", ["--method", "oracle"], "none"),
    ("first", ["--method", "first"], "none"),
    ("last", ["--method", "last"], "none"),
    ("random-search-min", ["--method", "random-search", "--candidates", "100"], "none"),
    ("random-search-median", ["--method", "random-search", "--candidates", "100"], "none"),
    ("learnable-1:2-lora+maskedkd", ["--method", "learnable", "--scheme", "1:2", "--delta-w", "lora"], "masked"),
]


def parse_args(argv):
    p = Parser(prog="python bench/prune_compare.py", description=__doc__)
    p.add_argument("--teacher", help="teacher checkpoint (default: the shipped digits teacher)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--short", type=int, default=500, help="short recovery budget (steps)")
    p.add_argument("--long", type=int, default=1500, help="long recovery budget (steps), at least 3x --short")
    p.add_argument("--search-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--random-masks", type=int, default=16, help="random masks for the calibration-loss scatter")
    p.add_argument("--methods", nargs="+", help="subset of row names")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "prune_compare.json"))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "prune_compare"), help="run folders")
    p.add_argument("--eval-steps", type=positive(), help="sampler steps of every evaluation (default: the model's)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, one seed, 4 random masks, 100 samples of 10 steps")
    p.add_argument("--report", action="store_true", help="only rewrite the table and plots from the results file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.short, args.long, args.search_steps = args.seeds[:1], 6, 18, 6
        args.batch, args.eval_samples, args.random_masks, args.eval_steps = 16, 100, 4, 10
    if args.long < 3 * args.short:
        raise UserError(f"--long {args.long} must be at least 3x --short {args.short}")
    names = [m[0] for m in METHODS]
    bad = [m for m in args.methods or [] if m not in names]
    if bad:
        raise UserError(f"unknown methods {bad}; choose from {', '.join(names)}")
    return args


def not_applicable(prune_args, depths):
    """Why a row cannot run on a teacher with these block-stack depths (a MAR: 6 and 6), or None."""
    if "--scheme" in prune_args:
        m = int(prune_args[prune_args.index("--scheme") + 1].split(":")[1])
        if any(d % m for d in depths):
            return f"M={m} does not divide the stack depths {depths}"
    method, total = prune_args[prune_args.index("--method") + 1], sum(depths)
    if (method == "first" and total // 2 <= total - depths[-1]) or (method == "last" and total // 2 <= total - depths[0]):
        return f"keeping the {method} half of {depths} leaves a stack empty"
    return None


def stack_depths(teacher):
    from tinyfusion.checkpoint import load
    from tinyfusion.models.stack import block_stack

    return list(block_stack(load(teacher)).depths)


def load_results(path):
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        return {"units": saved["units"], "random_masks": saved["random_masks"], "wall_s": saved.get("wall_s", 0.0)}
    return {"units": {}, "random_masks": {}, "wall_s": 0.0}


def save_results(path, results, args):
    """One file: the summary (rows, kendall_tau, ...) plus the raw units that make a rerun skip finished work."""
    summary = summarize(results, args, results.get("wall_s", 0.0))
    summary.update(units=results["units"], random_masks=results["random_masks"])
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    return summary


def call(main, argv):
    """Run a tinyfusion CLI in-process; a non-zero exit stops the bench with that CLI's message."""
    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise UserError(f"step failed: {' '.join(argv[:6])} ...") from None


def evaluate_file(ckpt, out_json, args):
    from tinyfusion.evaluate import main as evaluate_main

    steps = ["--steps", str(args.eval_steps)] if args.eval_steps else []
    call(evaluate_main, ["--ckpt", ckpt, "--samples", str(args.eval_samples), *steps, "--json", out_json])
    with open(out_json) as f:
        return json.load(f)


def continue_flags(folder, state):
    """A unit's folder after a killed run: --resume where its resumable state was saved, --overwrite where
    the run died before that (the commands refuse a folder holding another run otherwise)."""
    if os.path.isfile(os.path.join(folder, state)):
        return ["--resume"]
    return ["--overwrite"] if os.path.isdir(folder) and os.listdir(folder) else []


def run_unit(args, teacher, name, prune_args, kd, seed, pruned_cache, finished):
    """Prune (shared between rows that differ only in recovery), recover, evaluate short and long."""
    from tinyfusion.finetune import main as finetune_main
    from tinyfusion.prune import main as prune_main

    prune_key = (tuple(prune_args), seed)
    prune_dir = os.path.join(args.work, "prune", "-".join(a.strip("-") for a in prune_args), f"seed{seed}")
    if prune_key not in pruned_cache and not os.path.isfile(os.path.join(prune_dir, "decision.json")):
        call(prune_main, ["--ckpt", teacher, *prune_args, "--steps", str(args.search_steps), "--global-batch-size",
                          str(args.batch), "--seed", str(seed), "--out", prune_dir, *continue_flags(prune_dir, "search_state.pt")])
    pruned_cache[prune_key] = prune_dir
    with open(os.path.join(prune_dir, "decision.json")) as f:
        decision = json.load(f)
    ckpt = os.path.join(prune_dir, "pruned.safetensors")
    calib = decision["calibration_loss"]
    if name == "random-search-median":
        ckpt = os.path.join(prune_dir, "pruned-median.safetensors")
        calib = decision["picks"]["median"]["calibration_loss"]
    kept = tinyfusion_kept(ckpt)
    for done in finished.values():  # the same mask, recovery and seed recover identically: reuse, don't rerun
        if done["kept"] == kept and done["recovery"] == kd and done["seed"] == seed:
            return {**done, "method": name, "calibration_loss": calib, "reused_from": done["method"]}
    rec_dir = os.path.join(args.work, "recover", name, f"seed{seed}")
    call(finetune_main, ["--ckpt", ckpt, "--teacher", teacher, "--kd", kd, "--steps", str(args.long), "--global-batch-size",
                         str(args.batch), "--seed", str(seed), "--snapshot-steps", str(args.short), "--eval-samples", "0",
                         "--out", rec_dir, *continue_flags(rec_dir, "finetune_state.pt")])
    short = evaluate_file(os.path.join(rec_dir, f"recovered-step{args.short}.safetensors"),
                          os.path.join(rec_dir, "eval-short.json"), args)
    long = evaluate_file(os.path.join(rec_dir, "recovered.safetensors"), os.path.join(rec_dir, "eval-long.json"), args)
    return {"method": name, "seed": seed, "kept": kept, "calibration_loss": calib, "recovery": kd,
            "short": short, "long": long}


def tinyfusion_kept(ckpt):
    import tinyfusion

    return tinyfusion.load(ckpt).provenance["kept"]


def random_mask_unit(args, teacher, index):
    """A seeded random 6-of-12 mask: calibration loss, then short plain fine-tuning and its FID."""
    from tinyfusion.finetune import main as finetune_main
    from tinyfusion.prune import main as prune_main

    prune_dir = os.path.join(args.work, "random-masks", f"mask{index}")
    if not os.path.isfile(os.path.join(prune_dir, "decision.json")):
        call(prune_main, ["--ckpt", teacher, "--method", "random", "--seed", str(1000 + index), "--out", prune_dir,
                          *continue_flags(prune_dir, "no state: a baseline")])
    with open(os.path.join(prune_dir, "decision.json")) as f:
        decision = json.load(f)
    rec_dir = os.path.join(prune_dir, "recover")
    call(finetune_main, ["--ckpt", os.path.join(prune_dir, "pruned.safetensors"), "--teacher", teacher, "--kd", "none",
                         "--steps", str(args.short), "--global-batch-size", str(args.batch), "--eval-samples", "0", "--out", rec_dir,
                         *continue_flags(rec_dir, "finetune_state.pt")])
    m = evaluate_file(os.path.join(rec_dir, "recovered.safetensors"), os.path.join(rec_dir, "eval.json"), args)
    return {"kept": decision["kept"], "calibration_loss": decision["calibration_loss"], "digits_fid": m["digits_fid"],
            "class_accuracy": m["class_accuracy"]}


def kendall_tau(x, y):
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic) if len(x) >= 2 else None


def summarize(results, args, wall):
    rows = []
    by_method = {}
    for unit in results["units"].values():
        by_method.setdefault(unit["method"], []).append(unit)
    for name, *_ in METHODS:
        units = by_method.get(name)
        if not units:
            continue
        row = {"method": name, "seeds": sorted(u["seed"] for u in units), "recovery": units[0]["recovery"],
               "kept": [u["kept"] for u in units],
               "calibration_loss_mean": float(np.mean([u["calibration_loss"] for u in units]))}
        for budget in ("short", "long"):
            ms = [u[budget] for u in units]
            row[budget] = {
                "steps": args.short if budget == "short" else args.long,
                "digits_fid_mean": float(np.mean([m["digits_fid"] for m in ms])),
                "digits_fid_std": float(np.std([m["digits_fid"] for m in ms])),
                "class_accuracy_mean": float(np.mean([m["class_accuracy"] for m in ms])),
                "precision_mean": float(np.mean([m["precision"] for m in ms])),
                "recall_mean": float(np.mean([m["recall"] for m in ms])),
                "real_floor_fid": float(np.mean([m["real_floor_fid"] for m in ms])),
            }
        rows.append(row)
    rm = list(results["random_masks"].values())
    tau = kendall_tau([r["calibration_loss"] for r in rm], [r["digits_fid"] for r in rm])
    return {"rows": rows, "kendall_tau": tau, "scatter": rm,
            "command": "python bench/prune_compare.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}",
            "date": time.strftime("%Y-%m-%d"), "wall_s": round(wall, 1),
            "settings": {"seeds": args.seeds, "short": args.short, "long": args.long, "search_steps": args.search_steps,
                         "batch": args.batch, "eval_samples": args.eval_samples,
                         "eval_steps": args.eval_steps}}


def markdown(summary):
    lines = ["| method | recovery | calib. loss | FID short (mean ± std) | FID long (mean ± std) | acc. long | prec. / rec. long | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        s, l = r["short"], r["long"]
        lines.append(f"| {r['method']} | {r['recovery']} | {r['calibration_loss_mean']:.4f} | {s['digits_fid_mean']:.2f} ± "
                     f"{s['digits_fid_std']:.2f} | {l['digits_fid_mean']:.2f} ± {l['digits_fid_std']:.2f} | "
                     f"{l['class_accuracy_mean']:.3f} | {l['precision_mean']:.2f} / {l['recall_mean']:.2f} | {len(r['seeds'])} |")
    if summary["rows"]:
        lines.append(f"\nreal-vs-real floor: {summary['rows'][0]['long']['real_floor_fid']:.2f}; "
                     f"short = {summary['settings']['short']} steps, long = {summary['settings']['long']} steps")
    tau = summary["kendall_tau"]
    lines.append(f"Kendall's tau (calibration loss vs FID after short recovery, {len(summary['scatter'])} random masks): "
                 f"{tau if tau is None else round(tau, 3)}")
    return "\n".join(lines) + "\n"


def plot(summary, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        x = np.arange(len(rows))
        for off, budget in ((-0.2, "short"), (0.2, "long")):
            ax.bar(x + off, [r[budget]["digits_fid_mean"] for r in rows], 0.4, yerr=[r[budget]["digits_fid_std"] for r in rows],
                   label=f"{budget} ({summary['settings'][budget]} steps)")
        ax.axhline(rows[0]["long"]["real_floor_fid"], color="k", ls="--", lw=0.8, label="real-vs-real floor")
        ax.set_xticks(x)
        ax.set_xticklabels([r["method"] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("digits-FID after recovery")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path_prefix + "_fid.png", dpi=110)
        plt.close(fig)
    rm = summary["scatter"]
    if rm:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ax.scatter([r["calibration_loss"] for r in rm], [r["digits_fid"] for r in rm])
        if summary["rows"]:
            ax.axhline(summary["rows"][0]["long"]["real_floor_fid"], color="gray", ls="--", lw=1,
                       label="real-vs-real floor")
            ax.legend(fontsize=8)
        ax.set_yscale("log")  # collapsed masks sit 20x above the rest
        ax.set_xlabel("calibration loss right after pruning")
        ax.set_ylabel("digits-FID after short recovery")
        ax.set_title(f"Kendall tau = {summary['kendall_tau']:.2f}" if summary["kendall_tau"] is not None else "")
        fig.tight_layout()
        fig.savefig(path_prefix + "_scatter.png", dpi=110)
        plt.close(fig)


@cli
def main(argv=None):
    args = parse_args(argv)
    from tinyfusion.assets import TEACHER_PATH

    teacher = args.teacher or TEACHER_PATH
    results = load_results(args.results)
    t0 = time.time() - results["wall_s"]
    pruned_cache = {}

    def save():
        results["wall_s"] = time.time() - t0
        save_results(args.results, results, args)

    depths = stack_depths(teacher)

    def run_seed(seed):
        for name, prune_args, kd in METHODS:
            key = f"{name}/seed{seed}"
            if (args.methods and name not in args.methods) or key in results["units"]:
                continue
            reason = not_applicable(prune_args, depths)
            if reason:
                print(f"== {key}: skipped, {reason}", flush=True)
                continue
            print(f"== {key}", flush=True)
            results["units"][key] = run_unit(args, teacher, name, prune_args, kd, seed, pruned_cache, results["units"])
            save()

    # Order: a full first-seed comparison, then the random-mask scatter, then the other seeds, so that
    # every question has an answer before the run spends hours tightening the error bars.
    seeds = [] if args.report else args.seeds
    for seed in seeds[:1]:
        run_seed(seed)
    for i in range(0 if args.report else args.random_masks):
        if str(i) not in results["random_masks"]:
            print(f"== random mask {i}", flush=True)
            results["random_masks"][str(i)] = random_mask_unit(args, teacher, i)
            save()
    for seed in seeds[1:]:
        run_seed(seed)
    if not args.report:
        results["wall_s"] = time.time() - t0
    summary = save_results(args.results, results, args)
    base = os.path.splitext(args.results)[0]
    table = markdown(summary)
    atomic_write(base + ".md", lambda tmp: open(tmp, "w").write(f"# prune_compare\n\n`{summary['command']}`\n"
                                                                 f"{summary['machine']}, {summary['date']}, "
                                                                 f"wall {summary['wall_s']:.0f} s\n\n{table}"))
    plot(summary, base)
    print(table)


if __name__ == "__main__":
    main()
