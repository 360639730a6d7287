"""The ``image`` writer: a batch of generated images -> one labelled grid PNG.

Samples that share a label are consecutive (``protocols.MediaWriter``); when every run of
equal labels has the same length the grid has one row per run, labelled on its left (a
class-conditional batch ``k`` classes x ``n`` samples is ``k`` rows of ``n``). Otherwise,
or without labels (or with only empty ones: unconditional), it is a square grid with no
row labels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from torch import Tensor

from selfflow.plugins.gallery import check_labels, check_stem, replacing
from selfflow.plugins.image.media import save_grid
from selfflow.plugins.protocols import MediaFile


@attrs.frozen(kw_only=True)
class ImageWriterConfig:
    """``scale``: each image pixel becomes ``scale`` x ``scale`` grid pixels (0: automatic,
    small images are enlarged to about 64 pixels)."""

    scale: int = attrs.field(default=0, validator=attrs.validators.ge(0))


def grid_rows(labels: Sequence[str] | None) -> tuple[int | None, list[str] | None]:
    """``(rows, row_labels)`` for ``save_grid``: one row per run of equal consecutive labels
    when every run has the same length, else ``(None, None)`` (a square grid)."""
    if labels is None or not any(labels):
        return None, None
    runs = [(label, len(list(group))) for label, group in itertools.groupby(labels)]
    if len({n for _, n in runs}) != 1:
        return None, None
    return len(runs), [label for label, _ in runs]


def check_images(media: object) -> Tensor:
    """``media`` as a ``(B, C, H, W)`` float tensor, or an error that says what was expected."""
    expected = "the image writer takes a (B, C, H, W) float tensor in [-1, 1] with C = 1 (gray) or 3 (RGB)"
    if not isinstance(media, Tensor):
        hint = " (text? write it with the text writer)" if isinstance(media, (str, list, tuple)) else ""
        raise TypeError(f"{expected}; got a {type(media).__name__}{hint}")
    if media.ndim != 4:
        hints = {
            5: " (B, C, T, H, W): a video batch? write it with the video writer",
            3: ": one image (C, H, W)? add a batch dimension, x[None]; "
            "an audio batch (B, channels, samples)? use the audio writer",
        }
        raise ValueError(f"{expected}; got shape {tuple(media.shape)}{hints.get(media.ndim, '')}")
    if not media.is_floating_point():
        raise TypeError(f"{expected}; got dtype {media.dtype} (uint8 pixels? pass x.float() / 127.5 - 1)")
    if media.shape[1] not in (1, 3):
        raise ValueError(
            f"{expected}; got {media.shape[1]} channels in shape {tuple(media.shape)} "
            "(channels-last? pass x.permute(0, 3, 1, 2))"
        )
    if media.shape[0] == 0:
        raise ValueError(f"{expected}; got an empty batch, shape {tuple(media.shape)}")
    return media


class ImageWriter:
    """Writes ``directory/{stem}.png``: the batch as one grid (``save_grid``), titled."""

    modality = "image"

    def __init__(self, config: ImageWriterConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: ImageWriterConfig | None = None) -> ImageWriter:
        return cls(config if config is not None else ImageWriterConfig())

    def write(
        self, media: Tensor, directory: Path, *, stem: str, labels: Sequence[str] | None, title: str
    ) -> list[MediaFile]:
        images = check_images(media)
        b = images.shape[0]
        labels = check_labels(labels, b, "image")
        path = Path(directory) / f"{check_stem(stem)}.png"
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        rows, row_labels = grid_rows(labels)
        with replacing(path) as tmp:
            save_grid(
                torch.nan_to_num(images.detach(), nan=0.0),
                tmp,
                rows=rows,
                row_labels=row_labels,
                scale=self.config.scale,
                title=title or None,
            )
        caption = f"{b} samples" + (f", {rows} rows of {b // rows}" if rows else "")
        if bad:
            caption += f"; {bad} with non-finite values (NaN drawn grey)"
        return [MediaFile(path=path, element="img", items=range(b), caption=caption)]
