"""Noise-level distributions p(t) and the dual-timestep scheduler of Self-Flow.

Every random draw takes an explicit ``torch.Generator``: a run is reproducible from its seed
and resumable from the generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import attrs
import torch
from torch import Tensor

from selfflow.core.distributed import batch_rand
from selfflow.core.types import Timesteps, TokenBatch


class TimeSampler(Protocol):
    """A distribution over ``t`` in [0, 1]; ``sample(n)`` returns ``(n,)`` float32."""

    def sample(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor: ...


def _rand(n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    # drawn on the generator's device for the global batch, this rank's rows kept (distributed.py)
    return batch_rand((n,), generator, device)


@attrs.frozen(kw_only=True)
class UniformTime:
    """``t ~ U(0, 1)``."""

    def sample(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        return _rand(n, generator, device)


@attrs.frozen(kw_only=True)
class LogitNormalTime:
    """``t = sigmoid(z)``, ``z ~ N(mean, std)`` (SD3's logit-normal; ``mean=0, std=1`` default)."""

    mean: float = 0.0
    std: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))

    def sample(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        z = batch_rand((n,), generator, device, normal=True)
        return torch.sigmoid(self.mean + self.std * z)


@attrs.frozen(kw_only=True)
class ShiftedTime:
    """Resolution shift of another sampler: ``t' = a t / (1 + (a - 1) t)``.

    ``a > 1`` moves mass towards noise, as larger images need (SD3 uses
    ``a = sqrt(tokens / base_tokens)``).
    """

    base: TimeSampler
    shift: float = attrs.field(validator=attrs.validators.gt(0))

    @classmethod
    def for_resolution(cls, base: TimeSampler, num_tokens: int, base_tokens: int = 256) -> ShiftedTime:
        return cls(base=base, shift=math.sqrt(num_tokens / base_tokens))

    def sample(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        t = self.base.sample(n, generator=generator, device=device)
        return shift_time(t, self.shift)


def shift_time(t: Tensor, shift: float) -> Tensor:
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------- teacher rules


class TeacherRule(Protocol):
    """Maps the student's per-sample levels to the teacher's.

    ``levels`` is the student's ``(B, 3)`` table ``[0, t, s]``; the result has the same
    layout, so teacher and student share one token index.
    """

    def __call__(self, levels: Tensor, *, generator: torch.Generator) -> Tensor: ...


@attrs.frozen(kw_only=True)
class MinTeacher:
    """The paper's rule: every generated token at ``min(t, s)``, the cleaner of the two."""

    def __call__(self, levels: Tensor, *, generator: torch.Generator) -> Tensor:
        tmin = torch.minimum(levels[:, 1], levels[:, 2])
        return torch.stack([levels[:, 0], tmin, tmin], dim=1)


@attrs.frozen(kw_only=True)
class GapTeacher:
    """SRA-style: each noise group sees the teacher a little cleaner, ``tau - U(0, gap)``."""

    gap: float = attrs.field(default=0.2, validator=[attrs.validators.gt(0), attrs.validators.le(1)])

    def __call__(self, levels: Tensor, *, generator: torch.Generator) -> Tensor:
        b = levels.shape[0]
        u = batch_rand((b, 2), generator, levels.device)
        cleaner = (levels[:, 1:] - self.gap * u).clamp_min(0.0)
        return torch.cat([levels[:, :1], cleaner], dim=1)


# ----------------------------------------------------------------------------- scheduler

# candidates for s under min_gap. With the default logit-normal p(t), t near 0.5 and
# min_gap = 0.3, a candidate fails with p ~ 0.83: 32 candidates all fail for about one such
# sample in 400 (a crash every few steps at batch 256); 256 fail with p ~ 1e-21 and cost a
# single draw of 256 B numbers
_GAP_ROUNDS = 256


@attrs.frozen(kw_only=True)
class DualTimesteps:
    """One training step's noise assignment.

    ``student`` and ``teacher`` share the index; level 0 is the clean level of condition
    tokens, level 1 is ``t`` (unmasked tokens), level 2 is ``s`` (masked tokens). With
    ``dual=False`` both are ``Timesteps.uniform(t)``: one level per sample.
    ``masked (B, N_total)`` is True for generated tokens that got ``s``.
    """

    student: Timesteps
    teacher: Timesteps
    masked: Tensor

    def groups(self) -> Tensor:
        """``(B, N_total)`` noise group per token: 0 condition, 1 at ``t``, 2 at ``s``."""
        return self.student.index


def check_mask_ratio(name: str, ratio: float) -> float:
    """The one check of a mask ratio (the scheduler's and the run config's): R in [0, 0.5]."""
    if not 0.0 <= float(ratio) <= 0.5:
        raise ValueError(
            f"mask ratio for {name!r} is {ratio}; Self-Flow masks at most half the tokens "
            "(R in [0, 0.5]; the paper uses image 0.25, video 0.10, audio 0.50)"
        )
    return float(ratio)


MASK_UNITS = ("token", "frame")


def check_mask_unit(name: str, unit: str) -> str:
    """The one check of a mask unit (the scheduler's and the run config's)."""
    if unit not in MASK_UNITS:
        raise ValueError(
            f"mask unit for {name!r} is {unit!r}; use 'token' (each token drawn alone, the paper's) "
            "or 'frame' (every token of a time step shares one draw)"
        )
    return unit


def _check_units(instance: object, attribute: attrs.Attribute, value: str | Mapping[str, str]) -> None:
    units = value.items() if isinstance(value, Mapping) else [("*", value)]
    for name, u in units:
        check_mask_unit(name, u)


def frame_leaders(positions: Tensor) -> Tensor:
    """``(B, N)``: for each token, the index of the first token of its sample with the same
    time position ``t`` (``positions[..., 0]``): the token whose draw the whole frame shares.

    O(B N): ``t`` values are mapped to frame ids with one ``unique`` over the batch and the
    smallest token index of each (sample, frame) is found with ``scatter_reduce``.
    """
    b, n = positions.shape[:2]
    _, frame = torch.unique(positions[..., 0], return_inverse=True)
    order = torch.arange(n, device=positions.device).expand(b, n)
    first = torch.full((b, int(frame.max()) + 1 if n else 1), n, dtype=torch.long, device=positions.device)
    first = first.scatter_reduce(1, frame, order, reduce="amin")
    return first.gather(1, frame)


def _check_ratio(instance: object, attribute: attrs.Attribute, value: float | Mapping[str, float]) -> None:
    ratios = value.items() if isinstance(value, Mapping) else [("*", value)]
    for name, r in ratios:
        check_mask_ratio(name, r)


@attrs.frozen(kw_only=True)
class DualTimestepScheduler:
    """Draws ``t`` and ``s`` per sample and assigns them to tokens.

    - ``t`` and ``s`` come independently from the same ``time`` sampler and are **not sorted**:
      in some samples the masked tokens are the cleaner ones, in others the noisier ones.
    - Each generated token is masked (gets ``s``) with probability ``mask_ratio`` (a float, or
      a per-modality mapping; a modality missing from it is not masked). There is no default:
      the ratio is the modality's (a run takes its tokenizer's, the paper's image 0.25, video
      0.10, audio 0.50).
    - ``mask_unit`` (a string, or a per-modality mapping; missing: ``"token"``): ``"token"``
      draws each token alone (the paper's); ``"frame"`` gives every token of one time step
      (equal ``t`` position: a latent video frame) one shared draw, so a frame is masked whole.
      Either way a sample draws the same random numbers (one per token; a frame uses its first
      token's), and the masked fraction of frames, hence of tokens, is ``mask_ratio``.
    - ``dual=False`` gives every generated token ``t`` (plain flow matching's assignment).
    - ``max_gap`` draws ``s`` within ``max_gap`` of ``t`` (the paper's "small gap" ablation);
      ``min_gap`` redraws ``s`` until ``|t - s| >= min_gap``.
    - Condition tokens sit at level 0 in both student and teacher.
    """

    time: TimeSampler = attrs.field(factory=LogitNormalTime)
    # no default: each modality has its own
    mask_ratio: float | Mapping[str, float] = attrs.field(validator=_check_ratio)
    teacher_rule: TeacherRule = attrs.field(factory=MinTeacher)
    mask_unit: str | Mapping[str, str] = attrs.field(default="token", validator=_check_units)
    dual: bool = True
    min_gap: float | None = None
    max_gap: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.min_gap is not None and self.max_gap is not None and self.min_gap > self.max_gap:
            raise ValueError(f"min_gap={self.min_gap} is larger than max_gap={self.max_gap}")
        if self.min_gap is not None and not 0 <= self.min_gap < 1:
            raise ValueError(f"min_gap must be in [0, 1), got {self.min_gap}")
        if self.max_gap is not None and not 0 < self.max_gap <= 1:
            raise ValueError(f"max_gap must be in (0, 1], got {self.max_gap}")

    def ratio_for(self, modality: str) -> float:
        if isinstance(self.mask_ratio, Mapping):
            return float(self.mask_ratio.get(modality, 0.0))
        return float(self.mask_ratio)

    def unit_for(self, modality: str) -> str:
        if isinstance(self.mask_unit, Mapping):
            return str(self.mask_unit.get(modality, "token"))
        return str(self.mask_unit)

    def _draw_s(self, t: Tensor, generator: torch.Generator) -> Tensor:
        b, device = t.shape[0], t.device
        # With min_gap, s is the first of R candidates (one draw, sample-major (B, R)) that is
        # far enough from t. A fixed amount of randomness per step keeps every rank of a
        # distributed run on the same generator position, and sample-major candidates are the
        # numbers a 1-process run of the global batch draws. R = 1 without min_gap.
        rounds = _GAP_ROUNDS if self.min_gap else 1
        if self.max_gap is not None:
            u = batch_rand((b, rounds), generator, device)
            cand = (t[:, None] + (2 * u - 1) * self.max_gap).clamp(0.0, 1.0)
        else:
            cand = self.time.sample(b * rounds, generator=generator, device=device).view(b, rounds)
        if not self.min_gap:
            return cand[:, 0]
        ok = (t[:, None] - cand).abs() >= self.min_gap
        if not bool(ok.any(1).all()):
            raise RuntimeError(
                f"could not draw s with |t - s| >= min_gap={self.min_gap} in {_GAP_ROUNDS} candidates; lower min_gap"
            )
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
        return cand.gather(1, first).squeeze(1)

    def __call__(self, batch: TokenBatch, *, generator: torch.Generator) -> DualTimesteps:
        b, device = batch.batch_size, batch.device
        t = self.time.sample(b, generator=generator, device=device)
        if not self.dual:  # one level per sample, drawn exactly as plain flow matching draws it
            single = Timesteps.uniform(t, batch)
            masked = torch.zeros(single.index.shape, dtype=torch.bool, device=device)
            return DualTimesteps(student=single, teacher=single, masked=masked)
        s = self._draw_s(t, generator)
        levels = torch.stack([torch.zeros_like(t), t, s], dim=1)

        parts = []
        for seg in batch.segments:
            ratio = self.ratio_for(seg.modality)
            u = batch_rand((b, seg.num_tokens), generator, device)
            if self.unit_for(seg.modality) == "frame" and seg.num_tokens:
                u = u.gather(1, frame_leaders(seg.positions))
            gen = seg.valid_mask() & seg.generated
            parts.append(gen.long() + (gen & (u < ratio)).long())
        index = torch.cat(parts, dim=1)
        masked = index == 2
        # a sample in which no token drew s has only the level t: its s is unused, so it must
        # not pull the teacher's min(t, s) below t
        levels[:, 2] = torch.where(masked.any(dim=1), levels[:, 2], levels[:, 1])

        student = Timesteps(levels=levels, index=index)
        teacher = Timesteps(levels=self.teacher_rule(levels, generator=generator), index=index)
        return DualTimesteps(student=student, teacher=teacher, masked=masked)
