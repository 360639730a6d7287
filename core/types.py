"""Value types shared by every part of selfflow.

Shapes, once: B = batch, N = tokens of one segment, N_total = tokens of all segments in
order, C = a segment's channels, K = distinct noise levels in a sample.

Time runs from data to noise: ``t = 0`` is data, ``t = 1`` is noise.

Positions, once (``Segment.positions (B, N, 3)``, integer ``(t, h, w)``):

- ``t`` is **time on one axis shared by every modality**, in ticks of ``1 / TIME_RATE``
  seconds: a token that stands for the media at time ``x`` seconds sits at
  ``t = round(x * TIME_RATE)``. Each tokenizer sets it from its own frame rate or hop
  (``time_ticks(frame, rate_hz)``), so a video frame and the audio frames played with it
  share ``t``. ``TIME_RATE = 3000`` makes the common rates whole ticks (24/25/30/60 fps;
  50, 62.5 and 75 Hz latent frames). Media without time (an image, a point set) sit at
  ``t = 0``. The model's RoPE reads ``t`` in units of ``ROPE_TIME_TICKS`` ticks (1/25 s),
  so one video frame at 25 fps is one rotary step, whatever the tokenizer's rate.
- ``h, w`` are spatial grid coordinates (``>= 0``; 0 for audio).
- 1-D token sequences without time or space (text) sit at ``t = 0`` on the negative
  diagonal of ``(h, w)``: token ``i`` of ``L`` at ``h = w = i - L`` (``sequence_positions``).
  They never share a position with an image token (``h, w >= 0``), and consecutive tokens
  differ by ``(0, 1, 1)``, one step on both spatial axes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import attrs
import torch
from torch import Tensor

TIME_RATE = 3000  # ticks per second on the shared time axis (see the module docstring)
ROPE_TIME_TICKS = 120  # ticks per rotary step on the time axis: 1/25 s


def time_ticks(frame: Tensor | int | float, rate_hz: float) -> Tensor:
    """Tick of frame ``frame`` of a stream running at ``rate_hz`` frames per second:
    ``round(frame / rate_hz * TIME_RATE)`` as ``torch.long``."""
    if rate_hz <= 0:
        raise ValueError(f"frame rate must be positive, got {rate_hz}")
    frame_t = torch.as_tensor(frame, dtype=torch.float64)
    return torch.round(frame_t * (TIME_RATE / float(rate_hz))).long()


class Role(enum.Enum):
    """What a segment is for: ``GENERATE`` tokens are noised, trained on and sampled;
    ``CONDITION`` tokens stay clean, sit at noise level 0 and carry no loss."""

    GENERATE = "generate"
    CONDITION = "condition"


def _shape_error(name: str, value: Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def _check_tensor(name: str, value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor")


def _check_segment(seg: Segment, attribute: attrs.Attribute, value: object) -> None:
    tokens, positions, valid = seg.tokens, seg.positions, seg.valid
    _check_tensor(f"Segment[{seg.modality}].tokens", tokens)
    _check_tensor(f"Segment[{seg.modality}].positions", positions)
    if valid is not None:
        _check_tensor(f"Segment[{seg.modality}].valid", valid)
    if tokens.ndim != 3:
        raise _shape_error(f"Segment[{seg.modality}].tokens", tokens, "(B, N, C)")
    if not tokens.is_floating_point():
        raise TypeError(f"Segment[{seg.modality}].tokens must be floating point, got {tokens.dtype}")
    b, n, _ = tokens.shape
    if positions.shape != (b, n, 3):
        raise _shape_error(f"Segment[{seg.modality}].positions", positions, f"({b}, {n}, 3)")
    if positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError(
            f"Segment[{seg.modality}].positions must be integer (t, h, w) coordinates, "
            f"got {positions.dtype}; convert with .long()"
        )
    if valid is not None:
        if valid.shape != (b, n):
            raise _shape_error(f"Segment[{seg.modality}].valid", valid, f"({b}, {n})")
        if valid.dtype != torch.bool:
            raise TypeError(f"Segment[{seg.modality}].valid must be bool, got {valid.dtype}")


@attrs.frozen(kw_only=True)
class Segment:
    """One modality's part of a batch.

    ``tokens (B, N, C)`` continuous latents; ``positions (B, N, 3)`` integer (t, h, w)
    coordinates used by the rotary embedding; ``valid (B, N)`` marks real tokens when a
    batch is padded (``None``: all real).
    """

    modality: str
    tokens: Tensor
    positions: Tensor
    role: Role = Role.GENERATE
    valid: Tensor | None = attrs.field(default=None, validator=_check_segment)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def channels(self) -> int:
        return self.tokens.shape[2]

    @property
    def generated(self) -> bool:
        return self.role is Role.GENERATE

    def valid_mask(self) -> Tensor:
        """``(B, N)`` bool, all True when the segment is not padded."""
        if self.valid is None:
            return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)
        return self.valid

    def with_tokens(self, tokens: Tensor) -> Segment:
        return attrs.evolve(self, tokens=tokens)

    def to(self, device: torch.device | str) -> Segment:
        return attrs.evolve(
            self,
            tokens=self.tokens.to(device),
            positions=self.positions.to(device),
            valid=None if self.valid is None else self.valid.to(device),
        )


def _segments(value: Iterable[Segment]) -> tuple[Segment, ...]:
    return tuple(value)


def _check_batch(batch: TokenBatch, attribute: attrs.Attribute, value: object) -> None:
    if not batch.segments:
        raise ValueError("TokenBatch needs at least one segment")
    for i, seg in enumerate(batch.segments):
        if not isinstance(seg, Segment):
            raise TypeError(f"TokenBatch.segments[{i}] must be a Segment, got {type(seg).__name__}")
    sizes = {seg.batch_size for seg in batch.segments}
    if len(sizes) != 1:
        raise ValueError(
            "all segments of a TokenBatch must have the same batch size, got "
            + ", ".join(f"{s.modality}={s.batch_size}" for s in batch.segments)
        )
    if not any(seg.generated for seg in batch.segments):
        raise ValueError("TokenBatch has no segment with role GENERATE: nothing to train or sample")
    labels = batch.labels
    if labels is not None:
        _check_tensor("TokenBatch.labels", labels)
        if labels.shape != (batch.batch_size,):
            raise _shape_error("TokenBatch.labels", labels, f"({batch.batch_size},)")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"TokenBatch.labels must be integer class ids, got {labels.dtype}")


@attrs.frozen(kw_only=True)
class TokenBatch:
    """The ordered segments of one batch and an optional global condition.

    ``labels (B,)`` are class ids; the model reserves one extra id (``num_classes``) as the
    null label for classifier-free guidance.
    """

    segments: tuple[Segment, ...] = attrs.field(converter=_segments)
    labels: Tensor | None = attrs.field(default=None, validator=_check_batch)

    @property
    def batch_size(self) -> int:
        return self.segments[0].batch_size

    @property
    def num_tokens(self) -> int:
        return sum(seg.num_tokens for seg in self.segments)

    @property
    def device(self) -> torch.device:
        return self.segments[0].tokens.device

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(seg.modality for seg in self.segments)

    def generate_mask(self) -> Tensor:
        """``(B, N_total)`` bool: tokens that are generated (and real, not padding)."""
        return torch.cat([seg.valid_mask() & seg.generated for seg in self.segments], dim=1)

    def valid_mask(self) -> Tensor | None:
        """``(B, N_total)`` bool, or ``None`` when no segment is padded."""
        if all(seg.valid is None for seg in self.segments):
            return None
        return torch.cat([seg.valid_mask() for seg in self.segments], dim=1)

    def with_tokens(self, tokens: Sequence[Tensor]) -> TokenBatch:
        """The same batch with each segment's tokens replaced, in order."""
        if len(tokens) != len(self.segments):
            raise ValueError(f"expected {len(self.segments)} token tensors, got {len(tokens)}")
        return attrs.evolve(self, segments=tuple(seg.with_tokens(x) for seg, x in zip(self.segments, tokens)))

    def with_labels(self, labels: Tensor | None) -> TokenBatch:
        return attrs.evolve(self, labels=labels)

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            segments=tuple(seg.to(device) for seg in self.segments),
            labels=None if self.labels is None else self.labels.to(device),
        )


