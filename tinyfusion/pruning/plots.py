"""Decision dynamics of the learnable search (like the paper's Figure 6) and baseline score bars."""
import numpy as np

from ..checkpoint import atomic_write
from .masks import group_starts, candidate_masks


def keep_probabilities(history, groups):
    """(steps, depth) array: probability that each source layer is kept, per logged step."""
    depth = sum(m for _, m in groups)
    out = np.zeros((len(history), depth))
    for r, point in enumerate(history):
        for (n, m), start, probs in zip(groups, group_starts(groups), point["probs"]):
            out[r, start:start + m] = np.asarray(probs) @ candidate_masks(n, m).numpy()
    return out


def _figure(width=7, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def plot_decisions(history, groups, kept, path):
    if not history:
        return
    plt, fig, ax = _figure()
    probs = keep_probabilities(history, groups)
    steps = [p["step"] for p in history]
    im = ax.imshow(probs.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=[0, steps[-1], -0.5, probs.shape[1] - 0.5])
    for start in group_starts(groups)[1:]:
        ax.axhline(start - 0.5, color="white", lw=0.6)
    ax.set_yticks(range(probs.shape[1]))
    ax.set_yticklabels([f"{i}{' *' if i in kept else ''}" for i in range(probs.shape[1])], fontsize=7)
    ax.set_xlabel("search step")
    ax.set_ylabel("source layer (* kept)")
    ax.set_title("P(layer kept) from the EMA gate logits")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_scores(scores, kept, label, path):
    plt, fig, ax = _figure(height=3)
    colors = ["tab:blue" if i in kept else "tab:gray" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("source layer (blue: kept)")
    ax.set_ylabel(label)
    ax.set_xticks(range(len(scores)))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
