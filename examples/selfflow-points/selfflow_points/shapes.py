"""The shapes' geometry, exact: outlines, points drawn on them, and distances to them.

Every shape is centred on the origin with circumradius 1 (its "unit outline"); a drawn set
is that outline scaled by ``s`` and rotated by ``theta``. Points are ``(..., 2)`` float
``(x, y)``. The dataset draws points with ``sample``; the ``points/on-shape`` metric fits
``(theta, s)`` to a set with ``fit_distance`` and reports how far its points are from the
fitted outline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

CROSS_HALF_WIDTH = 0.3  # arm half-width of the cross, in units of its arm length


def _polygon(vertices: Sequence[tuple[float, float]]) -> Tensor:
    v = torch.tensor(vertices, dtype=torch.float64)
    return v / v.norm(dim=1).max()  # circumradius 1


def _regular(k: int, first_deg: float) -> Tensor:
    a = torch.deg2rad(torch.tensor(first_deg, dtype=torch.float64)) + torch.arange(k, dtype=torch.float64) * (
        2 * math.pi / k
    )
    return torch.stack([a.cos(), a.sin()], dim=1)


def _cross() -> Tensor:
    w = CROSS_HALF_WIDTH
    return _polygon(
        [(1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w)]
    )


@attrs.frozen(kw_only=True, eq=False)
class Shape:
    """A unit outline: a circle (``vertices is None``) or a closed polygon whose vertices
    run counter-clockwise. ``symmetry``: the smallest rotation in degrees that maps it onto
    itself (0 for the circle: every rotation does)."""

    name: str
    symmetry: float
    vertices: Tensor | None = None

    def sample(self, n: int, phase: Tensor) -> Tensor:
        """``n`` points evenly spaced along the outline by arc length, starting at the
        fraction ``phase (M,)`` of the perimeter: ``(M, n, 2)`` float64."""
        u = (phase[:, None].double() + torch.arange(n, dtype=torch.float64)) / n % 1.0  # (M, n) in [0, 1)
        if self.vertices is None:
            a = 2 * math.pi * u
            return torch.stack([a.cos(), a.sin()], dim=-1)
        a, b = self.vertices, self.vertices.roll(-1, dims=0)
        lengths = (b - a).norm(dim=1)
        ends = lengths.cumsum(0) / lengths.sum()  # (E,) perimeter fraction at each edge's end
        edge = torch.searchsorted(ends, u.contiguous(), right=True).clamp(max=len(ends) - 1)
        start = ends[edge] - lengths[edge] / lengths.sum()
        t = ((u - start) / (lengths[edge] / lengths.sum()))[..., None]
        return a[edge] + t * (b[edge] - a[edge])

    def unit_distance(self, q: Tensor) -> Tensor:
        """Euclidean distance of ``q (..., 2)`` to the unit outline: ``(...)``."""
        if self.vertices is None:
            return (q.norm(dim=-1) - 1).abs()
        v = self.vertices.to(q)
        ab = v.roll(-1, dims=0) - v  # (E, 2) edge vectors
        inv = 1.0 / (ab * ab).sum(-1)
        dx, dy = q[..., 0, None] - v[:, 0], q[..., 1, None] - v[:, 1]  # (..., E): from each edge's start
        t = ((dx * ab[:, 0] + dy * ab[:, 1]) * inv).clamp_(0, 1)  # the nearest point's place on the edge
        dx, dy = dx - t * ab[:, 0], dy - t * ab[:, 1]
        return (dx * dx + dy * dy).amin(dim=-1).sqrt()


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(name="circle", symmetry=0.0),
        Shape(name="square", symmetry=90.0, vertices=_regular(4, 45.0)),
        Shape(name="triangle", symmetry=120.0, vertices=_regular(3, 90.0)),
        Shape(name="cross", symmetry=90.0, vertices=_cross()),
    )
}


def rotate(points: Tensor, degrees: Tensor) -> Tensor:
    """Rotate ``points (..., N, 2)`` counter-clockwise by ``degrees (...)``."""
    a = torch.deg2rad(degrees.to(points))[..., None]
    c, s = a.cos(), a.sin()
    x, y = points[..., 0], points[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def sort_by_angle(points: Tensor) -> Tensor:
    """Each set's points ordered by their angle around the set's centre (the origin, where
    every shape is centred), from -180 degrees upward: ``(M, N, 2)``. Every outline here is
    star-shaped around its centre, so this order walks along the outline and neighbouring
    tokens are neighbouring points."""
    order = torch.atan2(points[..., 1], points[..., 0]).argsort(dim=-1)
    return points.gather(-2, order[..., None].expand_as(points))


def _rotations(shape: Shape, low: float, high: float, step: float) -> Tensor:
    """The rotations to try: the dataset's range, or one symmetry period when that is shorter."""
    if shape.symmetry == 0:
        return torch.zeros(1, dtype=torch.float64)
    if high - low >= shape.symmetry:  # a whole period: its end is its start
        n = max(1, math.ceil(shape.symmetry / step))
        return torch.arange(n, dtype=torch.float64) * (shape.symmetry / n)
    n = max(1, math.ceil((high - low) / step))
    return torch.linspace(low, high, n + 1, dtype=torch.float64)


