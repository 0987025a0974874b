"""The lean second-order GM update and the GM solvers against the pre-#13 algorithm written with the
public GaussianMixture operations (re-anchor, surrogate, Gaussian ratio, materialised draws)."""

import pytest
import torch

from gmflow import Gaussian, GaussianMixture, ProbabilisticGuidance, ring_gmm, sample
from gmflow.gaussian import reverse_transition_coefs
from gmflow.guidance import probabilistic_guidance
from gmflow.sampling.solvers.gm import SecondOrder
from gmflow.sampling.solvers.gm_field import PreparedGM

D = torch.float64


class ReferenceSecondOrder:
    """GMFlow App. A.2 as implemented before #13: every quantity from the materialised GMs."""

    def __init__(self):
        self.prev = None

    def __call__(self, gm, info, x, t, t_next):
        h, out = t - t_next, gm
        if self.prev is not None:
            prev_gm, prev_x, prev_t, prev_h = self.prev
            if info is not None:
                base_gm, base, bias, cur, w2 = info.cond, info.base, info.bias, gm.mean(), info.scale**2
            else:
                base_gm, base = gm, gm.to_gaussian(spatial_average=True)
                bias, cur, w2 = None, base.mean, 0.0
            var = base.var
            m_prev = prev_gm.reanchor(prev_x, prev_t, x, t).mean()
            big_b = (
                (cur - m_prev) * (0.5 * h / prev_h) * (1 - (w2 + 0.005) * var / prev_h**2).clamp_min(0).sqrt()
            )
            big_b = big_b if bias is None else big_b + bias
            power = big_b.square().flatten(1).mean(1).reshape(var.shape)
            big_b = torch.where(power > var, big_b * torch.sqrt(var / power.clamp_min(1e-30)), big_b)
            target = Gaussian(base.mean + big_b, var * (1 - power / var).clamp_min(1e-6))
            out = base_gm.mul_gaussian_ratio(target, base)
        self.prev = (gm, x, t, h)
        return out


def _random_gm(shape, g, dtype):
    b, k = shape[:2]
    sp = shape[3:]
    return GaussianMixture.from_logits(
        torch.randn(shape, generator=g, dtype=dtype),
        torch.randn(b, k, 1, *sp, generator=g, dtype=dtype),
        -1.5 + 0.3 * torch.randn(b, 1, 1, *[1] * len(sp), generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("shape", [(256, 16, 2), (16, 8, 1, 8, 8), (8, 8, 4, 4, 4)])
@pytest.mark.parametrize("guided", [False, True])
def test_lean_second_order_matches_the_reference_to_fp32_rounding(shape, guided):
    g = torch.Generator().manual_seed(0)
    lean, ref = SecondOrder(), ReferenceSecondOrder()
    for t, t_next in [(1.0, 0.7), (0.7, 0.4), (0.4, 0.15)]:
        gm = _random_gm(shape, g, torch.float32)
        x = torch.randn(shape[0], *shape[2:], generator=g)
        info = None
        if guided:
            info = probabilistic_guidance(gm, gm.mean() + 0.3 * torch.randn_like(x), 0.4)
            gm = info.gm
        want = ref(gm, info, x, t, t_next)
        tilt = lean(PreparedGM(gm if info is None else info.cond), info, x, t, t_next)
        if t == 1.0:
            assert tilt is None and want is gm
            continue
        got = (gm if info is None else info.cond).tilt(tilt.zeta.reshape(-1), tilt.nu)
        torch.testing.assert_close(got.means, want.means, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logstds, want.logstds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)


class StaleRing:
    """The ring posterior with time-dependent bias in its means: successive GMs disagree, so the
    second-order update extrapolates; ``label`` shifts the conditional model."""

    def __init__(self, spatial_shape=()):
        self.ring = ring_gmm(spatial_shape=spatial_shape)

    def __call__(self, x, t, label=None):
        gm = self.ring(x, t)
        scale = (1.0 + 0.15 * t).reshape(-1, *[1] * (gm.means.dim() - 1))
        shift = 0.0 if label is None else 0.3 * label.reshape(scale.shape)
        return GaussianMixture(gm.means * scale + shift, gm.logweights, gm.logstds)


def _reference_run(model, noise, solver, nfe, guidance=None, substeps=1):
    """The GM solvers' loop written out with the reference second-order update (uniform grid)."""
    g = torch.Generator().manual_seed(3)
    so, x = ReferenceSecondOrder(), noise
    ts = [1 - i / nfe for i in range(nfe + 1)]
    for t, tn in zip(ts, ts[1:]):
        tv = torch.full((x.shape[0],), t, dtype=D)
        gm, info = model(x, tv).u_to_x0(x, tv), None
        if guidance is not None:
            gm_c = model(x, tv, torch.ones(x.shape[0], dtype=D)).u_to_x0(x, tv)
            info = probabilistic_guidance(gm_c, gm.mean(), guidance.scale, guidance.orthogonal)
            gm = info.gm
        gm = so(gm, info, x, t, tn)
        if solver == "gm-sde":
            c1, c2, c3 = reverse_transition_coefs(t, tn, x.dim(), like=x)
            x0 = gm.sample(g)
            x = c1 * x + c2 * x0 + (c3.sqrt() * torch.randn(x.shape, generator=g, dtype=D) if tn > 0 else 0)
        else:  # Euler sub-steps on the re-anchored mean
            y = x
            for j in range(substeps):
                tau, tau_n = t + (j / substeps) * (tn - t), t + ((j + 1) / substeps) * (tn - t)
                x0 = gm.mean() if j == 0 else gm.reanchor(x, t, y, tau).mean()
                y = y + (tau_n - tau) * (y - x0) / tau
            x = y
    return x


@pytest.mark.parametrize("spatial", [(), (3, 3)])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("solver", ["gm-sde", "gm-ode"])
def test_second_order_solvers_follow_the_reference_algorithm(solver, guided, spatial):
    """fp64 end to end: GM-SDE o2 (same draws) and GM-ODE o2 with Euler sub-steps, plain and guided."""
    model = StaleRing(spatial)
    noise = torch.randn(64, 2, *spatial, dtype=D, generator=torch.Generator().manual_seed(1))
    guidance = ProbabilisticGuidance(0.3, orthogonal=0.5) if guided else None
    kw = {} if solver == "gm-sde" else {"substeps": 5, "substep_method": "euler"}
    extra = {}
    if guided:
        extra = dict(cond={"label": torch.ones(64, dtype=D)}, uncond={"label": torch.zeros(64, dtype=D)})
    got = sample(
        model, noise, solver=solver, nfe=4, order=2, generator=torch.Generator().manual_seed(3),
        guidance=guidance, **kw, **extra,
    )  # fmt: skip
    want = _reference_run(model, noise, solver, 4, guidance, substeps=5)
    assert torch.allclose(got, want, atol=1e-9), float((got - want).abs().max())
