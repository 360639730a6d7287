"""What plugins provide: the protocols of datasets, tokenizers, writers, reference networks,
media metrics and model probes, and the typed contexts they are built with.

``registry/`` turns names into objects that satisfy these; ``core/`` never sees a modality
library, only ``TokenBatch``es and callables. A third-party package implements the same
protocols as the built-ins (``docs/plugins.md`` walks through one).

Media conventions (per modality, as batches):
- image: ``(B, C, H, W)`` float in [-1, 1]
- video: ``(B, C, T, H, W)`` float in [-1, 1]
- audio: ``(B, channels, samples)`` float in [-1, 1]
- text:  a list of ``str``
A plugin's own modality states its convention in its docs; selfflow only moves its media
between the plugin's dataset, tokenizer, writer, reference network and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor, nn

from selfflow.core.types import Segment


def _check_media(instance: Example, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        raise TypeError(
            "Example.media is a mapping modality -> medium, e.g. Example(media={'image': x}); "
            f"got {type(value).__name__}"
        )


@attrs.frozen(kw_only=True)
class Example:
    """One dataset item: ``media`` keyed by modality (``{"image": x, "text": "seven"}``) and
    an optional class ``label``."""

    media: Mapping[str, Any] = attrs.field(validator=_check_media)
    label: int | None = None


@runtime_checkable
class Dataset(Protocol):
    """A map-style dataset of ``Example``s.

    ``modalities``: the keys of every item's ``media``; ``num_classes``: 0 when unlabelled;
    ``class_names`` for labelled sets (row labels of sample grids; streams that share a
    label space must agree on them); ``fingerprint()``: a short string that changes when
    the data changes (caches of fitted tokenizers, encoded latents and reference networks
    key on it).
    """

    modalities: tuple[str, ...]
    num_classes: int
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Example: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Media of one modality <-> a ``Segment`` of continuous tokens.

    ``channels``: the token width (known after ``fit``); ``mask_ratio``: the modality's
    default Self-Flow mask ratio R (the paper's image 0.25, video 0.10, audio 0.50), used
    when the run does not set ``modalities.NAME.mask_ratio``; ``encode`` takes a batch of
    media and returns a ``Segment`` with ``(t, h, w)`` positions (``core.types`` states the
    position convention) and the default role: which segments are conditions is chosen per
    batch by ``core.conditioning.ConditionRule``, never by the tokenizer; ``decode``
    inverts it. ``fit`` trains the tokenizer on ``dataset`` (reading ``media[modality]``)
    when it needs training (a no-op for fixed ones) and may cache under ``cache_dir``;
    ``cache_key()`` identifies what ``encode`` computes once fitted (encoded latents are
    cached on disk under it; ``None``: never cache).
    """

    modality: str
    mask_ratio: float

    @property
    def channels(self) -> int: ...

    def fit(
        self, dataset: Dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None
    ) -> None: ...

    def encode(self, media: Any) -> Segment: ...

    def decode(self, segment: Segment) -> Any: ...

    def cache_key(self) -> str | None: ...


# ----------------------------------------------------------------------------- writers


def _items(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in value)


@attrs.frozen(kw_only=True)
class MediaFile:
    """A file a writer wrote and how ``samples.html`` shows it: ``element`` is ``"img"``,
    ``"video"``, ``"audio"`` or ``"text"`` (the file's contents in a ``<pre>``); ``items``
    are the indices of the samples it shows (a grid shows many); ``caption``: a line shown
    under it."""

    path: Path
    element: str = attrs.field(validator=attrs.validators.in_(("img", "video", "audio", "text")))
    items: tuple[int, ...] = attrs.field(default=(), converter=_items)
    caption: str = ""


