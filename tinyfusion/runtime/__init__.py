"""One interface over every inference backend: `load(ckpt, backend=...)` -> a callable DiT.

    rt = tinyfusion.runtime.load("runs/x/pruned.safetensors", backend="cpp")
    eps = rt(x, t, y)                                     # (N, C, H, W), (N,), (N,) -> (N, out_channels, H, W)
    eps = rt.forward_with_cfg(x, t, y, cfg_scale=1.5)     # the same guidance as DiT.forward_with_cfg

The samplers, `sample`, `evaluate` and `bench/latency.py` take a Runtime wherever they take a DiT.
"""
import copy
import os

import torch

from ..errors import UserError
from ..models.dit import DiT, forward_with_cfg

# name -> (what it is, module that builds it); modules import lazily so a missing dependency only
# matters to the backend that needs it.
BACKENDS = {
    "eager": "PyTorch eager",
    "compile": "torch.compile (Inductor): on the CPU the whole model with freezing, on CUDA block by block",
    "cpp": "C++ fused CPU ops and attention (csrc/, pybind11) around oneDNN GEMMs",
    "triton": "Triton fused adaLN/GELU kernels and flash attention around PyTorch GEMMs (NVIDIA GPU)",
    "onnxruntime": "the model exported to ONNX, run by onnxruntime's CPU provider (fp32)",
    "tensorrt": "the model exported to ONNX, built into a TensorRT engine (NVIDIA GPU)",
}


class Runtime:
    """A DiT forward on one backend, with the attributes the samplers read. The model runs in its dtype;
    inputs are cast to it and outputs come back fp32, so a sampler's state (x_t, the schedule arithmetic,
    the guidance combine) stays fp32 whatever the model's precision."""

    def __init__(self, model: DiT, forward, backend: str):
        self.model = model
        self.config = model.config
        self.in_channels = model.in_channels
        self.out_channels = model.out_channels
        self.backend = backend
        self.dtype = next(model.parameters()).dtype
        self._forward = forward

    def _fp32_forward(self, x, t, y):
        return self._forward(x.to(self.dtype), t, y).float()  # no-ops for an fp32 model

    @torch.no_grad()
    def __call__(self, x, t, y):
        return self._fp32_forward(x, t, y)

    @torch.no_grad()
    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        return forward_with_cfg(self._fp32_forward, self.in_channels, x, t, y, cfg_scale, guidance_channels)

    def parameters(self):
        return self.model.parameters()


class CudaGraphForward:
    """A forward replayed from CUDA graphs, one per input shape and dtype: each call copies its inputs into
    the graph's static buffers, replays, and returns a copy of the graph's output (the next replay
    overwrites it). A sampling step then costs one launch per forward, not one per kernel."""

    def __init__(self, forward, warmup=2):
        self.forward, self.warmup, self.graphs = forward, warmup, {}

    def capture(self, inputs):
        static = [v.clone() for v in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (lazy init, autotuning, allocator pools)
            for _ in range(self.warmup):
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(*static)
        return graph, static, out

    def __call__(self, *inputs):
        key = tuple((tuple(v.shape), v.dtype) for v in inputs)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs)
        graph, static, out = self.graphs[key]
        for buf, v in zip(static, inputs):
            buf.copy_(v)
        graph.replay()
        return out.clone()


