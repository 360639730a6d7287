"""Training objectives: vanilla flow matching, Self-Flow, and REPA-style external alignment.

Each objective is an ``nn.Module`` (it may own trainable heads, e.g. the projector) whose
``forward(model, batch, teacher=..., generator=...)`` returns a ``LossBreakdown``. Every
loss reads top to bottom in the order of the Self-Flow spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
import torch
from torch import Tensor, nn

from selfflow.core import path
from selfflow.core.acceleration import full_precision
from selfflow.core.attention import separation_mask
from selfflow.core.distill import Projector, representation_loss
from selfflow.core.distributed import batch_rand, unwrap
from selfflow.core.model import FlowTransformer, ModelOutput
from selfflow.core.timesteps import DualTimestepScheduler, LogitNormalTime, TimeSampler
from selfflow.core.types import LossBreakdown, Timesteps, TokenBatch


class Objective(Protocol):
    def __call__(
        self, model: FlowTransformer, batch: TokenBatch, *, teacher: nn.Module | None, generator: torch.Generator
    ) -> LossBreakdown: ...


# ----------------------------------------------------------------------------- shared steps


def drop_labels(labels: Tensor | None, p: float, null_label: int, generator: torch.Generator) -> Tensor | None:
    """Replace each label by the null id with probability ``p`` (classifier-free guidance)."""
    if labels is None or p <= 0:
        return labels
    u = batch_rand(tuple(labels.shape), generator, labels.device)
    return torch.where(u < p, torch.full_like(labels, null_label), labels)


def draw_noise(batch: TokenBatch, generator: torch.Generator) -> tuple[Tensor | None, ...]:
    """``eps ~ N(0, I)`` for every generated segment (``None`` for condition segments)."""
    out: list[Tensor | None] = []
    for seg in batch.segments:
        if seg.generated:
            out.append(
                batch_rand(tuple(seg.tokens.shape), generator, seg.tokens.device, normal=True, dtype=seg.tokens.dtype)
            )
        else:
            out.append(None)
    return tuple(out)


def noised(batch: TokenBatch, noise: tuple[Tensor | None, ...], timesteps: Timesteps) -> TokenBatch:
    """``x_tau`` with each token at its own level; condition segments stay clean."""
    taus = timesteps.split([seg.num_tokens for seg in batch.segments])
    xs = [
        seg.tokens if eps is None else path.interpolate(seg.tokens, eps, tau)
        for seg, eps, tau in zip(batch.segments, noise, taus)
    ]
    return batch.with_tokens(xs)


def flow_loss(
    batch: TokenBatch, noise: tuple[Tensor | None, ...], out: ModelOutput, weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """MSE between predicted and target velocity, mean over generated tokens and channels,
    per segment, summed with the per-modality weights (default 1). In float32 with autocast off
    whatever precision the forward ran in (``core.acceleration``)."""
    with full_precision(batch.device):
        return _flow_loss(batch, noise, out, weights)


def _flow_loss(
    batch: TokenBatch, noise: tuple[Tensor | None, ...], out: ModelOutput, weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    total = torch.zeros((), device=batch.device)
    per: dict[str, Tensor] = {}
    for seg, eps, v in zip(batch.segments, noise, out.velocity):
        if eps is None:
            continue
        assert v is not None, "the model returns a velocity for every generated segment"
        err = (v.float() - path.velocity_target(seg.tokens, eps).float()).pow(2).mean(-1)
        w = seg.valid_mask().to(err.dtype)
        mse = (err * w).sum() / w.sum().clamp_min(1.0)
        per[seg.modality] = mse.detach()
        total = total + weights.get(seg.modality, 1.0) * mse
    return total, per


def aligned(projected: Tensor, target: Tensor, tokens: Tensor) -> Tensor:
    """``representation_loss`` of ``projected (B, N, D)`` against ``target (B, N, D)`` in
    float32 with autocast off: the cosine's normalisation of bf16 activations is where
    REPA-style losses turn NaN."""
    with full_precision(projected.device):
        return representation_loss(projected.float(), target.float(), tokens)


def _default_layer(depth: int, frac: float) -> int:
    return min(depth, max(1, round(frac * depth)))


# ----------------------------------------------------------------------------- vanilla


class FlowMatching(nn.Module):
    """Plain flow matching: one ``t`` per sample for every generated token."""

    def __init__(
        self,
        *,
        time: TimeSampler | None = None,
        label_dropout: float = 0.1,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.time = time or LogitNormalTime()
        self.label_dropout = label_dropout
        self.loss_weights = dict(loss_weights or {})

    def forward(
        self, model: FlowTransformer, batch: TokenBatch, *, teacher: nn.Module | None = None, generator: torch.Generator
    ) -> LossBreakdown:
        t = self.time.sample(batch.batch_size, generator=generator, device=batch.device)
        timesteps = Timesteps.uniform(t, batch)
        batch = batch.with_labels(drop_labels(batch.labels, self.label_dropout, unwrap(model).null_label, generator))
        noise = draw_noise(batch, generator)
        out = model(noised(batch, noise, timesteps), timesteps)
        flow, per = flow_loss(batch, noise, out, self.loss_weights)
        return LossBreakdown(total=flow, flow=flow, per_modality=per)


# ----------------------------------------------------------------------------- Self-Flow


@attrs.frozen(kw_only=True)
class SelfFlowConfig:
    """The switches of Self-Flow (defaults: the paper).

    ``student_layer`` l and ``teacher_layer`` k are 1-indexed blocks; ``None`` means
    ``round(0.3 depth)`` and ``round(0.7 depth)``. ``representation_tokens``: ``"all"``
    generated tokens (authors' answer) or ``"masked"`` only (ablation).
    """

    gamma: float = attrs.field(default=0.8, validator=attrs.validators.ge(0))
    representation: bool = True
    student_layer: int | None = None
    teacher_layer: int | None = None
    representation_tokens: str = attrs.field(default="all", validator=attrs.validators.in_(("all", "masked")))
    attention_separation: bool = False
    label_dropout: float = attrs.field(default=0.1, validator=[attrs.validators.ge(0), attrs.validators.le(1)])


class SelfFlow(nn.Module):
    """Self-Flow: dual-timestep flow matching plus self-distillation from an EMA teacher."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        scheduler: DualTimestepScheduler,
        config: SelfFlowConfig | None = None,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or SelfFlowConfig()
        self.scheduler = scheduler  # its mask ratios are the modalities' own: no default here
        self.loss_weights = dict(loss_weights or {})
        self.student_layer = _default_layer(depth, 0.3) if cfg.student_layer is None else cfg.student_layer
        self.teacher_layer = _default_layer(depth, 0.7) if cfg.teacher_layer is None else cfg.teacher_layer
        for name, layer in (("student_layer", self.student_layer), ("teacher_layer", self.teacher_layer)):
            if not 1 <= layer <= depth:
                raise ValueError(f"objective.{name}={layer} is outside blocks 1..{depth} (1-indexed)")
        self.projector = Projector(width) if cfg.representation else None

    @classmethod
    def for_model(cls, model: FlowTransformer, **kwargs) -> SelfFlow:
        return cls(width=model.width, depth=model.depth, **kwargs)

    def forward(
        self, model: FlowTransformer, batch: TokenBatch, *, teacher: nn.Module | None, generator: torch.Generator
    ) -> LossBreakdown:
        cfg = self.config
        # 1-2. two unsorted levels per sample, a Bernoulli mask per token (condition tokens at 0)
        steps = self.scheduler(batch, generator=generator)
        # 12. CFG label dropout; the teacher sees the same (possibly dropped) label
        batch = batch.with_labels(drop_labels(batch.labels, cfg.label_dropout, unwrap(model).null_label, generator))
        # 3. student input: every token at its own level, one noise draw shared with the teacher
        noise = draw_noise(batch, generator)
        student_in = noised(batch, noise, steps.student)
        mask = separation_mask(steps.groups(), batch.valid_mask()) if cfg.attention_separation else None

        # 5. student forward: velocity everywhere, hidden state after block l
        want = (self.student_layer,) if cfg.representation else ()
        out = model(student_in, steps.student, return_hidden=want, attn_mask=mask)
        # 7. generation loss over all generated tokens
        flow, per = flow_loss(batch, noise, out, self.loss_weights)
        if not cfg.representation:
            return LossBreakdown(total=flow, flow=flow, per_modality=per)

        # 4 + 6. teacher: every generated token at the teacher's level, no grad, stops at block k
        if teacher is None:
            raise ValueError("SelfFlow with the representation loss needs the EMA teacher")
        with torch.no_grad():
            target = teacher(
                noised(batch, noise, steps.teacher),
                steps.teacher,
                stop_after=self.teacher_layer,
                return_hidden=(self.teacher_layer,),
            ).hidden[self.teacher_layer]
        # 8. representation loss: 1 - cos(projected student, raw teacher), mean over tokens
        tokens = batch.generate_mask()
        if cfg.representation_tokens == "masked":
            tokens = tokens & steps.masked
        assert self.projector is not None, "built whenever config.representation is on"
        rep = aligned(self.projector(out.hidden[self.student_layer]), target, tokens)
        # 9. total
        return LossBreakdown(total=flow + cfg.gamma * rep, flow=flow, representation=rep, per_modality=per)


# ----------------------------------------------------------------------------- REPA-style


class ExternalAlignment(nn.Module):
    """REPA: flow matching plus alignment of the student's block-l hidden state, through the
    projector, to a frozen external encoder's features of the *clean* batch.

    ``encoder(batch) -> (B, N_gen, E)`` per token of the generated segments, in order
    (padding positions included; they carry no loss), or ``(B, E)`` (broadcast to every
    token). It is called under ``no_grad``.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        encoder: Callable[[TokenBatch], Tensor],
        encoder_dim: int,
        gamma: float = 0.5,
        student_layer: int | None = None,
        time: TimeSampler | None = None,
        label_dropout: float = 0.1,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.gamma = gamma
        self.student_layer = _default_layer(depth, 0.3) if student_layer is None else student_layer
        if not 1 <= self.student_layer <= depth:
            raise ValueError(f"objective.student_layer={self.student_layer} is outside blocks 1..{depth}")
        self.time = time or LogitNormalTime()
        self.label_dropout = label_dropout
        self.loss_weights = dict(loss_weights or {})
        self.projector = Projector(width, encoder_dim)

    def forward(
        self, model: FlowTransformer, batch: TokenBatch, *, teacher: nn.Module | None = None, generator: torch.Generator
    ) -> LossBreakdown:
        t = self.time.sample(batch.batch_size, generator=generator, device=batch.device)
        timesteps = Timesteps.uniform(t, batch)
        with torch.no_grad():
            target = self.encoder(batch)
        batch = batch.with_labels(drop_labels(batch.labels, self.label_dropout, unwrap(model).null_label, generator))
        noise = draw_noise(batch, generator)
        out = model(noised(batch, noise, timesteps), timesteps, return_hidden=(self.student_layer,))
        flow, per = flow_loss(batch, noise, out, self.loss_weights)

        # the generated segments' tokens, in order: (B, N_gen, D); padding stays in place and
        # is excluded by the weights (a boolean gather would mix samples of a padded batch)
        parts = out.hidden[self.student_layer].split([seg.num_tokens for seg in batch.segments], dim=1)
        hidden = torch.cat([h for h, seg in zip(parts, batch.segments) if seg.generated], dim=1)
        tokens = torch.cat([seg.valid_mask() for seg in batch.segments if seg.generated], dim=1)
        if target.ndim == 2:
            target = target[:, None, :].expand(-1, hidden.shape[1], -1)
        if target.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"encoder features have shape {tuple(target.shape)}; expected (B, {hidden.shape[1]}, E) "
                "for the generated tokens, or (B, E)"
            )
        rep = aligned(self.projector(hidden), target, tokens)
        return LossBreakdown(total=flow + self.gamma * rep, flow=flow, representation=rep, per_modality=per)
