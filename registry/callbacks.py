"""What a training run does besides training: samples, plots, evaluation at the end.

Each is a ``core.loop.Callback``; ``compose.build_run`` creates them. Only rank 0 writes.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import attrs

from selfflow.core import distributed
from selfflow.core.loop import Loop
from selfflow.core.train_step import StepResult
from selfflow.plugins.gallery import Gallery
from selfflow.plugins.protocols import MediaFile

if TYPE_CHECKING:
    from selfflow.registry.run import Run


class SampleCallback:
    """Samples every stream from the EMA model at ``every`` steps (0: only at the end) and
    writes each generated modality through its writer: ``samples/step_XXXXXXX*`` files, the
    final ones again as ``samples*`` in the run directory, all listed in ``samples.html``."""

    def __init__(self, run_ref: list[Run], every: int) -> None:
        self.run_ref, self.every = run_ref, every
        self.final_files: list[MediaFile] = []

    def write(self, step: int, final: bool) -> None:
        self.run_ref[0].gather_teacher()  # under FSDP every rank joins the gather; rank 0 samples
        if not distributed.shard().is_main:
            return
        from selfflow.registry.sampling import write_samples

        run = self.run_ref[0]
        gallery = Gallery(run.out_dir, title=f"{run.config.run.name}: samples")
        stem = f"step_{step:07d}"
        files = write_samples(
            run,
            run.out_dir / "samples",
            stem=stem,
            labels=None,
            n=None,
            seed=run.config.run.seed + 1,
            gallery=gallery,
            step=step,
        )
        if final:  # the last samples again at the top of the run directory: samples.png, ...
            self.final_files = []
            for f in files:
                dest = run.out_dir / f.path.name.replace(stem, "samples", 1)
                shutil.copyfile(f.path, dest)
                self.final_files.append(attrs.evolve(f, path=dest))

    def on_step(self, loop: Loop, result: StepResult) -> None:
        if self.every and loop.state.step % self.every == 0 and loop.state.step < loop.config.steps:
            self.write(loop.state.step, final=False)

    def on_end(self, loop: Loop) -> None:
        self.write(loop.state.step, final=True)


class PlotCallback:
    """``loss.png`` from ``metrics.jsonl`` at the end (rank 0)."""

    def on_step(self, loop: Loop, result: StepResult) -> None:
        pass

    def on_end(self, loop: Loop) -> None:
        if distributed.shard().is_main and loop.history:
            from selfflow.plugins.plots import plot_losses

            plot_losses(loop.history, loop.out_dir / "loss.png")


class EvalCallback:
    """``eval.at_end``: the run's ``[[eval.metrics]]`` after the last step, the report in
    ``eval/eval_step_N-KEY.{json,md}`` and ``eval/eval_step_N.{json,md}`` (rank 0; see
    ``evaluate.write_report``)."""

    def __init__(self, run_ref: list[Run]) -> None:
        self.run_ref = run_ref
        self.report_path = None

    def on_step(self, loop: Loop, result: StepResult) -> None:
        pass

    def on_end(self, loop: Loop) -> None:
        self.run_ref[0].gather_teacher()  # under FSDP every rank joins the gather; rank 0 evaluates
        if not distributed.shard().is_main:
            return
        from selfflow.registry.evaluate import evaluate, write_report

        run = self.run_ref[0]
        self.report_path = write_report(evaluate(run), run.out_dir / "eval")
