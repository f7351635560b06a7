"""Block-stack adapters: the one place that knows where a model's residual blocks are.

The pruner, the baselines, Masked KD, surgery and the latency bench reach a model only through
`block_stack(model)`:

    stack = block_stack(model)            # DiT/SiT, MAR, or a diffusers transformer
    stack.depth, stack.depths             # all blocks; per stack (Flux: double, single)
    with stack.masked(mask):              # (B, depth): block i acts as m*block(.) + (1-m)*identity
        out = model(...)                  # the model's own forward, unchanged
    with stack.recording([3, 5]) as rec:  # rec[i] = (input hidden, output hidden) of block i
        out = model(...)
    shallow = stack.prune(kept)           # a model of the same class with only those blocks

Masking and recording are forward hooks, so no model's forward is rewritten and the state-dict
names never change. A family adds one small subclass: which ModuleLists hold the blocks, what a
skipped block returns (its input, arranged like its output), and how to build the shallow model.
"""
import copy

from ..errors import UserError
from .stack_base import BlockStack, renumbered  # the base lives apart: the diffusers adapters subclass it


class DiTStack(BlockStack):
    """DiT and SiT (same network): one stack, `model.blocks`, each block maps x -> x."""

    family = "DiT"
    frozen = ("pos_embed",)

    def stacks(self):
        return [self.model.blocks]

    def passthrough(self, args, kwargs, output):
        return args[0]

    def lora_targets(self):
        m = self.model
        return [m.blocks, m.final_layer, m.t_embedder]

    def build(self, kept_per_stack):
        kept = kept_per_stack[0]
        model = self.model
        cfg = copy.deepcopy(model.config)
        cfg.depth = len(kept)
        shallow = type(model)(cfg).to(next(model.parameters()).device)
        shallow.load_state_dict(renumbered(model.state_dict(), {"blocks.": kept}), strict=True)
        return shallow.eval()


class MARStack(BlockStack):
    """MAR: the encoder then the decoder blocks, two stacks (the paper prunes MAR-L 32 -> 16 in all)."""

    family = "MAR"

    def stacks(self):
        return [self.model.encoder_blocks, self.model.decoder_blocks]

    def passthrough(self, args, kwargs, output):
        return args[0]

    def lora_targets(self):
        return [*self.stacks(), self.model.diffloss.net]

    def build(self, kept_per_stack):
        from .mar import prune_mar

        return prune_mar(self.model, *kept_per_stack)


def block_stack(model) -> BlockStack:
    """The adapter for `model`; a one-line error naming the adapters tried when none fits."""
    from .dit import DiT

    from .mar import MAR

    if isinstance(model, DiT):
        return DiTStack(model)
    if isinstance(model, MAR):
        return MARStack(model)
    from .diffusers_denoiser import DiffusersDenoiser

    if isinstance(model, DiffusersDenoiser):  # hooks on the wrapped model's blocks; prune returns that model
        model = model.model
    if type(model).__module__.startswith("diffusers."):
        from .diffusers_stacks import diffusers_stack

        return diffusers_stack(model)
    raise UserError(f"cannot find the block stack of a {type(model).__name__}: tried the DiT/SiT, MAR and diffusers adapters")
