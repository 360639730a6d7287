"""A composed run and its streams: the objects ``compose.build_run`` makes and every
command works on (``sampling``, ``callbacks``, ``evaluate``), and the one place a modality's
reference network is built."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.core.conditioning import ConditionRule
from selfflow.core.loop import Loop
from selfflow.core.model import FlowTransformer
from selfflow.core.train_step import TrainState
from selfflow.plugins.batching import EncodedData
from selfflow.plugins.protocols import Dataset, FeatureNetwork, MediaWriter, ReferenceContext, Tokenizer
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
    encoded: EncodedData
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

    @property
    def teacher(self) -> FlowTransformer:
        return self.state.teacher.model

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
