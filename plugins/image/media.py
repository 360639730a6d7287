"""Image files a person looks at: labelled sample grids (PNG)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MAX_LABEL_WIDTH = 160  # pixels; a grid's label column never grows past this
FONT_SIZE = 11


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's fonts (Pillow's built-in font drops spaces at this size)."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` on one line, cut with an ellipsis to at most ``width`` pixels."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


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

    ``scale`` (0: automatic) enlarges small images with nearest-neighbour pixels. The label
    column is as wide as the longest label (at most ``MAX_LABEL_WIDTH`` pixels; longer
    labels are cut with an ellipsis) and the canvas at least as wide as the title.
    """
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    rows = rows or int(np.ceil(np.sqrt(b)))
    cols = int(np.ceil(b / rows))
    scale = scale or max(1, 64 // max(h, w))
    hs, ws, pad = h * scale, w * scale, 2
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    shown = [_fit(measure, str(label), font, MAX_LABEL_WIDTH) for label in row_labels[:rows]] if row_labels else []
    left = 8 + int(max(measure.textlength(label, font=font) for label in shown)) if shown else 0
    top = 18 if title else 0
    width = max(left + cols * (ws + pad) + pad, 8 + int(measure.textlength(title, font=font)) if title else 0)
    canvas = Image.new("RGB", (width, top + rows * (hs + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i in range(b):
        r, k = divmod(i, cols)
        tile = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i], mode="L" if c == 1 else "RGB").convert("RGB")
        tile = tile.resize((ws, hs), Image.NEAREST)
        canvas.paste(tile, (left + pad + k * (ws + pad), top + pad + r * (hs + pad)))
    for r, label in enumerate(shown):
        draw.text((4, top + pad + r * (hs + pad) + hs // 2 - 6), label, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
