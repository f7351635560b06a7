"""A run folder's log.txt, metrics.json and PNG plots."""
import json
import os
import sys
import time

from ..checkpoint import atomic_write


class RunLog:
    def __init__(self, run_dir, enabled=True):
        self.run_dir, self.enabled = run_dir, enabled  # the folder appears with the first line written

    def write(self, line, echo=True):
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
        if echo:
            print(line, flush=True)

    def metrics(self, data, name="metrics.json"):
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, name)

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2)

        atomic_write(path, write)


def plot_curve(curve, path, title):
    """Loss against step, log-scaled."""
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*curve)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def progress(total, initial=0, desc=None, enabled=True):
    """A tqdm bar that suits its stream: live on a terminal; on a file or pipe (SLURM logs) a plain line
    at most every 60 s, so a long run does not fill its log with carriage-return updates."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=tty,
                mininterval=0.1 if tty else 60, ncols=None if tty else 100, ascii=not tty)
