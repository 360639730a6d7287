"""``points/on-shape``: how far generated points lie from the outline their label asks for.

For each generated set, the outline of its requested class (``points/shapes`` geometry,
exact) is fitted over the rotations and scales the dataset draws from, and the mean
distance of the set's points to it is the set's score; the metric is the mean over sets, in
media units (the [-1, 1] box). 0 is perfect; real sets score about ``0.8 x jitter`` (their
Gaussian noise, perpendicular part); uniform noise in the box scores ``chance``.

Its details also hold the label-free view: the distance to the *nearest* class's outline
and how often that class is the requested one. Real media come without labels in
``update`` (``labels`` belong to the fakes), so the real-data number is the nearest-class
distance; on ``points/shapes`` that equals the requested-class one (a set lies far from every
other class's outline), and ``selfflow eval --real`` scores real sets with their own labels.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from selfflow.plugins.protocols import MetricContext, MetricResult
from selfflow_points.dataset import ShapesConfig, ShapesDataset
from selfflow_points.shapes import SHAPES, fit_distance

NAME = "points/on-shape"
_v = attrs.validators


@attrs.frozen(kw_only=True)
class OnShapeConfig:
    """``rotation_step``: degrees between rotations of the coarse fit; ``scale_steps``:
    scales of the coarse fit (both refined ten times finer around the best); ``seed``: the
    uniform-noise sets of ``chance``."""

    rotation_step: float = attrs.field(default=6.0, validator=[_v.gt(0), _v.le(45)])
    scale_steps: int = attrs.field(default=4, validator=_v.ge(1))
    seed: int = 0


def distances(points: Tensor, shapes: ShapesConfig, config: OnShapeConfig) -> Tensor:
    """``(B, K)``: the fitted mean distance of each set to each class's outline, in
    ``shapes.classes`` order."""
    return torch.stack(
        [
            fit_distance(
                points,
                SHAPES[name],
                scale=shapes.scale,
                rotation=shapes.rotation,
                rotation_step=config.rotation_step,
                scale_steps=config.scale_steps,
            )
            for name in shapes.classes
        ],
        dim=1,
    )


class OnShape:
    """The ``MediaMetric``: ``update(real=, fake=, labels=)`` any number of times, then
    ``compute()``."""

    name = NAME

    def __init__(self, config: OnShapeConfig, shapes: ShapesConfig) -> None:
        self.config, self.shapes = config, shapes
        self._fake: list[Tensor] = []  # (B, K) per update
        self._labels: list[Tensor | None] = []
        self._real: list[Tensor] = []
        self._n_points: int | None = None

    @classmethod
    def from_config(cls, config: OnShapeConfig | None, *, context: MetricContext) -> OnShape:
        data = context.eval_dataset
        if not isinstance(data, ShapesDataset):
            raise ValueError(
                f"{NAME} measures point sets against the outlines of points/shapes classes, but the stream that "
                f'generates {context.modality!r} reads {type(data).__name__}; use it with dataset = "points/shapes"'
            )
        return cls(config or OnShapeConfig(), data.config)

    def _check(self, media: object, what: str) -> Tensor:
        if not isinstance(media, Tensor) or media.ndim != 3 or media.shape[-1] != 2:
            shape = tuple(media.shape) if isinstance(media, Tensor) else type(media).__name__
            raise ValueError(f"{NAME}: {what} must be point sets (B, N, 2), got {shape}")
        return media.detach().cpu()

    def update(self, *, real: Any = None, fake: Any = None, labels: Tensor | None = None) -> None:
        if real is not None:
            self._real.append(distances(self._check(real, "real"), self.shapes, self.config))
        if fake is not None:
            fake = self._check(fake, "fake")
            if labels is not None:
                labels = torch.as_tensor(labels).cpu().long()
                k = len(self.shapes.classes)
                if labels.shape != (len(fake),) or bool(((labels < 0) | (labels >= k)).any()):
                    raise ValueError(
                        f"{NAME}: labels must be ({len(fake)},) class ids in [0, {k}), "
                        f"got {tuple(labels.shape)} {labels[:8].tolist()}"
                    )
            self._fake.append(distances(fake, self.shapes, self.config))
            self._labels.append(labels)
            self._n_points = fake.shape[1]

    def _score(self, d: Tensor, labels: Tensor | None) -> float:
        chosen = d.amin(1) if labels is None else d.gather(1, labels[:, None])[:, 0]
        return float(chosen.mean())

    def compute(self) -> list[MetricResult]:
        if not self._fake:
            raise ValueError(f"{NAME} needs generated point sets: call update(fake=...) first")
        if any(lab is None for lab in self._labels) and any(lab is not None for lab in self._labels):
            raise ValueError(
                f"{NAME}: some updates had labels and some had none; give labels with every fake batch or with none"
            )
        d = torch.cat(self._fake)
        labels = None if self._labels[0] is None else torch.cat(self._labels)  # type: ignore[arg-type]
        nearest = d.argmin(1)

        gen = torch.Generator().manual_seed(self.config.seed)
        noise = torch.rand(len(d), self._n_points or self.shapes.points, 2, generator=gen) * 2 - 1
        chance = self._score(distances(noise, self.shapes, self.config), labels)

        details: dict[str, Any] = {
            "fake_samples": len(d),
            "outline": "the requested class's" if labels is not None else "the nearest class's (unconditional samples)",
            "nearest_class_distance": float(d.amin(1).mean()),
            "chance": chance,
            "chance_protocol": (
                f"uniform points in [-1, 1]^2, as many sets as the samples (and their labels), seed {self.config.seed}"
            ),
            "fit": (
                f"best rotation in {list(self.shapes.rotation)} deg and scale in {list(self.shapes.scale)}, grid "
                f"{self.config.rotation_step:g} deg x {self.config.scale_steps} scales refined 10x"
            ),
            "data_jitter": self.shapes.jitter,
            "units": "mean point-to-outline distance in media coordinates ([-1, 1] box); 0 is on the outline",
        }
        if labels is not None:
            details["class_agreement"] = float((nearest == labels).float().mean())
        if self._real:
            r = torch.cat(self._real)
            details["real"] = float(r.amin(1).mean())
            details["real_samples"] = len(r)
            details["real_protocol"] = "real sets have no labels here: distance to the nearest class's outline"
        return [MetricResult(name="on_shape", value=self._score(d, labels), details=details)]
