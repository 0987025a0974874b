"""ReFlow diagnostics: straightness, per-t relative loss, one-step error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmflow import ring_gmm, sample
from gmflow.reflow import one_step_error, per_t_relative_loss, straightness, velocity


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


C = torch.tensor([1.0, -2.0], dtype=torch.float64)


def point_flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact velocity of single-point data ``x0 = C``: ``u = (x - C)/t`` (straight paths)."""
    return (x - C.to(x)) / t.to(x).reshape(-1, 1)


def test_straightness_of_a_linear_flow_is_zero():
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s, per_t = straightness(point_flow, x1, nfe=16, return_per_t=True)
    assert s < 1e-20
    assert per_t["t"].shape == per_t["value"].shape == (16,) and per_t["t"][0] == 1.0
    assert straightness(point_flow, x1, nfe=5, solver="heun", grid="sigmoid", kappa=5.0) < 1e-20


def test_straightness_of_the_ring_teacher_is_positive():
    ring = ring_gmm()
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    s_ring = straightness(ring, x1, nfe=32)  # GM output: its mean is the velocity
    assert s_ring > 0.1
    # ReFlow (one-step Euler on its own pairs) is straight by construction
    x0 = sample(ring, x1, solver="euler", nfe=1)

    def rect(x, t):
        return (x1 - x0) * torch.ones_like(t).reshape(-1, 1)

    assert straightness(rect, x1, nfe=8) < 1e-10


def test_one_step_error():
    ring = ring_gmm()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(256, 2, generator=g)
    x0 = sample(ring, x1, solver="euler", nfe=1)  # the teacher's own 1-step pairs
    assert one_step_error(ring, x0, x1) < 1e-10
    assert one_step_error(point_flow, C.expand(256, 2).float(), x1) < 1e-10
    fine = sample(ring, x1, solver="heun", nfe=33)
    err = one_step_error(ring, fine, x1)  # the 1-step teacher vs its fine ODE: clearly worse
    assert err > 0.1
    manual = ((x1 - ring.velocity(x1, 1.0)) - fine).square().mean().item()
    assert err == pytest.approx(manual, rel=1e-5)


def test_per_t_relative_loss_statistics():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)
    ts = [0.1, 0.5, 1.0]

    def zero(x, t):
        return torch.zeros_like(x)

    out = per_t_relative_loss(zero, x0, x1, ts=ts)
    assert set(out) == {"t", "min", "mean", "max", "loss_mean"}
    # u = 0: D = x_t, loss_i = t^2 ||x1 - x0||^2, so the relative loss is t-independent
    ref = (x1 - x0).square().sum(1).double()
    rel = ref / ref.mean()
    np.testing.assert_allclose(out["t"], ts)
    np.testing.assert_allclose(out["mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["min"], rel.min().item(), rtol=1e-5)
    np.testing.assert_allclose(out["max"], rel.max().item(), rtol=1e-5)
    np.testing.assert_allclose(out["loss_mean"], np.square(ts) * ref.mean().item(), rtol=1e-5)
    l1 = per_t_relative_loss(zero, x0, x1, ts=ts, distance="l1")
    assert np.all(l1["min"] <= 1.0) and np.all(l1["max"] >= 1.0)
    # a perfect model: zero loss up to round-off (relative loss defined as 0 where the mean is exactly 0)
    c = C.float().expand(200, 2)
    perfect = per_t_relative_loss(point_flow, c, x1[:, :2], ts=ts)
    assert np.all(perfect["loss_mean"] < 1e-10)
    assert per_t_relative_loss(point_flow, c, c, ts=[0.5])["max"][0] == 0.0
    # the exact ring denoiser on independent pairs: spread grows large, as in Simple ReFlow Fig. 1
    ring = ring_gmm()
    xr = ring.sample(200, generator=g)
    spread = per_t_relative_loss(ring, xr, x1[:, :2], ts=[0.2, 0.8])
    assert np.all(spread["max"] > 3.0) and np.all(spread["min"] < 0.2)
    with pytest.raises(ValueError, match="distance"):
        per_t_relative_loss(zero, x0, x1, ts=ts, distance="cosine")
    with pytest.raises(ValueError, match="ts"):
        per_t_relative_loss(zero, x0, x1, ts=[1.5])


def test_velocity_helper_checks_shapes():
    ring = ring_gmm()
    x = torch.randn(4, 2)
    assert torch.allclose(velocity(ring, x, 0.3), ring.velocity(x, 0.3))
    with pytest.raises(ValueError, match="velocity shaped like"):
        velocity(lambda x, t: x[:, :1], x, 0.5)
