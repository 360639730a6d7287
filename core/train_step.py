"""One training step, top to bottom.

The objective draws times, noise and runs student and teacher (see ``objectives.py``);
this module turns its ``LossBreakdown`` into an update: backward, clip, optimiser, EMA.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from selfflow.core.distill import EMATeacher
from selfflow.core.distributed import all_reduce_grads
from selfflow.core.objectives import Objective
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


def backward(state: TrainState, batch: TokenBatch, *, generator: torch.Generator, scale: float = 1.0) -> LossBreakdown:
    """Forward through the objective and accumulate ``scale * total`` gradients."""
    losses = state.objective(state.model, batch, teacher=state.teacher, generator=generator)
    _check_finite(losses, state.step)
    (losses.total * scale).backward()
    return losses


def apply_update(state: TrainState) -> tuple[float, float, float]:
    """Clip, optimiser step, schedule, EMA teacher update. Returns (grad_norm, lr, ema_decay)."""
    # DDP averaged the model's gradients; heads outside it (the projector) are averaged here
    all_reduce_grads([p for p in state.objective.parameters() if p.requires_grad])
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
    return grad_norm, lr, decay


def train_step(state: TrainState, batch: TokenBatch, *, generator: torch.Generator) -> StepResult:
    """One optimiser step on one batch."""
    # student + teacher forward and the losses, then the generation + representation gradients
    losses = backward(state, batch, generator=generator)
    # clip at 1.0, AdamW step, LR schedule, then the EMA teacher follows the student
    grad_norm, lr, decay = apply_update(state)
    return StepResult(losses=losses, grad_norm=grad_norm, lr=lr, ema_decay=decay)
