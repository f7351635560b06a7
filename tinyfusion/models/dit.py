"""DiT (Peebles & Xie 2023) with module and parameter names identical to facebookresearch/DiT.

Official checkpoints load with strict=True. Two knobs exist only so that diffusers'
`DiTTransformer2DModel` can be reproduced exactly (its port differs from the original in two places):
`timestep_freq_shift` (diffusers divides the frequency exponent by half-1, the original by half) and
`mlp_norm_eps` (diffusers' second LayerNorm uses 1e-5, the original 1e-6).
"""
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.guidance import guide


@dataclass
class DiTConfig:
    depth: int = 28
    hidden_size: int = 1152
    patch_size: int = 2
    num_heads: int = 16
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    timestep_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    # The objective the weights were trained with: "diffusion" (DiT) or "flow" (SiT: same network).
    objective: str = "diffusion"
    path: str = "linear"  # flow only: linear or gvp interpolant
    prediction: str = "velocity"  # flow only: velocity, noise or score

    def to_dict(self):
        return asdict(self)


# Widths and heads of the published family; depth is free (DiT-D14/2 is DiT-XL/2 at depth 14).
FAMILY = {"S": (384, 6, 12), "B": (768, 12, 12), "L": (1024, 16, 24), "XL": (1152, 16, 28)}
HEADS_BY_WIDTH = {w: h for w, h, _ in FAMILY.values()}


def config_from_name(name: str, **overrides) -> DiTConfig:
    """'DiT-XL/2', 'DiT-S/4', 'DiT-XL-D14/2' (any depth), or 'SiT-XL/2'. Raises ValueError on unknown names."""
    sit = name.startswith("SiT-")
    try:
        body, patch = name.removeprefix("SiT-" if sit else "DiT-").split("/")
        size, _, depth = body.partition("-D")
        width, heads, default_depth = FAMILY[size]
        cfg = DiTConfig(depth=int(depth or default_depth), hidden_size=width, num_heads=heads, patch_size=int(patch))
    except (ValueError, KeyError):
        raise ValueError(f"unknown model name {name!r}; expected DiT-{{S,B,L,XL}}/{{2,4,8}}, optionally DiT-XL-D14/2, "
                         "or the same with SiT-") from None
    if cfg.patch_size not in (2, 4, 8):
        raise ValueError(f"unknown model name {name!r}: patch size must be 2, 4 or 8")
    if sit:  # SiT is the DiT network trained with flow matching (official checkpoints keep learn_sigma)
        cfg.objective = "flow"
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv patchifier with the parameter name timm uses (`proj`)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):  # attn_mask (B, 1, 1, N) bool, True = key visible (MAR's export)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_embedding(t, dim, freq_shift=0, max_period=10000):
    """Sinusoidal embedding, cos first. freq_shift=0 is the original DiT, 1 is diffusers' DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; the extra last row is the 'null' class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: per-sample shift/scale/gate from the conditioning, gates start at zero."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mlp_norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # The branches run in their weights' dtype: with attn/mlp cast to fp16 or bf16 (mixed-precision
        # export) LayerNorm, modulation, gates and the residual stay in x's dtype. No-ops when they agree.
        low = self.attn.qkv.weight.dtype
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa).to(low)).to(x.dtype)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp).to(low)).to(x.dtype)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        if c.input_size % c.patch_size:
            raise ValueError(f"input_size {c.input_size} is not divisible by patch_size {c.patch_size}")
        self.in_channels = c.in_channels
        self.out_channels = c.in_channels * 2 if c.learn_sigma else c.in_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, freq_shift=c.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        num_patches = (c.input_size // c.patch_size) ** 2
        # A frozen parameter (not a buffer) because official checkpoints store it under this name.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp_norm_eps) for _ in range(c.depth)]
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Tokens and conditioning vector: what every block receives."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return x, c

    def head(self, x, c):
        return self.unpatchify(self.final_layer(x, c))

    def forward(self, x, t, y, force_drop_ids=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        x, c = self.embed(x, t, y, force_drop_ids)
        for block in self.blocks:
            x = block(x, c)
        return self.head(x, c)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        return forward_with_cfg(self.forward, self.in_channels, x, t, y, cfg_scale, guidance_channels)


def forward_with_cfg(forward, in_channels, x, t, y, cfg_scale, guidance_channels=None):
    """Classifier-free guidance on a batch whose second half carries the null label.

    guidance_channels=None guides every noise-prediction channel (diffusers' DiTPipeline);
    guidance_channels=3 reproduces facebookresearch/DiT, which guides the first 3 channels only.
    Shared by the module and every runtime backend, so all of them guide the same way.
    """
    half = x[: x.shape[0] // 2]  # not len(x): that would fix the batch size in an exported graph
    out = forward(torch.cat([half, half]), t, y)
    return guide(out, in_channels if guidance_channels is None else guidance_channels, cfg_scale)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos embedding (MAE convention: first half encodes w, second half h)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
