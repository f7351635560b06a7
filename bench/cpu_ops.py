"""The cpp backend's attention and GEMM choices against the PyTorch calls they replace, on the CPU.

At the shapes of the latency benchmark's `cpu` preset (DiT-S/2 width: hidden 384, 6 heads, 256 tokens,
batch 8, depth 12), each case's implementations are timed in interleaved rounds (one call each per round,
so a shared machine's drift hits them alike; freed memory kept in the heap, as runtime.load keeps it on the
CPU), with the rate each reaches over the case's FLOPs:

  attention  the C++ op (oneDNN's BRGEMM micro-kernel per head) | PyTorch's CPU SDPA, on the qkv views
  adaln      the one adaLN GEMM of all blocks (batch rows): oneDNN, weight reordered once | torch.addmm
  fc1        the MLP's first GEMM with bias and tanh-GELU: oneDNN with GELU as post-op | oneDNN + the C++
             bias_gelu_ pass | torch.mm + bias_gelu_
  fc1 GEMM   the same GEMM with its bias and no GELU, through oneDNN: what the GELU epilogue costs
  forward    the whole forward of the cpp backend (random DiT of --depth blocks) | the same with PyTorch's
             SDPA for attention (FLOPs as bench/latency.py counts them)

  python bench/cpu_ops.py [--json bench/results/cpu_ops.json] [--repeats 30]
"""
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from latency import forward_flops, random_model, time_once  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, cli, positive, writable_file  # noqa: E402
from tinyfusion.models.dit import DiTConfig  # noqa: E402
from tinyfusion.runtime import cpu_ops, load  # noqa: E402
from tinyfusion.runtime.fused import FusedForward, sdpa  # noqa: E402
from tinyfusion.runtime.heap import keep_freed_memory  # noqa: E402


def parse_args(argv):
    p = Parser(prog="python bench/cpu_ops.py", description=__doc__)
    p.add_argument("--batch", type=positive(), default=8)
    p.add_argument("--tokens", type=positive(), default=256)
    p.add_argument("--hidden", type=positive(), default=384)
    p.add_argument("--heads", type=positive(), default=6)
    p.add_argument("--depth", type=positive(), default=12, help="blocks whose adaLN projections form the one GEMM")
    p.add_argument("--warmup", type=positive(), default=5)
    p.add_argument("--repeats", type=positive(), default=30)
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "cpu_ops.json"))
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.hidden % 4:
        p.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads} and of 4 (sin-cos positions)")
    if math.isqrt(args.tokens) ** 2 != args.tokens:
        p.error(f"--tokens {args.tokens} is not a square: the forward's tokens are a grid of 2x2 latent patches")
    writable_file(args.json)
    return args


def cases(args):
    """{case: (FLOPs, {implementation: no-argument call})}."""
    ops = cpu_ops.require()
    B, N, D, H = args.batch, args.tokens, args.hidden, args.heads
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B * N, 3 * D, generator=g)
    q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
    reorder, onednn = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise

    c = torch.randn(B, D, generator=g)
    ada_w = torch.randn(args.depth * 6 * D + 2 * D, D, generator=g) * 0.05
    ada_b = torch.randn(ada_w.shape[0], generator=g)
    ada_packed = reorder(ada_w, None)

    x = torch.randn(B * N, D, generator=g)
    w1 = torch.randn(4 * D, D, generator=g) * 0.05
    b1 = torch.randn(4 * D, generator=g)
    w1_packed = reorder(w1, None)

    def onednn_then_gelu():
        h = onednn(x, w1_packed, None, "none", [], "")
        ops.bias_gelu_(h, b1)
        return h

    def addmm_then_gelu():
        h = torch.mm(x, w1.t())
        ops.bias_gelu_(h, b1)
        return h

    config = DiTConfig(depth=args.depth, hidden_size=D, num_heads=H, patch_size=2, input_size=2 * math.isqrt(N))
    model = random_model(config).eval()
    cpp = load(model, backend="cpp")
    with_sdpa = FusedForward(cpp.model, ops, sdpa, onednn=True)
    latents = torch.randn(B, 4, config.input_size, config.input_size, generator=g)
    steps, labels = torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 1000, (B,), generator=g)

    return {
        "attention": (4 * B * N * N * D, {
            "cpp attention": lambda: ops.attention(q, k, v),
            "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2),
        }),
        "adaln": (2 * B * D * ada_w.shape[0], {
            "oneDNN": lambda: onednn(c, ada_packed, ada_b, "none", [], ""),
            "torch addmm": lambda: torch.addmm(ada_b, c, ada_w.t()),
        }),
        "fc1": (2 * B * N * D * 4 * D, {
            "oneDNN + GELU post-op": lambda: onednn(x, w1_packed, b1, "gelu", [], "tanh"),
            "oneDNN, then bias_gelu_": onednn_then_gelu,
            "torch mm, then bias_gelu_": addmm_then_gelu,
        }),
        "fc1 GEMM": (2 * B * N * D * 4 * D, {
            "oneDNN, bias, no GELU": lambda: onednn(x, w1_packed, b1, "none", [], ""),
        }),
        "forward": (forward_flops(config, B), {
            "cpp backend": lambda: cpp(latents, steps, labels),
            "cpp with torch SDPA": lambda: with_sdpa(latents, steps, labels),
        }),
    }


def check_agreement(all_cases):
    """Every implementation of a case computes the same thing (else its speed would mean nothing)."""
    for name, (_, impls) in all_cases.items():
        outs = [fn() for fn in impls.values()]
        for other in outs[1:]:
            torch.testing.assert_close(other, outs[0], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def measure(all_cases, warmup, repeats):
    calls = [(case, impl, fn) for case, (_, impls) in all_cases.items() for impl, fn in impls.items()]
    times = {(case, impl): [] for case, impl, _ in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for _, _, fn in calls:
                fn()
        for _ in range(repeats):
            for case, impl, fn in calls:
                times[case, impl].append(time_once(fn, "cpu"))
    return {key: statistics.median(ts) for key, ts in times.items()}


@cli
def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # as the runtime runs: outputs reuse freed pages instead of faulting fresh ones in
    all_cases = cases(args)
    check_agreement(all_cases)
    medians = measure(all_cases, args.warmup, args.repeats)
    rows = []
    for case, (flop, impls) in all_cases.items():
        first = next(iter(impls))
        for impl in impls:
            ms = medians[case, impl]
            rows.append({"case": case, "implementation": impl, "median_ms": ms, "gflops": flop / ms / 1e6,
                         "speedup_of_first": ms / medians[case, first]})
    summary = {"command": "python bench/cpu_ops.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "isa": cpu_ops.isa(), "batch": args.batch, "tokens": args.tokens, "hidden": args.hidden,
               "heads": args.heads, "depth": args.depth, "rows": rows}
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    print("| case | implementation | median ms | GFLOP/s | the first row's speed-up over it |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['implementation']} | {r['median_ms']:.2f} | {r['gflops']:.0f} | "
              f"{r['speedup_of_first']:.2f}x |")
    return summary


if __name__ == "__main__":
    main()
