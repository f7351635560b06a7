"""Training state on disk: copied off the device at once, written by a background thread, renamed
into place only when complete (a kill at any moment leaves the previous state whole), read back on the
CPU (RNG states must be CPU ByteTensors; `load_state_dict` and `copy_` then place the rest)."""
import threading

import torch

from ..checkpoint import atomic_write
from ..errors import UserError


def to_cpu(obj):
    """A deep copy of a state with every tensor on the CPU (the live tensors keep training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def load(path):
    """A saved training state, every tensor on the CPU (memory-mapped, so a big file is not read twice)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"{path}: not a readable training state ({type(e).__name__}: {str(e)[:120]})") from None


class AsyncSaver:
    """One write at a time in a background thread; the caller only waits for the device-to-host copy.

    The next save (and close) first waits for the previous write, so there is never more than one state
    in flight and the file on disk is always the latest complete one."""

    def __init__(self, background=True):
        self.background, self.thread, self.error = background, None, None

    def save(self, path, state):
        self.wait()
        cpu_state = to_cpu(state)

        def write():
            try:
                atomic_write(path, lambda tmp: torch.save(cpu_state, tmp))
            except BaseException as e:  # re-raised in the training thread at the next wait()
                self.error = e

        if self.background:
            self.thread = threading.Thread(target=write, name="tinyfusion-checkpoint", daemon=False)
            self.thread.start()
        else:
            write()
            self.wait()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise UserError(f"could not write the training state: {error}")
