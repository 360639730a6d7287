"""Samplers against analytic velocity fields: constant fields land exactly, a point mass is
hit exactly by the SDE, Heun converges at second order on Gaussian data, guidance acts only
inside its interval, condition segments stay clean, all randomness is the explicit generator."""

from __future__ import annotations

import attrs
import pytest
import torch

from selfflow.core.model import FlowTransformer, ModelConfig, ModelOutput
from selfflow.core.timesteps import shift_time
from selfflow.core.types import Role, Timesteps, TokenBatch
from selfflow.plugins.samplers import (
    EulerMaruyamaSampler,
    EulerSampler,
    Guidance,
    HeunSampler,
    initial_noise,
    model_velocity,
    time_grid,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ODE_SAMPLERS = [EulerSampler, HeunSampler, lambda **kw: EulerMaruyamaSampler(diffusion=0.0, **kw)]


def _eps(template: TokenBatch, seed: int) -> list[torch.Tensor | None]:
    """The noise every sampler starts from (its first draws)."""
    noise = initial_noise(template, torch.Generator().manual_seed(seed))
    return [s.tokens if s.generated else None for s in noise.segments]


def _field(fn):
    """A VelocityFn from ``fn(x, t) -> v`` per generated segment (``t`` is ``(B, 1, 1)``)."""

    def velocity(batch, t):
        return tuple(fn(s.tokens, t[:, None, None]) if s.generated else None for s in batch.segments)

    return velocity


def _gaussian_velocity(m: float, sigma: float):
    """Exact velocity of data N(m, sigma^2) per coordinate: E[eps - x0 | x_t = x]."""

    def v(x, t):
        var = (1 - t) ** 2 * sigma**2 + t**2
        return -m + (t - (1 - t) * sigma**2) * (x - (1 - t) * m) / var

    return _field(v)


# ----------------------------------------------------------------------------- grid


def test_time_grid():
    g = time_grid(4)
    assert g.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    torch.testing.assert_close(shifted, shift_time(g, 3.0))
    assert bool((shifted[1:-1] > g[1:-1]).all())  # more steps spent near noise
    with pytest.raises(ValueError, match="steps must be >= 1"):
        EulerSampler(steps=0)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("make", ODE_SAMPLERS)
@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (3, 1.0), (10, 3.0)])
def test_constant_velocity_integrates_exactly(make_batch, make, steps, shift):
    template = make_batch([("text", 2, 2, "condition"), ("image", 5, 3, "generate")], batch=3)
    c = torch.linspace(-2, 2, 15).view(1, 5, 3)
    calls = []

    def v(x, t):
        calls.append(float(t.flatten()[0]))
        return c.expand_as(x)

    out = make(steps=steps, shift=shift)(_field(v), template, generator=torch.Generator().manual_seed(0))
    eps = _eps(template, 0)[1]
    # x(0) = x(1) - integral_0^1 c dt = eps - c
    torch.testing.assert_close(out.segments[1].tokens, eps - c, rtol=0, atol=1e-5)
    assert torch.equal(out.segments[0].tokens, template.segments[0].tokens)
    expected_calls = 2 * steps - 1 if make is HeunSampler else steps
    assert len(calls) == expected_calls and calls[0] == 1.0 and min(calls) > 0


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_sde_lands_exactly_on_a_point_mass(make_batch, steps):
    """Data = a point mass at a: v(x, t) = (x - a) / t. The SDE's intermediate states are
    random, the last step is deterministic Euler from t = h: x - h (x - a) / h = a."""
    template = make_batch([("image", 6, 2, "generate")], batch=8)
    a = torch.linspace(-3, 3, 12).view(1, 6, 2)
    seen = []

    def v(x, t):
        seen.append(x.clone())
        return (x - a) / t

    out = EulerMaruyamaSampler(steps=steps, diffusion=1.0)(
        _field(v), template, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(out.segments[0].tokens, a.expand(8, 6, 2), rtol=0, atol=1e-5)
    if steps > 1:
        # the noise is real: the state fed at the last step differs from the ODE's
        ode_seen = []

        def v_ode(x, t):
            ode_seen.append(x.clone())
            return (x - a) / t

        EulerSampler(steps=steps)(_field(v_ode), template, generator=torch.Generator().manual_seed(1))
        assert float((seen[-1] - ode_seen[-1]).abs().max()) > 1e-3
        assert torch.equal(seen[0], ode_seen[0])  # both start from the same noise


def test_ode_samplers_follow_the_exact_gaussian_flow_map(make_batch):
    """For data N(m, sigma^2) the ODE maps noise eps to m + sigma eps."""
    m, sigma = 2.0, 0.5
    template = make_batch([("image", 16, 4, "generate")], batch=8)
    eps = _eps(template, 3)[0]
    exact = m + sigma * eps
    for sampler, tol in ((EulerSampler(steps=200), 2e-2), (HeunSampler(steps=50), 2e-3)):
        out = sampler(_gaussian_velocity(m, sigma), template, generator=torch.Generator().manual_seed(3))
        assert float((out.segments[0].tokens - exact).abs().max()) < tol, type(sampler).__name__


def test_heun_error_shrinks_faster_than_euler(make_batch):
    m, sigma = 2.0, 0.5
    template = make_batch([("image", 8, 4, "generate")], batch=4)
    template = template.with_tokens([template.segments[0].tokens.double()])
    exact = m + sigma * _eps(template, 0)[0]

    def error(sampler):
        out = sampler(_gaussian_velocity(m, sigma), template, generator=torch.Generator().manual_seed(0))
        return float((out.segments[0].tokens - exact).abs().max())

    steps = [4, 8, 16, 32]
    euler = [error(EulerSampler(steps=n)) for n in steps]
    heun = [error(HeunSampler(steps=n)) for n in steps]
    for e, h in zip(euler, heun):
        assert h < e
    for i in range(len(steps) - 1):
        assert 1.6 < euler[i] / euler[i + 1] < 2.6  # first order: error halves
        assert heun[i] / heun[i + 1] > 3.3  # second order: error quarters
    assert heun[-1] < 0.05 * euler[-1]


def test_sde_reproduces_gaussian_data_statistics(make_batch):
    """The reverse SDE has the flow's marginals: samples of N(m, sigma^2) data have mean m
    and std sigma (a wrong drift sign or noise scale would miss them by far)."""
    m, sigma = 1.0, 0.5
    template = make_batch([("image", 64, 8, "generate")], batch=32)  # 16,384 coordinates
    for diffusion in (0.5, 1.0, 2.0):
        out = (
            EulerMaruyamaSampler(steps=100, diffusion=diffusion)(
                _gaussian_velocity(m, sigma), template, generator=torch.Generator().manual_seed(0)
            )
            .segments[0]
            .tokens
        )
        assert abs(float(out.mean()) - m) < 0.02, diffusion
        assert abs(float(out.std()) - sigma) < 0.02, diffusion
        ode = m + sigma * _eps(template, 0)[0]
        assert float((out - ode).abs().mean()) > 0.1  # stochastic, not the ODE's map


# ----------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    "sampler",
    [EulerSampler(steps=4), HeunSampler(steps=4), EulerMaruyamaSampler(steps=4, diffusion=1.0)],
    ids=["euler", "heun", "euler-maruyama"],
)
def test_condition_segments_held_clean(make_batch, sampler):
    template = make_batch(
        [("text", 3, 2, "condition"), ("image", 5, 3, "generate"), ("audio", 4, 2, "condition")], batch=2
    )
    clean = [s.tokens.clone() for s in template.segments]

    def velocity(batch, t):
        for seg, ref in zip(batch.segments, clean):
            if not seg.generated:
                assert torch.equal(seg.tokens, ref)  # the model always sees the clean condition
        return tuple(torch.ones_like(s.tokens) for s in batch.segments)  # even a velocity for conditions

    out = sampler(velocity, template, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.segments[0].tokens, clean[0]) and torch.equal(out.segments[2].tokens, clean[2])
    assert not torch.equal(out.segments[1].tokens, clean[1])
    assert [s.role for s in out.segments] == [Role.CONDITION, Role.GENERATE, Role.CONDITION]


