"""``image/patch``: non-overlapping ``p x p`` pixel patches as tokens (exact round trip)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment, grid_positions


@attrs.frozen(kw_only=True)
class PatchConfig:
    """``patch``: patch side in pixels; ``image_channels``: 1 (grayscale) or 3 (RGB)."""

    patch: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    image_channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))


def check_image_batch(images: Tensor, channels: int, multiple: int = 1) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch (B, C, H, W), got {shape}")
    if images.shape[1] != channels:
        raise ValueError(f"expected {channels}-channel images, got {images.shape[1]} channels")
    h, w = images.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} is not divisible by {multiple}; resize or crop the images")


class PatchTokenizer:
    """Image ``(B, C, H, W)`` in [-1, 1] <-> tokens ``(B, (H/p)(W/p), C p p)``."""

    modality = "image"
    mask_ratio = 0.25  # the paper's image mask ratio

    def __init__(self, config: PatchConfig | None = None) -> None:
        self.config = config or PatchConfig()

    @classmethod
    def from_config(cls, config: PatchConfig | None, **context) -> PatchTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        return self.config.image_channels * self.config.patch**2

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Nothing to learn."""

    def cache_key(self) -> str:
        return f"image/patch:{self.config.patch}:{self.config.image_channels}"

    def encode(self, media: Tensor) -> Segment:
        p, c = self.config.patch, self.config.image_channels
        check_image_batch(media, c, p)
        b, _, h, w = media.shape
        x = (
            media.reshape(b, c, h // p, p, w // p, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // p) * (w // p), c * p * p)
        )
        pos = grid_positions(1, h // p, w // p, batch=b, device=media.device)
        return Segment(modality=self.modality, tokens=x.contiguous(), positions=pos)

    def decode(self, segment: Segment) -> Tensor:
        p, c = self.config.patch, self.config.image_channels
        b, n, _ = segment.tokens.shape
        gh = int(segment.positions[0, :, 1].max()) + 1
        gw = n // gh
        x = segment.tokens.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, gh * p, gw * p)
