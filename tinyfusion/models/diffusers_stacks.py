"""Block-stack adapters for diffusers transformers: DiT, PixArt, SD3 and Flux.

The pruned model is the same diffusers class with fewer blocks and its config's layer counts updated,
so `save_pretrained` writes a folder that `from_pretrained` loads. Two details make that exact:
- SD3 builds its last block "context-pre-only" (no context output, a 2-way context norm). When the kept
  last block was an inner one, it is converted: the same image-stream computation, the context norm's
  shift/scale rows reordered, the unused context output layers dropped. SD3.5's dual-attention layer
  indices are renumbered.
- diffusers' DiT reads the output layer's conditioning from block 0's embedder; converted checkpoints
  hold the same embedder in every block, which is checked before block 0 is dropped.
"""
import copy

import torch
import torch.nn as nn

from ..errors import UserError, read_json
from .stack_base import BlockStack


def _hidden_states(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class DiffusersStack(BlockStack):
    """One `transformer_blocks` list whose blocks map hidden_states -> hidden_states (DiT, PixArt)."""

    stack_names = ("transformer_blocks",)
    layer_keys = ("num_layers",)

    def stacks(self):
        return [getattr(self.model, n) for n in self.stack_names]

    def passthrough(self, args, kwargs, output):
        return _hidden_states(args, kwargs)

    def build(self, kept_per_stack):
        new = copy.deepcopy(self.model)
        for name, key, kept in zip(self.stack_names, self.layer_keys, kept_per_stack):
            old = getattr(new, name)
            setattr(new, name, nn.ModuleList([old[i] for i in kept]))
            new.register_to_config(**{key: len(kept)})
        return new.eval()


class DiTTransformerStack(DiffusersStack):
    family = "diffusers DiT"

    def build(self, kept_per_stack):
        kept = kept_per_stack[0]
        blocks = self.model.transformer_blocks
        if kept[0] != 0:
            a, b = blocks[0].norm1.emb.state_dict(), blocks[kept[0]].norm1.emb.state_dict()
            if any(not torch.equal(a[k], b[k]) for k in a):
                raise UserError("diffusers' DiT reads its output conditioning from block 0's embedder, and this model's "
                                f"block {kept[0]} has a different one: keep block 0")
        return super().build(kept_per_stack)


class PixArtStack(DiffusersStack):
    family = "PixArt"


class JointStack(DiffusersStack):
    """Blocks that carry (encoder_hidden_states, hidden_states) and return them in that order."""

    def passthrough(self, args, kwargs, output):
        return kwargs["encoder_hidden_states"], _hidden_states(args, kwargs)

    def hidden(self, state):
        return state[1]


class SD3Stack(JointStack):
    family = "SD3"

    def build(self, kept_per_stack):
        kept = kept_per_stack[0]
        new = super().build(kept_per_stack)
        dual = set(self.model.config.dual_attention_layers or ())
        new.register_to_config(dual_attention_layers=tuple(j for j, i in enumerate(kept) if i in dual))
        last = new.transformer_blocks[-1]
        if not last.context_pre_only:
            new.transformer_blocks[-1] = context_pre_only(last, new.config)
        return new.eval()


def context_pre_only(block, config):
    """The last-block form of an inner SD3 block: same image output, no context output."""
    from diffusers.models.attention import JointTransformerBlock

    dim = config.num_attention_heads * config.attention_head_dim
    out = JointTransformerBlock(dim, config.num_attention_heads, config.attention_head_dim, context_pre_only=True,
                                qk_norm=config.qk_norm, use_dual_attention=block.use_dual_attention)
    sd = {k: v for k, v in block.state_dict().items()
          if not k.startswith(("ff_context.", "norm2_context.", "attn.to_add_out.", "norm1_context."))}
    shift, scale = block.norm1_context.linear.weight[:dim], block.norm1_context.linear.weight[dim:2 * dim]
    bshift, bscale = block.norm1_context.linear.bias[:dim], block.norm1_context.linear.bias[dim:2 * dim]
    sd["norm1_context.linear.weight"] = torch.cat([scale, shift])  # AdaLayerNormContinuous chunks (scale, shift)
    sd["norm1_context.linear.bias"] = torch.cat([bscale, bshift])
    out.load_state_dict(sd, strict=True)
    return out.to(block.norm1_context.linear.weight.device, block.norm1_context.linear.weight.dtype)


class FluxStack(JointStack):
    """Double-stream then single-stream blocks: two stacks, each with its own N:M groups."""

    family = "Flux"
    stack_names = ("transformer_blocks", "single_transformer_blocks")
    layer_keys = ("num_layers", "num_single_layers")


FAMILIES = {
    "DiTTransformer2DModel": DiTTransformerStack,
    "PixArtTransformer2DModel": PixArtStack,
    "SD3Transformer2DModel": SD3Stack,
    "FluxTransformer2DModel": FluxStack,
}


def diffusers_stack(model):
    cls = FAMILIES.get(type(model).__name__)
    if cls is None:
        raise UserError(f"cannot find the block stack of a {type(model).__name__}: tried the DiT/SiT and MAR adapters and the "
                        f"diffusers adapters for {', '.join(FAMILIES)}")
    return cls(model)


def load_folder(path):
    """A diffusers transformer folder -> the model, for any class in FAMILIES."""
    import os

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: not a diffusers model folder (no config.json)")
    name = read_json(cfg_path).get("_class_name")
    if name not in FAMILIES:
        raise UserError(f"{path}: _class_name {name!r} has no block-stack adapter; supported: {', '.join(FAMILIES)}")
    import diffusers

    try:
        return getattr(diffusers, name).from_pretrained(path, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: diffusers could not load the {name} ({str(e).splitlines()[0][:200]})") from None
