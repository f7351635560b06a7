"""One claim on a run folder, shared by `train`, `prune` and `finetune`: a lock while the run lives, a
record of what made it (`run.json`), and never another run's artifacts mixed into this one's.

- A folder in use by a live run is refused. The lock is `flock` on the folder itself, so nothing extra is
  written, and the kernel drops it when the process ends however it ends (a SIGKILLed run leaves none stuck).
- A folder holding a run is refused unless `--resume` (then its record must match this run's: the
  checkpoint's SHA-256 and every setting that changes the result; one line names what differs) or
  `--overwrite` (then the earlier run's files go first, so no stale plot or search state is picked up).
- A non-empty folder that is not a run folder is never cleared: choose another --out.
"""
import fcntl
import json
import os
import shutil

import torch
import torch.distributed as dist

from ..checkpoint import atomic_write, file_sha256
from ..errors import UserError, on_exit, read_json

RECORD = "run.json"
# Settings that change how a run goes, not what it computes: a resumed run may change them.
NOT_RESULT = {"out", "resume", "overwrite", "num_workers", "log_every", "ckpt_every", "ckpt_minutes", "grad_accum",
              "grad_checkpoint", "compile", "results_dir", "name", "max_bad_steps", "snapshot_steps", "snapshots"}
_locks = {}  # folder -> open fd, held until the command returns (or the process ends)


def add_overwrite_arg(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier run in --out (its files are removed first)")


def release():
    """Drop this process's locks: a command run in-process (tests) frees its folder when it returns."""
    while _locks:
        os.close(_locks.popitem()[1])


def record_of(command, args, files=(), ignore=()):
    """What makes a run's result: every argument but those in NOT_RESULT and `ignore` (paths made absolute) and the SHA-256
    of each checkpoint named in `files` (an argument name; the path itself is left out, since a moved
    checkpoint is the same input)."""
    record = {"command": command}
    for key, value in sorted(vars(args).items()):
        if key in NOT_RESULT or key in ignore or key in files or callable(value):
            continue
        if key.endswith("_path") and isinstance(value, str):
            value = os.path.abspath(value)
        record[key] = json.loads(json.dumps(value, default=str))
    for key in files:
        path = getattr(args, key)
        record[f"{key}_sha256"] = file_sha256(path) if path else None
    return record


def _lock(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder} is in use by another running process; wait for it or choose another --out") from None
    _locks[folder] = fd
    if release not in on_exit:
        on_exit.append(release)


def read_record(folder):
    """The folder's run.json, or None where it has none; a corrupt one is one error line."""
    path = os.path.join(folder, RECORD)
    return read_json(path, "a run record (a JSON object)") if os.path.isfile(path) else None


def write_record(folder, record):
    atomic_write(os.path.join(folder, RECORD),
                 lambda tmp: open(tmp, "w").write(json.dumps(record, indent=1, sort_keys=True)))


def differing(record, earlier):
    """The keys whose values differ between two records, sorted."""
    return sorted(k for k in set(record) | set(earlier) if record.get(k) != earlier.get(k))


def _claim(folder, record, resume, overwrite):
    folder = os.path.abspath(folder)
    if resume and not os.path.isdir(folder):
        raise UserError(f"--resume: {folder} does not exist")
    os.makedirs(folder, exist_ok=True)  # nothing can refuse a folder that did not exist: it is empty
    _lock(folder)
    entries = os.listdir(folder)
    is_run = RECORD in entries or "log.txt" in entries  # log.txt: a run folder written before run.json existed
    if entries and not is_run:
        raise UserError(f"{folder} holds files that are not a tinyfusion run; choose another --out")
    if entries and overwrite:
        for name in entries:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    elif entries and resume:
        earlier = read_record(folder)  # None: a run from before run.json; the engine's state check still applies
        if earlier is not None:
            diff = differing(record, earlier)
            if diff:
                raise UserError(f"--resume: {folder} holds a run with other settings "
                                f"({', '.join(_shown(k, earlier, record) for k in diff)})")
    elif entries:
        raise UserError(f"{folder} holds an earlier run; --resume continues it, --overwrite replaces it, "
                        "or choose another --out")
    write_record(folder, record)


def _shown(key, earlier, now):
    a, b = earlier.get(key), now.get(key)
    if key.endswith("_sha256"):
        return f"{key}: another file"
    return f"{key}: {a!r} there, {b!r} now"


def claim(folder, record, resume=False, overwrite=False, rank=0, device="cpu"):
    """Rank 0 claims `folder` for this run (see the module's doc); under torchrun every rank learns whether
    it could, so a refused run ends on every rank with one line instead of hanging in a collective."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one")
    error = None
    if rank == 0:
        try:
            _claim(folder, record, resume, overwrite)
        except UserError as e:
            error = e
    if dist.is_initialized():
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise UserError(f"rank 0 could not claim {folder} (its error line says why)")
    if error is not None:
        raise error
