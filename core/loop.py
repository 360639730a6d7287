"""The outer training loop: LR schedule, steps with gradient accumulation, callbacks, progress.

The loop knows nothing of modalities or files other than ``metrics.jsonl`` and checkpoints:
sampling, plots and evaluation arrive as callbacks built by ``registry/compose.py``.

Run safety lives here too: ``LoopGuard`` (bad steps are skipped, a streak of them stops the
run and names the last checkpoint whose losses were sane) and Ctrl-C (``TrainingInterrupted``
after a checkpoint of the last completed step).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch

from selfflow.core import checkpoint as ckpt
from selfflow.core import files
from selfflow.core.distributed import shard
from selfflow.core.train_step import BadStepError, StepResult, TrainState, train_step
from selfflow.core.types import TokenBatch


class BatchSource(Protocol):
    """Yields this rank's micro-batches and can say/restore where it is in the data."""

    def next_batch(self) -> TokenBatch: ...

    def position(self) -> dict[str, Any]: ...

    def restore(self, position: dict[str, Any]) -> None: ...


class Callback(Protocol):
    """``on_step`` runs after every optimiser step (check ``loop.state.step`` for cadence; a
    skipped step is none); ``on_end`` once after the last step."""

    def on_step(self, loop: Loop, result: StepResult) -> None: ...

    def on_end(self, loop: Loop) -> None: ...


def warmup_schedule(warmup: int, total: int, kind: str = "constant", final: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then ``constant`` or ``cosine``
    decay to ``final`` of the peak at ``total``."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown LR schedule {kind!r}; choose 'constant' or 'cosine'")

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@attrs.frozen(kw_only=True)
class LoopOutput:
    """What the loop writes and how often (steps): ``log_every`` (averaged rows of
    ``metrics.jsonl``), ``checkpoint_every`` (0: only at the end), ``keep_checkpoints``
    (the last K), ``progress`` (a tqdm bar on rank 0)."""

    log_every: int = attrs.field(default=25, validator=attrs.validators.ge(1))
    checkpoint_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    keep_checkpoints: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    progress: bool = True


