"""Latency against depth, per backend: does a model half as deep run twice as fast?

For each backend and depth, the median forward latency (after warm-up) of a DiT with random weights,
then a fit t(L) = a + b*L with R^2, the half-depth speedup against its ideal (a + bL) / (a + bL/2) and
against 2, and the share of the FLOP floor reached (FLOPs counted from the config over the fastest GEMM
path's rate, timed in the same interleaved rounds as the backend's forwards; on the CPU each timed call
starts after a pause, so no thread of the call before still holds its cores). A width-pruned model with the
parameters of the half-depth one (hidden and MLP sizes scaled by 1/sqrt(2) to the nearest multiple of
lcm(heads, 4), head count kept) runs at full depth beside it: depth versus width.

  python bench/latency.py                        # --preset cpu: DiT-S/2 width, 256 tokens, depths 12 9 6 3
  python bench/latency.py --preset xl --device cuda --dtype bf16    # DiT-XL/2: 28 21 14 7
  python bench/latency.py --backends eager cpp --depths 12 6 --json out.json --profile

Outputs: a table on stdout, --json (default bench/results/latency_<preset>.json), the CSV and PNG beside it.
"""
import csv
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive, writable_file  # noqa: E402
from tinyfusion.models.dit import DiT, DiTConfig  # noqa: E402
from tinyfusion.runtime import BACKENDS, load  # noqa: E402

