"""Export a tinyfusion/DiT checkpoint to ONNX and verify it in onnxruntime.

  python export/onnx.py --ckpt runs/demo/recover/recovered.safetensors --out runs/onnx
  python export/onnx.py --ckpt P --out D --cfg --precision fp16 --opset 20
  python export/onnx.py --ckpt tinyfusion/assets/digits_mar_teacher.safetensors --out runs/onnx-mar   # a MAR

Writes DIR/model.onnx (dynamic batch; torch.onnx.export with dynamo=True) and DIR/parity.json: max-abs,
mean-abs and cosine similarity of onnxruntime (CPU) against PyTorch at two batch sizes. Exits non-zero
when any exceeds its threshold. fp16/bf16 keep LayerNorm, adaLN modulation, gates and the residual
stream in fp32 (explicit casts in the graph). onnxruntime's CPU provider has no bf16 MatMul, so a bf16
graph's parity is left to export/trt.py on a GPU. A MAR exports as two fp32 graphs, mar_z.onnx (encoder
and decoder) and mar_head.onnx (diffusion head), verified one by one and through a short generation.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # not export/: this file's name would shadow the onnx package

from tinyfusion.errors import Parser, cli  # noqa: E402
from tinyfusion.runtime.onnx_export import add_export_args, export_from_args  # noqa: E402


@cli
def main(argv=None):
    p = Parser(prog="python export/onnx.py", description=__doc__)
    add_export_args(p)
    args = p.parse_args(argv)
    report = export_from_args(args)
    graphs = report["onnx"] if isinstance(report["onnx"], list) else [report["onnx"]]  # a MAR has two
    print(f"wrote {', '.join(os.path.join(args.out, g) for g in graphs)} and parity.json")
    return report


if __name__ == "__main__":
    main()
