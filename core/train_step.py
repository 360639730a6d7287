"""One training step, top to bottom: ``train_step(state, micro_batches)``.

The objective draws times, noise and runs student and teacher (see ``objectives.py``);
this module turns its ``LossBreakdown`` of each micro-batch into gradients, then into one
update: backward per micro-batch, clip, optimiser, schedule, EMA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import cast

import attrs
import torch
from torch import Tensor, nn

from selfflow.core.distill import EMATeacher
from selfflow.core.distributed import all_reduce_grads
from selfflow.core.types import LossBreakdown, TokenBatch


class NonFiniteLossError(FloatingPointError):
    """Raised before any weight changes when a loss or gradient is NaN or infinite."""


@attrs.define(kw_only=True, eq=False)
class TrainState:
    """Everything a step mutates. ``model`` is the student (possibly DDP-wrapped: then
    ``module`` is the bare model), ``objective`` may own trainable heads (the projector)."""

    model: nn.Module
    teacher: EMATeacher
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0
    grad_clip: float = 1.0

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + [p for p in self.objective.parameters() if p.requires_grad]


@attrs.frozen(kw_only=True)
class StepResult:
    """What one optimiser step did: ``losses`` is the mean over its micro-batches
    (detached), ``grad_norm`` the norm before clipping, ``lr`` the rate the step used,
    ``ema_decay`` the teacher's decay at this update."""

    losses: LossBreakdown
    grad_norm: float
    lr: float
    ema_decay: float


def _check_finite(losses: LossBreakdown, step: int) -> None:
    value = float(losses.total.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step} (flow={float(losses.flow.detach())}"
            + ("" if losses.representation is None else f", representation={float(losses.representation.detach())}")
            + "); no update was applied. Lower the learning rate, check the data for NaNs, "
            "or resume from the last checkpoint"
        )


def mean_losses(parts: Sequence[LossBreakdown]) -> LossBreakdown:
    """The mean of micro-batches' losses, detached: what a step logs. A per-modality (or
    representation) term is averaged over the micro-batches that have it (streams differ in
    their modalities)."""

    def mean(values: list[Tensor]) -> Tensor:
        return torch.stack([v.detach().float() for v in values]).mean()

    names = sorted({k for p in parts for k in p.per_modality})
    reps = [p.representation for p in parts if p.representation is not None]
    return LossBreakdown(
        total=mean([p.total for p in parts]),
        flow=mean([p.flow for p in parts]),
        representation=mean(reps) if reps else None,
        per_modality={k: mean([p.per_modality[k] for p in parts if k in p.per_modality]) for k in names},
    )


def train_step(
    state: TrainState, micro_batches: TokenBatch | Sequence[TokenBatch], *, generator: torch.Generator
) -> StepResult:
    """One optimiser step on the micro-batches of one global batch (gradient accumulation:
    each contributes ``1 / len(micro_batches)`` of the gradient). The loop, the tests and the
    step benchmark all call this."""
    micros = [micro_batches] if isinstance(micro_batches, TokenBatch) else list(micro_batches)
    if not micros:
        raise ValueError("train_step needs at least one micro-batch")
    parts = []
    for i, batch in enumerate(micros):
        # DDP synchronises gradients only on the last micro-batch
        no_sync = getattr(state.model, "no_sync", None)
        sync = i == len(micros) - 1 or no_sync is None
        with (
            contextlib.nullcontext() if sync else cast(Callable[[], contextlib.AbstractContextManager[None]], no_sync)()
        ):
            # student + teacher forward and the losses, then the generation + representation gradients
            losses = state.objective(state.model, batch, teacher=state.teacher, generator=generator)
            _check_finite(losses, state.step)
            (losses.total * (1.0 / len(micros))).backward()
        parts.append(losses)

    # DDP averaged the model's gradients; heads outside it (the projector) are averaged here
    all_reduce_grads([p for p in state.objective.parameters() if p.requires_grad])
    # clip, AdamW step, LR schedule, then the EMA teacher follows the student
    params = state.trainable_parameters()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, state.grad_clip))
    if not math.isfinite(grad_norm):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {state.step}; no update was applied")
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.lr_schedule is not None:
        state.lr_schedule.step()
    decay = state.teacher.update(state.module)
    state.step += 1
    return StepResult(losses=mean_losses(parts), grad_norm=grad_norm, lr=lr, ema_decay=decay)
