"""ONNX export of a DiT (dynamic batch) and the onnxruntime backend.

The graph's inputs are x (B, C, H, W) float32, t (B,) float32 timesteps, y (B,) int64 labels, and with
`cfg=True` a cfg_scale (1,) float32: the CFG graph takes the conditional half only, adds the null-label
half inside and returns the guided output (B, out_channels, H, W), so one graph serves any scale.
`precision="fp16"|"bf16"` casts attention and MLP weights (the GEMMs) and keeps LayerNorm, adaLN
modulation, gates, the residual stream, embedders and the final layer in fp32, with explicit casts in
the graph: the known fp16 overflow of DiT engines, and what a strongly typed TensorRT build needs.
"""
import copy
import logging
import os
import tempfile
import warnings

import torch
from torch import nn

from ..errors import UserError, positive
from ..models.dit import DiT
from .onnx_common import DEFAULT_THRESHOLDS, check_parity, compare, graph_sha256, ort_session, write_parity  # noqa: F401

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPSETS = (18, 19, 20)  # LayerNormalization is one node; decomposed attention; ORT CPU and TensorRT 10.x read them


class ExportedDiT(nn.Module):
    """The forward that goes into the graph: plain, or conditional-half-in CFG."""

    def __init__(self, model, cfg=False, guidance_channels=None):
        super().__init__()
        self.model, self.cfg, self.guidance_channels = model, cfg, guidance_channels

    def forward(self, x, t, y, cfg_scale=None):
        if not self.cfg:
            return self.model(x, t, y)
        # DiT.forward_with_cfg's first half, written with the symbolic batch b (chunk() would pin it to 2)
        b, n = x.shape[0], self.guidance_channels or self.model.in_channels
        null = torch.full_like(y, self.model.config.num_classes)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:b], out[b:]
        return torch.cat([uncond[:, :n] + cfg_scale * (cond[:, :n] - uncond[:, :n]), cond[:, n:]], dim=1)


def with_precision(model, precision):
    """A copy whose attention and MLP run in `precision`; everything else stays fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    model = copy.deepcopy(model).float().cpu().eval()
    for block in model.blocks:
        block.attn.to(PRECISIONS[precision])
        block.mlp.to(PRECISIONS[precision])
    return model


def example_inputs(config, batch, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return (x, t, y, torch.tensor([1.5])) if cfg else (x, t, y)


def input_names(cfg):
    return ["x", "t", "y", "cfg_scale"] if cfg else ["x", "t", "y"]


def export_onnx(model, path, opset=18, precision="fp32", cfg=False, guidance_channels=None, batch=2,
                external_data=None):
    """Write `path` (atomically) and re-check the saved graph's inputs: batch dynamic, the rest static.
    Weights go to `path`.data beside it when the graph would pass protobuf's 2 GiB (or `external_data`)."""
    if opset not in OPSETS:
        raise UserError(f"opset {opset} is not supported; choose from {', '.join(map(str, OPSETS))}")
    if batch < 2:
        raise UserError("export with an example batch of at least 2 (torch.export specialises sizes 0 and 1)")
    module = ExportedDiT(with_precision(model, precision), cfg, guidance_channels).eval()
    inputs = example_inputs(model.config, batch, cfg)
    b = torch.export.Dim("batch", min=1, max=4096)
    shapes = {"x": {0: b}, "t": {0: b}, "y": {0: b}, "cfg_scale": None} if cfg else {"x": {0: b}, "t": {0: b}, "y": {0: b}}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" is not ours to print
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    input_names=input_names(cfg), output_names=["out"], verbose=False)
    # Saved under its final file name in a private folder, then moved: the graph records its weights file
    # by name, so saving to a temporary name would leave it pointing at that name after the rename.
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        program.save(staged, external_data=external_data)
        for name in sorted(os.listdir(tmp), key=lambda n: n == os.path.basename(path)):  # the graph last
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    check_input_shapes(path, model.config, cfg)
    return path


