"""GM-ODE sub-step integrators: defaults, Gaussian exactness and convergence orders on the ring oracle."""

import math

import pytest
import torch

from gmflow import GaussianMixture, ring_gmm
from gmflow.sampling.solvers.gm_field import GMField, PreparedGM
from gmflow.sampling.solvers.substeps import SUBSTEP_METHODS, default_substeps, integrate

D = torch.float64


def test_default_substeps():
    assert SUBSTEP_METHODS == ("euler", "pc2", "pc3")
    assert [default_substeps(n, "euler") for n in (1, 2, 3, 8, 200)] == [128, 64, 43, 16, 1]
    for m in ("pc2", "pc3"):
        assert [default_substeps(n, m) for n in (1, 2, 3, 8, 16, 200)] == [16, 8, 6, 2, 1, 1]
        # a step's own length decides (sub-steps of at most 1/16); exact multiples are not rounded up
        assert [default_substeps(5, m, length) for length in (0.76, 0.25, 0.25000000000000006, 1e-3)] == [
            13, 4, 4, 1,
        ]  # fmt: skip
    assert default_substeps(4) == default_substeps(4, "pc3")
    assert default_substeps(4, "euler", 0.9) == 32  # Euler: the paper's count on every step
    with pytest.raises(
        ValueError, match=r"substep_method must be one of \('euler', 'pc2', 'pc3'\), got 'rk4'"
    ):
        default_substeps(4, "rk4")


def _ring_field(t, n=2000, seed=0):
    """The exact ring posterior at on-distribution states x_t: its re-anchored field is the exact ODE's."""
    ring = ring_gmm()
    g = torch.Generator().manual_seed(seed)
    x_t = (1 - t) * ring.sample(n, generator=g, dtype=D) + t * torch.randn(n, 2, generator=g, dtype=D)
    gm = ring.posterior_x0(x_t, torch.full((n,), t, dtype=D))
    return GMField(PreparedGM(gm), x_t, t), x_t


def _rms(a, b):
    return float((a - b).norm(dim=1).square().mean().sqrt())


@pytest.mark.parametrize("method,order", [("euler", 1), ("pc2", 2), ("pc3", 3)])
def test_substeps_converge_at_their_order_on_the_ring_oracle(method, order):
    """log-log slope of the error against a converged solve, over n = 16 ... 128 sub-steps."""
    field, x_t = _ring_field(0.8)
    ref = integrate(field, x_t, 0.8, 0.3, 1024, "pc3")
    ns = [16, 32, 64, 128]
    errs = [_rms(integrate(field, x_t, 0.8, 0.3, n, method), ref) for n in ns]
    lx = torch.tensor([math.log(n) for n in ns], dtype=D)
    ly = torch.tensor([math.log(e) for e in errs], dtype=D)
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).square().sum())
    assert order - 0.25 < -slope < order + 0.5, (method, errs, slope)


def test_high_order_substeps_need_far_fewer_steps_than_euler():
    """From the noise (NFE 1 interval 1 -> 0): 16 pc3 sub-steps beat the paper's 128 Euler sub-steps."""
    field, x_t = _ring_field(1.0)
    ref = integrate(field, x_t, 1.0, 0.0, 1024, "pc3")
    euler = _rms(integrate(field, x_t, 1.0, 0.0, 128, "euler"), ref)
    assert _rms(integrate(field, x_t, 1.0, 0.0, 16, "pc3"), ref) < euler
    assert _rms(integrate(field, x_t, 1.0, 0.0, 16, "euler"), ref) > 4 * euler


@pytest.mark.parametrize("method", ["pc2", "pc3"])
def test_predictor_corrector_is_exact_for_a_single_gaussian(method):
    """K = 1: the mixture average is constant, so one sub-step solves the interval exactly."""
    g = torch.Generator().manual_seed(0)
    b, t, tn = 32, 0.9, 0.0
    gm = GaussianMixture(
        torch.randn(b, 1, 2, generator=g, dtype=D), torch.zeros(b, 1, 1, dtype=D),
        torch.log(0.05 + torch.rand(b, 1, 1, generator=g, dtype=D)),
    )  # fmt: skip
    x_t = torch.randn(b, 2, generator=g, dtype=D)
    field = GMField(PreparedGM(gm), x_t, t)
    exact = integrate(field, x_t, t, tn, 512, method)
    assert torch.allclose(integrate(field, x_t, t, tn, 1, method), exact, atol=1e-12)
    e64, e512 = (_rms(integrate(field, x_t, t, tn, n, "euler"), exact) for n in (64, 512))
    assert e512 < e64 / 4  # Euler only converges to it


def test_pc3_stays_as_accurate_as_pc2_on_a_sharp_mixture():
    """A sharp GM (s = 0.003, K = 8) on the last step 1/6 -> 0 with 3 sub-steps: the step in g grows by
    far more than 2x from one sub-step to the next, where the quadratic weights would amplify the change
    of mbar (unguarded pc3: 6x pc2's error); such positions take the pc2 step. Earlier steps keep third
    order (t = 0.5 -> 1/3: pc3 more accurate than pc2)."""
    g = torch.Generator().manual_seed(0)
    b = 256
    gm = GaussianMixture(
        torch.randn(b, 8, 1, generator=g, dtype=D),
        torch.log_softmax(torch.randn(b, 8, 1, generator=g, dtype=D), 1),
        torch.full((b, 1, 1), math.log(0.003), dtype=D),
    )
    errs = {}
    for t, tn in ((0.5, 1 / 3), (1 / 6, 0.0)):
        x_t = torch.randn(b, 1, generator=g, dtype=D)
        field = GMField(PreparedGM(gm), x_t, t)
        ref = integrate(field, x_t, t, tn, 2048, "pc2")
        errs[t] = {m: _rms(integrate(field, x_t, t, tn, 3, m), ref) for m in ("pc2", "pc3")}
    assert errs[1 / 6]["pc3"] <= 1.01 * errs[1 / 6]["pc2"], errs
    assert errs[0.5]["pc3"] < 0.6 * errs[0.5]["pc2"], errs
