"""Sampler flags shared by `sample` and `evaluate`, and the batched sampling they drive."""
import math

import torch
from tqdm import tqdm

from .. import runtime
from ..diffusion import DEFAULT_STEPS, sample, samplers_for
from ..errors import UserError, positive
from ..runtime import add_backend_arg


def default_settings(config=None):
    """What `sample` and `evaluate` use with no flags: DDIM 50 steps (a SiT: Heun 25), guidance 1.5 on
    all channels, seed 0."""
    name = samplers_for(config)[0]
    settings = {"name": name, "steps": DEFAULT_STEPS[name], "cfg_scale": 1.5, "guidance_channels": "all", "seed": 0}
    if name == "mar":
        settings.update(steps=min(settings["steps"], config.seq_len), temperature=1.0)
    return settings


DEFAULT_SETTINGS = default_settings()


def add_sampler_args(p):
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=list(DEFAULT_STEPS),
                   help="DiT: ddim (deterministic, eta 0; the default) or ddpm (ancestral, as the paper evaluates; "
                        "the default of sample --npz). SiT: heun (ODE; the default), euler (ODE) or sde "
                        "(Euler-Maruyama; the default of sample --npz). MAR: mar (steps = unmasking iterations)")
    g.add_argument("--steps", type=positive(),
                   help="sampling steps (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale; 1 disables it")
    g.add_argument("--temperature", type=positive(float), help="MAR: the diffusion head's noise scale (default 1.0)")
    g.add_argument("--guidance-channels", default="all",
                   help="'all' guides every noise channel (diffusers' DiTPipeline); '3' guides the first 3 "
                        "channels only, as facebookresearch/DiT's sample.py does")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=positive(), default=500, help="samples per forward batch")
    add_backend_arg(g)
    g.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu; the cpp and "
                                    "onnxruntime backends run on the cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"],
                   help="the model's weights and activations (default auto: bf16 on CUDA, fp32 on the cpu and for the "
                        "cpp, onnxruntime and tensorrt backends); the sampler's state stays fp32. fp8: every block "
                        "Linear in E4M3 (per-channel weight, per-token activation scales) around a bf16 model with "
                        "--backend triton on a GPU, or an fp32 model with --backend cpp (PyTorch's slow reference "
                        "FP8 GEMM: for accuracy)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each forward from a CUDA graph (eager, compile, triton on a GPU): one launch per step")


CPU_BACKENDS = ("cpp", "onnxruntime")
FP32_BACKENDS = ("cpp", "onnxruntime", "tensorrt")


def device_and_dtype(args, default_device=None):
    """(device, torch dtype) from --device/--dtype and the backend; one line when they cannot work."""
    from ..training.precision import DTYPES, configure_tf32

    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    elif args.backend in CPU_BACKENDS:
        device = torch.device("cpu")
    else:
        device = torch.device(default_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    if args.dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and args.backend not in FP32_BACKENDS else "fp32"
    else:
        dtype = args.dtype
    configure_tf32(device, True)  # fp32 on CUDA: TF32 GEMMs, as the official sampling scripts run
    if dtype == "fp8":
        if args.backend not in ("triton", "cpp"):
            raise UserError(f"--dtype fp8 runs with --backend triton (GPU) or cpp (CPU), not {args.backend}")
        return device, "fp8"
    return device, DTYPES[dtype]


def load_runtime(model, args, default_device=None):
    """The model on the backend, device and dtype the flags name."""
    device, dtype = device_and_dtype(args, default_device)
    return runtime.load(model, args.backend, device=device, dtype=dtype, max_batch=2 * args.batch_size,
                        cuda_graphs=args.cuda_graphs)


def sampler_settings(args, default=None, config=None):
    """Settings from the flags; `default` names the sampler to use when --sampler is not given (DiT
    names; a flow model maps ddim -> heun and ddpm -> sde). The sampler must fit config's objective."""
    allowed = samplers_for(config)
    default = {"ddim": allowed[0], "ddpm": allowed[-1]}.get(default or "ddim", default)
    if args.sampler and args.sampler not in allowed:
        kind = {"heun": "a SiT (flow matching)", "mar": "a MAR"}.get(allowed[0], "a DiT (Gaussian diffusion)")
        raise UserError(f"--sampler {args.sampler} does not fit {kind} model; choose {', '.join(allowed)}")
    if args.guidance_channels not in ("all", "3"):
        raise UserError(f"--guidance-channels must be 'all' or '3', got {args.guidance_channels!r}")
    if args.temperature is not None and allowed[0] != "mar":
        raise UserError("--temperature is the noise scale of a MAR's diffusion head; this model has none")
    if args.guidance_channels == "3" and config is not None and getattr(config, "in_channels", 3) < 3:
        raise UserError(f"--guidance-channels 3 needs 3 noise channels; this model has {config.in_channels} "
                        "(the rest of its output is the learned variance)")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 1:
        raise UserError(f"--cfg-scale must be a finite number of at least 1, got {args.cfg_scale}")
    name = args.sampler or default
    if name in ("ddim", "ddpm") and args.steps is not None and not 2 <= args.steps <= 1000:
        raise UserError(f"--steps {args.steps}: {name} respaces the 1000 training steps, so 2..1000")
    settings = {"name": name, "steps": args.steps or DEFAULT_STEPS[name], "cfg_scale": args.cfg_scale,
                "guidance_channels": args.guidance_channels, "seed": args.seed}
    if name == "mar":  # at most one unmasking step per token
        if args.steps and args.steps > config.seq_len:  # (the default, 64, is min'ed with the tokens silently)
            print(f"note: a MAR unmasks at most one token per step: {config.seq_len} steps, not {settings['steps']}",
                  flush=True)
        settings.update(steps=min(settings["steps"], config.seq_len), temperature=args.temperature or 1.0)
    return settings


def sample_batched(model, labels, settings, batch_size, desc="sampling"):
    """Samples for `labels`, batch by batch; batch i uses seed + i so results do not depend on the order."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.config.num_classes):
        raise UserError(f"labels must be in 0..{model.config.num_classes - 1}")
    c = model.config
    shape = (c.in_channels, c.input_size, c.input_size)
    gc = None if settings["guidance_channels"] == "all" else 3
    device = next(model.parameters()).device  # the noise is drawn where the model runs
    out = []
    chunks = labels.split(batch_size)
    with tqdm(total=len(chunks) * settings["steps"], desc=desc, dynamic_ncols=True) as bar:
        for i, chunk in enumerate(chunks):
            x = sample(model, chunk.to(device), shape, settings["name"], settings["steps"], settings["cfg_scale"], gc,
                       seed=settings["seed"] + i, progress=bar, temperature=settings.get("temperature", 1.0))
            out.append(x.float().cpu())
    return torch.cat(out)
