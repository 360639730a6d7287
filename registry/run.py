"""A composed run and its streams: the objects ``compose.build_run`` makes and every
command works on (``sampling``, ``callbacks``, ``evaluate``), the one place a modality's
reference network is built, and the rules of run directories: a run never writes into
another run's directory unless told to (``--overwrite``), resuming from an older checkpoint
keeps the later ones unless told otherwise, and a branch (``--resume A --out B``) leaves A
as it was."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.core import distributed
from selfflow.core.checkpoint import list_checkpoints
from selfflow.core.conditioning import ConditionRule
from selfflow.core.loop import Loop
from selfflow.core.model import FlowTransformer
from selfflow.core.train_step import TrainState
from selfflow.plugins.batching import EncodedData
from selfflow.plugins.protocols import Dataset, FeatureNetwork, MediaWriter, ReferenceContext, Tokenizer
from selfflow.plugins.shards import ShardData
from selfflow.registry.config import ConfigError, RunConfig, StreamConfig
from selfflow.registry.registry import Registries


@attrs.define(kw_only=True, eq=False)
class Stream:
    """A composed stream: its datasets, its encoded training tokens (segments in the order
    ``generate`` then ``condition``) and the rule that sets their roles per batch."""

    name: str
    index: int
    config: StreamConfig
    train: Dataset
    eval: Dataset
    encoded: EncodedData | ShardData  # in memory, or read from `selfflow encode`'s shards (streams[i].shards)
    rule: ConditionRule

    @property
    def generate(self) -> tuple[str, ...]:
        return tuple(self.config.generate)

    @property
    def condition(self) -> tuple[str, ...]:
        return tuple(self.config.condition)


@attrs.define(kw_only=True, eq=False)
class Run:
    """A composed run: call ``train()``; ``sample()`` draws from the EMA model."""

    config: RunConfig
    state: TrainState
    loop: Loop
    tokenizers: dict[str, Tokenizer]
    streams: dict[str, Stream]
    writers: dict[str, MediaWriter]
    class_names: tuple[str, ...]
    sampler: Any
    device: torch.device
    out_dir: Path
    generator: torch.Generator
    registries: Registries
    cache_dir: Path
    wall_time: float = 0.0
    _references: dict[str, FeatureNetwork] = attrs.field(factory=dict)

    _gathered: tuple[int, FlowTransformer] | None = None

    @property
    def teacher(self) -> FlowTransformer:
        """The EMA model that samples and evaluations use. Under FSDP2 (sharded) it is the
        whole copy ``gather_teacher`` made at this step (a collective: every rank calls it)."""
        model = self.state.teacher.model
        if not distributed.is_sharded(model):
            return model
        if self._gathered is None or self._gathered[0] != self.state.step:
            raise RuntimeError(
                "the EMA teacher is sharded (run.parallel = 'fsdp'): call run.gather_teacher() on every rank "
                "before sampling or evaluating on one"
            )
        return self._gathered[1]

    def gather_teacher(self) -> None:
        """Under FSDP2, all-gather the sharded teacher into a whole ``FlowTransformer`` kept by
        rank 0 for ``teacher`` (call on every rank; nothing happens when it is not sharded)."""
        model = self.state.teacher.model
        if not distributed.is_sharded(model):
            return
        tensors = {k: distributed.full_tensor(v) for k, v in model.state_dict().items()}
        if not distributed.shard().is_main:
            return
        with torch.random.fork_rng(devices=[]):  # building a model draws its init: keep the run's RNG as it was
            whole = FlowTransformer(model.cfg).to(self.device)
        whole.load_state_dict(tensors)
        whole.requires_grad_(False).eval()
        self._gathered = (self.state.step, whole)

    def train(self, *, until: int | None = None) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        history = self.loop.run(until=until)
        self.wall_time = time.perf_counter() - t0
        return history

    def stream_for(self, modality: str) -> Stream:
        """The first stream that generates ``modality`` (its data is what evaluation of that
        modality compares with)."""
        for st in self.streams.values():
            if modality in st.generate:
                return st
        raise ConfigError(f"no stream generates {modality!r}; generated: {self.config.generated()}")

    def reference(self, modality: str) -> FeatureNetwork:
        """The modality's reference feature network, built on first use (once per run), from
        ``[modalities.NAME] reference`` (default: the entry named after the modality)."""
        if modality not in self._references:
            self._references[modality] = build_reference(self, modality)
        return self._references[modality]


def build_reference(run: Run, modality: str) -> FeatureNetwork:
    """The one place reference networks are built: the ``references`` registry entry the
    modality's config names, fitted on the data of the first stream that generates it."""
    mc = run.config.modalities[modality]
    name = mc.reference or modality
    if name not in run.registries.references:
        known = run.registries.references.names()
        raise ConfigError(
            f"config key 'modalities.{modality}.reference': no reference network {name!r} is registered "
            f"(known: {', '.join(known) or 'none'}); a plugin adds one with the selfflow_register_references hook"
        )
    st = run.stream_for(modality)
    context = ReferenceContext(
        modality=modality,
        train_dataset=st.train,
        eval_dataset=st.eval,
        cache_dir=run.cache_dir,
        device=run.device,
        progress=run.config.output.progress,
    )
    return run.registries.references.build(name, mc.reference_options, context=context)


