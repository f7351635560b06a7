"""torchrun-aware process group set-up: gloo on CPU, nccl on GPU; a single process needs nothing."""
import os

import torch
import torch.distributed as dist


def setup(group_of_one=False):
    """(rank, world_size, device). Initializes the process group when launched by torchrun, or as a group of
    one process when asked (FSDP needs a group even alone: one GPU measuring its memory)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif group_of_one and not dist.is_initialized():
        from ..errors import on_exit

        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        on_exit.append(_end_group_of_one)  # a command run in-process that fails leaves no group behind
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _end_group_of_one():
    from ..errors import on_exit

    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()
    on_exit.remove(_end_group_of_one)


def setup_run(global_batch_size, run_dir, fsdp=False):
    """setup() plus what every training CLI checks first: the batch splits evenly, rank 0 can write run_dir."""
    from ..errors import UserError, writable_file

    world = int(os.environ.get("WORLD_SIZE", "1"))  # checked before the process group waits for its peers
    if global_batch_size % world:
        raise UserError(f"--global-batch-size {global_batch_size} is not divisible by {world} ranks")
    rank, world, device = setup(group_of_one=fsdp)
    if rank == 0:
        writable_file(os.path.join(run_dir, "log.txt"))
    return rank, world, device


_patient = None  # the gloo group wait_for_all uses, made on first use (every rank calls it together)


def wait_for_all(hours=48):
    """A barrier that can wait hours, on a gloo group of its own: after uneven work (sampling chunks that
    do not divide among the ranks, rank 0 packing the result) NCCL's watchdog would end a plain barrier
    after its timeout (10 minutes by default) and take the job down."""
    global _patient
    if not dist.is_initialized():
        return
    if _patient is None:
        from datetime import timedelta

        _patient = dist.new_group(backend="gloo", timeout=timedelta(hours=hours))
    dist.barrier(group=_patient)


def cleanup():
    """Every rank waits for the others (rank 0 may still be writing artifacts) before the group goes: a rank
    that tears gloo down early makes a late one abort on a closed pair."""
    global _patient
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # every group, the patient one too
        _patient = None
