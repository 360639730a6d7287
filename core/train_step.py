"""One training step, top to bottom: ``train_step(state, micro_batches)``.

The objective draws times, noise and runs student and teacher (see ``objectives.py``);
this module turns its ``LossBreakdown`` of each micro-batch into gradients, then into one
update: backward per micro-batch, clip, check, optimiser, schedule, EMA.

A step is applied whole or not at all: a non-finite loss or gradient norm (or, when the
caller sets ``max_loss``, a loss above it) is refused with a ``BadStepError`` before anything
changes, and Ctrl-C during the update is held back until the update is complete.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfflow.core.acceleration import autocast
from selfflow.core.distill import EMATeacher
from selfflow.core.distributed import all_reduce_grads, grad_norm_, shard
from selfflow.core.types import LossBreakdown, TokenBatch


class BadStepError(FloatingPointError):
    """A step refused before any weight changed. ``reason``: what was wrong, in a few words
    (the message without its advice); ``step`` is the number of updates so far (the refused
    one would have made it ``step + 1``), ``component`` names the bad quantity (``loss``,
    ``flow``, ``representation``, ``flow/MODALITY``, ``gradient norm``), ``value`` is its value
    and ``losses`` the step's mean losses (``LossBreakdown.detached()`` keys). ``checkpoint``:
    set by the loop when it stops a run, the last checkpoint whose losses were sane (finite
    and spike-free), or ``None``."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        step: int = -1,
        component: str = "loss",
        value: float = math.nan,
        losses: dict[str, float] | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason
        self.step, self.component, self.value = step, component, value
        self.losses = dict(losses or {})
        self.checkpoint = checkpoint


class NonFiniteLossError(BadStepError):
    """Raised before any weight changes when a loss or gradient is NaN or infinite."""


