"""Training-step speed: the learnable search step and the Masked-KD step, ours beside the official code.

At DiT-XL/2's shape (random weights, synthetic 4x32x32 latents, 1000 classes, batch 32): the search
step (1:2 over 28 blocks, LoRA rank 8) and the Masked-KD step (a D14 student of the XL teacher, hidden
KD on the 14 aligned blocks), through the shared training engine, in bf16, fp16, fp32 with TF32 and fp32
without it (what every trainer ran before the engine), eager and `--compile`: images/s and peak memory.
With `--official DIR` (a checkout of github.com/VainF/TinyFusion, never committed; needs timm, and
torchtune or else our LoRA layer in its place, which the output says), the same two steps as the
official scripts run them: bf16 autocast for the search (`prune_by_learning.py`), fp16 autocast with
a grad scaler for Masked KD (`train_masked_kd.py`), TF32 on, an EMA of every parameter, a host sync
per step.

  python bench/train_speed.py --device cuda --official TinyFusion/ --json bench/results/train_speed_h200.json
  python bench/train_speed.py --dry-run                  # tiny shapes on the CPU, every path once (in make test)
  python bench/train_speed.py --project bench/results/train_speed_h200.json   # GPU-hours for the paper's recipes

Writes the JSON after every measurement, so a run cut short keeps what it finished.
"""
import copy
import gc
import importlib
import json
import os
import platform
import sys
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.data.batches import FixedBatches  # noqa: E402
from tinyfusion.diffusion.gaussian import create_diffusion  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive, writable_file  # noqa: E402
from tinyfusion.models.dit import DiT, DiTConfig  # noqa: E402
from tinyfusion.pruning.learnable import LearnableSearch, SearchConfig  # noqa: E402
from tinyfusion.pruning.masks import parse_scheme  # noqa: E402
from tinyfusion.recovery.finetune import FinetuneConfig, Recovery  # noqa: E402
from tinyfusion.recovery.kd import alignment  # noqa: E402
from tinyfusion.training import RunOptions  # noqa: E402

PRESETS = {
    "xl": dict(depth=28, hidden_size=1152, num_heads=16, input_size=32, num_classes=1000, batch=32),
    "tiny": dict(depth=4, hidden_size=64, num_heads=2, input_size=8, num_classes=10, batch=4),
    # the shipped digits teacher's shape (random weights): what a CPU user trains
    "digits": dict(depth=12, hidden_size=128, num_heads=4, input_size=8, num_classes=10, batch=64, in_channels=1),
}
VARIANTS = {  # name: (precision, tf32)
    "bf16": ("bf16", True), "fp16": ("fp16", True), "fp32+tf32": ("fp32", True), "fp32": ("fp32", False),
}
IMAGENET = 1_281_167  # training images: one search epoch


def config(p, depth=None):
    return DiTConfig(depth=depth or p["depth"], hidden_size=p["hidden_size"], patch_size=2, num_heads=p["num_heads"],
                     input_size=p["input_size"], in_channels=p.get("in_channels", 4), num_classes=p["num_classes"])