# ----------------------------------------------------------------------------- guidance


class _LabelModel(torch.nn.Module):
    """v = value[label] everywhere; records (batch size, t) of every call."""

    null_label = 2

    def __init__(self) -> None:
        super().__init__()
        self.value = torch.tensor([1.0, -0.5, 3.0])  # labels 0, 1, null
        self.calls: list[tuple[int, float]] = []

    def forward(self, batch, timesteps):
        self.calls.append((batch.batch_size, float(timesteps.per_token().max())))
        v = self.value[batch.labels][:, None, None]
        return ModelOutput(
            velocity=tuple(v.expand_as(s.tokens) if s.generated else None for s in batch.segments), hidden={}
        )


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.7), (0.3, 0.7), (0.0, 1.0)])
def test_guidance_applies_only_inside_its_interval(make_batch, low, high):
    template = make_batch([("image", 4, 2, "generate")], batch=4, num_classes=2)  # labels 0, 1, 0, 1
    model, scale, steps = _LabelModel(), 4.0, 10
    out = EulerSampler(steps=steps)(
        model_velocity(model, Guidance(scale=scale, low=low, high=high)),
        template,
        generator=torch.Generator().manual_seed(0),
    )
    grid = time_grid(steps).tolist()
    inside = [low <= t <= high for t in grid[:-1]]
    assert any(inside) and (not all(inside) or (low, high) == (0.0, 1.0))
    # guided evaluations run conditional and null together: a batch of 2B, only inside
    assert [size == 8 for size, _ in model.calls] == inside
    # x(0) = eps - sum_k h_k v_k with v_k = v_u + w (v_c - v_u) inside, v_c outside
    v_c = model.value[template.labels][:, None, None]
    v_u = model.value[model.null_label]
    total = torch.zeros(4, 1, 1)
    for t, t_next, guided in zip(grid[:-1], grid[1:], inside):
        total = total + (t - t_next) * (v_u + scale * (v_c - v_u) if guided else v_c)
    torch.testing.assert_close(out.segments[0].tokens, _eps(template, 0)[0] - total, rtol=0, atol=1e-5)


