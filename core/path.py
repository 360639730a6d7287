"""The straight (rectified-flow) path between data and noise.

``t = 0`` is data, ``t = 1`` is noise:  ``x_t = (1 - t) x0 + t eps``, and the velocity the
network predicts is ``v = d x_t / dt = eps - x0``, the same for every token whatever its
level. ``t`` broadcasts from ``(B,)`` or ``(B, N)`` onto ``(B, N, C)``.
"""

from __future__ import annotations

from torch import Tensor


def _expand(t: Tensor, like: Tensor) -> Tensor:
    while t.ndim < like.ndim:
        t = t.unsqueeze(-1)
    return t


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t eps``."""
    t = _expand(t, x0)
    return x0 + t * (eps - x0)


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """``v = eps - x0``."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Data estimate from a velocity: ``x0 = x_t - t v``."""
    return x_t - _expand(t, x_t) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Noise estimate from a velocity: ``eps = x_t + (1 - t) v``."""
    return x_t + (1 - _expand(t, x_t)) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """``v = (x_t - x0) / t`` (undefined at ``t = 0``)."""
    return (x_t - x0) / _expand(t, x_t)


def score_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``grad log p_t(x_t) = -eps / t``, with the noise estimated from ``v``."""
    return -eps_from_velocity(x_t, v, t) / _expand(t, x_t)
