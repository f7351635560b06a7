"""MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization") with parameter
names identical to LTH14/mar, so official checkpoints load by key name.

An MAE-style encoder sees the class "buffer" tokens and the known (unmasked) continuous tokens; the
decoder fills the masked positions with a mask token, and a small adaLN MLP (the diffusion head)
models each token given the decoder output z, trained with DiT's diffusion loss on a cosine schedule.
Generation unmasks tokens in a random order over `num_iter` steps (cosine schedule), sampling each new
token with the head (temperature, CFG linear in the unmasked share as Muse). Depth pruning applies to
`encoder_blocks` and `decoder_blocks`: two stacks of the block-stack adapter.
"""
import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.gaussian import create_diffusion, randn_on
from ..diffusion.guidance import guide
from .dit import Attention, TimestepEmbedder
from .stack_base import renumbered


@dataclass
class MARConfig:
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    class_num: int = 1000
    class_rows: int = 1000  # official MARs keep a 1000-row class table whatever class_num is
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    diffusion_batch_mul: int = 4
    # Clip the head's x0 prediction to [-1, 1] while sampling: right for pixel tokens in [-1, 1] (the digits
    # MAR), not for VAE latents (official MARs, off). The cosine schedule's first step (alpha_bar 2.4e-9)
    # multiplies the eps error by 2e4, which a small head's error (rmse 0.02) turns into tokens of +-3000.
    clip_tokens: bool = False

    def to_dict(self):
        return asdict(self)

    @property
    def seq_len(self):
        return (self.img_size // self.vae_stride // self.patch_size) ** 2

    # The names the shared trainers and CLIs read from any model config.
    objective = "mar"
    learn_sigma = True

    @property
    def depth(self):
        return self.encoder_depth + self.decoder_depth

    @property
    def num_classes(self):
        return self.class_num

    @property
    def class_dropout_prob(self):
        return self.label_drop_prob

    @property
    def in_channels(self):
        return self.vae_embed_dim

    @property
    def input_size(self):
        return self.img_size // self.vae_stride

    @property
    def hidden_size(self):
        return self.encoder_embed_dim


# MAR-B/L/H widths and depths (encoder = decoder); depth pruning halves MAR-L from 32 to 16 blocks in all.
MAR_FAMILY = {"base": (768, 12, 12), "large": (1024, 16, 16), "huge": (1280, 20, 16)}


class Mlp(nn.Module):  # timm's: exact GELU (DiT's Mlp uses the tanh approximation)
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (its parameter names; dropout omitted: it is off at inference)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.in_ln = nn.LayerNorm(ch, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 3 * ch))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class HeadFinalLayer(nn.Module):
    def __init__(self, ch, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(ch, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(ch, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 2 * ch))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """The diffusion head: x_t (a token), t and the decoder's z -> eps and variance values."""

    def __init__(self, in_ch, width, z_ch, depth):
        super().__init__()
        self.in_channels = in_ch
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_ch, width)
        self.input_proj = nn.Linear(in_ch, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = HeadFinalLayer(width, 2 * in_ch)

    def forward(self, x, t, c):
        y = self.time_embed(t) + self.cond_embed(c)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    def __init__(self, target_ch, z_ch, depth, width):
        super().__init__()
        self.net = SimpleMLPAdaLN(target_ch, width, z_ch, depth)
        self.train_diffusion = create_diffusion(schedule="cosine")

    def forward(self, target, z, t, noise=None):
        """Per-token loss (eps-MSE + VB) at timesteps t."""
        return self.train_diffusion.training_losses(lambda xt, tt: self.net(xt, tt, z), target, t, noise)

    @torch.no_grad()
    def sample(self, z, steps=100, temperature=1.0, cfg=1.0, generator=None, clip=False):
        from ..diffusion.sampling import ddpm_loop

        diffusion = create_diffusion(str(steps), schedule="cosine")
        c = self.net.in_channels
        if cfg == 1.0:
            noise = randn_on((len(z), c), generator, z.device)
            return ddpm_loop(diffusion, lambda x, t: self.net(x, t, z), noise, generator, temperature=temperature,
                             clip_denoised=clip)
        half = randn_on((len(z) // 2, c), generator, z.device)

        def guided(x, t):
            return guide(self.net(torch.cat([x[: len(x) // 2]] * 2), t, z), c, cfg)

        return ddpm_loop(diffusion, guided, torch.cat([half, half]), generator, temperature=temperature,
                         clip_denoised=clip)


class MAR(nn.Module):
    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = c = config
        self.seq_len = c.seq_len
        self.token_embed_dim = c.vae_embed_dim * c.patch_size**2
        e, d = c.encoder_embed_dim, c.decoder_embed_dim
        self.class_emb = nn.Embedding(c.class_rows, e)
        self.fake_latent = nn.Parameter(torch.zeros(1, e))
        self.z_proj = nn.Linear(self.token_embed_dim, e)
        self.z_proj_ln = nn.LayerNorm(e, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + c.buffer_size, e))
        self.encoder_blocks = nn.ModuleList([Block(e, c.encoder_num_heads, c.mlp_ratio) for _ in range(c.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(e, eps=1e-6)
        self.decoder_embed = nn.Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + c.buffer_size, d))
        self.decoder_blocks = nn.ModuleList([Block(d, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, d))
        self.diffloss = DiffLoss(self.token_embed_dim, d, c.diffloss_d, c.diffloss_w)
        self.initialize_weights()

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        net = self.diffloss.net
        nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                          net.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- tokens ---------------------------------------------------------------------------------
    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x):
        b, p, c = x.shape[0], self.config.patch_size, self.config.vae_embed_dim
        s = int(self.seq_len ** 0.5)
        x = x.reshape(b, s, s, c, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(b, c, s * p, s * p)

    def class_embedding(self, labels, drop=None):
        """Class rows; where drop == 1 (or the label is class_num) the learned 'fake latent' for CFG."""
        null = labels >= self.config.class_num
        if drop is not None:
            null = null | (drop == 1)
        emb = self.class_emb(labels.clamp(max=self.config.class_rows - 1))
        return torch.where(null[:, None], self.fake_latent.expand_as(emb), emb)

    # --- the two transformer stacks ----------------------------------------------------------------
    def visible(self, mask):
        """(B, buffer + L) bool: what the encoder sees, the class buffer and the known tokens."""
        ones = torch.ones(mask.shape[0], self.config.buffer_size, dtype=torch.bool, device=mask.device)
        return torch.cat([ones, ~mask], dim=1)

    def encoder_input(self, tokens, class_emb):
        x = self.z_proj(tokens)
        b, _, e = x.shape
        x = torch.cat([class_emb[:, None].expand(b, self.config.buffer_size, e), x], dim=1)
        return self.z_proj_ln(x + self.encoder_pos_embed_learned)

    def decoder_output(self, x):
        """Decoder blocks over every position (mask tokens filled in), then z for the image tokens."""
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, self.config.buffer_size:] + self.diffusion_pos_embed_learned

    def forward_encoder(self, tokens, mask, class_emb):
        x = self.encoder_input(tokens, class_emb)
        x = x[self.visible(mask)].reshape(x.shape[0], -1, x.shape[-1])  # every sample masks the same number
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x, mask):
        x = self.decoder_embed(x)
        keep = self.visible(mask)
        full = self.mask_token.expand(x.shape[0], keep.shape[1], -1).clone().to(x.dtype)
        full[keep] = x.reshape(-1, x.shape[-1])
        return self.decoder_output(full)

    def predict_z(self, tokens, mask, labels, drop=None):
        """z for every position: (B, L, decoder width). mask (B, L) bool: True = unknown, to predict."""
        return self.forward_decoder(self.forward_encoder(tokens, mask, self.class_embedding(labels, drop)), mask)

    def predict_z_static(self, tokens, mask, labels):
        """predict_z with static shapes, for export: the encoder runs over every position and attention hides
        the masked ones (instead of dropping them), so per-sample mask counts may differ. Equal to predict_z
        up to float summation order (tested)."""
        keep = self.visible(mask)
        x = self.encoder_input(tokens, self.class_embedding(labels))
        for blk in self.encoder_blocks:
            x = blk(x, keep[:, None, None, :])
        x = self.decoder_embed(self.encoder_norm(x))
        return self.decoder_output(torch.where(keep[..., None], x, self.mask_token.to(x.dtype)))

    def forward(self, images, t, labels, force_drop_ids=None):
        """One training evaluation in the shared trainers' call: `t` (B,) integer seeds make everything
        random per sample (order, head timesteps and noise), so a teacher and a student called with the
        same (images, t, labels, drops) see the same masks and noised tokens; the mask ratio comes from
        the batch's seeds. Returns the per-sample loss, the head's outputs and the loss weights."""
        c = self.config
        tokens = self.patchify(images)
        b, L, d = tokens.shape
        if force_drop_ids is None and self.training and c.label_drop_prob > 0:
            force_drop_ids = (torch.rand(b, device=images.device) < c.label_drop_prob).long()
        gens = [torch.Generator().manual_seed(int(v)) for v in t.tolist()]
        mask = self.random_mask(b, gens, torch.Generator().manual_seed(int(t.sum()))).to(images.device)
        z = self.predict_z(tokens, mask, labels, force_drop_ids)
        mul = c.diffusion_batch_mul
        head_t = torch.stack([torch.randint(0, 1000, (mul * L,), generator=g) for g in gens]).to(images.device)
        noise = torch.stack([torch.randn(mul * L, d, generator=g) for g in gens]).to(images.device)
        target = tokens.repeat(1, mul, 1)  # (B, mul*L, d): each token mul times
        terms = self.diffloss(target.reshape(-1, d), z.repeat(1, mul, 1).reshape(b * mul * L, -1), head_t.reshape(-1),
                              noise.reshape(-1, d))
        w = mask.repeat(1, mul).float()
        per_token = terms["loss"].view(b, mul * L)
        return {"loss": (per_token * w).sum(1) / w.sum(1), "output": terms["output"].view(b, mul * L, -1),
                "weight": w, "mask": mask}

    # --- training --------------------------------------------------------------------------------
    def random_mask(self, b, order_gens, ratio_gen):
        """Random orders (one generator per sample), then the first ceil(L * r) masked, r from MAR's
        truncated normal on [mask_ratio_min, 1]."""
        from scipy.stats import truncnorm

        lo = (self.config.mask_ratio_min - 1.0) / 0.25
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ratio_gen))
        rate = truncnorm.rvs(lo, 0, loc=1.0, scale=0.25, random_state=np.random.default_rng(seed))
        orders = torch.stack([torch.argsort(torch.rand(self.seq_len, generator=g)) for g in order_gens])
        n = int(math.ceil(self.seq_len * rate))
        mask = torch.zeros(b, self.seq_len, dtype=torch.bool)
        mask.scatter_(1, orders[:, :n], True)
        return mask

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels, num_iter=64, cfg=1.0, temperature=1.0, head_steps=100, seed=0, progress=None):
        """Images (B, C, H, W) for `labels`, unmasking tokens in a random order over num_iter steps."""
        device = labels.device
        g = torch.Generator().manual_seed(seed)
        b, L = len(labels), self.seq_len
        mask = torch.ones(b, L, dtype=torch.bool, device=device)
        tokens = torch.zeros(b, L, self.token_embed_dim, device=device)
        orders = torch.argsort(torch.rand(b, L, generator=g), dim=1).to(device)
        for step in range(num_iter):
            lab, toks, msk = labels, tokens, mask
            if cfg != 1.0:
                lab = torch.cat([labels, torch.full_like(labels, self.config.class_num)])
                toks, msk = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            z = self.predict_z(toks, msk, lab)
            # how many stay masked after this step: cosine schedule, at least one fewer, at least one left
            left = int(math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter)))
            left = max(1, min(int(mask[0].sum()) - 1, left))
            mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :left], True)
            predict = mask if step == num_iter - 1 else mask & ~mask_next
            cfg_iter = 1 + (cfg - 1) * (L - left) / L  # Muse's linear guidance schedule
            rows = torch.cat([predict, predict]) if cfg != 1.0 else predict
            new = self.diffloss.sample(z[rows], head_steps, temperature, cfg_iter, g, self.config.clip_tokens)
            if cfg != 1.0:
                new = new[: len(new) // 2]
            tokens = tokens.clone()
            tokens[predict] = new
            mask = mask_next if step < num_iter - 1 else torch.zeros_like(mask)
            if progress is not None:
                progress.update(1)
        return self.unpatchify(tokens)


def prune_mar(model, kept_encoder, kept_decoder):
    """A MAR keeping those encoder and decoder blocks (local indices), renumbered from 0."""
    cfg = copy.deepcopy(model.config)
    cfg.encoder_depth, cfg.decoder_depth = len(kept_encoder), len(kept_decoder)
    shallow = MAR(cfg).to(next(model.parameters()).device)
    sd = renumbered(model.state_dict(), {"encoder_blocks.": kept_encoder, "decoder_blocks.": kept_decoder})
    shallow.load_state_dict(sd, strict=True)
    return shallow.eval()


def config_from_state_dict(sd, **overrides):
    """The MARConfig that official (or our) MAR weights imply; heads from the published widths."""
    from ..errors import UserError

    need = ("z_proj.weight", "decoder_embed.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned",
            "diffloss.net.input_proj.weight", "class_emb.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise UserError(f"not a MAR checkpoint: missing {', '.join(missing)}")
    e, token = sd["z_proj.weight"].shape
    d = sd["decoder_embed.weight"].shape[0]
    seq = sd["diffusion_pos_embed_learned"].shape[1]
    heads = {w: h for w, _, h in MAR_FAMILY.values()}

    def depth(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    patch, stride = overrides.pop("patch_size", 1), overrides.pop("vae_stride", 16)
    cfg = MARConfig(img_size=int(round(seq ** 0.5)) * patch * stride, vae_stride=stride, patch_size=patch,
                    vae_embed_dim=token // patch**2, encoder_embed_dim=e, encoder_depth=depth("encoder_blocks."),
                    encoder_num_heads=heads.get(e, max(1, e // 64)), decoder_embed_dim=d,
                    decoder_depth=depth("decoder_blocks."), decoder_num_heads=heads.get(d, max(1, d // 64)),
                    mlp_ratio=sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] / e if "encoder_blocks.0.mlp.fc1.weight" in sd else 4.0,
                    class_rows=sd["class_emb.weight"].shape[0], buffer_size=sd["encoder_pos_embed_learned"].shape[1] - seq,
                    diffloss_d=depth("diffloss.net.res_blocks."), diffloss_w=sd["diffloss.net.input_proj.weight"].shape[0])
    cfg.class_num = min(cfg.class_num, cfg.class_rows)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def mar_from_state_dict(sd, info, where, **overrides):
    """A MAR in eval mode from a state dict; sizes from our metadata, else read from the keys."""
    from ..errors import UserError

    meta = dict(info.get("config", {}))
    if meta.get("encoder_embed_dim"):
        meta.update(overrides)
        cfg = MARConfig(**{k: v for k, v in meta.items() if k in MARConfig.__dataclass_fields__})
    else:
        cfg = config_from_state_dict(sd, **overrides)
    model = MAR(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise UserError(f"{where}: keys or shapes do not match a MAR ({str(e).splitlines()[1].strip()[:200]})") from None
    model.provenance = info
    return model.eval()
