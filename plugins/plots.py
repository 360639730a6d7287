"""Plots a person looks at: loss curves (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_losses(history: Sequence[dict[str, float]], path: str | Path, *, title: str = "training losses") -> Path:
    """Loss components against step, one panel each (flow, representation, total)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "flow", "representation") if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    steps = [row["step"] for row in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [row.get(key, float("nan")) for row in history], lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
