"""Image files a person looks at: labelled sample grids (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(
    images: Tensor,
    path: str | Path,
    *,
    rows: int | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int = 0,
    title: str | None = None,
) -> Path:
    """Save ``images (B, C, H, W)`` in [-1, 1] as a grid PNG, ``rows`` rows (one per class
    when the images are ordered class by class), with a label left of each row.

    ``scale`` (0: automatic) enlarges small images with nearest-neighbour pixels.
    """
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    rows = rows or int(np.ceil(np.sqrt(b)))
    cols = int(np.ceil(b / rows))
    scale = scale or max(1, 64 // max(h, w))
    hs, ws, pad = h * scale, w * scale, 2
    left = 28 if row_labels else 0
    top = 18 if title else 0
    canvas = Image.new("RGB", (left + cols * (ws + pad) + pad, top + rows * (hs + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i in range(b):
        r, k = divmod(i, cols)
        tile = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i], mode="L" if c == 1 else "RGB").convert("RGB")
        tile = tile.resize((ws, hs), Image.NEAREST)
        canvas.paste(tile, (left + pad + k * (ws + pad), top + pad + r * (hs + pad)))
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, top + pad + r * (hs + pad) + hs // 2 - 6), str(label), fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
