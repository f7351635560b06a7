"""TensorRT engines from our ONNX graphs: strongly typed builds (precision lives in the graph's casts),
an optimization profile over the batch, a reused timing cache, and an engine cache keyed by everything
that makes an engine stale: the graph's hash, the profile, the precision, the TensorRT version and the
GPU. Needs `tensorrt` and an NVIDIA GPU; everything here that does not is importable without them."""
import hashlib
import json
import os

import torch

from ..errors import UserError

TRT_HINT = "pip install -e '.[trt]' on a machine with an NVIDIA GPU"


def parse_profile(text):
    """'MIN:OPT:MAX' -> (min, opt, max) batch sizes, 0 < MIN <= OPT <= MAX."""
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--batch must be MIN:OPT:MAX (three integers), got {text!r}") from None
    if lo <= 0 or not lo <= opt <= hi:
        raise UserError(f"--batch {text}: need 0 < MIN <= OPT <= MAX")
    return lo, opt, hi


def engine_cache_key(onnx_sha256, profile, precision, trt_version, gpu_name):
    """A changed graph, shape profile, precision, TensorRT version or GPU never reuses a stale engine."""
    fields = {"onnx": onnx_sha256, "profile": list(profile), "precision": precision, "tensorrt": trt_version,
              "gpu": gpu_name}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def batch_profile(max_batch):
    """(min, opt, max) batch sizes an engine is built for, from the largest batch it will see (a sampler's
    batch, doubled by CFG): an engine's profile below that batch fails at run time."""
    if max_batch < 1:
        raise UserError(f"a TensorRT profile needs a positive batch, got {max_batch}")
    return 1, max(1, max_batch // 2), max_batch


def timing_cache_path(folder, trt_version, gpu_name):
    """A timing cache per TensorRT version and GPU: one shared file would be overwritten by each node's."""
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name)
    return os.path.join(folder, f"timing-trt{trt_version}-{gpu}.cache")


def require_tensorrt():
    """The tensorrt module and the GPU name, or a one-line UserError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"TensorRT is not installed ({TRT_HINT})") from None
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU and none is visible to torch.cuda")
    return trt, torch.cuda.get_device_name()


def build_engine(onnx_path, profile, input_shapes, engine_dir, timing_cache, precision, log=print):
    """The engine file for this graph and profile: from the cache when its key matches, else built."""
    from .onnx_common import graph_sha256

    trt, gpu = require_tensorrt()
    key = engine_cache_key(graph_sha256(onnx_path), profile, precision, trt.__version__, gpu)
    engine_path = os.path.join(engine_dir, f"dit-{key}.engine")
    if os.path.isfile(engine_path):
        log(f"engine cache hit: {engine_path}")
        return engine_path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, rest in input_shapes.items():  # rest: the sizes after the batch; None for a batch-free input
        if rest is None:
            continue
        opt_profile.set_shape(name, *[(b, *rest) for b in profile])
    config.add_optimization_profile(opt_profile)
    cache_bytes = open(timing_cache, "rb").read() if os.path.isfile(timing_cache) else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU's or version's cache
        log(f"timing cache {timing_cache} does not match this GPU or TensorRT version: building without it")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log(f"building a TensorRT engine from {onnx_path} (batch {profile[0]}..{profile[2]}, {precision}); "
        "this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    os.makedirs(engine_dir, exist_ok=True)
    tmp = f"{engine_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, engine_path)
    with open(f"{timing_cache}.tmp{os.getpid()}", "wb") as f:
        f.write(memoryview(config.get_timing_cache().serialize()))
    os.replace(f"{timing_cache}.tmp{os.getpid()}", timing_cache)
    log(f"built {engine_path}")
    return engine_path


class TensorRTForward:
    """(x, t, y[, cfg_scale]) -> out on the GPU through an engine, with torch tensors as the I/O buffers."""

    def __init__(self, engine_path):
        trt, _ = require_tensorrt()
        self.trt = trt
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"{engine_path} does not deserialize with TensorRT {trt.__version__}: rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int32: torch.int32, trt.int64: torch.int64}
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}  # what the engine declares

    def __call__(self, *tensors):
        # bound by name (the call is (x, t, y[, cfg_scale]), whatever order the engine lists its inputs in)
        feeds = dict(zip(["x", "t", "y", "cfg_scale"], tensors))
        if set(feeds) != self.inputs:
            raise UserError(f"the engine takes {sorted(self.inputs)}, got {sorted(feeds)}")
        feeds = {n: v.to("cuda", self.dtypes[n]).contiguous() for n, v in feeds.items()}
        for name, value in feeds.items():
            if not self.context.set_input_shape(name, tuple(value.shape)):
                raise UserError(f"{name} of shape {tuple(value.shape)} is outside the engine's optimization profile "
                                "(rebuild it for a larger batch)")
            self.context.set_tensor_address(name, value.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda", dtype=self.dtypes[self.output])
        self.context.set_tensor_address(self.output, out.data_ptr())
        # enqueued on torch's current stream, so what follows on that stream is ordered after it: no host sync
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