# ----------------------------------------------------------------------------- run directories


class RunDirectoryError(ValueError):
    """A run directory that would be mixed with another run or overwritten; the message offers the fix."""


# what a run writes into its directory (the writers' final copies are ``samples*``); only
# these are removed by ``--overwrite``, so a user's own files in the directory stay
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "checkpoints", "summary.md", "summary.json", "loss.png", "eval")
MARKERS = ("config.toml", "metrics.jsonl", "checkpoints")  # a directory with any of these holds a run


def holds_run(directory: str | os.PathLike) -> list[str]:
    """The files that show ``directory`` holds a run (empty: it does not)."""
    directory = Path(directory)
    return [name for name in MARKERS if (directory / name).exists()]


def run_outputs(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("samples"))


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint path (``run/checkpoints/step_X`` -> ``run``; a
    checkpoint outside a ``checkpoints/`` folder: the folder it is in)."""
    path = Path(path).resolve()
    if (path / "manifest.json").is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if path.name == "checkpoints":
        return path.parent
    return path


def writable(directory: str | os.PathLike) -> bool:
    """Whether files can be created at ``directory``: its nearest existing ancestor is
    writable and has a write bit (a ``chmod a-w`` run directory counts as read-only, for
    root too)."""
    p = Path(directory).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o222)


def read_log(path: Path, *, until: int) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` up to step ``until``."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= until]


@attrs.frozen(kw_only=True)
class RunDirectory:
    """Where a training run writes, decided before any work (``plan_directory``) and made
    ready after the run is composed (``prepare``), so a refused or failed build writes nothing.

    ``clear``: remove the directory's run outputs (``--overwrite``); ``drop``: later
    checkpoints to remove (resuming from an older one with ``--overwrite``); ``branch_of``:
    the run directory whose log up to the checkpoint a branch starts from."""

    path: Path
    clear: bool = False
    drop: tuple[Path, ...] = ()
    branch_of: Path | None = None

    def prepare(self, step: int | None) -> list[dict[str, Any]] | None:
        """Clear, drop, copy the branch's log; returns the branch's log rows (else ``None``)."""
        if self.clear:
            for p in run_outputs(self.path):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        for ckpt in self.drop:
            shutil.rmtree(ckpt, ignore_errors=True)
        if self.branch_of is None or step is None:
            return None
        rows = read_log(self.branch_of / "metrics.jsonl", until=step)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows


def plan_directory(
    default: Path, *, out: str | os.PathLike | None, checkpoint: Path | None, overwrite: bool
) -> RunDirectory:
    """The run directory of ``train``: ``default`` (a fresh, auto-numbered one) or ``out``
    for a new run; the checkpoint's run (or ``out``: a branch) when resuming. Refuses to mix
    two runs or to replace checkpoints unless ``overwrite``."""
    if checkpoint is None:
        if out is None:
            return RunDirectory(path=default)
        path = Path(out)
        found = holds_run(path)
        if found and not overwrite:
            raise RunDirectoryError(
                f"--out {path} already holds a run ({', '.join(found)}); continue it with --resume {path}, "
                "choose a new --out, or pass --overwrite to replace its outputs"
            )
        return RunDirectory(path=path, clear=bool(found))
    source = run_dir_of(checkpoint)
    if out is None and checkpoint.resolve().parent.name != "checkpoints":
        raise RunDirectoryError(
            f"{checkpoint} is not in a run's checkpoints/ folder, so it has no run directory to continue in; "
            "give one with --out DIR"
        )
    path = Path(out) if out is not None else source
    if path.resolve() != source:  # a branch: starts from the checkpoint, leaves its run as it was
        found = holds_run(path)
        if found and not overwrite:
            raise RunDirectoryError(
                f"--out {path} already holds another run ({', '.join(found)}); a branch of {source} needs a new "
                f"or empty --out (or --overwrite to replace that run); to continue {path} itself: --resume {path}"
            )
        return RunDirectory(path=path, clear=bool(found), branch_of=source)
    later = [c for c in list_checkpoints(checkpoint.parent) if c.name > checkpoint.name]
    if later and not overwrite:
        raise RunDirectoryError(
            f"{checkpoint} is older than this run's checkpoints {', '.join(c.name for c in later)}, which resuming "
            "it in place would replace: branch into a new directory with --out NEW, or pass --overwrite to delete "
            "them and cut metrics.jsonl at its step"
        )
    return RunDirectory(path=path, drop=tuple(later))
