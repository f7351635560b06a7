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
import contextlib
import copy

from ..errors import UserError


def mix(m, new, old):
    """m * new + (1 - m) * old per sample, through tensors, tuples and None (a stream a block drops)."""
    if isinstance(new, (tuple, list)):
        return type(new)(mix(m, a, b) for a, b in zip(new, old))
    if new is None or old is None:
        return new
    w = m.view(-1, *([1] * (new.ndim - 1))).to(new.dtype)
    return w * new + (1 - w) * old


class BlockStack:
    """Base adapter. Subclasses set `family` and implement stacks, passthrough and build."""

    family = "?"
    frozen = ()  # parameter names a full weight update must leave alone

    def __init__(self, model):
        self.model = model

    # --- what a family defines ----------------------------------------------------------------
    def stacks(self):
        """The ModuleLists of residual blocks, in execution order."""
        raise NotImplementedError

    def passthrough(self, args, kwargs, output):
        """What block would return if it were the identity (its inputs, arranged like `output`)."""
        raise NotImplementedError

    def hidden(self, state):
        """The tensor hidden-state KD and block scores compare (the image stream of a tuple)."""
        return state

    def lora_targets(self):
        """Modules whose Linear layers get the recoverability update during the search."""
        return self.stacks()

    def build(self, kept_per_stack):
        """A new model of the same class keeping kept_per_stack[s] (local indices) of stack s."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    @property
    def blocks(self):
        return [b for s in self.stacks() for b in s]

    @property
    def depths(self):
        return [len(s) for s in self.stacks()]

    @property
    def depth(self):
        return sum(self.depths)

    def check_groups(self, groups):
        """N:M groups must tile the depth and never straddle two stacks."""
        if sum(m for _, m in groups) != self.depth:
            raise UserError(f"groups cover {sum(m for _, m in groups)} layers; the {self.family} stack has {self.depth}")
        bounds, s = set(), 0
        for d in self.depths[:-1]:
            s += d
            bounds.add(s)
        start = 0
        for n, m in groups:
            inner = [b for b in bounds if start < b < start + m]
            if inner:
                raise UserError(f"group [{n}, {m}] over layers {start}..{start + m - 1} straddles the boundary at "
                                f"layer {inner[0]} between {self.family}'s stacks (depths {self.depths})")
            start += m
        return groups

    def split(self, kept):
        """Global kept indices -> local indices per stack."""
        out, start = [], 0
        for d in self.depths:
            out.append([k - start for k in kept if start <= k < start + d])
            start += d
        return out

    def prune(self, kept):
        kept = sorted(kept)
        if not kept or kept[0] < 0 or kept[-1] >= self.depth or len(set(kept)) != len(kept):
            raise UserError(f"kept indices {kept} are not distinct layers of 0..{self.depth - 1}")
        per_stack = self.split(kept)
        empty = [i for i, k in enumerate(per_stack) if not k]
        if empty:
            raise UserError(f"{self.family}: every stack must keep at least one block (stack {empty[0]} keeps none)")
        return self.build(per_stack)

    @contextlib.contextmanager
    def _hooks(self, make):
        handles = [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def masked(self, mask):
        """Inside: block i returns mask[:, i] * block(.) + (1 - mask[:, i]) * its input. mask None: no change."""
        if mask is None:
            yield
            return

        def make(i):
            return lambda mod, args, kwargs, out: mix(mask[:, i], out, self.passthrough(args, kwargs, out))

        with self._hooks(make):
            yield

    @contextlib.contextmanager
    def recording(self, layers, inputs=False):
        """Inside: rec[i] = (input hidden or None, output hidden) for each i in layers."""
        rec, wanted = {}, set(layers)

        def make(i):
            def hook(mod, args, kwargs, out):
                if i in wanted:
                    before = self.hidden(self.passthrough(args, kwargs, out)) if inputs else None
                    rec[i] = (before, self.hidden(out))
            return hook

        with self._hooks(make):
            yield rec


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
        sd = {}
        for k, v in model.state_dict().items():
            if k.startswith("blocks."):
                _, idx, rest = k.split(".", 2)
                if int(idx) in kept:
                    sd[f"blocks.{kept.index(int(idx))}.{rest}"] = v
            else:
                sd[k] = v
        shallow.load_state_dict(sd, strict=True)
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