def batch(p, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p["batch"], p.get("in_channels", 4), p["input_size"], p["input_size"], generator=g)
    return x.to(device), torch.randint(0, p["num_classes"], (p["batch"],), generator=g).to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, steps, warmup):
    """(seconds per step, peak GPU GB or None) of `step()` after warm-up (compilation included there)."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    return dt, (round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if cuda else None)


# --- ours -------------------------------------------------------------------------------------------
def build(cls_config, device):
    """A model initialized directly on the device (an XL initializes in seconds there, a minute on a CPU)."""
    with torch.device(device):
        return DiT(cls_config)


def our_search(p, device, options):
    torch.manual_seed(0)
    model = build(config(p), device)
    groups = parse_scheme("1:2", p["depth"])
    cfg = SearchConfig(groups=groups, steps=10**9, global_batch_size=p["batch"], log_every=10**9, ckpt_every=10**9)
    task = LearnableSearch(model, create_diffusion(""), FixedBatches(*batch(p, device)), cfg, device=device,
                           options=options)
    return task.engine.train_step


def our_kd(p, device, options):
    torch.manual_seed(0)
    teacher = build(config(p), device)
    student = build(config(p, p["depth"] // 2), device)
    groups = parse_scheme("1:2", p["depth"])
    pairs = alignment(groups, list(range(1, p["depth"], 2)))
    cfg = FinetuneConfig(steps=10**9, global_batch_size=p["batch"], log_every=10**9, ckpt_every=10**9)
    task = Recovery(student, teacher, pairs, create_diffusion(""), FixedBatches(*batch(p, device)), cfg, device=device,
                    options=options)
    return task.engine.train_step


# --- the official code, as its scripts run it ---------------------------------------------------------
def import_official(path):
    if not os.path.isfile(os.path.join(path, "train_masked_kd.py")):
        raise UserError(f"--official {path}: not a checkout of VainF/TinyFusion (no train_masked_kd.py)")
    sys.path.insert(0, os.path.abspath(path))
    try:
        models = importlib.import_module("models")
        pruning = importlib.import_module("models_with_layer_pruning")
        diffusion = importlib.import_module("diffusion")
    except ImportError as e:
        raise UserError(f"--official {path}: cannot import its models ({e}); it needs timm") from None
    return models, pruning, diffusion


def official_lora(model, rank):
    """The official convert_to_lora_model: every nn.Linear becomes a LoRA layer (torchtune's when present)."""
    try:
        from torchtune.modules.peft import LoRALinear

        def make(m):
            lora = LoRALinear(in_dim=m.in_features, out_dim=m.out_features, rank=rank, alpha=2 * rank,
                              use_bias=m.bias is not None)
            lora.weight.data = m.weight.data
            if m.bias is not None:
                lora.bias.data = m.bias.data
            return lora.to(m.weight.device)
        kind = "torchtune"
    except ImportError:
        from tinyfusion.pruning.lora import LoRALinear

        def make(m):
            return LoRALinear(m, rank, 2 * rank)
        kind = "tinyfusion LoRALinear (torchtune missing; same math)"

    def convert(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear) and not hasattr(child, "lora_A") and not hasattr(child, "lora_a"):
                setattr(module, name, make(child))
            else:
                convert(child)

    convert(model)
    params = [p for n, p in model.named_parameters() if "lora" in n]
    return params, kind


@torch.no_grad()
def official_ema(ema, model, decay):
    ema_params = OrderedDict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def official_search(p, device, official):
    models, pruning, diffusion = official
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(device):
        model = pruning.DiT(input_size=p["input_size"], patch_size=2, hidden_size=p["hidden_size"], depth=p["depth"],
                            num_heads=p["num_heads"], num_classes=p["num_classes"], in_channels=p.get("in_channels", 4),
                            groups=[[1, 2] for _ in range(p["depth"] // 2)])
    gates = [q for n, q in model.named_parameters() if "gumbel_gates" in n]
    weights, kind = official_lora(model, 8)
    for n, q in model.named_parameters():
        q.requires_grad_(q in set(weights) or "gumbel_gates" in n)
    opt = torch.optim.AdamW([{"params": weights, "lr": 1e-4}, {"params": gates, "lr": 1e-3}], lr=1e-4, weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False)
    diff = diffusion.create_diffusion(timestep_respacing="")
    model.train()
    model.tau, model.scaling = 1.0, 100.0
    x, y = batch(p, device)
    dev = torch.device(device).type

    def step():
        opt.zero_grad()
        t = torch.randint(0, diff.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = diff.training_losses(model, x, t, dict(y=y))["loss"].mean()
        loss.backward()
        if loss.isnan().sum() == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        official_ema(ema, model, 0.999)
        loss.item()

    return step, kind


class AsDDP(torch.nn.Module):
    """A one-GPU stand-in for DDP's wrapper: the same call, the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def official_kd(p, device, official):
    models, _, diffusion = official
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    kw = dict(input_size=p["input_size"], patch_size=2, hidden_size=p["hidden_size"], num_heads=p["num_heads"],
              num_classes=p["num_classes"], in_channels=p.get("in_channels", 4))
    with torch.device(device):
        model = models.DiT(depth=p["depth"] // 2, **kw)
        teacher = models.DiT(depth=p["depth"], **kw).eval().requires_grad_(False)

    def feature_hook(module, inputs, output):
        module.feature = output

    for s, t in zip(range(p["depth"] // 2), range(1, p["depth"], 2)):
        model.blocks[s].target_layer = t
        model.blocks[s].register_forward_hook(feature_hook)
        teacher.blocks[t].register_forward_hook(feature_hook)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10**6, eta_min=1e-4)
    dev = torch.device(device).type
    scaler = torch.amp.GradScaler(dev)
    diff = diffusion.create_diffusion(timestep_respacing="")
    model.train()
    x, y = batch(p, device)

    wrapped = AsDDP(model)  # the official loss reads the student's blocks through DDP's .module

    def step():
        opt.zero_grad()
        t = torch.randint(0, diff.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device_type=dev, dtype=torch.float16):
            terms = diff.training_losses_kd_rep(wrapped, teacher, x, t, dict(y=y), beta_feat=1e-2)
            loss = terms["loss"].mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        official_ema(ema, model, 0.9999)
        for key in ("loss", "kd_loss", "feat_loss", "gt"):  # the script's four .item() per step
            terms[key].mean().item()

    return step, "torch autocast fp16 + GradScaler (as train_masked_kd.py)"


# --- the run ------------------------------------------------------------------------------------------
def project(results):
    """GPU-hours of the paper's recipes from the measured bf16 images/s (eager or compiled, the faster)."""
    best = {}
    for r in results["rows"]:
        if r["code"] == "ours" and r["variant"] == "bf16" and "images_per_s" in r:
            best[r["step"]] = max(best.get(r["step"], 0), r["images_per_s"])
    rows = []
    for step, recipe, images in (("search", "search: 1 epoch of ImageNet latents", IMAGENET),
                                 ("masked_kd", "Masked KD: 100K steps at batch 256", 100_000 * 256),
                                 ("masked_kd", "Masked KD: 500K steps at batch 256", 500_000 * 256)):
        if step in best:
            hours = images / best[step] / 3600
            rows.append({"recipe": recipe, "images_per_s_one_gpu": best[step], "gpu_hours": round(hours, 1),
                         "hours_on_1": round(hours, 1), "hours_on_8_linear": round(hours / 8, 2)})
    return rows


def print_projection(rows, device_name):
    print(f"\nprojected from the measured bf16 step on one {device_name} (8 GPUs: linear DDP scaling assumed)")
    print("| recipe | images/s (1 GPU) | hours on 1 | hours on 8 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['images_per_s_one_gpu']:.0f} | {r['hours_on_1']} | {r['hours_on_8_linear']} |")


@cli
def main(argv=None):
    ap = Parser(prog="python bench/train_speed.py", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="xl (DiT-XL/2, default on CUDA), digits (the shipped teacher's shape) or tiny (default on the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=positive(), help="per-step batch (default: the preset's, 32 for xl)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    ap.add_argument("--compile-variants", nargs="+", choices=list(VARIANTS), default=["bf16"],
                    help="variants also timed compiled (each compiles anew: about a minute on a GPU)")
    ap.add_argument("--steps", type=positive(), default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=positive(), default=3)
    ap.add_argument("--official", help="a checkout of github.com/VainF/TinyFusion to time beside ours")
    ap.add_argument("--json", help="output (default bench/results/train_speed_<device>.json)")
    ap.add_argument("--project", metavar="JSON", help="only print the GPU-hours table from a measured file")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 step, every path once (CPU test)")
    args = ap.parse_args(argv)
    if args.project:
        try:
            with open(args.project) as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--project {args.project}: {e}") from None
        print_projection(project(results), results.get("device", "?"))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (use --device cpu or --dry-run)")
    if args.dry_run:
        args.preset, args.steps, args.warmup = "tiny", 1, 1
        if args.device.startswith("cuda"):
            args.device = "cpu"
    preset = dict(PRESETS[args.preset or ("xl" if args.device.startswith("cuda") else "tiny")])
    if args.batch:
        preset["batch"] = args.batch
    cpu = not args.device.startswith("cuda")
    out = args.json or os.path.join(ROOT, "bench", "results", f"train_speed_{'cpu' if cpu else 'cuda'}.json")
    writable_file(out)
    official = import_official(args.official) if args.official else None
    name = platform.processor() or platform.machine() if cpu else torch.cuda.get_device_name(args.device)
    results = {"device": name, "torch": torch.__version__, "preset": preset, "steps": args.steps,
               "warmup": args.warmup, "command": "python bench/train_speed.py " + " ".join(argv or sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "rows": []}

    def record(row, build):
        try:
            step, note = build()
            dt, peak = measure(step, args.device, args.steps, args.warmup)
            row.update(step_s=round(dt, 5), images_per_s=round(preset["batch"] / dt, 2), peak_gpu_gb=peak)
            if note:
                row["note"] = note
        except UserError:
            raise
        except Exception as e:  # one failed path is a row that says why, not a lost run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write(out, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=2)))
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()

    # Most valuable first, so a run cut short keeps it: each step's bf16 beside the official code, then the
    # other precisions, then the compiled runs (each compiles anew).
    plan = []
    for mode in args.modes:
        for variant in args.variants:
            for step in ("search", "masked_kd"):
                if (mode == "compile" and variant not in args.compile_variants) or (
                        cpu and variant == "fp16" and not args.dry_run):
                    continue
                plan.append(("ours", step, variant, mode))
                if official is not None and mode == "eager" and variant == args.variants[0]:
                    plan.append(("official", step, "bf16" if step == "search" else "fp16", "eager"))
    for code, step, variant, mode in plan:
        row = {"code": code, "step": step, "variant": variant, "mode": mode}
        if code == "official":
            build = official_search if step == "search" else official_kd
            record(row, lambda: build(preset, args.device, official))
            continue
        prec, tf32 = VARIANTS[variant]
        opts = RunOptions(precision=prec, tf32=tf32, compile=mode == "compile", async_save=False,
                          compile_backend="eager" if args.dry_run else "inductor")
        ours = our_search if step == "search" else our_kd
        record(row, lambda: (ours(preset, args.device, opts), None))
    rows = project(results)
    results["projection"] = rows
    atomic_write(out, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=2)))
    failed = [r for r in results["rows"] if "error" in r]
    if not cpu:
        print_projection(rows, name)
    print(f"{len(results['rows'])} measurements ({len(failed)} failed) -> {out}")
    if failed and args.dry_run:
        raise UserError(f"{len(failed)} paths failed: {failed[0]['error']}")


if __name__ == "__main__":
    main()
