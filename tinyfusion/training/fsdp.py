"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training engine: models past one GPU.

Each transformer block of the adapter's stacks is its own unit and the rest of the trained module the
root, so a rank holds 1/K of every parameter, gradient and AdamW state and gathers one block at a time.
The EMA is sharded like its model (DTensor clones of the sharded parameters, updated shard by shard);
the KD teacher is sharded the same way, or replicated when it fits (`--fsdp-teacher replicate`).
Resumable states go through `torch.distributed.checkpoint`: every rank writes its own shards into one
folder. Final artifacts are gathered whole and written once by rank 0, loadable without FSDP.
"""
import os
import shutil

import torch
import torch.distributed as dist

from ..errors import UserError


def dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t):
    """A DTensor's shard on this rank (a view: in-place updates reach the DTensor); a tensor as it is."""
    return t.to_local() if isinstance(t, dtensor_type()) else t


def full(t):
    """The whole tensor of a DTensor (a collective: every rank calls it); a tensor as it is."""
    return t.full_tensor() if isinstance(t, dtensor_type()) else t


def mixed_precision(precision):
    """bf16/fp16 parameters in compute and in the gradient reduction, fp32 master weights (as --precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype) if dtype else MixedPrecisionPolicy()


def shard(root, blocks, precision, offload=False):
    """fully_shard every block, then the root (which takes every parameter left)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = {"mp_policy": mixed_precision(precision), "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)
    return root


def check_supported(model, offload, device):
    """One line for what --fsdp cannot shard or run, before any work."""
    from ..models.stack import block_stack

    try:
        blocks = block_stack(model).blocks
    except UserError:
        blocks = []
    if not blocks:
        raise UserError(f"--fsdp shards the blocks of a model the block-stack adapter knows; a {type(model).__name__} "
                        "has none")
    if offload and torch.device(device).type != "cuda":
        raise UserError("--fsdp-offload moves GPU parameters and optimizer state to the host: it needs CUDA")


def gather_into(module, tensors, buffers_from=None):
    """Fill a plain module (possibly on the meta device) with the whole values of `tensors` (DTensors or
    tensors, in the order of module.parameters()); every rank calls it (the gathers are collectives).
    Buffers, never sharded, are copied by name from `buffers_from`."""
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    with torch.no_grad():
        for p, t in zip(module.parameters(), tensors, strict=True):
            p.copy_(full(t).to(p.dtype))
        if buffers_from is not None:
            source = dict(buffers_from.named_buffers())
            for name, b in module.named_buffers():
                if name in source:
                    b.copy_(local(source[name]))
    return module


# --- resumable state through torch.distributed.checkpoint -------------------------------------------

def dcp_path(path):
    return path + ".dcp"


def save_sharded(path, tensors, meta, rank):
    """Every rank writes its shards of `tensors` (a dict of DTensors and tensors) into a fresh folder next to
    the final one; rank 0 adds `meta` (plain values) and swaps the folder in, so a kill at any moment leaves
    the previous state whole."""
    import torch.distributed.checkpoint as dcp

    final = dcp_path(path)
    tmp = final + ".tmp"
    if rank == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(tensors, checkpoint_id=tmp)
    if rank == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        old = final + ".old"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.isdir(old):
            shutil.rmtree(old)
    dist.barrier()


def load_sharded(path, tensors):
    """Read this rank's shards into `tensors` (in place) and return the plain values rank 0 saved."""
    import torch.distributed.checkpoint as dcp

    folder = dcp_path(path)
    if not os.path.isfile(os.path.join(folder, "meta.pt")):
        raise UserError(f"--resume: {folder} is not a complete sharded state")
    meta = torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size") != world:
        raise UserError(f"--resume: the sharded state was written by {meta.get('world_size')} rank(s); resume it on "
                        f"{meta.get('world_size')}, not {world}")
    dcp.load(tensors, checkpoint_id=folder)
    return meta


def state_exists(path):
    """A resumable state at `path`: the engine's file, or the sharded folder an --fsdp run writes."""
    return os.path.isfile(path) or os.path.isdir(dcp_path(path))
