"""Build a TensorRT engine for a tinyfusion/DiT checkpoint (or an ONNX graph) and check its parity.

  python export/trt.py --ckpt runs/demo/recover/recovered.safetensors --out runs/trt --batch 1:8:64
  python export/trt.py --onnx runs/trt/model.onnx --ckpt P --out runs/trt      # skip the export

First the ONNX stage of export/onnx.py (DIR/model.onnx, verified in onnxruntime, DIR/parity.json), then
a strongly typed engine (precision comes from the graph's casts) with an optimization profile over the
batch (--batch MIN:OPT:MAX), a timing cache reused across builds, and an engine cache keyed by the
graph's hash, the profile, the precision, the TensorRT version and the GPU name, so a changed shape or a
new GPU never loads a stale engine. The engine is run on random inputs against PyTorch and its parity
is added to parity.json. Without `tensorrt` or without a GPU the ONNX is still written and verified,
then the tool exits with status 3 and prints the command to run on a GPU machine.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # not export/: export/onnx.py would shadow the onnx package

import torch  # noqa: E402

from tinyfusion.errors import Parser, UserError, cli  # noqa: E402

NO_TRT_EXIT = 3


def validate_onnx(path):
    """A corrupt or truncated file, or one without a dynamic batch, is a one-line error."""
    import onnx

    if not os.path.isfile(path):
        raise UserError(f"--onnx {path}: no such file")
    try:  # by path, and without the weights: a graph over 2 GiB (the fp32 XL teacher) is past protobuf's limit
        onnx.checker.check_model(path)
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise UserError(f"--onnx {path} is not a valid ONNX model ({str(e).splitlines()[0][:200]})") from None
    shapes = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "cfg_scale":
            shapes[inp.name] = None
            continue
        if not dims or not dims[0].dim_param:
            raise UserError(f"--onnx {path}: input {inp.name} has no dynamic batch dimension")
        shapes[inp.name] = tuple(d.dim_value for d in dims[1:])
    if set(shapes) - {"cfg_scale"} != {"x", "t", "y"}:
        raise UserError(f"--onnx {path}: inputs {sorted(shapes)} are not a tinyfusion DiT graph's (x, t, y)")
    return shapes


@cli
def main(argv=None):
    from tinyfusion.runtime import tensorrt as rt_trt
    from tinyfusion.runtime.onnx_export import (ExportedDiT, add_export_args, check_parity, compare, example_inputs,
                                                export_from_args, load_model, thresholds, write_parity)

    p = Parser(prog="python export/trt.py", description=__doc__)
    add_export_args(p)
    p.add_argument("--onnx", help="use this ONNX graph instead of exporting (--ckpt still gives the PyTorch reference)")
    p.add_argument("--batch", default="1:8:64", help="optimization profile MIN:OPT:MAX batch sizes (default 1:8:64)")
    p.add_argument("--timing-cache", help="timing cache file, reused across builds (default DIR/timing.cache)")
    p.add_argument("--engine-cache", help="engine cache folder (default DIR/engines)")
    given = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    profile = rt_trt.parse_profile(args.batch)
    if args.onnx:
        shapes = validate_onnx(args.onnx)
        onnx_path, report = args.onnx, earlier_report(args.onnx)
        os.makedirs(args.out, exist_ok=True)
    else:
        report = export_from_args(args, dit_only=True)
        onnx_path = os.path.join(args.out, "model.onnx")
        shapes = validate_onnx(onnx_path)
    try:
        rt_trt.require_tensorrt()
    except UserError as e:
        print(f"error: {e}; the ONNX graph {onnx_path} is {'checked' if args.onnx else 'written and checked'}; "
              f"on a GPU machine run: {rerun_command(given, onnx_path)}", file=sys.stderr)
        sys.exit(NO_TRT_EXIT)
    engine = rt_trt.build_engine(onnx_path, profile, shapes, args.engine_cache or os.path.join(args.out, "engines"),
                                 args.timing_cache or os.path.join(args.out, "timing.cache"), args.precision)
    if args.ckpt:  # parity of the engine against PyTorch fp32 on the GPU
        model = load_model(args, dit_only=True).cuda().float().eval()
        cfg = "cfg_scale" in shapes
        reference = ExportedDiT(model, cfg, None if args.guidance_channels == "all" else 3)
        forward = rt_trt.TensorRTForward(engine)
        report["parity"]["tensorrt"] = {}
        for batch in sorted({profile[0], profile[1], profile[2]}):
            inputs = [v.cuda() for v in example_inputs(model.config, batch, cfg, seed=batch)]
            with torch.no_grad():
                want = reference(*inputs).cpu().numpy()
            report["parity"]["tensorrt"][f"batch{batch}"] = compare(forward(*inputs).cpu().numpy(), want)
        write_parity(args.out, report)
        bad = check_parity({"tensorrt": report["parity"]["tensorrt"]}, thresholds(args))
        if bad:
            raise UserError(f"engine parity above the thresholds ({'; '.join(bad)}); see {args.out}/parity.json")
    print(f"engine: {engine}")


def earlier_report(onnx_path):
    """The parity report written beside a graph when it was exported (its onnxruntime entries are kept
    when the engine's are added), or a fresh one."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "parity.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                report = json.load(f)
            if isinstance(report.get("parity"), dict):
                return report
        except (OSError, ValueError):
            pass
    return {"onnx": onnx_path, "parity": {}}


def rerun_command(given, onnx_path):
    """This command as given, with --onnx pointing at the graph it wrote or checked: every flag kept."""
    import shlex

    argv, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a == "--onnx":
            skip = True
        elif not a.startswith("--onnx="):
            argv.append(a)
    return shlex.join(["python", "export/trt.py", *argv, "--onnx", onnx_path])


if __name__ == "__main__":
    main()