def check_input_shapes(path, config, cfg):
    """The saved graph must take any batch (a symbolic first dimension) and exactly the model's other sizes."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    want = {"x": [config.in_channels, config.input_size, config.input_size], "t": [], "y": [], "cfg_scale": None}
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "cfg_scale":
            continue
        if not dims or not dims[0].dim_param or dims[0].dim_value:
            raise UserError(f"{path}: input {inp.name} has a fixed batch dimension; the export specialised it")
        rest = [d.dim_value for d in dims[1:]]
        if rest != want[inp.name]:
            raise UserError(f"{path}: input {inp.name} has sizes {rest} after the batch, expected {want[inp.name]}")
    return True


class OnnxRuntimeForward:
    """(x, t, y) -> out through an ORT CPU session over a plain (non-CFG) graph."""

    def __init__(self, path, threads=None):
        self.session = ort_session(path, threads)

    def __call__(self, x, t, y):
        feeds = {"x": x.detach().float().cpu().numpy(), "t": t.detach().float().cpu().numpy(),
                 "y": y.detach().long().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def onnxruntime_parity(model, path, batches=(2, 5), cfg=False, guidance_channels=None):
    """Run the graph in onnxruntime (CPU) at each batch size and compare with the fp32 PyTorch model."""
    session = ort_session(path)
    reference = ExportedDiT(model.float().eval(), cfg, guidance_channels)
    report = {}
    for batch in batches:
        inputs = example_inputs(model.config, batch, cfg, seed=batch)
        with torch.no_grad():
            want = reference(*inputs).numpy()
        feeds = {name: v.numpy() for name, v in zip(input_names(cfg), inputs)}
        got = session.run(None, feeds)[0]
        if got.shape != want.shape:
            raise UserError(f"onnxruntime returned {got.shape} at batch {batch}, PyTorch {want.shape}")
        report[f"batch{batch}"] = compare(got, want)
    return report


def export_and_verify(model, out_dir, opset=18, precision="fp32", cfg=False, guidance_channels=None, batch=2,
                      parity_batches=(2, 5), thresholds=None, log=print):
    """DIR/model.onnx and DIR/parity.json (onnxruntime against PyTorch). Returns the parity report; when an
    entry exceeds its threshold, renames the graph to model.onnx.rejected and raises a UserError naming it."""
    thresholds = thresholds or DEFAULT_THRESHOLDS[precision]
    path = os.path.join(out_dir, "model.onnx")
    os.makedirs(out_dir, exist_ok=True)
    log(f"exporting {model.config.depth}-layer DiT to {path} (opset {opset}, {precision}, cfg {cfg})")
    export_onnx(model, path, opset, precision, cfg, guidance_channels, batch)
    report = {"onnx": os.path.basename(path), "sha256": graph_sha256(path), "opset": opset, "precision": precision,
              "cfg": cfg, "guidance_channels": guidance_channels or "all", "export_batch": batch,
              "thresholds": dict(zip(("max_abs", "mean_abs", "min_cosine"), thresholds)), "parity": {}}
    try:
        report["parity"]["onnxruntime"] = onnxruntime_parity(model, path, parity_batches, cfg, guidance_channels)
    except UserError as e:  # ORT's CPU provider has no bf16 MatMul: record it, TensorRT checks that graph
        if precision == "fp32":
            raise
        report["parity"]["onnxruntime"] = {"skipped": str(e)}
    write_parity(out_dir, report)
    bad = check_parity(report["parity"], thresholds)
    if bad:  # nothing downstream may take the graph for a verified one; it stays for inspection
        os.replace(path, path + ".rejected")
        raise UserError(f"parity above the thresholds ({'; '.join(bad)}); the graph is kept as "
                        f"{path}.rejected, see {out_dir}/parity.json")
    return report


# The flags and the ONNX stage shared by export/onnx.py and export/trt.py.
def add_export_args(p):
    p.add_argument("--ckpt", help="checkpoint: teacher, pruned or recovered (any format tinyfusion.load reads)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cfg", action="store_true", help="export the classifier-free-guidance forward "
                   "(inputs x, t, y of the conditional half and cfg_scale)")
    p.add_argument("--guidance-channels", choices=["all", "3"], default="all")
    p.add_argument("--opset", type=int, choices=OPSETS, default=18)
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--export-batch", type=positive(), default=2, help="example batch for the export (>= 2)")
    p.add_argument("--parity-batches", type=positive(), nargs="+", default=[2, 5])
    for name, i in (("max-abs", 0), ("mean-abs", 1), ("min-cosine", 2)):
        p.add_argument(f"--{name}", type=float, help="parity threshold (default by precision: " +
                       ", ".join(f"{k} {v[i]:g}" for k, v in DEFAULT_THRESHOLDS.items()) + ")")


def thresholds(args):
    default = DEFAULT_THRESHOLDS[args.precision]
    given = (args.max_abs, args.mean_abs, args.min_cosine)
    return tuple(d if g is None else g for g, d in zip(given, default))


def load_model(args, dit_only=False):
    from ..checkpoint import load
    from ..errors import writable_file

    if not args.ckpt:
        raise UserError("--ckpt is required")
    writable_file(os.path.join(args.out, "parity.json"))
    model = load(args.ckpt)
    if dit_only and not isinstance(model, DiT):
        raise UserError(f"{args.ckpt} is a {type(model).__name__}: the TensorRT path covers DiT and SiT "
                        "(a MAR's graphs run in onnxruntime: export/onnx.py)")
    return model


def export_from_args(args, dit_only=False):
    """The ONNX stage of export/onnx.py and export/trt.py: load, export, verify, print the parity."""
    model = load_model(args, dit_only)
    if type(model).__name__ == "MAR":
        return export_mar_from_args(args, model)
    report = export_and_verify(model, args.out, args.opset, args.precision, args.cfg,
                               None if args.guidance_channels == "all" else 3, args.export_batch,
                               args.parity_batches, thresholds(args))
    for batch, m in report["parity"]["onnxruntime"].items():
        print(f"onnxruntime {batch}: " + (m if isinstance(m, str) else
              f"max_abs {m['max_abs']:.2e}  mean_abs {m['mean_abs']:.2e}  cosine {m['cosine']:.8f}"))
    return report


def export_mar_from_args(args, model):
    from .onnx_mar import export_mar_and_verify

    if args.cfg or args.precision != "fp32":
        raise UserError("a MAR exports fp32 graphs without --cfg (its sampler applies guidance around them)")
    report = export_mar_and_verify(model, args.out, args.opset, thresholds(args))
    for name, m in report["parity"]["onnxruntime"].items():
        print(f"onnxruntime {name}: max_abs {m['max_abs']:.2e}  mean_abs {m['mean_abs']:.2e}  cosine {m['cosine']:.8f}")
    return report
