"""The outer training loop: LR schedule, steps with gradient accumulation, callbacks, progress.

The loop knows nothing of modalities or files other than ``metrics.jsonl`` and checkpoints:
sampling, plots and evaluation arrive as callbacks built by ``registry/compose.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch

from selfflow.core import checkpoint as ckpt
from selfflow.core.distributed import shard
from selfflow.core.train_step import StepResult, TrainState, train_step
from selfflow.core.types import TokenBatch


class BatchSource(Protocol):
    """Yields this rank's micro-batches and can say/restore where it is in the data."""

    def next_batch(self) -> TokenBatch: ...

    def position(self) -> dict[str, Any]: ...

    def restore(self, position: dict[str, Any]) -> None: ...


class Callback(Protocol):
    """``on_step`` runs after every optimiser step (check ``loop.state.step`` for cadence);
    ``on_end`` once after the last step."""

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


@attrs.frozen(kw_only=True)
class LoopConfig:
    """``steps`` optimiser steps of ``grad_accum`` micro-batches each; ``output``: cadences
    (a run's ``[output]`` section derives from ``LoopOutput``, so it can be passed as is)."""

    steps: int = attrs.field(validator=attrs.validators.ge(1))
    grad_accum: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    output: LoopOutput = attrs.field(factory=LoopOutput)


class Loop:
    """Runs ``state`` for ``config.steps`` optimiser steps on ``source``.

    Writes ``out_dir/metrics.jsonl`` (rank 0) and ``out_dir/checkpoints/step_*``.
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
        self._window: list[dict[str, float]] = []
        self._t_window = time.perf_counter()

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    # -- resume

    def resume(self, path: str | Path) -> int:
        """Restore weights, optimiser, schedule, RNG and data position; returns the step."""
        meta = ckpt.load_checkpoint(path, self.state, generator=self.generator)
        self.source.restore(meta["data_position"])
        if shard().is_main and self.metrics_path.exists():  # drop log lines past the checkpoint
            lines = [l for l in self.metrics_path.read_text().splitlines() if l.strip()]
            keep = [l for l in lines if json.loads(l).get("step", 0) <= self.state.step]
            self.metrics_path.write_text("".join(l + "\n" for l in keep))
            self.history = [json.loads(l) for l in keep]
        return self.state.step

    def save(self) -> Path | None:
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.state,
            generator=self.generator,
            data_position=self.source.position(),
            extra=self.checkpoint_extra,
            keep_last=self.config.output.keep_checkpoints,
        )

    # -- one step

    def step(self) -> StepResult:
        """Draw this step's micro-batches and run ``train_step`` on them."""
        micro_batches = [self.source.next_batch() for _ in range(self.config.grad_accum)]
        return train_step(self.state, micro_batches, generator=self.generator)

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
        self._window, self._t_window = [], now
        self.history.append(avg)
        if shard().is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(avg) + "\n")

    # -- the loop

    def run(self, *, until: int | None = None) -> list[dict[str, float]]:
        """Train to ``config.steps`` (or stop early at step ``until`` with a checkpoint, as an
        interrupted run would; the LR schedule still follows ``config.steps``)."""
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        self.state.model.train()
        bar = None
        if cfg.output.progress and shard().is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        self._t_window = time.perf_counter()
        try:
            while self.state.step < stop:
                result = self.step()
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
        return self.history