def _spike_factor(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (value == 0 or value > 1):  # also refuses NaN
        raise ValueError(
            f"must be 0 (no spike detector) or above 1 (a loss that many times the recent median is a spike), "
            f"got {value}",
            attribute,
            None,
            value,
        )


@attrs.frozen(kw_only=True)
class LoopGuard:
    """What the loop does with bad steps (a run's ``[guard]`` section is this class).

    A step whose loss (any rank's, any component's) or gradient norm is NaN or infinite is
    **skipped**: no optimiser step, no LR-schedule step, no EMA update, its gradients
    dropped; its batches and random draws are spent. ``state.step`` counts updates, so a
    skipped step does not advance it. Each skip is a warning naming the step and the loss
    component, and is counted in the ``skipped`` field of ``metrics.jsonl``.
    ``max_consecutive_skips`` bad steps in a row stop the run (``NonFiniteLossError``, or
    ``LossSpikeError`` when the last was a spike) naming the step, the component and the last
    checkpoint whose losses were sane; 1 stops at the first bad step.

    A **spike** is a total loss above ``spike_factor`` times the median of the last
    ``spike_window`` applied steps' losses (checked once that many are known; 0 turns the
    detector off). Spikes are warned about, counted (``spikes`` in ``metrics.jsonl``) and make
    the next checkpoint not sane; the update is applied. With ``stop_on_spike`` a spike is a
    bad step like a non-finite one: skipped, and counted towards ``max_consecutive_skips``.

    "Sane" is recorded per checkpoint (``state.json``: ``extra.loop.sane``): no skipped step and
    no spike since the previous checkpoint (or since the start or resume). A stop names the
    newest sane checkpoint *before* the stopping step (one at that step holds the weights the
    bad steps were computed with). With no bad step and no spike the loop's numbers are
    exactly those of plain ``train_step`` calls.
    """

    max_consecutive_skips: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    spike_factor: float = attrs.field(default=10.0, validator=_spike_factor)
    spike_window: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    stop_on_spike: bool = False


@attrs.frozen(kw_only=True)
class LoopConfig:
    """``steps`` optimiser steps of ``grad_accum`` micro-batches each; ``output``: cadences
    (a run's ``[output]`` section derives from ``LoopOutput``, so it can be passed as is);
    ``guard``: what bad steps do (``LoopGuard``, a run's ``[guard]`` section)."""

    steps: int = attrs.field(validator=attrs.validators.ge(1))
    grad_accum: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    output: LoopOutput = attrs.field(factory=LoopOutput)
    guard: LoopGuard = attrs.field(factory=LoopGuard)


class BadStepWarning(RuntimeWarning):
    """A skipped step or a loss spike (``LoopGuard``); the message is one line."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped ``Loop.run``: ``checkpoint`` holds the last completed ``step`` (``None``
    when nothing was trained yet, or on a rank that does not write), so
    ``--resume CHECKPOINT`` continues exactly where the run stopped."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (nothing to resume)"
        super().__init__(f"training interrupted after step {step}; {where}")
        self.checkpoint, self.step = checkpoint, step


@attrs.frozen
class _Before:
    """Where a step attempt started: undone if Ctrl-C cuts the attempt short."""

    step: int
    generator: torch.Tensor
    data: dict[str, Any]


class Loop:
    """Runs ``state`` for ``config.steps`` optimiser steps on ``source``.

    Writes ``out_dir/metrics.jsonl`` (rank 0) and ``out_dir/checkpoints/step_*``. Bad steps
    follow ``config.guard``; Ctrl-C ends ``run`` with ``TrainingInterrupted``.
    """

    def __init__(
        self,
        *,
        state: TrainState,
        source: BatchSource,
        generator: torch.Generator,
        config: LoopConfig,
        out_dir: str | Path,
        callbacks: Sequence[Callback] = (),
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> None:
        self.state = state
        self.source = source
        self.generator = generator
        self.config = config
        self.out_dir = Path(out_dir)
        self.callbacks = list(callbacks)
        self.checkpoint_extra = checkpoint_extra or {}
        self.history: list[dict[str, float]] = []
        self.read_only = False
        self._window: list[dict[str, float]] = []
        self._t_window = time.perf_counter()
        # the guard's state: applied steps' losses (the spike baseline), the current streak of
        # bad steps, counts for the next metrics row, whether the losses since the last checkpoint
        # were sane; the saved (or resumed) checkpoint of this directory and its step
        self._recent: deque[float] = deque(maxlen=config.guard.spike_window)
        self._bad_in_a_row = 0
        self._skipped = self._spikes = 0
        self._sane = True
        self._saved_step: int | None = None  # on every rank, so ranks agree on what to save
        self._saved_path: Path | None = None  # rank 0 only
        self._before: _Before | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    # -- resume

    def resume(self, path: str | Path, *, read_only: bool = False) -> int:
        """Restore weights, optimiser, schedule, RNG, data position and the guard's state;
        returns the step. Drops ``metrics.jsonl`` rows past the checkpoint, unless
        ``read_only``: then no file is touched (``sample``, ``eval``) and ``run``/``save``
        refuse."""
        meta = ckpt.load_checkpoint(path, self.state, generator=self.generator)
        self.source.restore(meta["data_position"])
        guard = meta.get("extra", {}).get("loop", {})
        self._recent.clear()
        self._recent.extend(float(v) for v in guard.get("recent_losses", []))
        self._bad_in_a_row = int(guard.get("bad_in_a_row", 0))
        self._sane = True
        resolved = ckpt.resolve(path).resolve()
        if resolved.parent == self.checkpoint_dir.resolve():  # this directory's own checkpoint
            self._saved_step, self._saved_path = self.state.step, resolved
        self.read_only = read_only
        if self.metrics_path.exists():  # the log up to the checkpoint
            lines = [l for l in self.metrics_path.read_text().splitlines() if l.strip()]
            keep = [l for l in lines if json.loads(l).get("step", 0) <= self.state.step]
            self.history = [json.loads(l) for l in keep]
            if shard().is_main and not read_only and len(keep) < len(lines):  # drop log lines past it
                self.metrics_path.write_text("".join(l + "\n" for l in keep))
        return self.state.step

    def _refuse_if_read_only(self, what: str) -> None:
        if self.read_only:
            raise RuntimeError(f"this loop was resumed with read_only=True; it does not {what}")

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; call on every rank), with the guard's
        state and whether the losses since the previous checkpoint were sane."""
        self._refuse_if_read_only("write checkpoints")
        guard = {"sane": self._sane, "recent_losses": list(self._recent), "bad_in_a_row": self._bad_in_a_row}
        path = ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.state,
            generator=self.generator,
            data_position=self.source.position(),
            extra={**self.checkpoint_extra, "loop": guard},
            keep_last=self.config.output.keep_checkpoints,
            # losses since the last checkpoint were not sane: rotation keeps the newest sane one
            protect=None if self._sane else self._last_sane_checkpoint(),
        )
        self._sane = True
        self._saved_step, self._saved_path = self.state.step, path
        return path

    # -- one step

    def step(self) -> StepResult:
        """Draw this step's micro-batches and run ``train_step`` on them. A bad step raises
        ``BadStepError`` (nothing changed); with ``guard.stop_on_spike`` a loss above the
        spike limit is one."""
        limit = self._spike_limit() if self.config.guard.stop_on_spike else None
        micro_batches = [self.source.next_batch() for _ in range(self.config.grad_accum)]
        return train_step(self.state, micro_batches, generator=self.generator, max_loss=limit)

    # -- the guard

    def _spike_limit(self) -> float | None:
        guard = self.config.guard
        if guard.spike_factor == 0 or len(self._recent) < guard.spike_window:
            return None
        return guard.spike_factor * statistics.median(self._recent)

    def _skip(self, err: BadStepError) -> None:
        """A refused step: count it, warn, and stop the run at ``max_consecutive_skips`` in a row."""
        guard = self.config.guard
        self._bad_in_a_row += 1
        self._skipped += 1
        self._sane = False
        if self._bad_in_a_row >= guard.max_consecutive_skips:
            sane = self._last_sane_checkpoint()
            where = (
                f"the last checkpoint whose losses were finite and spike-free is {sane}: resume from it"
                if sane is not None
                else "no kept checkpoint has finite, spike-free losses: start again"
            )
            n = self._bad_in_a_row
            raise type(err)(
                f"training stopped: {n} bad step{'s' if n > 1 else ''} in a row "
                f"(guard.max_consecutive_skips = {guard.max_consecutive_skips}), the last: {err.reason}; "
                f"{where} with a lower optimizer.lr",
                reason=err.reason,
                step=err.step,
                component=err.component,
                value=err.value,
                losses=err.losses,
                checkpoint=sane,
            ) from err
        warnings.warn(
            f"bad step skipped ({self._bad_in_a_row} in a row; guard.max_consecutive_skips = "
            f"{guard.max_consecutive_skips} stop the run): {err.reason}",
            BadStepWarning,
            stacklevel=3,
        )

    def _watch(self, result: StepResult, limit: float | None) -> None:
        """An applied step: a spike is warned about and counted; its loss joins the baseline."""
        self._bad_in_a_row = 0
        if limit is not None and result.global_loss > limit:
            self._spikes += 1
            self._sane = False
            warnings.warn(
                f"loss spike at step {self.state.step - 1}: loss {result.global_loss:.6g} is above "
                f"guard.spike_factor = {self.config.guard.spike_factor} x the median of the last "
                f"{len(self._recent)} losses ({limit:.6g}); the update was applied "
                "(guard.stop_on_spike = true skips such steps)",
                BadStepWarning,
                stacklevel=3,
            )
        if self.config.guard.spike_factor:
            self._recent.append(result.global_loss)

    def _last_sane_checkpoint(self) -> Path | None:
        """The newest checkpoint before this step whose losses were sane. One *at* this step
        is not: its weights are the ones the streak of bad steps was computed with."""
        for path in reversed(ckpt.list_checkpoints(self.checkpoint_dir)):
            try:
                meta = json.loads((path / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("step", 0) < self.state.step and meta.get("extra", {}).get("loop", {}).get("sane"):
                return path
        return None

    # -- logging

    def _log(self, result: StepResult) -> None:
        row = result.losses.detached()
        row.update(grad_norm=result.grad_norm, lr=result.lr, ema_decay=result.ema_decay)
        self._window.append(row)
        step = self.state.step
        if step % self.config.output.log_every and step != self.config.steps:
            return
        now = time.perf_counter()
        # rows of different streams carry different per-modality keys: each key is averaged
        # over the rows that have it
        keys = list(dict.fromkeys(k for r in self._window for k in r))
        avg = {k: sum(vals) / len(vals) for k in keys if (vals := [r[k] for r in self._window if k in r])}
        avg.update(step=step, steps_per_s=len(self._window) / max(now - self._t_window, 1e-9))
        avg.update(skipped=self._skipped, spikes=self._spikes)  # since the previous row
        self._window, self._t_window = [], now
        self._skipped = self._spikes = 0
        self.history.append(avg)
        if shard().is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(avg) + "\n")

    # -- interrupts

    def _interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C: undo a step attempt cut short (its gradients, random draws and data),
        then checkpoint the last completed step unless it already is."""
        self.state.optimizer.zero_grad(set_to_none=True)
        before, self._before = self._before, None
        if before is not None and before.step == self.state.step:  # the attempt did not complete
            self.generator.set_state(before.generator)
            self.source.restore(before.data)
        step = self.state.step
        if self._saved_step == step:
            return TrainingInterrupted(self._saved_path, step)
        if shard().world > 1:  # a checkpoint gathers every rank, which Ctrl-C reached at different points
            return TrainingInterrupted(ckpt.latest_checkpoint(self.checkpoint_dir), step)
        return TrainingInterrupted(self.save() if step > 0 else None, step)

    # -- the loop

    def run(self, *, until: int | None = None) -> list[dict[str, float]]:
        """Train to ``config.steps`` (or stop early at step ``until`` with a checkpoint, as an
        interrupted run would; the LR schedule still follows ``config.steps``).

        Bad steps follow ``config.guard``; Ctrl-C raises ``TrainingInterrupted`` after a
        checkpoint of the last completed step. Temporary checkpoint directories that dead
        processes left (a ``kill -9`` mid-write) are removed first."""
        self._refuse_if_read_only("train")
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        if shard().is_main:
            files.clean_stale(self.checkpoint_dir)
        self.state.model.train()
        bar = None
        if cfg.output.progress and shard().is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        self._t_window = time.perf_counter()
        try:
            try:
                while self.state.step < stop:
                    self._before = _Before(
                        step=self.state.step, generator=self.generator.get_state(), data=self.source.position()
                    )
                    limit = self._spike_limit()
                    try:
                        result = self.step()
                    except BadStepError as err:
                        self._before = None
                        self._skip(err)
                        continue
                    self._before = None
                    self._watch(result, limit)
                    self._log(result)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(result.losses.total.detach()):.4f}", refresh=False)
                    if (
                        cfg.output.checkpoint_every
                        and self.state.step % cfg.output.checkpoint_every == 0
                        and self.state.step < cfg.steps
                    ):
                        self.save()
                    for cb in self.callbacks:
                        cb.on_step(self, result)
            finally:
                if bar is not None:
                    bar.close()
            self.save()
            if self.state.step >= cfg.steps:
                for cb in self.callbacks:
                    cb.on_end(self)
        except KeyboardInterrupt as err:
            raise self._interrupted() from err
        return self.history