@runtime_checkable
class MediaWriter(Protocol):
    """Writes a batch of decoded media of one modality to files a person opens.

    ``write(media, directory, stem=, labels=, title=)``: ``labels`` has one entry per
    sample (what it was generated for: its class name, its condition), samples that share
    a label are consecutive; files are named from ``stem`` (``step_0000500``) plus the
    writer's suffixes. Returns every file it wrote, in display order.
    """

    modality: str

    def write(
        self, media: Any, directory: Path, *, stem: str, labels: Sequence[str] | None, title: str
    ) -> list[MediaFile]: ...


# ----------------------------------------------------------------------------- reference networks


@runtime_checkable
class FeatureNetwork(Protocol):
    """A modality's reference network: what media metrics and REPA-style alignment see.

    ``features(media) -> (B, num_features)``; ``logits(media) -> (B, num_classes)``;
    ``feature_module()``: an ``nn.Module`` with an int ``num_features`` that maps a media
    batch to features (torchmetrics' ``feature=``); ``token_features(media, segment) ->
    (B, N, token_feature_dim)``: one feature vector per token of ``segment`` (the tokens
    ``media`` was encoded to), for REPA-style alignment; ``accuracy``: held-out accuracy;
    ``describe()``: the protocol to write next to every number it produces.
    """

    name: str

    @property
    def accuracy(self) -> float: ...

    @property
    def num_features(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def token_feature_dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def features(self, media: Any) -> Tensor: ...

    def logits(self, media: Any) -> Tensor: ...

    def feature_module(self) -> nn.Module: ...

    def token_features(self, media: Any, segment: Segment) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@attrs.frozen(kw_only=True)
class ReferenceContext:
    """What a reference network's factory receives: the modality it serves, the run's data
    (``train_dataset`` to fit on, ``eval_dataset`` to measure its accuracy on; both carry
    ``media[modality]``), where to cache, the device and whether to show progress."""

    modality: str
    train_dataset: Dataset
    eval_dataset: Dataset
    cache_dir: Path
    device: torch.device
    progress: bool = False


# ----------------------------------------------------------------------------- metrics


@attrs.frozen(kw_only=True)
class MetricResult:
    """A named value with the protocol that produced it (sampler, steps, seeds, reference
    network accuracy, ...), written next to the number."""

    name: str
    value: float
    details: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class MetricContext:
    """What a media metric's or model probe's factory receives, frozen and typed.

    ``modality``: the modality it scores; ``train_dataset`` / ``eval_dataset``: the data of
    the stream that generates it; ``tokenizer``: that modality's tokenizer; ``reference()``:
    the modality's reference network, built on first call and shared by every metric of the
    evaluation (metrics that never call it cost nothing)."""

    modality: str
    train_dataset: Dataset
    eval_dataset: Dataset
    tokenizer: Tokenizer
    device: torch.device
    cache_dir: Path
    reference: Callable[[], FeatureNetwork]
    progress: bool = False


@runtime_checkable
class MediaMetric(Protocol):
    """Compares generated media of one modality with real media.

    ``update(real=, fake=, labels=)`` may be called many times with batches (``labels``: the
    class each fake sample was generated for); ``compute()`` returns ``MetricResult``s."""

    name: str

    def update(self, *, real: Any = None, fake: Any = None, labels: Tensor | None = None) -> None: ...

    def compute(self) -> list[MetricResult]: ...


@runtime_checkable
class ModelProbe(Protocol):
    """Measures the generator itself (e.g. a linear probe of its hidden states) on the
    context's data: ``probe(model) -> [MetricResult]``; it has no real-data ceiling."""

    name: str

    def __call__(self, model: nn.Module) -> list[MetricResult]: ...


# ----------------------------------------------------------------------------- registration


class Register(Protocol):
    """Handed to every ``selfflow_register_*`` hook; entries it adds are attributed to the
    calling plugin. ``factory`` is called as the hook's docstring says; ``config_cls`` is a
    frozen attrs class of the entry's options (``None``: none); ``doc``: one line."""

    def add(self, name: str, factory: Callable[..., Any], config_cls: type | None = None, doc: str = "") -> None: ...