def _grid_distance(points: Tensor, shape: Shape, rotations: Tensor, scales: Tensor) -> Tensor:
    """Mean point distance to the outline at each (rotation, scale): ``(B, R, S)``.
    ``rotations (B, R)``, ``scales (B, S)``; ``d(p, s O) = s d(p / s, O)``."""
    q = rotate(points[:, None], -rotations)  # (B, R, N, 2): undo the rotation
    q = q[:, :, None] / scales[:, None, :, None, None]  # (B, R, S, N, 2)
    return (shape.unit_distance(q) * scales[:, None, :, None]).mean(-1)


def fit_distance(
    points: Tensor,
    shape: Shape,
    *,
    scale: tuple[float, float],
    rotation: tuple[float, float],
    rotation_step: float = 6.0,
    scale_steps: int = 4,
    refinements: int = 10,
) -> Tensor:
    """For each set of ``points (B, N, 2)``: the mean distance of its points to the nearest
    outline of ``shape`` rotated within ``rotation`` (degrees) and scaled within ``scale``,
    ``(B,)`` float64.

    The distance to a given outline is exact; the best rotation and scale are searched on a
    grid (``rotation_step`` degrees x ``scale_steps + 1`` scales), then ``refinements``
    times on a 3 x 3 grid around the best point so far, half as wide each time (the last
    step is 2^-refinements of a coarse cell: far below the data's jitter).
    """
    points = points.float()
    b = len(points)
    s_lo, s_hi = scale
    periodic = shape.symmetry > 0 and rotation[1] - rotation[0] >= shape.symmetry
    rot = _rotations(shape, rotation[0], rotation[1], rotation_step).float()
    scales = torch.linspace(s_lo, s_hi, scale_steps + 1)
    d = _grid_distance(points, shape, rot.expand(b, -1), scales.expand(b, -1)).flatten(1)
    best_d, best = d.min(1)
    r0, s0 = rot[best // len(scales)], scales[best % len(scales)]
    dr = float(rot[1] - rot[0]) / 2 if len(rot) > 1 else 0.0
    ds = (s_hi - s_lo) / scale_steps / 2
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    for _ in range(refinements):
        r = r0[:, None] + dr * offsets  # (B, 3)
        if not periodic and dr:
            r = r.clamp(rotation[0], rotation[1])
        s = (s0[:, None] + ds * offsets).clamp(s_lo, s_hi)
        d = _grid_distance(points, shape, r, s).flatten(1)
        d_min, i = d.min(1)
        better = d_min < best_d
        best_d = torch.where(better, d_min, best_d)
        r0 = torch.where(better, r.gather(1, (i // 3)[:, None])[:, 0], r0)
        s0 = torch.where(better, s.gather(1, (i % 3)[:, None])[:, 0], s0)
        dr, ds = dr / 2, ds / 2
    return best_d.double()
