"""Spectral GM-SDE (``GMSDE(spectrum_net=...)``, ``sample(..., spectral=...)``): the step is the exact
transition of a spectral x0 draw, the Gaussian the spectrum net sees (surrogate, guided numerator,
second-order target), the automatic use of ``model.spectrum_net``, and option errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gmflow
from gmflow import Gaussian, ProbabilisticGuidance, probabilistic_guidance, ring_gmm, sample, spectral_sample
from gmflow.gaussian import reverse_transition_coefs
from gmflow.nn import GMDiT, SpectrumMLP
from gmflow.sampling import GMSDE, GMPrediction

D = torch.float64
FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"


class Recorder:
    """A spectrum net that records the Gaussians it is given and returns a fixed coloured spectrum."""

    def __init__(self, c: int = 2, h: int = 4, w: int = 4):
        self.net = SpectrumMLP(base_size=[c, h, w], layers=[8]).double()
        torch.nn.init.normal_(self.net.mlp[-1].weight, generator=torch.Generator().manual_seed(0))
        self.seen: list[Gaussian] = []

    def __call__(self, mean, var):
        self.seen.append(Gaussian(mean, var))
        return self.net(mean, var)


def _x0_gm(model, x, t):
    tv = torch.full((x.shape[0],), t, dtype=x.dtype)
    return model(x, tv).u_to_x0(x, tv)


def _assert_same_gaussian(a: Gaussian, b: Gaussian):
    assert a.var.shape == b.var.shape
    assert torch.allclose(a.mean, b.mean, atol=1e-12) and torch.allclose(a.var, b.var, atol=1e-12)


def test_step_is_the_reverse_transition_of_a_spectral_draw():
    ring, net = ring_gmm(spatial_shape=(4, 4)), Recorder()
    x = torch.randn(3, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    s = GMSDE(spectrum_net=net)
    s.set_timesteps(4)
    x = s.step(GMPrediction(_x0_gm(ring, x, 1.0), None), 1.0, x, generator=torch.Generator().manual_seed(5))
    gm = _x0_gm(ring, x, 0.75)
    x1 = s.step(GMPrediction(gm, None), 0.75, x, generator=torch.Generator().manual_seed(6))
    # by hand: surrogate -> spectrum -> KR draw, then the scheduler noise, from one generator
    q = gm.to_gaussian()
    _assert_same_gaussian(net.seen[-1], q)
    g = torch.Generator().manual_seed(6)
    x0 = spectral_sample(gm, net.net(q.mean, q.var), g)
    c1, c2, c3 = reverse_transition_coefs(0.75, 0.5, 4, like=x)
    want = c1 * x + c2 * x0 + c3.sqrt() * torch.randn(x.shape, generator=g, dtype=D)
    assert torch.equal(x1, want)


def test_guided_step_feeds_the_numerator_gaussian():
    ring, net = ring_gmm(spatial_shape=(4, 4)), Recorder()
    x = torch.randn(2, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    gm_c = _x0_gm(ring, x, 0.6)
    mean_u = gm_c.mean() + 0.5 * torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(3))
    info = probabilistic_guidance(gm_c, mean_u, 0.45)
    s = GMSDE(spectrum_net=net)
    s.set_timesteps(1, times=[0.6, 0.0])
    s.step(GMPrediction(info.gm, info), 0.6, x, generator=torch.Generator().manual_seed(0))
    want = Gaussian(info.base.mean + info.bias, info.avg_var * (1 - 0.45**2))
    _assert_same_gaussian(net.seen[0], want)


def test_second_order_step_feeds_its_target():
    ring, net = ring_gmm(spatial_shape=(4, 4)), Recorder()
    x = torch.randn(2, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(4))
    s = GMSDE(order=2, spectrum_net=net)
    s.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    t0 = s.timestep
    gm0 = _x0_gm(ring, x, t0)
    x = s.step(GMPrediction(gm0, None), t0, x, generator=g)
    assert s._second.target is None  # the first step does not extrapolate: plain surrogate
    _assert_same_gaussian(net.seen[0], gm0.to_gaussian())
    t1 = s.timestep
    s.step(GMPrediction(_x0_gm(ring, x, t1), None), t1, x, generator=g)
    assert s._second.target is not None
    _assert_same_gaussian(net.seen[1], s._second.target)


def test_sample_spectral_option_and_automatic_model_attribute():
    ring, net = ring_gmm(spatial_shape=(4, 4)), Recorder()
    noise = torch.randn(2, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(1))

    def run(model, **kw):
        return sample(model, noise, nfe=3, generator=torch.Generator().manual_seed(0), **kw)

    plain = run(ring, solver="gm-sde")
    spectral = run(ring, solver="gm-sde", spectral=net)
    assert len(net.seen) == 3 and torch.isfinite(spectral).all() and not torch.equal(spectral, plain)

    class Carrier(nn.Module):  # a model checkpointed together with its spectrum net
        def __init__(self):
            super().__init__()
            self.spectrum_net = net.net

        def forward(self, x, t):
            return ring(x, t)

    carrier = Carrier()
    assert torch.equal(run(carrier, solver="gm-sde"), spectral)  # automatic
    assert torch.equal(run(carrier, solver="gm-sde", spectral=True), spectral)
    assert torch.equal(run(carrier, solver="gm-sde", spectral=False), plain)
    # GM-ODE has no x0 draw: the model's net is ignored, an explicit one is an error
    assert torch.equal(run(carrier, solver="gm-ode", substeps=2), run(ring, solver="gm-ode", substeps=2))
    with pytest.raises(ValueError, match="spectral applies to solver='gm-sde' only, got solver='gm-ode'"):
        run(ring, solver="gm-ode", spectral=net)
    with pytest.raises(ValueError, match="spectral=True needs a model with a spectrum_net attribute"):
        run(ring, solver="gm-sde", spectral=True)
    with pytest.raises(TypeError, match="spectral must be a spectrum net, True, False or None"):
        run(ring, solver="gm-sde", spectral="yes")
    with pytest.raises(TypeError, match="spectrum_net must be None or callable"):
        GMSDE(spectrum_net=3)
    with pytest.raises(ValueError, match=r"spectral sampling needs a GM over \(B, C, H, W\) images"):
        sample(ring_gmm(), torch.zeros(4, 2), solver="gm-sde", nfe=2, spectral=lambda m, v: m)


def test_official_tiny_gm_dit_with_its_spectrum_net_guided_second_order():
    dit = GMDiT.from_pretrained(FIXTURE / "transformer").requires_grad_(False)
    net = SpectrumMLP.from_pretrained(FIXTURE / "spectrum_net").requires_grad_(False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    kw = dict(
        solver="gm-sde", order=2, nfe=4, cond={"class_labels": torch.tensor([3, 7])},
        uncond={"class_labels": torch.full((2,), 10)}, guidance=ProbabilisticGuidance(0.45),
    )  # fmt: skip
    a = gmflow.sample(dit, noise, spectral=net, generator=torch.Generator().manual_seed(21), **kw)
    b = gmflow.sample(dit, noise, spectral=net, generator=torch.Generator().manual_seed(21), **kw)
    c = gmflow.sample(dit, noise, generator=torch.Generator().manual_seed(21), **kw)
    assert a.shape == noise.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
