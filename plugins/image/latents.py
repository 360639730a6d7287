"""Latent feature maps <-> token segments, shared by the autoencoder tokenizers.

``(B, L, h, w)`` latents become ``(B, h w, L)`` tokens in raster order with ``(0, row, col)``
positions, standardised per channel as ``(z - shift) / scale``; ``to_latents`` inverts it.
"""

from __future__ import annotations

from torch import Tensor

from selfflow.core.types import Segment, grid_positions


def grid_of(segment: Segment) -> tuple[int, int]:
    """The ``(rows, cols)`` a raster-ordered image segment spans, from its positions."""
    return int(segment.positions[0, :, 1].max()) + 1, int(segment.positions[0, :, 2].max()) + 1


def to_segment(z: Tensor, shift: Tensor, scale: Tensor, *, modality: str) -> Segment:
    b, ch, h, w = z.shape
    z = (z - shift[:, None, None]) / scale[:, None, None]
    tokens = z.permute(0, 2, 3, 1).reshape(b, h * w, ch)
    pos = grid_positions(1, h, w, batch=b, device=z.device)
    return Segment(modality=modality, tokens=tokens.contiguous(), positions=pos)


def to_latents(segment: Segment, shift: Tensor, scale: Tensor, *, channels: int, name: str) -> Tensor:
    tokens = segment.tokens
    b, n, ch = tokens.shape
    if ch != channels:
        raise ValueError(f"{name} decodes {channels}-channel tokens, got {ch}")
    h, w = grid_of(segment)
    if h * w != n:
        raise ValueError(f"{name}: positions span a {h}x{w} grid but the segment has {n} tokens")
    z = tokens.float().reshape(b, h, w, ch).permute(0, 3, 1, 2)
    return z * scale.to(z.device)[:, None, None] + shift.to(z.device)[:, None, None]
