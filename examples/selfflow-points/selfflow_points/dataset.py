"""``points/shapes``: 2-D point sets drawn on the outlines of circles, squares, triangles and
crosses, generated from a seeded generator (no files, no network).

Media convention of the ``points`` modality: one set is ``(N, 2)`` float ``(x, y)`` in
[-1, 1]; a batch is ``(B, N, 2)``. Each set's points are sorted by their angle around the
set's centre, so token ``i`` is the ``i``-th point along the outline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from selfflow.core.files import content_key
from selfflow.plugins.protocols import Example
from selfflow_points.shapes import SHAPES, rotate, sort_by_angle

NAME = "points/shapes"
_FORMAT = 1  # bump when the generator changes: fingerprints (and every cache keyed on them) change
_v = attrs.validators


def _range(low: float, high: float, what: str):
    def check(instance: object, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
        if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
            raise ValueError(
                f"{attribute.name} must be [low, high] with {low} <= low <= high <= {high} ({what}), got {list(value)}"
            )

    return check


def _classes(value: Sequence[str]) -> tuple[str, ...]:
    names = tuple(value)
    unknown = [n for n in names if n not in SHAPES]
    if unknown or len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct names among {list(SHAPES)}, got {list(names)}")
    return names


@attrs.frozen(kw_only=True)
class ShapesConfig:
    """``points``: points per set (N, the number of tokens); ``size``: sets in train + eval
    together, ``eval_fraction`` of them in the eval split; ``classes``: which shapes, in
    label order; ``scale``: the range of the circumradius; ``rotation``: the range of the
    rotation in degrees; ``jitter``: std of the Gaussian noise added to every coordinate.
    Points are evenly spaced along the outline from a random start."""

    points: int = attrs.field(default=32, validator=_v.ge(3))
    size: int = attrs.field(default=2000, validator=_v.ge(2))
    eval_fraction: float = attrs.field(default=0.1, validator=[_v.gt(0), _v.lt(1)])
    classes: tuple[str, ...] = attrs.field(default=tuple(SHAPES), converter=_classes)
    scale: tuple[float, float] = attrs.field(
        default=(0.6, 0.9), converter=tuple, validator=_range(0.05, 1.0, "inside the [-1, 1] box")
    )
    rotation: tuple[float, float] = attrs.field(
        default=(0.0, 360.0), converter=tuple, validator=_range(-360.0, 360.0, "degrees")
    )
    jitter: float = attrs.field(default=0.02, validator=[_v.ge(0), _v.le(0.5)])


def _split_seed(seed: int, split: str) -> int:
    """Train and eval come from different streams of the same seed (disjoint draws)."""
    return int(hashlib.sha256(f"{NAME}|{split}|{seed}".encode()).hexdigest()[:15], 16)


def draw_sets(config: ShapesConfig, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sets ``(n, N, 2)`` float32 in [-1, 1] and their labels ``(n,)``, class-balanced
    and shuffled."""
    k = len(config.classes)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=generator)]
    phase = torch.rand(n, generator=generator, dtype=torch.float64)
    lo, hi = config.scale
    scale = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    lo, hi = config.rotation
    degrees = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, config.points, 2, generator=generator, dtype=torch.float64) * config.jitter
    unit = torch.empty(n, config.points, 2, dtype=torch.float64)
    for c, name in enumerate(config.classes):
        rows = labels == c
        unit[rows] = SHAPES[name].sample(config.points, phase[rows])
    points = rotate(unit, degrees) * scale[:, None, None] + noise
    return sort_by_angle(points.clamp(-1, 1)).float().contiguous(), labels


class ShapesDataset:
    """One split of ``points/shapes``, held in memory: ``points (M, N, 2)``, ``labels (M,)``."""

    modalities = ("points",)

    def __init__(self, config: ShapesConfig, *, split: str, seed: int) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        n_eval = max(1, round(config.eval_fraction * config.size))
        n = n_eval if split == "eval" else config.size - n_eval
        if n < 1:
            raise ValueError(
                f"points/shapes: size={config.size} with eval_fraction={config.eval_fraction} leaves no "
                "training sets; raise size"
            )
        self.config, self.split, self.seed = config, split, seed
        self.points, self.labels = draw_sets(config, n, torch.Generator().manual_seed(_split_seed(seed, split)))

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{NAME} {self.split} split has {len(self)} sets, got index {i}")
        return Example(media={"points": self.points[i]}, label=int(self.labels[i]))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.points.numpy().tobytes()).hexdigest()[:16]
        return content_key(NAME, _FORMAT, self.split, self.seed, self.config, digest, length=16)


def shapes(config: ShapesConfig | None, *, split: str, seed: int) -> ShapesDataset:
    """The registry factory of ``points/shapes``."""
    return ShapesDataset(config or ShapesConfig(), split=split, seed=seed)