def test_guidance_scale_one_or_no_labels_means_one_pass(make_batch):
    template = make_batch([("image", 4, 2, "generate")], batch=4, num_classes=2)
    model = _LabelModel()
    EulerSampler(steps=3)(
        model_velocity(model, Guidance(scale=1.0)), template, generator=torch.Generator().manual_seed(0)
    )
    assert [size for size, _ in model.calls] == [4, 4, 4]
    assert not Guidance(scale=2.0, low=0.0, high=0.7).active(0.8) and Guidance(scale=2.0, high=0.7).active(0.7)


def test_model_velocity_guides_a_real_model(make_batch):
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"text": 2, "image": 3}, width=32, depth=2, heads=2, num_classes=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    batch = make_batch([("text", 3, 2, "condition"), ("image", 5, 3, "generate")], batch=2, num_classes=2)
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        ts = Timesteps.uniform(t, batch)
        v_c = model(batch, ts).velocity[1]
        v_u = model(batch.with_labels(torch.full((2,), model.null_label)), ts).velocity[1]
        guided = model_velocity(model, Guidance(scale=3.0, high=0.7))(batch, t)
        plain = model_velocity(model, Guidance(scale=3.0, high=0.4))(batch, t)
    assert guided[0] is None and plain[0] is None
    torch.testing.assert_close(guided[1], v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[1], v_c, rtol=0, atol=0)
    assert float((v_c - v_u).abs().max()) > 1e-3  # the label matters, so the check has teeth


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize(
    "sampler",
    [EulerSampler(steps=3), HeunSampler(steps=3), EulerMaruyamaSampler(steps=5)],
    ids=["euler", "heun", "euler-maruyama"],
)
def test_samplers_use_only_the_explicit_generator(make_batch, global_rng_untouched, sampler):
    template = make_batch([("image", 4, 2, "generate")], batch=2)
    v = _gaussian_velocity(0.5, 0.5)
    torch.manual_seed(0)
    with global_rng_untouched():
        a = sampler(v, template, generator=torch.Generator().manual_seed(9)).segments[0].tokens
        b = sampler(v, template, generator=torch.Generator().manual_seed(9)).segments[0].tokens
        c = sampler(v, template, generator=torch.Generator().manual_seed(10)).segments[0].tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the template's generated tokens only give shapes
    shifted = template.with_tokens([template.segments[0].tokens + 100.0])
    d = sampler(v, shifted, generator=torch.Generator().manual_seed(9)).segments[0].tokens
    assert torch.equal(a, d)


def test_sampler_configs_are_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        EulerSampler().steps = 3
