"""Latency against depth for every block-stack family: does half the blocks mean twice the speed?

Each family (DiT, PixArt, SD3, Flux as diffusers classes, at DiT-S/2-like width and 256 image tokens
on the CPU preset; or a diffusers folder you give) is pruned with the block-stack adapter to fractions
of its depth (Flux: the same fraction of each stack) and timed in interleaved rounds with the same
inputs; then the fit t(L) = a + b*L, its R^2, and the half-depth speedup against the fit's ideal.

  python bench/latency_stacks.py                              # all four families, CPU preset
  python bench/latency_stacks.py --families flux --fractions 1 0.5 --repeats 20
  python bench/latency_stacks.py --preset gpu --device cuda --dtype bf16    # XL width, 28 blocks
  python bench/latency_stacks.py --folder path/to/transformer --device cuda --dtype bf16

Outputs a table, --json (default bench/results/latency_stacks_<preset>.json) and a PNG beside it.
"""
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from latency import DTYPES, fit_line, machine, time_once  # noqa: E402
from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive, writable_file  # noqa: E402
from tinyfusion.models.stack import block_stack  # noqa: E402

# cpu: DiT-S/2-like widths (6 heads x 64), 12 blocks (Flux: 4 double + 8 single), 256 image tokens, 64 text tokens.
# gpu: DiT-XL/2's width (1152 = 18 heads x 64, so Flux's rotary axes stay even) and depth 28 (Flux: 9 + 19).
PRESETS = {"cpu": dict(heads=6, head_dim=64, depth=12, batch=2, text=64),
           "gpu": dict(heads=18, head_dim=64, depth=28, batch=16, text=120),
           "tiny": dict(heads=2, head_dim=8, depth=4, batch=1, text=4)}


def build(family, p):
    import diffusers

    h, d, L = p["heads"], p["head_dim"], p["depth"]
    if family == "dit":
        return diffusers.DiTTransformer2DModel(num_attention_heads=h, attention_head_dim=d, in_channels=4, out_channels=8,
                                               num_layers=L, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(num_attention_heads=h, attention_head_dim=d, in_channels=4, out_channels=8,
                                                  num_layers=L, cross_attention_dim=h * d, sample_size=32, patch_size=2,
                                                  caption_channels=128, use_additional_conditions=False)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=L, attention_head_dim=d,
                                               num_attention_heads=h, joint_attention_dim=128, caption_projection_dim=h * d,
                                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32)
    if family == "flux":
        rope = (d // 4, 3 * d // 8, 3 * d // 8) if d >= 16 else (2, 2, d - 4)
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=L // 3, num_single_layers=L - L // 3,
                                                attention_head_dim=d, num_attention_heads=h, joint_attention_dim=128,
                                                pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=rope)
    raise UserError(f"unknown family {family!r}; choose from dit, pixart, sd3, flux")


def inputs(model, batch, text, device, dtype):
    """One fixed batch in the model's own call signature (random conditioning: latency does not care)."""
    g = torch.Generator().manual_seed(0)
    c, name = model.config, type(model).__name__

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    t = torch.full((batch,), 500.0, device=device)
    if name == "FluxTransformer2DModel":
        n = 256
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
        return dict(hidden_states=rnd(batch, n, c.in_channels), encoder_hidden_states=rnd(batch, text, c.joint_attention_dim),
                    pooled_projections=rnd(batch, c.pooled_projection_dim), timestep=t / 1000,
                    img_ids=ids.reshape(n, 3).to(device), txt_ids=torch.zeros(text, 3, device=device))
    x = rnd(batch, c.in_channels, c.sample_size, c.sample_size)
    if name == "DiTTransformer2DModel":
        return dict(hidden_states=x, timestep=t.long(), class_labels=torch.zeros(batch, dtype=torch.long, device=device))
    if name == "PixArtTransformer2DModel":
        return dict(hidden_states=x, encoder_hidden_states=rnd(batch, text, c.caption_channels), timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=x, encoder_hidden_states=rnd(batch, text, c.joint_attention_dim),
                pooled_projections=rnd(batch, c.pooled_projection_dim), timestep=t)


def keep_fraction(stack, fraction):
    """The first round(fraction * depth) blocks of every stack (at least one each)."""
    kept, start = [], 0
    for d in stack.depths:
        kept += list(range(start, start + max(1, round(fraction * d))))
        start += d
    return kept