class AutocastSampler:
    """A model that samples itself (MAR, whose loop draws fp32 noise and token state inside) run under
    autocast: fp32 weights and state, its GEMMs in `dtype`. Everything else is the model's."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def __getattr__(self, name):
        return getattr(self.model, name)

    @torch.no_grad()
    def sample(self, *args, **kwargs):
        with torch.autocast(next(self.model.parameters()).device.type, dtype=self.dtype):
            return self.model.sample(*args, **kwargs)


def load(ckpt, backend: str = "eager", device="cpu", dtype=torch.float32, max_batch=1024,
         cuda_graphs=False) -> Runtime:
    """`ckpt` is a checkpoint path (any format `tinyfusion.load` reads) or a DiT module. `max_batch`: the
    largest batch an exported engine (tensorrt) must take; a sampler's batch doubled by CFG.
    `cuda_graphs`: replay the forward from CUDA graphs (eager, compile, triton on a CUDA device).
    `dtype="fp8"`: every block Linear in FP8 (runtime/fp8.py) around a bf16 model on CUDA (triton backend),
    or an fp32 model on the CPU (cpp backend; PyTorch's reference FP8 GEMM: slow, for accuracy)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    fp8 = dtype in ("fp8", torch.float8_e4m3fn)
    if fp8:
        if backend not in ("triton", "cpp"):
            raise UserError(f"FP8 runs the block GEMMs of the fused forward: the triton (CUDA) or cpp (CPU) backend, "
                            f"not {backend}")
        dtype = torch.float32 if backend == "cpp" else torch.bfloat16
        from .fp8 import check_device

        check_device(device)
    if cuda_graphs and (torch.device(device).type != "cuda" or backend not in ("eager", "compile", "triton")):
        raise UserError(f"CUDA graphs need a CUDA device and the eager, compile or triton backend, not {backend} on {device}")
    if backend in ("cpp", "onnxruntime") and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise UserError(f"the {backend} backend runs float32 on the CPU, not {dtype} on {device}")
    if torch.device(device).type == "cpu":
        from .heap import keep_freed_memory

        keep_freed_memory()
    if isinstance(ckpt, torch.nn.Module):
        model = ckpt
        p = next(model.parameters())
        if p.device != torch.device(device) or p.dtype != dtype:
            model = copy.deepcopy(model)  # Module.to works in place: the caller's model stays as it was
    else:
        from ..checkpoint import load as load_checkpoint

        model = load_checkpoint(ckpt)
    if not isinstance(model, DiT):  # MAR samples itself, eager or through its two ONNX graphs
        if cuda_graphs:
            raise UserError(f"CUDA graphs replay DiT/SiT forwards; a {type(model).__name__} samples itself")
        if backend == "onnxruntime" and type(model).__name__ == "MAR":
            return mar_onnxruntime(model)
        if backend != "eager":
            raise UserError(f"the {backend} backend runs DiT/SiT models; a {type(model).__name__} runs eager or "
                            "onnxruntime")
        model = model.to(device=device).eval().requires_grad_(False)
        return model if dtype == torch.float32 else AutocastSampler(model, dtype)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if backend == "eager":
        forward = model.forward
    elif backend == "compile":
        model = copy.deepcopy(model)  # a copy, so the caller's module stays eager
        if torch.device(device).type == "cpu":
            # As a CPU user configures Inductor for inference: freezing folds the (frozen) weights into the
            # graph as constants, so the GEMMs get oneDNN's prepacked weights and fused post-ops.
            forward = torch.compile(model, options={"freezing": True})
        else:
            # Regional compilation: each block compiles to the same graph (parameters are inputs), so
            # compile time does not grow with depth.
            for block in model.blocks:
                block.compile()
            forward = model.forward
    elif backend == "cpp":
        from . import cpu_ops
        from .fused import FusedForward

        ops = cpu_ops.require()
        forward = FusedForward(model, ops, ops.attention, onednn=True, fp8=fp8)
    elif backend == "triton":
        from .fused import FusedForward

        ops = triton_ops(device)
        forward = FusedForward(model, ops, ops.attention, fp8=fp8)
    else:
        forward = exported_forward(model, backend, max_batch)
    if cuda_graphs and isinstance(model, DiT):
        forward = CudaGraphForward(forward)
    return Runtime(model, forward, backend + ("+fp8" if fp8 else ""))


def triton_ops(device):
    """tinyfusion.kernels.ops, on a CUDA device (or anywhere in Triton's interpreter, for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("the triton backend needs the triton package (pip install triton) and an NVIDIA GPU") from None
    from ..kernels import INTERPRET

    if torch.device(device).type != "cuda" and not INTERPRET:
        raise UserError(f"the triton backend runs on a CUDA device, not {device} "
                        "(TRITON_INTERPRET=1 runs it slowly on the CPU, for tests)")
    from ..kernels import ops

    return ops


def mar_onnxruntime(model):
    """A MAR whose encoder-decoder and head run as ONNX graphs in onnxruntime (exported to a private folder)."""
    import tempfile

    from .onnx_mar import export_mar, onnx_mar

    folder = tempfile.TemporaryDirectory(prefix="tinyfusion-onnx-mar-")
    export_mar(model, folder.name)
    rt = onnx_mar(model, folder.name, threads=torch.get_num_threads())
    rt.onnx_folder = folder  # the graphs live as long as the model
    return rt


def exported_forward(model, backend, max_batch=1024):
    """Export to a private folder (kept while the forward lives), then onnxruntime or a TensorRT engine
    whose profile reaches `max_batch` (a sampler's batch doubled by CFG)."""
    import tempfile

    from . import onnx_export

    folder = tempfile.TemporaryDirectory(prefix="tinyfusion-onnx-")
    if backend == "tensorrt":
        from . import tensorrt

        trt, gpu = tensorrt.require_tensorrt()  # fail before the export when TensorRT or the GPU is missing
    source = copy.deepcopy(model).cpu() if next(model.parameters()).is_cuda else model  # traced on the CPU
    path = onnx_export.export_onnx(source, os.path.join(folder.name, "model.onnx"))
    if backend == "onnxruntime":
        forward = onnx_export.OnnxRuntimeForward(path, threads=torch.get_num_threads())
    else:
        c = model.config
        shapes = {"x": (c.in_channels, c.input_size, c.input_size), "t": (), "y": ()}
        cache = os.path.expanduser("~/.cache/tinyfusion/tensorrt")  # safe to share: keyed by graph, GPU, version
        engine = tensorrt.build_engine(path, tensorrt.batch_profile(max_batch), shapes, cache,
                                       tensorrt.timing_cache_path(cache, trt.__version__, gpu), "fp32")
        forward = tensorrt.TensorRTForward(engine)
    forward.folder = folder  # the graph's files live as long as the forward
    return forward


def add_backend_arg(parser):
    parser.add_argument("--backend", default="eager", choices=list(BACKENDS),
                        help="inference backend: " + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