class LossSpikeError(BadStepError):
    """Raised before any weight changes when the step's loss is above the caller's ``max_loss``."""


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
    # autocast dtype of the forward passes (run.precision: bf16 on CUDA), None: float32; core.acceleration
    precision: torch.dtype | None = None
    sharded: bool = False  # FSDP2 (run.parallel = "fsdp"): checkpoints are sharded (core.checkpoint)

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
    ``ema_decay`` the teacher's decay at this update, ``global_loss`` the total loss
    averaged over micro-batches and ranks (``losses`` is this rank's; every rank sees the
    same ``global_loss``, so decisions taken on it agree)."""

    losses: LossBreakdown
    grad_norm: float
    lr: float
    ema_decay: float
    global_loss: float


def _bad_component(values: dict[str, float]) -> str:
    """The most specific non-finite entry of ``LossBreakdown.detached()``: a modality's flow
    loss before the flow loss, before the total."""
    for name in [*sorted(k for k in values if k.startswith("flow/")), "flow", "representation"]:
        if name in values and not math.isfinite(values[name]):
            return name
    return "loss"


def _refusal(
    state: TrainState, losses: dict[str, float], global_loss: float, grad_norm: float, max_loss: float | None
) -> BadStepError | None:
    """Why this step must not be applied, or ``None``. Checked on every rank in the same order,
    on values every rank shares, so all ranks refuse the same steps."""
    step, total = state.step, losses["loss"]
    if not math.isfinite(total) or not math.isfinite(global_loss):
        if math.isfinite(total):  # this rank's loss is fine, another rank's is not
            component, value = "loss on another rank", global_loss
        else:
            component = _bad_component(losses)
            value = losses.get(component, total)
        others = ", ".join(f"{k}={v:.6g}" for k, v in losses.items() if k not in ("loss", component))
        what = "; ".join(x for x in ("" if component == "loss" else f"{component} is {value}", others) if x)
        reason = f"loss is {global_loss if math.isfinite(total) else total} at step {step}" + (
            f" ({what})" if what else ""
        )
        return NonFiniteLossError(
            f"{reason}; no update was applied: lower the learning rate or check the data for NaNs",
            reason=reason,
            step=step,
            component=component,
            value=value,
            losses=losses,
        )
    breakdown = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
    if not math.isfinite(grad_norm):
        return NonFiniteLossError(
            f"gradient norm is {grad_norm} at step {step}; no update was applied ({breakdown}): "
            "lower the learning rate or check the data",
            reason=f"gradient norm is {grad_norm} at step {step} ({breakdown})",
            step=step,
            component="gradient norm",
            value=grad_norm,
            losses=losses,
        )
    if max_loss is not None and global_loss > max_loss:
        reason = f"loss spike at step {step}: loss {global_loss:.6g} is above the limit {max_loss:.6g} ({breakdown})"
        return LossSpikeError(
            f"{reason}; no update was applied",
            reason=reason,
            step=step,
            component="loss",
            value=global_loss,
            losses=losses,
        )
    return None


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then deliver it: the update is applied
    whole or not at all. Only the main thread can handle signals; elsewhere (or with a
    non-callable handler) this does nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt here


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
    state: TrainState,
    micro_batches: TokenBatch | Sequence[TokenBatch],
    *,
    generator: torch.Generator,
    max_loss: float | None = None,
) -> StepResult:
    """One optimiser step on the micro-batches of one global batch (gradient accumulation:
    each contributes ``1 / len(micro_batches)`` of the gradient). The loop, the tests and the
    step benchmark all call this.

    Raises ``NonFiniteLossError`` (a NaN or infinite loss on any rank, or gradient norm) or,
    with ``max_loss``, ``LossSpikeError`` (a total loss above it) before anything changes:
    weights, optimiser, schedule, teacher and ``state.step`` are as they were and the
    gradients are dropped; the step's random draws are spent. ``core.loop`` turns these into
    skipped steps (``LoopGuard``)."""
    micros = [micro_batches] if isinstance(micro_batches, TokenBatch) else list(micro_batches)
    if not micros:
        raise ValueError("train_step needs at least one micro-batch")
    parts = []
    for i, batch in enumerate(micros):
        # DDP synchronises gradients only on the last micro-batch; FSDP2 likewise reduce-scatters once
        no_sync = getattr(state.model, "no_sync", None)
        sync = i == len(micros) - 1 or no_sync is None
        for m in (state.model, *state.objective.children()):
            set_sync = getattr(m, "set_requires_gradient_sync", None)  # an FSDP2 module's
            if callable(set_sync):
                set_sync(i == len(micros) - 1)
        with (
            contextlib.nullcontext() if sync else cast(Callable[[], contextlib.AbstractContextManager[None]], no_sync)()
        ):
            # student + teacher forward and the losses, then the generation + representation gradients;
            # a non-finite loss is back-propagated too, so every rank joins the same gradient all-reduce
            with autocast(state.precision, batch.device):  # fp32 master weights; the losses are fp32
                losses = state.objective(state.model, batch, teacher=state.teacher, generator=generator)
            (losses.total * (1.0 / len(micros))).backward()
        parts.append(losses)

    # DDP averaged the model's gradients; heads outside it (the projector) are averaged here
    all_reduce_grads([p for p in state.objective.parameters() if p.requires_grad])
    params = state.trainable_parameters()
    grad_norm = grad_norm_(params, state.grad_clip)
    mean = mean_losses(parts)
    global_loss = _global_mean(mean.total)
    refusal = _refusal(state, mean.detached(), global_loss, grad_norm, max_loss)
    if refusal is not None:
        state.optimizer.zero_grad(set_to_none=True)  # its gradients go; nothing else was touched
        raise refusal

    # the update: AdamW step, LR schedule, then the EMA teacher follows the student
    lr = state.optimizer.param_groups[0]["lr"]
    with _interrupts_held():
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if state.lr_schedule is not None:
            state.lr_schedule.step()
        decay = state.teacher.update(state.module)
        state.step += 1
    return StepResult(losses=mean, grad_norm=grad_norm, lr=lr, ema_decay=decay, global_loss=global_loss)


def _global_mean(total: Tensor) -> float:
    """The total loss averaged over ranks (NaN if any rank's is): one scalar all-reduce."""
    if shard().world == 1:
        return float(total)
    t = total.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / shard().world
