"""The straight path: t = 0 is data, t = 1 is noise, v = eps - x0; conversions round-trip."""

from __future__ import annotations

import pytest
import torch

from selfflow.core import path


@pytest.fixture
def data(gen):
    x0 = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    return x0, eps


def test_endpoints_t0_is_data_t1_is_noise(data):
    x0, eps = data
    assert torch.equal(path.interpolate(x0, eps, torch.zeros(3, dtype=torch.float64)), x0)
    torch.testing.assert_close(path.interpolate(x0, eps, torch.ones(3, dtype=torch.float64)), eps, rtol=0, atol=1e-15)


def test_per_token_levels_broadcast(data):
    x0, eps = data
    t = torch.tensor([[0.0, 1.0, 0.25, 0.5, 0.75]] * 3, dtype=torch.float64)  # (B, N)
    xt = path.interpolate(x0, eps, t)
    assert torch.equal(xt[:, 0], x0[:, 0])
    torch.testing.assert_close(xt[:, 1], eps[:, 1], rtol=0, atol=1e-15)
    torch.testing.assert_close(xt[:, 2], 0.75 * x0[:, 2] + 0.25 * eps[:, 2], rtol=0, atol=1e-15)
    # (B,) levels: sample b uses its own t everywhere
    tb = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(path.interpolate(x0, eps, tb), (1 - tb[:, None, None]) * x0 + tb[:, None, None] * eps)


def test_velocity_target_is_time_derivative_of_path(data):
    x0, eps = data
    t, h = torch.full((3,), 0.3, dtype=torch.float64), 1e-6
    fd = (path.interpolate(x0, eps, t + h) - path.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, path.velocity_target(x0, eps), rtol=0, atol=1e-8)
    assert torch.equal(path.velocity_target(x0, eps), eps - x0)


@pytest.mark.parametrize("t_shape", ["per_sample", "per_token"])
def test_v_x0_eps_round_trips(data, t_shape, gen):
    x0, eps = data
    t = torch.rand(3, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    if t_shape == "per_token":
        t = torch.rand(3, 5, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    xt = path.interpolate(x0, eps, t)
    v = path.velocity_target(x0, eps)
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(path.x0_from_velocity(xt, v, t), x0, **tol)
    torch.testing.assert_close(path.eps_from_velocity(xt, v, t), eps, **tol)
    torch.testing.assert_close(path.velocity_from_x0(xt, x0, t), v, **tol)
    # x0 -> v -> x0 and v -> x0 -> v on an arbitrary (non-target) estimate
    x0_hat = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    v_hat = path.velocity_from_x0(xt, x0_hat, t)
    torch.testing.assert_close(path.x0_from_velocity(xt, v_hat, t), x0_hat, **tol)
    torch.testing.assert_close(
        path.velocity_from_x0(xt, path.x0_from_velocity(xt, v_hat, t), t), v_hat, rtol=0, atol=1e-10
    )
    # eps and x0 estimates from one velocity are consistent with the path
    torch.testing.assert_close(
        path.interpolate(path.x0_from_velocity(xt, v_hat, t), path.eps_from_velocity(xt, v_hat, t), t), xt, **tol
    )


def test_score_matches_gaussian_marginal(gen):
    """For data N(m, sigma^2) the marginal is N((1-t) m, (1-t)^2 sigma^2 + t^2) and the exact
    velocity is known; the score derived from it equals the marginal's score."""
    m, sigma = 1.5, 0.5
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64) * 2
    tt = t[:, None, None]
    var = (1 - tt) ** 2 * sigma**2 + tt**2
    v = -m + (tt - (1 - tt) * sigma**2) * (x - (1 - tt) * m) / var
    torch.testing.assert_close(path.score_from_velocity(x, v, t), -(x - (1 - tt) * m) / var, rtol=0, atol=1e-12)