def _check_timesteps(ts: Timesteps, attribute: attrs.Attribute, value: object) -> None:
    _check_tensor("Timesteps.levels", ts.levels)
    _check_tensor("Timesteps.index", ts.index)
    if ts.levels.ndim != 2:
        raise _shape_error("Timesteps.levels", ts.levels, "(B, K)")
    if not ts.levels.is_floating_point():
        raise TypeError(f"Timesteps.levels must be floating point noise levels in [0, 1], got {ts.levels.dtype}")
    if ts.index.ndim != 2:
        raise _shape_error("Timesteps.index", ts.index, "(B, N_total)")
    if ts.index.dtype != torch.long:
        raise TypeError(
            f"Timesteps.index must be torch.long (it feeds gather), got {ts.index.dtype}; convert with .long()"
        )
    if ts.index.shape[0] != ts.levels.shape[0]:
        raise ValueError(f"Timesteps batch sizes differ: levels {ts.levels.shape[0]}, index {ts.index.shape[0]}")


@attrs.frozen(kw_only=True)
class Timesteps:
    """Per-token noise levels, factored: ``tau[b, i] = levels[b, index[b, i]]``.

    A training sample has a handful of distinct levels (0 for condition tokens, t, s), a
    sampling step has one or two, so the model embeds and modulates per level and gathers
    per token instead of running a per-token matmul.
    """

    levels: Tensor  # (B, K) float in [0, 1]
    index: Tensor = attrs.field(validator=_check_timesteps)  # (B, N_total) long in [0, K)

    @property
    def num_levels(self) -> int:
        return self.levels.shape[1]

    def per_token(self) -> Tensor:
        """``(B, N_total)`` dense noise levels."""
        return self.levels.gather(1, self.index)

    def split(self, sizes: Sequence[int]) -> tuple[Tensor, ...]:
        """Dense per-token levels split per segment: ``(B, N_m)`` each."""
        return self.per_token().split(list(sizes), dim=1)

    @classmethod
    def uniform(cls, t: Tensor, batch: TokenBatch) -> Timesteps:
        """One level ``t (B,)`` for every generated token, 0 for condition tokens and padding."""
        gen = batch.generate_mask()
        if bool(gen.all()):  # a single level broadcasts: no gather in the model
            return cls(levels=t[:, None], index=torch.zeros_like(gen, dtype=torch.long))
        levels = torch.stack([torch.zeros_like(t), t], dim=1)
        return cls(levels=levels, index=gen.long())


