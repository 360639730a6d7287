"""The ``points`` writer: a batch of point sets as one PNG grid of scatter plots.

One row per run of equal labels (the label left of the row; a run longer than
``max_columns`` wraps onto more rows), the title on top. Each point is coloured by its token
index (dark to light), so the order the model generated along the outline is visible.
matplotlib is imported when a grid is drawn, not when the plugin loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from torch import Tensor

from selfflow.plugins.gallery import check_labels, check_stem, replacing
from selfflow.plugins.protocols import MediaFile

_v = attrs.validators


@attrs.frozen(kw_only=True)
class PointsWriterConfig:
    """``max_columns``: plots per row before a run of one label wraps; ``cell``: side of
    one plot in inches; ``dpi``; ``connect``: draw a faint line through the points in
    token order; ``marker_size`` in points squared."""

    max_columns: int = attrs.field(default=16, validator=_v.ge(1))
    cell: float = attrs.field(default=1.1, validator=_v.gt(0))
    dpi: int = attrs.field(default=100, validator=_v.ge(20))
    connect: bool = True
    marker_size: float = attrs.field(default=6.0, validator=_v.gt(0))


def layout(labels: Sequence[str] | None, b: int, max_columns: int) -> list[tuple[str, list[int]]]:
    """Rows of the grid: ``(row label, sample indices)``; a label only on a run's first row.
    Without labels (or with only empty ones: unconditional samples), a square-ish grid."""
    if labels is None or not any(labels):
        cols = min(max_columns, math.ceil(math.sqrt(b)))
        return [("", list(range(i, min(i + cols, b)))) for i in range(0, b, cols)]
    if len(labels) != b:
        raise ValueError(f"the points writer got {b} sets and {len(labels)} labels: give one label per set")
    rows: list[tuple[str, list[int]]] = []
    start = 0
    for i in range(1, b + 1):
        if i == b or labels[i] != labels[start]:
            run = list(range(start, i))
            for j in range(0, len(run), max_columns):
                rows.append((str(labels[start]) if j == 0 else "", run[j : j + max_columns]))
            start = i
    return rows


class PointsWriter:
    """Writes ``(B, N, 2)`` point sets to ``directory/{stem}.png``."""

    modality = "points"

    def __init__(self, config: PointsWriterConfig | None = None) -> None:
        self.config = config or PointsWriterConfig()

    @classmethod
    def from_config(cls, config: PointsWriterConfig | None) -> PointsWriter:
        return cls(config)

    def write(
        self, media: Tensor, directory: Path, *, stem: str, labels: Sequence[str] | None, title: str
    ) -> list[MediaFile]:
        from matplotlib.figure import Figure  # a Figure without pyplot: no global state, Agg canvas for PNG

        if not isinstance(media, Tensor) or media.ndim != 3 or media.shape[-1] != 2 or len(media) == 0:
            shape = tuple(media.shape) if isinstance(media, Tensor) else type(media).__name__
            raise ValueError(f"the points writer draws a non-empty batch of point sets (B, N, 2), got {shape}")
        check_stem(stem)
        pts = media.detach().float().cpu().numpy()
        b, n, _ = pts.shape
        labels = check_labels(labels, b, "points")
        cfg = self.config
        rows = layout(labels, b, cfg.max_columns)
        labelled = any(label for label, _ in rows)
        cols = max(len(idx) for _, idx in rows)
        left = 0.9 if labelled else 0.1
        top = 0.45 if title else 0.1
        fig = Figure(figsize=(left + cols * cfg.cell, top + len(rows) * cfg.cell), dpi=cfg.dpi)
        fig.subplots_adjust(
            left=left / fig.get_figwidth(),
            right=1 - 0.05 / fig.get_figwidth(),
            bottom=0.05 / fig.get_figheight(),
            top=1 - top / fig.get_figheight(),
            wspace=0.06,
            hspace=0.06,
        )
        axes = fig.subplots(len(rows), cols, squeeze=False)
        order = torch.arange(n).numpy()
        for r, (row_label, idx) in enumerate(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xlim(-1.08, 1.08)
                ax.set_ylim(-1.08, 1.08)
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(idx):
                    ax.axis("off")
                    continue
                x, y = pts[idx[c], :, 0], pts[idx[c], :, 1]
                if cfg.connect:
                    ax.plot([*x, x[0]], [*y, y[0]], color="0.8", linewidth=0.6, zorder=1)
                ax.scatter(x, y, c=order, cmap="viridis", s=cfg.marker_size, linewidths=0, zorder=2)
            if row_label:
                axes[r][0].set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9)
        if title:
            fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig.get_figheight(), va="top")
        path = Path(directory) / f"{stem}.png"
        with replacing(path) as tmp:  # a reader of samples.html sees the old grid or the new one
            fig.savefig(tmp, format="png")
        caption = (
            f"{b} point sets of {n} points" + (", one row per label" if labelled else "") + "; colour: token order"
        )
        return [MediaFile(path=path, element="img", items=tuple(range(b)), caption=caption)]
