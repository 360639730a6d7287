"""What plugins provide: the protocols of tokenizers, datasets and metrics.

``registry/compose.py`` turns names into objects that satisfy these; ``core/`` never sees a
modality library, only ``TokenBatch``es and callables.

Media conventions (per modality, as tensors):
- image: ``(B, C, H, W)`` float in [-1, 1]
- video: ``(B, C, T, H, W)`` float in [-1, 1]
- audio: ``(B, channels, samples)`` float in [-1, 1]
- text:  a list of ``str``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment


@attrs.frozen(kw_only=True)
class Example:
    """One dataset item: ``media`` for the modality, an optional class ``label`` and an
    optional ``text`` (e.g. the word an image shows, used as a condition segment)."""

    media: Any
    label: int | None = None
    text: str | None = None


@runtime_checkable
class Dataset(Protocol):
    """A map-style dataset of ``Example``s.

    ``modality``: what ``media`` is; ``num_classes``: 0 when unlabelled; ``class_names``
    for labelled sets (used in sample grids); ``fingerprint()``: a short string that changes
    when the data changes (caches of fitted tokenizers and reference networks key on it).
    """

    modality: str
    num_classes: int
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Example: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Media <-> a ``Segment`` of continuous tokens.

    ``channels`` is the token width (known after ``fit``); ``encode`` takes a batch of media
    (see the module docstring) and returns a ``Segment`` with ``(t, h, w)`` positions;
    ``decode`` inverts it. ``fit`` trains the tokenizer on a dataset when it needs training
    (a no-op for fixed ones) and may cache under ``cache_dir``.
    """

    modality: str

    @property
    def channels(self) -> int: ...

    def fit(self, dataset: Dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None: ...

    def encode(self, media: Any) -> Segment: ...

    def decode(self, segment: Segment) -> Any: ...


@attrs.frozen(kw_only=True)
class MetricResult:
    """A named value with the protocol that produced it (sampler, steps, seeds, reference
    network accuracy, ...), written next to the number."""

    name: str
    value: float
    details: dict[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Metric(Protocol):
    """Compares generated media with real media.

    ``update(real=..., fake=..., labels=...)`` may be called many times with batches;
    ``compute()`` returns ``MetricResult``s. ``requires``: what the metric needs, a subset of
    {"real", "fake", "labels", "model"}.
    """

    name: str

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None: ...

    def compute(self) -> list[MetricResult]: ...
