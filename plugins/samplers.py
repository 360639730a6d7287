"""Built-in samplers: Euler and Heun ODE, Euler-Maruyama SDE, classifier-free guidance.

Every sampler integrates from ``t = 1`` (noise) to ``t = 0`` (data) over the *generated*
segments of a template ``TokenBatch``; condition segments are held clean at level 0. The
template's generated tokens only give shapes: they are replaced by fresh noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import attrs
import torch
from torch import Tensor

from selfflow.core import path
from selfflow.core.timesteps import shift_time
from selfflow.core.types import Timesteps, TokenBatch

# batch of current states, per-sample time (B,) -> one velocity per segment (None for condition)
VelocityFn = Callable[[TokenBatch, Tensor], tuple[Tensor | None, ...]]


class Sampler(Protocol):
    def __call__(self, velocity: VelocityFn, template: TokenBatch, *, generator: torch.Generator) -> TokenBatch: ...


def _positive_int(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"sampler.{attribute.name} must be >= 1, got {value}")


# ----------------------------------------------------------------------------- guidance


@attrs.frozen(kw_only=True)
class Guidance:
    """Classifier-free guidance ``v_u + scale (v_c - v_u)``, applied only while
    ``low <= t <= high`` (the guidance interval; the paper guides only for ``t <= 0.7``)."""

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


def model_velocity(model: torch.nn.Module, guidance: Guidance | None = None) -> VelocityFn:
    """Wraps a ``FlowTransformer`` as a ``VelocityFn``; with guidance, runs the conditional
    and the null-label batch together as one batch of 2B."""
    guidance = guidance or Guidance()

    def velocity(batch: TokenBatch, t: Tensor) -> tuple[Tensor | None, ...]:
        if batch.labels is None or not guidance.active(float(t[0])):
            return model(batch, Timesteps.uniform(t, batch)).velocity
        null = torch.full_like(batch.labels, model.null_label)
        both = TokenBatch(
            segments=[
                attrs.evolve(
                    seg,
                    tokens=torch.cat([seg.tokens, seg.tokens]),
                    positions=torch.cat([seg.positions, seg.positions]),
                    valid=None if seg.valid is None else torch.cat([seg.valid, seg.valid]),
                )
                for seg in batch.segments
            ],
            labels=torch.cat([batch.labels, null]),
        )
        out = model(both, Timesteps.uniform(torch.cat([t, t]), both)).velocity
        guided = []
        for v in out:
            if v is None:
                guided.append(None)
                continue
            v_c, v_u = v.chunk(2)
            guided.append(v_u + guidance.scale * (v_c - v_u))
        return tuple(guided)

    return velocity


# ----------------------------------------------------------------------------- integration


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` times from 1 to 0 (uniform, optionally resolution-shifted)."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift_time(t, shift) if shift != 1.0 else t


def initial_noise(template: TokenBatch, generator: torch.Generator) -> TokenBatch:
    xs = []
    for seg in template.segments:
        if seg.generated:
            eps = torch.randn(seg.tokens.shape, generator=generator, device=generator.device, dtype=seg.tokens.dtype)
            xs.append(eps.to(seg.tokens.device))
        else:
            xs.append(seg.tokens)
    return template.with_tokens(xs)


def _step(batch: TokenBatch, velocity: tuple[Tensor | None, ...], dt: float | Tensor) -> TokenBatch:
    """``x <- x + dt v`` on generated segments (``dt < 0`` when moving towards data).

    Condition segments are held by their role, not by trusting the velocity function to
    return ``None`` for them."""
    return batch.with_tokens(
        [seg.tokens + dt * v if seg.generated else seg.tokens for seg, v in zip(batch.segments, velocity)]
    )


def _full(batch: TokenBatch, value: float) -> Tensor:
    return torch.full((batch.batch_size,), value, device=batch.device)


@attrs.frozen(kw_only=True)
class EulerSampler:
    """First-order ODE integration, ``steps`` function evaluations."""

    steps: int = attrs.field(default=50, validator=_positive_int)
    shift: float = 1.0

    @torch.no_grad()
    def __call__(self, velocity: VelocityFn, template: TokenBatch, *, generator: torch.Generator) -> TokenBatch:
        x = initial_noise(template, generator)
        grid = time_grid(self.steps, self.shift).tolist()
        for t, t_next in itertools.pairwise(grid):
            x = _step(x, velocity(x, _full(x, t)), t_next - t)
        return x


@attrs.frozen(kw_only=True)
class HeunSampler:
    """Second-order ODE integration (trapezoidal predictor-corrector), ``2 steps - 1``
    function evaluations (the last step is Euler, as in EDM)."""

    steps: int = attrs.field(default=50, validator=_positive_int)
    shift: float = 1.0

    @torch.no_grad()
    def __call__(self, velocity: VelocityFn, template: TokenBatch, *, generator: torch.Generator) -> TokenBatch:
        x = initial_noise(template, generator)
        grid = time_grid(self.steps, self.shift).tolist()
        for t, t_next in itertools.pairwise(grid):
            v = velocity(x, _full(x, t))
            x_pred = _step(x, v, t_next - t)
            if t_next == 0.0:
                x = x_pred
                continue
            v_next = velocity(x_pred, _full(x, t_next))
            mean_v = tuple(None if a is None or b is None else 0.5 * (a + b) for a, b in zip(v, v_next))
            x = _step(x, mean_v, t_next - t)
        return x


@attrs.frozen(kw_only=True)
class EulerMaruyamaSampler:
    """The reverse-time SDE with the same marginals as the flow,

        dx = [v - (g^2 / 2) score] dt + g dW,   g(t)^2 = 2 diffusion t,

    with the score estimated from the velocity (``path.score_from_velocity``), integrated
    backwards by Euler-Maruyama. The last step is a deterministic Euler step (no noise is
    added at the end). ``diffusion = 0`` is the Euler ODE. The authors' ImageNet FID setting
    is 250 steps, no guidance.
    """

    steps: int = attrs.field(default=250, validator=_positive_int)
    diffusion: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    shift: float = 1.0

    @torch.no_grad()
    def __call__(self, velocity: VelocityFn, template: TokenBatch, *, generator: torch.Generator) -> TokenBatch:
        x = initial_noise(template, generator)
        grid = time_grid(self.steps, self.shift).tolist()
        for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
            v = velocity(x, _full(x, t))
            h = t - t_next
            if i == len(grid) - 2 or self.diffusion == 0.0:
                x = _step(x, v, -h)
                continue
            tt = torch.tensor(t, device=x.device)
            xs = []
            for seg, vel in zip(x.segments, v):
                if not seg.generated:
                    xs.append(seg.tokens)
                    continue
                score = path.score_from_velocity(seg.tokens, vel, tt)
                drift = vel - self.diffusion * t * score  # v - (g^2 / 2) score
                z = torch.randn(seg.tokens.shape, generator=generator, device=generator.device, dtype=seg.tokens.dtype)
                xs.append(seg.tokens - h * drift + (2 * self.diffusion * t * h) ** 0.5 * z.to(seg.tokens.device))
            x = x.with_tokens(xs)
        return x


# ----------------------------------------------------------------------------- plugin hooks

from selfflow.plugins.hookspecs import hookimpl  # noqa: E402


def _self(config):
    return config


@hookimpl
def selfflow_register_samplers(register) -> None:
    register.add("ode/euler", _self, EulerSampler, "Euler ODE from noise to data (options: steps, shift)")
    register.add(
        "ode/heun", _self, HeunSampler, "Heun (2nd order) ODE, 2 steps - 1 evaluations (options: steps, shift)"
    )
    register.add(
        "sde/euler-maruyama",
        _self,
        EulerMaruyamaSampler,
        "Euler-Maruyama on the marginal-preserving reverse SDE (options: steps, diffusion, shift)",
    )
