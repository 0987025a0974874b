"""Flow conventions: converters, transitions, time grids and training-time samplers."""

import math

import pytest
import torch
from scipy import stats

from gmflow import flow

D = torch.float64


def test_converters_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g, dtype=D), torch.randn(4, 3, 2, 2, generator=g, dtype=D)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=D)
    xt = flow.interpolate(x0, eps, t)
    u = eps - x0
    assert torch.allclose(flow.u_to_x0(u, xt, t), x0)
    assert torch.allclose(flow.x0_to_u(x0, xt, t), u)
    assert torch.allclose(flow.u_to_eps(u, xt, t), eps)
    assert torch.allclose(flow.eps_to_u(eps, xt, t), u)
    assert torch.allclose(flow.x0_to_eps(x0, xt, t), eps)
    assert torch.allclose(flow.eps_to_x0(eps, xt, t), x0)
    assert torch.allclose(flow.interpolate(x0, eps, 0.0), x0)
    assert torch.allclose(flow.interpolate(x0, eps, 1.0), eps)


def test_forward_transition_marginal():
    """x_s ~ p_s then forward to t gives the marginal at t: for x0 = 0, var = t^2."""
    n = 200000
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(n, 1, dtype=D)
    s, t = 0.3, 0.8
    xs = flow.interpolate(x0, torch.randn(n, 1, generator=g, dtype=D), s)
    xt = flow.forward_transition(xs, s, t, torch.randn(n, 1, generator=g, dtype=D))
    assert abs(float(xt.var()) - t**2) < 0.01
    with pytest.raises(ValueError, match="s <= t"):
        flow.forward_transition(xs, 0.9, 0.2, xs)


def test_transition_pair():
    x0 = torch.randn(1000, 2, dtype=D)
    t_high = torch.rand(1000, dtype=D).clamp_min(1e-3)
    x_low, t_low, x_high = flow.transition_pair(x0, t_high, 0.9, torch.Generator().manual_seed(0))
    assert torch.allclose(t_low, torch.minimum(0.1 * t_high, t_high - 1e-7))
    assert bool((t_low < t_high).all())
    x_low1, t_low1, _ = flow.transition_pair(x0, t_high, 1.0)
    assert torch.all(t_low1 == 0) and torch.allclose(x_low1, x0)
    with pytest.raises(ValueError, match="ratio"):
        flow.transition_pair(x0, t_high, 0.0)


def test_t_shape_errors():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="shape"):
        flow.interpolate(x, x, torch.zeros(4))
    with pytest.raises(TypeError):
        flow.interpolate(x, x, "0.5")


def test_uniform_and_shift_grids():
    g = flow.time_grid(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=D))
    s = flow.time_grid(4, "shift", shift=3.0)
    assert s[0] == 1 and s[-1] == 0 and torch.allclose(s[2], torch.tensor(1.5 / 2.0, dtype=D))


def test_sigmoid_grid_endpoints_values_and_small_kappa_limit():
    g5 = flow.time_grid(5, "sigmoid", kappa=5.0)
    assert torch.allclose(g5, torch.tensor([1, 0.874, 0.644, 0.356, 0.126, 0], dtype=D), atol=1e-3)
    g20 = flow.time_grid(5, "sigmoid", kappa=20.0)
    assert torch.allclose(g20, torch.tensor([1, 0.998, 0.881, 0.119, 0.002, 0], dtype=D), atol=1e-3)
    for k in (1e-3, 1e-6):
        assert torch.allclose(flow.time_grid(7, "sigmoid", kappa=k), flow.time_grid(7), atol=1e-5)
    assert bool((g20[:-1] > g20[1:]).all())
    with pytest.raises(ValueError, match="kappa"):
        flow.time_grid(4, "sigmoid", kappa=0.0)
    with pytest.raises(ValueError, match="kind"):
        flow.time_grid(4, "cosine")
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)


def test_pow10_sampler_ks():
    t = flow.sample_time(20000, "pow10", generator=torch.Generator().manual_seed(0), dtype=D, eps=0.0)
    res = stats.kstest(t.numpy(), lambda v: (10.0**v - 1.0) / 9.0)
    assert res.pvalue > 0.01
    assert abs(float(t.mean()) - (1 / math.log(10) * -1 + 10 / 9)) < 0.01  # E[t] = 10/9 - 1/ln 10


def test_other_samplers():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_time(20000, "uniform", generator=g, dtype=D)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 0.01
    ln = flow.sample_time(20000, "logit_normal", generator=g, dtype=D, loc=0.5, scale=0.8)
    logit = torch.log(ln / (1 - ln))
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03
    us = flow.sample_time(20000, "u_shaped", generator=g, dtype=D)
    h = torch.histc(us, 10, 0, 1)
    assert h[0] > 3 * h[5] and h[-1] > 3 * h[5]
    assert float(u.min()) >= 1e-4
    with pytest.raises(ValueError, match="kind"):
        flow.sample_time(10, "beta")
    with pytest.raises(ValueError, match="n must"):
        flow.sample_time(0)