@attrs.frozen(kw_only=True)
class LossBreakdown:
    """What one step's objective produced. ``total`` is what is back-propagated."""

    total: Tensor
    flow: Tensor
    representation: Tensor | None = None
    per_modality: dict[str, Tensor] = attrs.field(factory=dict)

    def detached(self) -> dict[str, float]:
        """Plain floats for logging."""
        out = {"loss": float(self.total.detach()), "flow": float(self.flow.detach())}
        if self.representation is not None:
            out["representation"] = float(self.representation.detach())
        for name, value in self.per_modality.items():
            out[f"flow/{name}"] = float(value.detach())
        return out


def grid_positions(
    frames: int, height: int, width: int, *, batch: int = 1, device: torch.device | str = "cpu"
) -> Tensor:
    """``(batch, frames * height * width, 3)`` long (t, h, w) coordinates in raster order."""
    t, h, w = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    grid = torch.stack([t, h, w], dim=-1).reshape(1, -1, 3)
    return grid.expand(batch, -1, -1)


def sequence_positions(length: int, *, batch: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """``(batch, length, 3)`` long positions of a 1-D sequence without time or space (text):
    token ``i`` at ``(0, i - length, i - length)`` (see the module docstring)."""
    pos = torch.zeros(length, 3, dtype=torch.long, device=device)
    pos[:, 1] = pos[:, 2] = torch.arange(length, device=device) - length
    return pos[None].expand(batch, -1, -1)
