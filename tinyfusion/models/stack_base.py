"""The block-stack adapter's base class (see stack.py for what an adapter is); each family's adapter
subclasses it, and `stack.block_stack` picks the one that fits a model."""
import contextlib

from ..errors import UserError


def blend_per_sample(m, new, old):
    """m * new + (1 - m) * old per sample, through tensors, tuples and None (a stream a block drops)."""
    if isinstance(new, (tuple, list)):
        return type(new)(blend_per_sample(m, a, b) for a, b in zip(new, old))
    if new is None or old is None:
        return new
    w = m.view(-1, *([1] * (new.ndim - 1))).to(new.dtype)
    return w * new + (1 - w) * old


def validate_kept(kept, depth):
    """Sorted kept layer indices: not empty, inside 0..depth-1, no duplicates (one check for the prune
    command's --kept, the surgery and every adapter)."""
    if not kept:
        raise UserError("the kept layer list is empty")
    bad = [k for k in kept if not 0 <= k < depth]
    if bad:
        raise UserError(f"kept indices {bad} are outside 0..{depth - 1}")
    if len(set(kept)) != len(kept):
        raise UserError(f"kept indices contain duplicates: {sorted(kept)}")
    return sorted(kept)


def renumbered(state_dict, kept_by_prefix):
    """The state dict of a shallow model: under each block-list prefix (e.g. "blocks."), only the kept
    blocks, renumbered 0..len(kept)-1 in order; every other entry as it is."""
    out = {}
    for k, v in state_dict.items():
        for prefix, kept in kept_by_prefix.items():
            if k.startswith(prefix):
                idx, rest = k[len(prefix):].split(".", 1)
                if int(idx) in kept:
                    out[f"{prefix}{kept.index(int(idx))}.{rest}"] = v
                break
        else:
            out[k] = v
    return out


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
        kept = validate_kept(kept, self.depth)
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
            return lambda mod, args, kwargs, out: blend_per_sample(mask[:, i], out, self.passthrough(args, kwargs, out))

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
