"""A diffusers transformer behind DiT's call, `forward(x, t, y, force_drop_ids)`, so that the learnable
search, the baselines, calibration and Masked KD run on it unchanged.

Text-conditioned models read their conditioning from a bank: `y` indexes rows of precomputed prompt
embeddings (made once with the pipeline's text encoders, which tinyfusion never loads), and the bank's
last row is the null prompt used for label dropout. Latent folders label each latent with its prompt's
row. The objective follows the family:
- DiT, PixArt: DiT's Gaussian diffusion (eps, learned variance when out_channels = 2 x in_channels);
- SD3, Flux: rectified flow. diffusers' convention (x = (1 - s) data + s noise, the model predicts
  noise - data, timestep s) is our linear path with t = 1 - s and velocity = -output, so the
  FlowObjective and the SiT samplers apply as they are.
"""
import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..errors import UserError, read_json

BANK_KEYS = {
    "PixArtTransformer2DModel": ("encoder_hidden_states",),
    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "DiTTransformer2DModel": (),
}


class DiffusersDenoiser(nn.Module):
    def __init__(self, model, bank=None, class_dropout_prob=0.1, guidance=3.5):
        super().__init__()
        name = type(model).__name__
        if name not in BANK_KEYS:
            raise UserError(f"no denoiser for a {name}; supported: {', '.join(BANK_KEYS)}")
        self.model, self.name, self.guidance = model, name, guidance
        keys = BANK_KEYS[name]
        bank = bank or {}
        missing = [k for k in keys if k not in bank]
        if missing:
            raise UserError(f"a {name} needs a conditioning bank with {', '.join(keys)}; missing {', '.join(missing)}")
        rows = {len(bank[k]) for k in keys}
        if len(rows) > 1:
            raise UserError(f"conditioning bank entries disagree on the number of rows: {sorted(rows)}")
        for k in keys:
            self.register_buffer(f"bank_{k}", bank[k].float(), persistent=False)
        c = model.config
        in_ch = c.in_channels // 4 if name == "FluxTransformer2DModel" else c.in_channels  # Flux packs 2x2 patches
        out_ch = getattr(c, "out_channels", None) or in_ch
        flow = name in ("SD3Transformer2DModel", "FluxTransformer2DModel")
        from .diffusers_stacks import diffusers_stack

        self.config = SimpleNamespace(
            objective="flow" if flow else "diffusion", path="linear", prediction="velocity",
            depth=diffusers_stack(model).depth, hidden_size=c.num_attention_heads * c.attention_head_dim,
            patch_size=c.patch_size, family=name,
            learn_sigma=not flow and out_ch == 2 * in_ch, in_channels=in_ch,
            num_classes=(c.num_embeds_ada_norm if name == "DiTTransformer2DModel" else rows.pop() - 1),
            class_dropout_prob=class_dropout_prob, input_size=getattr(c, "sample_size", None),
        )

    @property
    def diffusers_model(self):
        """What checkpoint.save_model writes: the wrapped diffusers model."""
        return self.model

    def _bank(self, key, y):
        return getattr(self, f"bank_{key}")[y]

    def forward(self, x, t, y, force_drop_ids=None):
        cfg = self.config
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids == 1, cfg.num_classes, y)
        elif self.training and cfg.class_dropout_prob > 0:
            y = torch.where(torch.rand(len(y), device=y.device) < cfg.class_dropout_prob, cfg.num_classes, y)
        m = self.model
        if self.name == "DiTTransformer2DModel":
            return m(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
        if self.name == "PixArtTransformer2DModel":
            return m(hidden_states=x, encoder_hidden_states=self._bank("encoder_hidden_states", y), timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        cond = {"encoder_hidden_states": self._bank("encoder_hidden_states", y),
                "pooled_projections": self._bank("pooled_projections", y)}
        sigma = 1 - t
        if self.name == "SD3Transformer2DModel":
            return -m(hidden_states=x, timestep=sigma * 1000, **cond, return_dict=False)[0]
        return -unpack(self._flux(pack(x), sigma, cond), x.shape)

    def _flux(self, tokens, sigma, cond):
        b, n = tokens.shape[:2]
        h = w = int(n ** 0.5)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij"), -1)
        img_ids = img_ids.reshape(n, 3).to(tokens)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3).to(tokens)
        extra = {"guidance": torch.full((b,), self.guidance).to(tokens)} if self.model.config.guidance_embeds else {}
        return self.model(hidden_states=tokens, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, **cond, **extra,
                          return_dict=False)[0]

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        from .dit import forward_with_cfg

        return forward_with_cfg(self.forward, self.config.in_channels, x, t, y, cfg_scale, guidance_channels)


def pack(x):
    """(B, C, H, W) latents -> Flux's (B, H/2 * W/2, 4C) tokens of 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, shape):
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def load_bank(path):
    """A conditioning bank file (.pt or .safetensors): {"encoder_hidden_states": (K+1, L, D),
    "pooled_projections": (K+1, P)}, row K the null prompt."""
    if not os.path.isfile(path):
        raise UserError(f"--cond {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            bank = load_file(path)
        else:
            bank = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is one line, never a traceback
        raise UserError(f"--cond {path}: not a tensor file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(bank, dict) or not all(isinstance(v, torch.Tensor) for v in bank.values()):
        raise UserError(f"--cond {path}: expected a dict of tensors")
    return bank


def load_denoiser(folder, cond=None, class_dropout_prob=0.1):
    """A diffusers transformer folder (any supported class) as a DiffusersDenoiser."""
    from .diffusers_stacks import load_folder

    den = DiffusersDenoiser(load_folder(folder), load_bank(cond) if cond else None, class_dropout_prob)
    info = os.path.join(folder, "tinyfusion.json")  # written beside a pruned or recovered folder
    den.provenance = {"source": os.path.abspath(folder)}
    if os.path.isfile(info):
        den.provenance = read_json(info)
    return den


def is_diffusers_transformer_folder(path):
    """A diffusers folder of a class other than DiT (DiT folders load as our own DiT instead)."""
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg)):
        return False
    name = read_json(cfg).get("_class_name")
    return name is not None and name != "DiTTransformer2DModel"
