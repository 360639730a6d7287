"""``points/xy``: one token per point, its ``(x, y)`` as the token's two channels (exact).

Positions follow ``core.types``' ``(t, h, w)`` convention: a point set has no time, so
``t = 0``; its points are an ordered 1-D sequence (sorted along the outline by the dataset),
so ``h`` is the point's index and ``w = 0``. The rotary embedding then sees neighbouring
points as neighbouring tokens.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment

NAME = "points/xy"
_FORMAT = 1  # bump when what encode computes changes: cached latents keyed on cache_key() are then ignored


@attrs.frozen(kw_only=True)
class XYConfig:
    """``points``: the number of points every set must have (``None``: any number, the
    same within a batch)."""

    points: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))


def positions(batch: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """``(batch, n, 3)`` long: ``(0, i, 0)`` for point ``i``."""
    pos = torch.zeros(batch, n, 3, dtype=torch.long, device=device)
    pos[..., 1] = torch.arange(n, device=device)
    return pos


class XYTokenizer:
    """Point sets ``(B, N, 2)`` float in [-1, 1] <-> tokens ``(B, N, 2)``; nothing to fit."""

    modality = "points"
    mask_ratio = 0.25  # the default Self-Flow mask ratio R of this modality (image's, as a start)

    def __init__(self, config: XYConfig | None = None) -> None:
        self.config = config or XYConfig()

    @classmethod
    def from_config(cls, config: XYConfig | None) -> XYTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        return 2

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Nothing to learn."""

    def cache_key(self) -> str:
        return f"{NAME}-v{_FORMAT}-points={self.config.points}"

    def _check(self, media: object) -> None:
        if not isinstance(media, Tensor):
            raise TypeError(
                f"{NAME} encodes a tensor of point sets (B, N, 2), got {type(media).__name__}; "
                "stack the sets with torch.stack"
            )
        if media.ndim != 3 or media.shape[-1] != 2:
            hint = (
                " (one set: add a batch dimension with media[None])" if media.ndim == 2 and media.shape[-1] == 2 else ""
            )
            raise ValueError(f"{NAME} encodes point sets of shape (B, N, 2), got {tuple(media.shape)}{hint}")
        if not media.is_floating_point():
            raise TypeError(f"{NAME} encodes float coordinates in [-1, 1], got {media.dtype}; convert with .float()")
        n = self.config.points
        if n is not None and media.shape[1] != n:
            raise ValueError(
                f"{NAME} is configured for sets of {n} points (tokenizer_options.points), got {media.shape[1]}"
            )

    def encode(self, media: Tensor) -> Segment:
        self._check(media)
        b, n, _ = media.shape
        return Segment(
            modality=self.modality, tokens=media.float().contiguous(), positions=positions(b, n, media.device)
        )

    def decode(self, segment: Segment) -> Tensor:
        if segment.modality != self.modality or segment.channels != 2:
            raise ValueError(
                f"{NAME} decodes a 'points' segment with 2 channels, got modality {segment.modality!r} "
                f"with {segment.channels} channels"
            )
        return segment.tokens