PRESETS = {  # DiT-S/2 and DiT-XL/2 widths at 256 tokens (32x32x4 latents, patch 2)
    "cpu": dict(config=dict(depth=12, hidden_size=384, num_heads=6), batch=8, dtype="fp32", device="cpu"),
    "xl": dict(config=dict(depth=28, hidden_size=1152, num_heads=16), batch=32, dtype="bf16", device="cuda"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCHAO = "torchao+fp8"
SETTLE_S = 0.25  # the CPU's pause before each timed call (settle)


def parse_args(argv):
    p = Parser(prog="python bench/latency.py", description=__doc__)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--backends", nargs="+", choices=[*BACKENDS, "triton+fp8", "cpp+fp8", TORCHAO],
                   help="default: every backend that runs on the device (cpu: eager compile cpp onnxruntime); "
                        "triton+fp8 / cpp+fp8: the block GEMMs in FP8 (runtime/fp8.py); torchao+fp8: the peer, "
                        "torchao's float8 inference quantization of the same Linears (CUDA, compute capability 8.9+)")
    p.add_argument("--depths", nargs="+", type=int, help="default: the full depth and its 3/4, 1/2, 1/4")
    p.add_argument("--batch", type=positive(), help="default: the preset's (cpu 8, xl 32)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: the preset's (cpu fp32, xl bf16)")
    p.add_argument("--device", help="default: the preset's (cpu, or cuda for xl)")
    p.add_argument("--warmup", type=positive(), default=3)
    p.add_argument("--repeats", type=positive(), default=10)
    p.add_argument("--no-width", action="store_true", help="skip the width-pruned comparison")
    p.add_argument("--cuda-graphs", action="store_true", help="on CUDA, replay each forward as a CUDA graph")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table per backend at full depth")
    p.add_argument("--json", help="default: bench/results/latency_<preset>.json (CSV and PNG beside it)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.dtype = args.dtype or preset["dtype"]
    args.device = args.device or preset["device"]
    full = preset["config"]["depth"]
    args.depths = sorted(set(args.depths or [full, full * 3 // 4, full // 2, full // 4]), reverse=True)
    bad = [d for d in args.depths if not 1 <= d <= full]
    if bad:
        raise UserError(f"--depths {bad} outside 1..{full} (the {args.preset} preset's source depth)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.backends is None:
        args.backends = ["eager", "compile", "cpp", "onnxruntime"] if args.device == "cpu" else ["eager", "compile"]
    if TORCHAO in args.backends:
        check_torchao(args.device)
    args.json = args.json or os.path.join(ROOT, "bench", "results", f"latency_{args.preset}.json")
    writable_file(args.json)
    return args


def make_config(preset, depth, width_scale=1.0):
    c = dict(PRESETS[preset]["config"], depth=depth)
    step = math.lcm(c["num_heads"], 4)  # head count kept (head dim shrinks); sin-cos positions need D % 4 == 0
    c["hidden_size"] = step * round(c["hidden_size"] * width_scale / step)
    return DiTConfig(patch_size=2, input_size=32, in_channels=4, num_classes=1000, **c)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = DiT(config)
    for p in model.parameters():  # adaLN-Zero starts every block as the identity; random weights do real work
        torch.nn.init.normal_(p, std=0.02)
    return model


def forward_flops(c, batch):
    """Multiply-adds x 2 of GEMMs and attention in one forward (elementwise work not counted)."""
    n = (c.input_size // c.patch_size) ** 2
    d, tokens = c.hidden_size, batch * n
    mlp = int(d * c.mlp_ratio)
    block = 2 * tokens * d * (3 * d + d + 2 * mlp) + 2 * 2 * batch * n * n * d + 2 * batch * d * 6 * d
    out_ch = c.in_channels * (2 if c.learn_sigma else 1)
    edges = 2 * tokens * d * c.patch_size**2 * (c.in_channels + out_ch) + 2 * batch * d * 2 * d
    return c.depth * block + edges


def gemm_runners(tokens, d, mlp, device, dtype):
    """Every GEMM path this machine has at the model's MLP shape, as no-argument calls, and their FLOPs:
    PyTorch's default (MKL on the CPU, cuBLAS on a GPU) and, for fp32 on the CPU, oneDNN with a reordered
    weight (what the cpp backend runs) and onnxruntime's MLAS. The fastest is the denominator of the floor:
    a backend measured against a slower GEMM than the machine has would look better than it is."""
    a = torch.randn(tokens, d, device=device, dtype=dtype)
    w = torch.randn(mlp, d, device=device, dtype=dtype)
    runs = {"torch": lambda: torch.mm(a, w.t())}
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        if torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            runs["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        ort = onnxruntime_matmul(w)
        if ort is not None:
            feed = {"a": a.numpy()}
            runs["onnxruntime"] = lambda: ort.run(None, feed)
    return runs, 2 * tokens * d * mlp


def gemm_paths(runs, flop, device, repeats):
    """GFLOP/s of each GEMM path, measured on its own before any backend (the summary's gemm_paths)."""
    # long warm-up: thread pools spin up
    return {name: flop / median_ms(fn, device, 10, max(repeats, 30)) / 1e6 for name, fn in runs.items()}


def onnxruntime_matmul(w):
    """An onnxruntime session of one MatMul by w.T (None without onnxruntime)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    weight = numpy_helper.from_array(w.t().contiguous().numpy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["out"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", w.shape[1]])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", w.shape[0]])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's threads spin-wait after a run by default, on the cores the call timed next needs (a cpp forward right
    # after an onnxruntime run: 5-7% slower, bench/settle.py); this GEMM's own rate loses nothing by it
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(fn, device, warmup, repeats):
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        return statistics.median(time_once(fn, device) for _ in range(repeats))


def settle(device):
    """On the CPU, a pause before each timed call: the threads of the call before (onnxruntime's spin-wait
    after a run by default, for tens of ms) must not share the cores with the one timed next
    (bench/settle.py measures how long they do)."""
    if not str(device).startswith("cuda"):
        time.sleep(SETTLE_S)


def time_once(fn, device):
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def example_inputs(args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, 32, 32, generator=g).to(args.device, DTYPES[args.dtype])
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    return x, t, y


def prepared_forward(rt, args):
    """A no-argument forward on fixed random inputs (replayed as a CUDA graph with --cuda-graphs)."""
    x, t, y = example_inputs(args)
    fn = lambda: rt(x, t, y)  # noqa: E731
    with torch.no_grad():
        for _ in range(args.warmup):  # warm-up (and compile) before any timing
            fn()
        if args.cuda_graphs and args.device.startswith("cuda"):
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                # the graph reads x, t, y where they were at capture: keep them alive with it
                fn = lambda graph=graph, inputs=(x, t, y): graph.replay()  # noqa: E731
            except RuntimeError as e:  # a backend that cannot be captured is timed without a graph, and says so
                print(f"  {rt.backend}: no CUDA graph ({str(e).splitlines()[0][:120]})", flush=True)
    return fn


def fit_line(depths, ms):
    n = len(depths)
    mx, my = sum(depths) / n, sum(ms) / n
    sxx = sum((d - mx) ** 2 for d in depths)
    b = sum((d - mx) * (m - my) for d, m in zip(depths, ms)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((m - my) ** 2 for m in ms)
    ss_res = sum((m - (a + b * d)) ** 2 for d, m in zip(depths, ms))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def load_backend(model, backend, args):
    """A backend name, or NAME+fp8 for its FP8 block GEMMs, or the torchao peer."""
    if backend == TORCHAO:
        return torchao_fp8(model, args.device)
    name, _, fp8 = backend.partition("+")
    return load(model, name, args.device, "fp8" if fp8 else DTYPES[args.dtype])


def check_torchao(device):
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise UserError(f"{TORCHAO} needs torchao (pip install torchao)") from None
    if not (str(device).startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise UserError(f"{TORCHAO}: torchao's float8 GEMMs need a CUDA GPU of compute capability 8.9 or later "
                        f"(Ada, Hopper), not {device}")


def torchao_fp8(model, device):
    """The FP8 path a user would reach for: torchao's float8 inference quantization (E4M3 weights with
    per-output-channel scales, activations quantized per row on the fly) of the same block Linears as ours,
    on the bf16 eager model, the blocks compiled as torchao advises (its quantize and scale ops fuse there)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from tinyfusion.runtime.fp8 import block_linears

    rt = load(model, "eager", device, torch.bfloat16)
    linears = set(map(id, block_linears(rt.model)))
    quantize_(rt.model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: id(module) in linears)
    for block in rt.model.blocks:
        block.compile()
    rt.backend = TORCHAO
    return rt


def fp8_cosine(rt, args):
    """Accuracy beside speed: the cosine of an FP8 runtime's full-depth forward (the one just timed) to the
    eager forward of the same random model in --dtype, on the timed inputs."""
    model = random_model(make_config(args.preset, args.depths[0]))  # seeded: the weights rt was built from
    inputs = example_inputs(args)
    with torch.no_grad():
        ref = load(model, "eager", args.device, DTYPES[args.dtype])(*inputs).float().flatten()
        out = rt(*inputs).float().flatten()
    return torch.nn.functional.cosine_similarity(out, ref, dim=0).item()


def measure_backend(args, backend, gemms):
    """Median latency of every model (each depth, and the width-pruned one) of one backend, and of each GEMM
    path (`gemms`, keyed ("gemm", name)). Its cases are timed in interleaved rounds, one forward each per
    round, so drift in a shared machine's load hits every depth alike (the fit and the half-depth speed-up
    compare those) and hits the floor's GEMM as it hits the forwards (each GEMM timed warm: run once
    untimed just before); a backend's results are written before the next backend starts, so a run cut off
    by a time limit keeps every backend it finished."""
    full = PRESETS[args.preset]["config"]["depth"]
    configs = [(d, make_config(args.preset, d)) for d in args.depths]
    if not args.no_width and args.depths[0] == full:
        configs.append(("width", make_config(args.preset, full, 1 / math.sqrt(2))))
    cases = {}
    for key, config in configs:
        rt = load_backend(random_model(config), backend, args)
        cases[backend, key] = (rt, prepared_forward(rt, args))
        print(f"  ready: {backend} {'width-pruned' if key == 'width' else f'depth {key}'}", flush=True)
    times = {case: [] for case in [*cases, *(("gemm", name) for name in gemms)]}
    with torch.no_grad():
        for _ in range(args.repeats):
            for case, (_, fn) in cases.items():
                settle(args.device)
                times[case].append(time_once(fn, args.device))
            for name, fn in gemms.items():
                settle(args.device)
                fn()
                times["gemm", name].append(time_once(fn, args.device))
    return {case: statistics.median(ts) for case, ts in times.items()}, {case: rt for case, (rt, _) in cases.items()}


def backend_result(backend, args, gemm_flop, medians, runtimes):
    ms = [medians[backend, d] for d in args.depths]
    # one depth has no line: the fit is null in the JSON (not a bare NaN, which JSON does not have)
    a, b, r2 = fit_line(args.depths, ms) if len(ms) > 1 else (None,) * 3
    result = {"backend": backend, "depths": args.depths, "median_ms": ms, "fit": {"a": a, "b": b, "r2": r2}}
    top = args.depths[0]
    if top % 2 == 0 and top // 2 in args.depths:
        result["half_depth_speedup"] = medians[backend, top] / medians[backend, top // 2]
        result["ideal_half_depth_speedup"] = (a + b * top) / (a + b * top / 2)
    # the floor: the fastest GEMM path, timed in this backend's own rounds
    result["gemm_gflops"] = {name: gemm_flop / ms / 1e6 for (kind, name), ms in medians.items() if kind == "gemm"}
    floor_ms = forward_flops(make_config(args.preset, top), args.batch) / max(result["gemm_gflops"].values()) / 1e6
    result["floor_ms"] = floor_ms
    result["floor_fraction"] = floor_ms / medians[backend, top]
    if (backend, "width") in medians:
        rt = runtimes[backend, "width"]
        result["width_pruned"] = {"hidden_size": rt.config.hidden_size, "depth": rt.config.depth,
                                  "median_ms": medians[backend, "width"],
                                  "params_m": sum(p.numel() for p in rt.parameters()) / 1e6,
                                  "speedup": medians[backend, top] / medians[backend, "width"]}
    if backend.endswith("+fp8"):
        result["cosine_to_eager"] = fp8_cosine(runtimes[backend, top], args)
    if args.profile and backend not in ("onnxruntime", "tensorrt"):  # torch.profiler cannot see inside an engine
        result["profile"] = profile(backend, args, top)
    return result


def profile(backend, args, depth):
    """Where the time goes: the top operators of a few full-depth forwards, as a text table beside the JSON."""
    rt = load_backend(random_model(make_config(args.preset, depth)), backend, args)
    prepared_forward(rt, args)  # warm (and compile) before profiling
    x = torch.randn(args.batch, 4, 32, 32).to(args.device, DTYPES[args.dtype])
    t = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    with torch.no_grad(), torch.profiler.profile() as prof:
        for _ in range(3):
            rt(x, t, t)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    path = os.path.splitext(args.json)[0] + f"_profile_{backend}.txt"
    atomic_write(path, lambda tmp: open(tmp, "w").write(table))
    return os.path.relpath(path, os.path.dirname(args.json))


def machine(args):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        desc = f"{torch.cuda.get_device_name()}; host {desc}"
    return desc


def write_outputs(summary, args):
    base = os.path.splitext(args.json)[0]
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["backend", "depth", "hidden_size", "median_ms"])
            for r in summary["results"]:
                for d, m in zip(r["depths"], r["median_ms"]):
                    w.writerow([r["backend"], d, PRESETS[args.preset]["config"]["hidden_size"], f"{m:.3f}"])
                if "width_pruned" in r:
                    wp = r["width_pruned"]
                    w.writerow([r["backend"], wp["depth"], wp["hidden_size"], f"{wp['median_ms']:.3f}"])

    atomic_write(base + ".csv", write_csv)
    plot(summary, base + ".png")


def plot(summary, path):
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the JSON and CSV are the results, the plot is a convenience
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["results"]:
        fit = r["fit"] if r["fit"]["r2"] is not None else None
        label = f"{r['backend']} (R² {fit['r2']:.3f})" if fit else r["backend"]
        line = ax.plot(r["depths"], r["median_ms"], "o", label=label)[0]
        if fit:
            xs = [0, max(r["depths"])]
            ax.plot(xs, [fit["a"] + fit["b"] * x for x in xs], "-", color=line.get_color(), alpha=0.5)
        if "width_pruned" in r:
            wp = r["width_pruned"]
            ax.plot([wp["depth"]], [wp["median_ms"]], "x", ms=9, color=line.get_color())
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("median forward latency (ms)")
    ax.set_title(f"{summary['preset']}: batch {summary['batch']}, {summary['dtype']} ({summary['device']}); "
                 "x = width-pruned", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def table(summary):
    lines = ["| backend | " + " | ".join(f"L={d} ms" for d in summary["results"][0]["depths"]) +
             " | R² | half-depth speedup (ideal) | FLOP floor reached | width-pruned speedup | cosine to eager |",
             "|---" * (len(summary["results"][0]["depths"]) + 6) + "|"]
    for r in summary["results"]:
        half = (f"{r['half_depth_speedup']:.2f}x ({r['ideal_half_depth_speedup']:.2f}x)"
                if "half_depth_speedup" in r else "-")
        width = f"{r['width_pruned']['speedup']:.2f}x" if "width_pruned" in r else "-"
        r2 = "-" if r["fit"]["r2"] is None else f"{r['fit']['r2']:.4f}"
        cosine = f"{r['cosine_to_eager']:.5f}" if "cosine_to_eager" in r else "-"
        lines.append(f"| {r['backend']} | " + " | ".join(f"{m:.1f}" for m in r["median_ms"]) +
                     f" | {r2} | {half} | {r['floor_fraction']:.0%} | {width} | {cosine} |")
    return "\n".join(lines)


@cli
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    top = make_config(args.preset, args.depths[0])
    tokens = args.batch * (top.input_size // top.patch_size) ** 2
    gemms, gemm_flop = gemm_runners(tokens, top.hidden_size, int(top.hidden_size * top.mlp_ratio), args.device,
                                    DTYPES[args.dtype])
    paths = gemm_paths(gemms, gemm_flop, args.device, args.repeats)
    gflops = max(paths.values())
    print(f"GEMM rate ({tokens}x{top.hidden_size} @ {top.hidden_size}x{int(top.hidden_size * top.mlp_ratio)}, "
          f"{args.dtype}): " + ", ".join(f"{k} {v:.1f}" for k, v in paths.items()) +
          f" GFLOP/s; each backend's floor uses the fastest path timed again in its own rounds", flush=True)
    summary = {"preset": args.preset, "machine": machine(args), "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "batch": args.batch, "dtype": args.dtype, "device": args.device, "tokens": 256,
               "hidden_size": top.hidden_size, "gemm_gflops": gflops, "gemm_paths": paths, "results": [],
               "backends_left": list(args.backends)}
    for backend in args.backends:
        medians, runtimes = measure_backend(args, backend, gemms)
        summary["results"].append(backend_result(backend, args, gemm_flop, medians, runtimes))
        summary["backends_left"].remove(backend)
        summary["wall_s"] = time.time() - t0
        write_outputs(summary, args)  # after every backend: a cut-off run keeps what it finished
        del medians, runtimes
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
