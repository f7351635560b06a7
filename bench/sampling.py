"""Sampling throughput: images/s of guided DDIM and DDPM per backend variant, depth and batch.

Every case runs the real sampler (`tinyfusion.diffusion.sample`, classifier-free guidance 1.5, so each step
is one forward of twice the batch) through a Runtime on random DiT weights, for a few timed steps after a
warm-up; a step costs the same at every noise level, so images/s for the full schedule is
batch / (steps x seconds per step). Optionally the VAE decode, timed separately, per image.

  python bench/sampling.py --preset xl --device cuda      # DiT-XL/2 at depths 28/14/7, batch 8/64/256
  python bench/sampling.py --dry-run                      # tiny shapes on the CPU (make test runs it)

Variants: eager, compile, triton, triton+graphs (the triton backend replayed from CUDA graphs), cpp (CPU).
The JSON is rewritten after every case, so a run cut short keeps what it measured.
"""
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive  # noqa: E402

PRESETS = {  # (config, depths, batches, variants, dtype, device)
    "xl": (dict(hidden_size=1152, num_heads=16, patch_size=2, input_size=32, in_channels=4, num_classes=1000),
           [28, 14, 7], [8, 64, 256], ["eager", "compile", "triton", "triton+graphs"], "bf16", "cuda"),
    "cpu": (dict(hidden_size=384, num_heads=6, patch_size=2, input_size=32, in_channels=4, num_classes=1000),
            [12, 6], [8], ["eager", "cpp"], "fp32", "cpu"),
    "tiny": (dict(hidden_size=48, num_heads=3, patch_size=2, input_size=8, in_channels=4, num_classes=10),
             [4, 2], [2], ["eager", "cpp"], "fp32", "cpu"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_STEPS = {"ddim": 50, "ddpm": 250}


def parse_args(argv):
    p = Parser(prog="python bench/sampling.py", description=__doc__)
    p.add_argument("--preset", choices=list(PRESETS), default="xl")
    p.add_argument("--depths", type=positive(), nargs="+")
    p.add_argument("--batches", type=positive(), nargs="+")
    p.add_argument("--variants", nargs="+", choices=["eager", "compile", "triton", "triton+graphs", "cpp"])
    p.add_argument("--samplers", nargs="+", choices=list(FULL_STEPS), default=["ddim", "ddpm"])
    p.add_argument("--steps", type=positive(), default=5, help="timed steps per case (after --warmup)")
    p.add_argument("--warmup", type=positive(), default=2,
                   help="steps of the untimed first run and of the baseline run subtracted from the timed one (at least 2)")
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--device")
    p.add_argument("--vae", help="a local diffusers AutoencoderKL folder: also time decoding, per image")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "sampling.json"))
    p.add_argument("--dry-run", action="store_true", help="the tiny preset, one step each: a check that it all runs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.steps, args.warmup = "tiny", 1, 1
    config, depths, batches, variants, dtype, device = PRESETS[args.preset]
    args.config = config
    args.depths, args.batches = args.depths or depths, args.batches or batches
    args.variants, args.dtype, args.device = args.variants or variants, args.dtype or dtype, args.device or device
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here (the cpu and tiny presets run on the CPU)")
    return args


def random_model(config, depth, device):
    from tinyfusion.models import DiT, DiTConfig

    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: no XL-size init on the host
        model = DiT(DiTConfig(depth=depth, **config))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def runtime_for(model, variant, args):
    from tinyfusion import runtime

    backend = variant.split("+")[0]
    return runtime.load(model, backend, device=args.device, dtype=DTYPES[args.dtype] if backend != "cpp" else torch.float32,
                        cuda_graphs=variant.endswith("+graphs"))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(rt, sampler, batch, args):
    """Wall time of one guided step, from a run of warmup + steps steps minus a run of warmup steps."""
    from tinyfusion.diffusion import sample

    c = rt.config
    labels = torch.arange(batch, device=args.device) % c.num_classes
    shape = (c.in_channels, c.input_size, c.input_size)

    def run(steps):
        sync(args.device)
        t0 = time.perf_counter()
        sample(rt, labels, shape, sampler, steps, cfg_scale=1.5, seed=0)
        sync(args.device)
        return time.perf_counter() - t0

    base = max(2, args.warmup)  # the samplers take at least 2 steps
    run(base)  # compile, capture, allocator warm-up
    short, long = run(base), run(base + args.steps)
    return max(long - short, 1e-9) / args.steps


def decode_seconds_per_image(vae_path, config, batch, device):
    from tinyfusion.data.vae import decode, load_vae

    vae = load_vae(vae_path, device)
    z = torch.randn(batch, config["in_channels"], config["input_size"], config["input_size"], device=device)
    with torch.no_grad():
        decode(vae, z)
        sync(device)
        t0 = time.perf_counter()
        decode(vae, z)
        sync(device)
    return (time.perf_counter() - t0) / batch


def save(args, rows, t0):
    summary = {"preset": args.preset, "dtype": args.dtype, "device": args.device, "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}"
                          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
               "command": "python bench/sampling.py " + " ".join(args.argv), "wall_s": round(time.time() - t0, 1),
               "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    return summary


def table(rows):
    lines = ["| variant | depth | batch | sampler | s / step | images/s (full schedule) |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['images_per_s']:.2f}" if "images_per_s" in r else r.get("error", "-")
        step = f"{r['seconds_per_step']:.4f}" if "seconds_per_step" in r else "-"
        lines.append(f"| {r['variant']} | {r['depth']} | {r['batch']} | {r['sampler']}-{r['full_steps']} | {step} | {value} |")
    return "\n".join(lines)


@cli
def main(argv=None):
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    t0, rows = time.time(), []
    for variant in args.variants:
        for depth in args.depths:
            model = random_model(args.config, depth, args.device)
            try:
                rt = runtime_for(model, variant, args)
            except UserError as e:  # a variant this machine cannot run is a row that says why
                rows += [{"variant": variant, "depth": depth, "batch": b, "sampler": s, "full_steps": FULL_STEPS[s],
                          "error": str(e)} for b in args.batches for s in args.samplers]
                save(args, rows, t0)
                continue
            for batch in args.batches:
                for sampler in args.samplers:
                    row = {"variant": variant, "depth": depth, "batch": batch, "sampler": sampler,
                           "full_steps": FULL_STEPS[sampler]}
                    try:
                        sec = seconds_per_step(rt, sampler, batch, args)
                        row.update(seconds_per_step=sec, images_per_s=batch / (sec * FULL_STEPS[sampler]))
                    except (RuntimeError, UserError) as e:
                        row["error"] = str(e).splitlines()[0][:200]
                    rows.append(row)
                    print(f"  {variant} depth {depth} batch {batch} {sampler}: "
                          + (f"{row['images_per_s']:.2f} images/s" if "images_per_s" in row else row["error"]), flush=True)
                    save(args, rows, t0)
            del rt, model
    summary = save(args, rows, t0)
    if args.vae:
        summary["vae_decode_s_per_image"] = {b: decode_seconds_per_image(args.vae, args.config, b, args.device)
                                             for b in args.batches}
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    print(table(rows))
    return summary


if __name__ == "__main__":
    main()
