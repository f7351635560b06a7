"""What the DiT and MAR ONNX exports share: the graph's hash, an onnxruntime session, and parity reports
against PyTorch with their thresholds."""
import hashlib
import json
import os

import numpy as np

from ..errors import UserError


def graph_sha256(path):
    """SHA-256 of the graph file and of every external-data file it names (a large graph keeps its weights
    beside it: hashing the .onnx alone would miss an edit of the weights)."""
    h = hashlib.sha256()
    for p in [path, *external_data_files(path)]:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def external_data_files(path):
    """The files a graph's initializers live in, beside it (none for a self-contained graph)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    names = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return [os.path.join(os.path.dirname(os.path.abspath(path)), n) for n in sorted(names)]


def ort_session(path, threads=None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install -e '.[onnx]'") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # a corrupt file or a kernel ORT's CPU provider lacks: say which, in one line
        raise UserError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None


def compare(got, want):
    got, want = np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel()
    diff = np.abs(got - want)
    cos = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": cos}


# Per precision: (max_abs, mean_abs, min_cosine) against the fp32 PyTorch model. fp32 is reordering noise;
# fp16/bf16 are the GEMMs' rounding (10 and 7 mantissa bits) on outputs of order 1.
DEFAULT_THRESHOLDS = {"fp32": (1e-4, 1e-5, 0.99999), "fp16": (5e-2, 5e-3, 0.999), "bf16": (2e-1, 2e-2, 0.99)}


def check_parity(report, thresholds):
    """The (output, batch) entries that exceed a threshold, as readable strings."""
    max_abs, mean_abs, min_cos = thresholds
    bad = []
    for runtime_name, per_batch in report.items():
        for batch, m in per_batch.items():
            if not isinstance(m, dict) or "max_abs" not in m:
                continue
            if m["max_abs"] > max_abs or m["mean_abs"] > mean_abs or m["cosine"] < min_cos:
                bad.append(f"{runtime_name} {batch}: max_abs {m['max_abs']:.3g}, mean_abs {m['mean_abs']:.3g}, "
                           f"cosine {m['cosine']:.6f}")
    return bad


def write_parity(out_dir, report):
    tmp = os.path.join(out_dir, f"parity.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "parity.json"))