def parse_args(argv):
    p = Parser(prog="python bench/latency_stacks.py", description=__doc__)
    p.add_argument("--families", nargs="+", default=["dit", "pixart", "sd3", "flux"], choices=["dit", "pixart", "sd3", "flux"])
    p.add_argument("--folder", help="time this diffusers transformer folder instead of the random families")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--batch", type=positive(), help="default: the preset's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--warmup", type=positive(), default=2)
    p.add_argument("--repeats", type=positive(), default=10)
    p.add_argument("--json", help="default: bench/results/latency_stacks_<preset>.json (PNG beside it)")
    args = p.parse_args(argv)
    if args.fractions[0] != 1.0 or any(not 0 < f <= 1 for f in args.fractions):
        raise UserError("--fractions must start at 1 and lie in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    args.batch = args.batch or PRESETS[args.preset]["batch"]
    args.json = args.json or os.path.join(ROOT, "bench", "results", f"latency_stacks_{args.preset}.json")
    writable_file(args.json)
    return args


def models(args):
    if args.folder:
        from tinyfusion.models.diffusers_stacks import load_folder

        m = load_folder(args.folder)
        yield os.path.basename(os.path.normpath(args.folder)), m
        return
    torch.manual_seed(0)
    for family in args.families:
        m = build(family, PRESETS[args.preset])
        with torch.no_grad():  # zero-initialized gates would make every block the identity
            for p in m.parameters():
                p.normal_(0, 0.02)
        yield family, m


@torch.no_grad()
def measure(name, model, args):
    stack = block_stack(model)
    dtype = DTYPES[args.dtype]
    cases = []
    for f in args.fractions:
        m = (stack.prune(keep_fraction(stack, f)) if f < 1 else model).to(args.device).eval()
        if dtype != torch.float32:
            m = m.to(dtype)
        kw = inputs(m, args.batch, PRESETS[args.preset]["text"], args.device, dtype)
        fn = lambda m=m, kw=kw: m(**kw, return_dict=False)  # noqa: E731
        for _ in range(args.warmup):
            fn()
        cases.append((block_stack(m).depth, fn))
    times = [[] for _ in cases]
    for _ in range(args.repeats):  # interleaved rounds: drift in a shared machine's load hits every depth alike
        for i, (_, fn) in enumerate(cases):
            times[i].append(time_once(fn, args.device))
    depths = [d for d, _ in cases]
    ms = [statistics.median(t) for t in times]
    a, b, r2 = fit_line(depths, ms)
    out = {"model": name, "class": type(model).__name__, "depths": depths, "stack_depths": stack.depths, "median_ms": ms,
           "fit": {"a": a, "b": b, "r2": r2}, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    top = depths[0]
    if 0.5 in args.fractions:
        half = depths[args.fractions.index(0.5)]
        out["half_depth_speedup"] = ms[0] / ms[args.fractions.index(0.5)]
        out["ideal_half_depth_speedup"] = (a + b * top) / (a + b * half)
    print(f"  {name}: " + ", ".join(f"depth {d} {m:.1f} ms" for d, m in zip(depths, ms)), flush=True)
    return out


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["results"]:
        ax.plot(r["depths"], r["median_ms"], "o-", label=f"{r['model']} (R² {r['fit']['r2']:.3f})")
    ax.set_xlabel("blocks kept")
    ax.set_ylabel("forward latency (ms, median)")
    ax.set_title(f"latency vs depth, batch {summary['batch']}, {summary['dtype']} on {summary['device']}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


@cli
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    results = [measure(name, m, args) for name, m in models(args)]
    summary = {"preset": args.preset, "machine": machine(args), "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/latency_stacks.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "batch": args.batch, "dtype": args.dtype, "device": args.device, "results": results,
               "wall_s": time.time() - t0}
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=2)))
    plot(summary, os.path.splitext(args.json)[0] + ".png")
    print("| model | depths | median ms | R² | half-depth speedup (ideal) |\n|---|---|---|---|---|")
    for r in results:
        half = f"{r['half_depth_speedup']:.2f}x ({r['ideal_half_depth_speedup']:.2f}x)" if "half_depth_speedup" in r else "-"
        print(f"| {r['model']} | {' '.join(map(str, r['depths']))} | {' '.join(f'{m:.1f}' for m in r['median_ms'])} "
              f"| {r['fit']['r2']:.4f} | {half} |")
    return summary


if __name__ == "__main__":
    main()
