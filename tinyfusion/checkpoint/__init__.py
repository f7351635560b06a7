"""Checkpoint I/O: `load(path) -> DiT` for every format users hold, `save(model, path)` as safetensors.

Reads official `.pt` (plain state dict or `{"model"|"ema": ...}`, always `weights_only=True`), our
safetensors (config and provenance in the metadata), plain safetensors, and diffusers
`DiTTransformer2DModel` folders. The config is inferred from the keys where the file carries none.
"""
import json
import os
import pickle
import tempfile
import zipfile

import torch

from ..errors import UserError, read_json
from ..models.dit import HEADS_BY_WIDTH, DiT, DiTConfig, get_2d_sincos_pos_embed
from ..models.diffusers_keys import diffusers_to_dit, dit_depth

META_KEY = "tinyfusion"


def _read_pt(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise UserError(f"{path}: refused to unpickle (it holds objects that weights-only loading does not allow: {first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path}: not a PyTorch checkpoint ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict):
        for key in ("ema", "model_ema", "model", "state_dict"):  # official DiT and MAR carry both; sample from EMA
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def _read_safetensors(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a safetensors checkpoint ({str(e)[:160]})") from None
    info = json.loads(meta[META_KEY]) if META_KEY in meta else {}
    return sd, info


def _read_diffusers_folder(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: a folder, but not a diffusers model folder (no config.json)")
    hf = read_json(cfg_path)
    weights = [os.path.join(path, n) for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise UserError(f"{path}: no diffusion_pytorch_model.safetensors or .bin in the folder")
    sd, _ = _read_safetensors(weights[0]) if weights[0].endswith(".safetensors") else _read_pt(weights[0])
    hidden = hf["num_attention_heads"] * hf["attention_head_dim"]
    grid = hf["sample_size"] // hf["patch_size"]
    pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float()[None]
    try:
        sd = diffusers_to_dit(sd, pos)
    except KeyError as e:
        raise UserError(f"{path}: not a DiTTransformer2DModel (missing key {e})") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    cfg = {
        "num_heads": hf["num_attention_heads"],
        "timestep_freq_shift": 1,  # diffusers' Timesteps(downscale_freq_shift=1)
        "mlp_norm_eps": hf.get("norm_eps", 1e-5),
    }
    return sd, {"config": cfg, "source": path}


def read(path):
    """(DiT-key state dict, tinyfusion metadata dict) from any supported checkpoint path."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _read_diffusers_folder(path)
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: not readable (permission denied)")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: an 8-byte header length, then the JSON header. Checked first: that length's low byte
    # can be 0x80, a pickle's first byte.
    if head[8:9] == b"{":
        return _read_safetensors(path)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or a raw pickle
        return _read_pt(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)  # its error says what is wrong with the header
    raise UserError(f"{path}: not a checkpoint (neither safetensors nor a torch.save file; a diffusers model is a folder)")


def infer_config(sd, info=None):
    """Build the DiTConfig that the tensors imply; metadata fills what keys cannot say (heads)."""
    info = info or {}
    required = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight", "pos_embed")
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:4])
        raise UserError(f"not a DiT checkpoint: missing keys {', '.join(missing)} (it has keys like {sample})")
    proj = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    meta = dict(info.get("config", {}))
    has_null = meta.get("class_dropout_prob", 0.1) > 0  # official DiTs always carry the null-class row
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    cfg = DiTConfig(
        depth=dit_depth(sd),
        hidden_size=hidden,
        patch_size=patch,
        num_heads=meta.get("num_heads", HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))),
        input_size=grid * patch,
        in_channels=in_ch,
        num_classes=rows - int(has_null),
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else meta.get("mlp_ratio", 4.0),
        class_dropout_prob=meta.get("class_dropout_prob", 0.1),
        learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_shift=meta.get("timestep_freq_shift", 0),
        mlp_norm_eps=meta.get("mlp_norm_eps", 1e-6),
        objective=meta.get("objective", "diffusion"),
        path=meta.get("path", "linear"),
        prediction=meta.get("prediction", "velocity"),
    )
    return cfg


def build_strict(cfg, sd, where="checkpoint"):
    """A DiT of `cfg` with `sd` loaded strictly; mismatches become one readable line."""
    try:
        model = DiT(cfg)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise UserError(f"{where}: keys do not match a DiT: {'; '.join(parts)}")
    bad = [k for k in own if own[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        raise UserError(f"{where}: shape mismatch at {k}: file has {tuple(sd[k].shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)
    return model


OBJECTIVES = {"dit": "diffusion", "sit": "flow", "mar": "mar"}


MODEL_NAMES = {"dit": "DiT", "sit": "SiT", "mar": "MAR"}  # --model values as the papers write them


def load(path, expect=None, model=None, **overrides):
    """Load any supported checkpoint as a DiT (or SiT: the same network) in eval mode.

    expect: an optional DiTConfig (e.g. from a model name) that the weights must agree with on depth,
    width and patch size. model: "dit" or "sit", the objective the weights are used with; a file whose
    metadata names the other one is refused, a file without metadata (official SiT .pt) takes it.
    overrides: config fields the file cannot tell (e.g. num_heads=...).
    """
    sd, info = read(path)
    if "z_proj.weight" in sd:  # MAR's keys
        if model not in (None, "mar"):
            raise UserError(f"{path} is a MAR checkpoint; --model {model} asks for a {MODEL_NAMES[model]}")
        from ..models.mar import mar_from_state_dict

        return mar_from_state_dict(sd, info, path, **overrides)
    if model == "mar":
        raise UserError(f"{path} is not a MAR checkpoint (no z_proj / encoder_blocks keys); --model mar needs one")
    cfg = infer_config(sd, info)
    if model is not None:
        said = info.get("config", {}).get("objective")
        want = OBJECTIVES[model]
        if said is not None and said != want:
            names = {v: k for k, v in OBJECTIVES.items()}
            raise UserError(f"{path} is a {MODEL_NAMES[names[said]]} checkpoint (its metadata says objective {said!r}); "
                            f"--model {model} would use it with the {want} objective")
        cfg.objective = want
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if expect is not None:
        for field in ("depth", "hidden_size", "patch_size"):
            want, have = getattr(expect, field), getattr(cfg, field)
            if want != have:
                raise UserError(f"{path}: {field} {want} was asked for but the weights have {field} {have}")
    model = build_strict(cfg, {k: v.float() for k, v in sd.items()}, where=path)
    model.provenance = info
    return model.eval()


def save(model, path, dtype=None, **provenance):
    """Write safetensors with config and provenance in the metadata, atomically (temp file, rename).

    dtype: store floating tensors in this dtype (e.g. torch.float16 to halve the file); `load` returns fp32.
    """
    from safetensors.torch import save_file

    info = {"config": model.config.to_dict(), **provenance}
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: json.dumps(info), "format": "pt"}))


def save_model(model, out, name, **provenance):
    """Our models as out/<name>.safetensors; a diffusers transformer (or a DiffusersDenoiser around one) as
    the folder out/<name>/ that from_pretrained loads, provenance in its tinyfusion.json. Atomic both ways."""
    model = getattr(model, "diffusers_model", model)
    if not hasattr(model, "save_pretrained"):
        path = os.path.join(out, f"{name}.safetensors")
        save(model, path, **provenance)
        return path
    def write(tmp):
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "tinyfusion.json"), "w") as f:
            json.dump(provenance, f, indent=2)

    folder = os.path.join(out, name)
    atomic_folder(folder, write)
    return folder


def atomic_folder(path, write):
    """Call write(tmp_folder) then replace `path` with it, so a crash never leaves a half-written folder."""
    import shutil

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        write(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def atomic_write(path, write):
    """Call write(tmp_path) then rename over `path`, so a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_mar(path, **overrides):
    """An official MAR checkpoint (.pth with "model_ema"/"model", EMA preferred) or our safetensors."""
    from ..models.mar import mar_from_state_dict

    sd, info = read(path)
    return mar_from_state_dict(sd, info, path, **overrides)


def load_trainable(path, model=None, data_path=None, cond=None):
    """What prune and finetune train: our checkpoints (DiT, SiT, MAR; `model` names the family of an
    ambiguous one), or a diffusers PixArt/SD3/Flux folder behind DiT's call, which needs its latents
    (`data_path`) and a conditioning bank (`cond`). A flag that does not apply is an error, not ignored."""
    from ..models.diffusers_denoiser import is_diffusers_transformer_folder, load_denoiser

    if is_diffusers_transformer_folder(path):
        if model:
            raise UserError("--model dit|sit|mar applies to our checkpoints; a diffusers folder brings its own objective")
        if not data_path:
            raise UserError(f"{path} is a diffusers transformer: give --data-path with its latents (and --cond)")
        return load_denoiser(path, cond)
    if cond:
        raise UserError("--cond applies to diffusers PixArt/SD3/Flux folders only")
    return load(path, model=model)


def file_sha256(path):
    """What identifies a checkpoint's content: the SHA-256 of a file; of a folder (a diffusers model), of
    its files' names, sizes and modification times (reading gigabytes of weights for a name is not worth it)."""
    import hashlib

    h = hashlib.sha256()
    if os.path.isdir(path):
        for folder, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                h.update(f"{os.path.relpath(os.path.join(folder, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
