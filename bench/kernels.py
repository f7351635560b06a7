"""Each fused Triton kernel against eager PyTorch and torch.compile at DiT-XL/2 shapes, on CUDA.

Reports the measured ceilings first (device-to-device copy bandwidth, bf16 GEMM rate), then per kernel
and batch: median time (triton.testing.do_bench) and the bandwidth it achieves over the bytes the
operation must move (attention: TFLOP/s over its FLOPs). The "-> E4M3" rows time each kernel writing an FP8
GEMM's input itself against the plain kernel followed by a quantizer: whether fusing the quantization pays.

  python bench/kernels.py --json OUT.json [--batches 32 64 128 256] [--dtype bf16] [--attention-sweep]
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tinyfusion.checkpoint import atomic_write  # noqa: E402
from tinyfusion.errors import Parser, UserError, cli, positive  # noqa: E402

D, N, HEADS, MLP = 1152, 256, 16, 4608  # DiT-XL/2 at 256 tokens


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings(dtype):
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a, b = torch.randn(8192, 8192, device="cuda", dtype=dtype), torch.randn(8192, 8192, device="cuda", dtype=dtype)
    gemm_ms = bench(lambda: a @ b)
    return {"copy_gb_s": 2 * x.numel() / copy_ms / 1e6, "gemm_tflops": 2 * 8192**3 / gemm_ms / 1e9}


def cases(batch, dtype, device="cuda", tokens=N):
    """{kernel: (bytes moved, or -FLOPs for attention; {impl: no-argument call})} at DiT-XL/2's width (the
    tests call it on the CPU, in Triton's interpreter, with a few tokens)."""
    from tinyfusion.kernels import ops
    from tinyfusion.runtime.fp8 import quantize

    x = torch.randn(batch, tokens, D, device=device, dtype=dtype)
    br = torch.randn_like(x)
    mods = torch.randn(batch, 4 * D, device=device, dtype=dtype) * 0.1
    gate, shift, scale, bias = mods[:, :D], mods[:, D:2 * D], mods[:, 2 * D:3 * D], mods[0, 3 * D:]
    h = torch.randn(batch * tokens, MLP, device=device, dtype=dtype)
    fc1_bias = torch.randn(MLP, device=device, dtype=dtype)
    qkv = torch.randn(batch, tokens, 3, HEADS, D // HEADS, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    el = x.element_size()

    def eager_ln_mod(x, shift, scale):
        return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def eager_res(x, br, bias, gate, shift, scale):
        x = x + gate[:, None] * (br + bias)
        return x, eager_ln_mod(x, shift, scale)

    def eager_gelu(h, b):
        return F.gelu(h + b, approximate="tanh")

    ln_c, res_c, gelu_c, quantize_c = (torch.compile(f) for f in (eager_ln_mod, eager_res, eager_gelu, quantize))
    return {
        "adaln (LN + modulate)": (2 * x.numel() * el, {
            "eager": lambda: eager_ln_mod(x, shift, scale), "compile": lambda: ln_c(x, shift, scale),
            "triton": lambda: ops.ln_modulate(x, shift, scale)}),
        "gate + residual + adaln": (4 * x.numel() * el, {
            "eager": lambda: eager_res(x, br, bias, gate, shift, scale),
            "compile": lambda: res_c(x, br, bias, gate, shift, scale),
            "triton": lambda: ops.residual_ln_modulate_(x, br, bias, gate, shift, scale, 1e-6)}),
        "bias + GELU": (2 * h.numel() * el, {
            "eager": lambda: eager_gelu(h, fc1_bias), "compile": lambda: gelu_c(h, fc1_bias),
            "triton": lambda: ops.bias_gelu_(h, fc1_bias)}),
        # FP8 GEMM inputs: each kernel writing E4M3 rows itself against the plain kernel then a quantizer
        "adaln -> E4M3": ((el + 1) * x.numel(), {
            "then torch quantize": lambda: quantize(ops.ln_modulate(x, shift, scale).view(-1, D), -1),
            "then quantize_rows": lambda: ops.quantize_rows(ops.ln_modulate(x, shift, scale)),
            "triton": lambda: ops.ln_modulate_e4m3(x, shift, scale, 1e-6)}),
        "gate + residual + adaln -> E4M3": ((3 * el + 1) * x.numel(), {
            "then quantize_rows": lambda: (ops.residual_ln_modulate_(x, br, bias, gate, shift, scale, 1e-6),
                                           ops.quantize_rows(br)),
            "triton": lambda: ops.residual_ln_modulate_e4m3_(x, br, bias, gate, shift, scale, 1e-6)}),
        "bias + GELU -> E4M3": ((el + 1) * h.numel(), {
            "then torch quantize": lambda: (ops.bias_gelu_(h, fc1_bias), quantize(h, -1)),
            "then quantize_rows": lambda: (ops.bias_gelu_(h, fc1_bias), ops.quantize_rows(h)),
            "triton": lambda: ops.bias_gelu_e4m3(h, fc1_bias)}),
        "quantize rows (E4M3)": ((el + 1) * x.numel(), {
            "eager": lambda: quantize(x.view(-1, D), -1), "compile": lambda: quantize_c(x.view(-1, D), -1),
            "triton": lambda: ops.quantize_rows(x)}),
        "attention (TFLOP/s)": (-4 * batch * HEADS * tokens * tokens * (D // HEADS), {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "triton": lambda: ops.flash_attention(q, k, v)}),
    }


# (BLOCK_M, BLOCK_N, num_warps, num_stages): the shipped tile first, then larger ones Hopper may prefer
ATTENTION_TILES = [(64, 64, 4, None), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
                   (64, 32, 4, 3), (128, 128, 8, 2)]


def attention_sweep(batch, dtype):
    """Our flash-attention kernel per tile (time, TFLOP/s, max error against fp32 SDPA) beside SDPA."""
    from tinyfusion.kernels import ops

    qkv = torch.randn(batch, N, 3, HEADS, D // HEADS, device="cuda", dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    flops = 4 * batch * HEADS * N * N * (D // HEADS)
    rows = [{"impl": "sdpa", "ms": bench(lambda: F.scaled_dot_product_attention(q, k, v))}]
    for bm, bn, warps, stages in ATTENTION_TILES:
        row = {"impl": "triton", "block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
        try:
            got = ops.launch_flash_attention(q, k, v, bm, bn, warps, stages)
            row["max_err"] = (got.float() - want).abs().max().item()
            row["ms"] = bench(lambda: ops.launch_flash_attention(q, k, v, bm, bn, warps, stages))
        except Exception as e:  # a tile that does not fit (shared memory) is reported, not fatal
            row["error"] = str(e).splitlines()[0][:160]
        rows.append(row)
    for row in rows:
        if "ms" in row:
            row["tflops"] = flops / row["ms"] / 1e9
        print("attention sweep: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()), flush=True)
    return rows


def adaln_sweep(batches, dtype):
    """The two forward adaLN kernels at each (rows per program, warps) launch, as fractions of copy bandwidth
    (the issue's goal: 80%), via TINYFUSION_ADALN_ROWS / _WARPS; the best launch per batch is what
    kernels/ops.py's row_launch should choose."""
    from tinyfusion.kernels import ops

    rows = []
    for batch in batches:
        x = torch.randn(batch, N, D, device="cuda", dtype=dtype)
        br = torch.randn_like(x)
        mods = torch.randn(batch, 3 * D, device="cuda", dtype=dtype) * 0.1
        gate, shift, scale = mods[:, :D], mods[:, D:2 * D], mods[:, 2 * D:]
        for r in (1, 2, 4, 8):
            for warps in (4, 8):
                os.environ["TINYFUSION_ADALN_ROWS"], os.environ["TINYFUSION_ADALN_WARPS"] = str(r), str(warps)
                row = {"batch": batch, "rows": r, "num_warps": warps}
                with torch.no_grad():
                    row["ln_modulate_gb_s"] = 2 * x.numel() * x.element_size() / bench(lambda: ops.ln_modulate(x, shift, scale)) / 1e6
                    row["residual_gb_s"] = 4 * x.numel() * x.element_size() / bench(
                        lambda: ops.residual_ln_modulate_(x, br, None, gate, shift, scale, 1e-6)) / 1e6
                rows.append(row)
        os.environ.pop("TINYFUSION_ADALN_ROWS"), os.environ.pop("TINYFUSION_ADALN_WARPS")
    return rows


@cli
def main(argv=None):
    p = Parser(prog="python bench/kernels.py", description=__doc__)
    p.add_argument("--batches", type=positive(), nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--attention-sweep", action="store_true",
                   help="then time our flash-attention kernel over several tile sizes (at the first batch)")
    p.add_argument("--adaln-sweep", action="store_true",
                   help="then time the adaLN kernels at every rows-per-program and warp count (each batch)")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "kernels.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("bench/kernels.py needs an NVIDIA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "ceilings": ceilings(dtype), "kernels": []}
    print(f"copy {result['ceilings']['copy_gb_s']:.0f} GB/s, GEMM {result['ceilings']['gemm_tflops']:.0f} TFLOP/s")

    def save():  # after every batch, so a run cut off by a timeout still leaves what it measured
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1)))

    for batch in args.batches:
        for name, (size, impls) in cases(batch, dtype).items():
            row = {"kernel": name, "batch": batch}
            for impl, fn in impls.items():
                ms = bench(fn)
                rate = (-size / ms / 1e9) if size < 0 else size / ms / 1e6  # TFLOP/s or GB/s
                row[impl] = {"ms": ms, "rate": rate}
            if size > 0:
                row["triton_of_copy_bandwidth"] = row["triton"]["rate"] / result["ceilings"]["copy_gb_s"]
            result["kernels"].append(row)
            print(f"{name:<26} batch {batch:>3}: " + "  ".join(f"{k} {v['ms']:.3f} ms ({v['rate']:.0f})"
                  for k, v in row.items() if isinstance(v, dict)), flush=True)
        save()
    if args.adaln_sweep:
        result["adaln_sweep"] = adaln_sweep(args.batches, dtype)
        copy = result["ceilings"]["copy_gb_s"]
        for r in result["adaln_sweep"]:
            r["ln_modulate_of_copy"], r["residual_of_copy"] = r["ln_modulate_gb_s"] / copy, r["residual_gb_s"] / copy
        save()
    if args.attention_sweep:  # last, so the per-kernel table above is written whatever happens here
        result["attention_sweep"] = attention_sweep(args.batches[0], dtype)
        save()


if __name__ == "__main__":
    main()
