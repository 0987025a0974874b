"""Guidance: CFG (+ orthogonal projection), probabilistic guidance, AutoGuidance, conditional sampling."""

import math

import pytest
import torch

from gmflow import CFG, AutoGuidance, GaussianMixture, ProbabilisticGuidance, probabilistic_guidance, sample
from gmflow.data.gmm import GaussianMixtureData
from gmflow.guidance import cfg_x0

D = torch.float64


def two_class_oracle():
    """Class-conditional GMM: label 0 / 1 select a data set; label 2 is the unconditional mixture."""
    c0 = torch.tensor([[-3.0, 0.0], [-2.0, 2.0]], dtype=D)
    c1 = torch.tensor([[3.0, 0.0], [2.0, -2.0]], dtype=D)
    sets = [
        GaussianMixtureData(c0, 0.3),
        GaussianMixtureData(c1, 0.3),
        GaussianMixtureData(torch.cat([c0, c1]), 0.3),
    ]

    def model(x, t, label):
        outs = [sets[int(label[i])](x[i : i + 1], t[i : i + 1]) for i in range(x.shape[0])]
        k = max(o.num_components for o in outs)
        pad = []
        for o in outs:  # pad to a common K with -inf-weight components
            extra = k - o.num_components
            if extra:
                o = GaussianMixture(
                    torch.cat([o.means, o.means[:, :1].expand(1, extra, 2)], 1),
                    torch.cat([o.logweights, torch.full((1, extra, 1), -1e4, dtype=D)], 1),
                    o.logstds,
                )
            pad.append(o)
        return GaussianMixture.cat(pad)

    return model, sets


def test_cfg_formula_and_projection():
    c, u = torch.randn(4, 3, 2, dtype=D), torch.randn(4, 3, 2, dtype=D)
    assert torch.allclose(cfg_x0(c, u, 1.0), c)
    assert torch.allclose(cfg_x0(c, u, 3.0), c + 2.0 * (c - u))
    g = cfg_x0(c, u, 3.0, orthogonal=1.0) - c
    assert torch.allclose((g * c).flatten(1).sum(1), torch.zeros(4, dtype=D), atol=1e-10)


def test_probabilistic_guidance_properties():
    model, sets = two_class_oracle()
    x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.3, -0.2], [0.2, -0.4], [1.0, 0.0], [0.6, 0.3]], dtype=D)
    t = torch.full((6,), 0.6, dtype=D)
    cond = model(x, t, torch.zeros(6)).u_to_x0(x, t)
    unc = model(x, t, torch.full((6,), 2)).u_to_x0(x, t)
    w = 0.5
    res = probabilistic_guidance(cond, unc.mean(), w, orthogonal=0.0)
    # bias has RMS w~ s_c and points from the unconditional towards the conditional mean
    rms = res.bias.square().mean(1, keepdim=True).sqrt()
    assert bool(((cond.mean() - unc.mean()).square().mean(1) > 1e-4).all())  # well-defined direction
    assert torch.allclose(rms, w * res.avg_var.sqrt(), atol=1e-10)
    assert bool(((res.bias * (cond.mean() - unc.mean())).sum(1) > 0).all())
    # the guided GM is the conditional GM times the ratio N(mu_c + b, (1 - w^2) s^2) / N(mu_c, s^2)
    xs = torch.randn(5, 6, 2, dtype=D)
    from gmflow import Gaussian

    num = Gaussian(res.base.mean + res.bias, res.avg_var * (1 - w**2))
    diffs = torch.stack(
        [res.gm.log_prob(v) - cond.log_prob(v) - num.log_prob(v) + res.base.log_prob(v) for v in xs]
    )
    assert torch.allclose(diffs, diffs[:1].expand_as(diffs), atol=1e-9)
    # w~ = 0 is the identity
    same = probabilistic_guidance(cond, unc.mean(), 0.0)
    assert torch.equal(same.gm.means, cond.means)
    # orthogonal projection removes the component of b along mu_c
    proj = probabilistic_guidance(cond, unc.mean(), w, orthogonal=1.0)
    assert torch.allclose((proj.bias * proj.base.mean).sum(1), torch.zeros(6, dtype=D), atol=1e-9)


def test_guided_sampling_counts_one_nfe_per_batched_call():
    model, _ = two_class_oracle()
    calls = []

    def counting(x, t, label):
        calls.append(x.shape[0])
        return model(x, t, label)

    noise = torch.randn(8, 2, dtype=D)
    cond, uncond = {"label": torch.zeros(8)}, {"label": torch.full((8,), 2)}
    for solver, order in [("gm-sde", 2), ("gm-ode", 2), ("euler", 1), ("dpm++2m", 1)]:
        calls.clear()
        x = sample(
            counting,
            noise,
            solver=solver,
            nfe=4,
            order=order,
            cond=cond,
            uncond=uncond,
            guidance=ProbabilisticGuidance(0.3),
            generator=torch.Generator().manual_seed(0),
        )
        assert len(calls) == 4 and all(c == 16 for c in calls)
        assert x.shape == noise.shape


def _inner(a, b):
    return (a * b).sum(1, keepdim=True)


@pytest.mark.parametrize("orthogonal", [0.0, 1.0])
@pytest.mark.parametrize("gm_model", [False, True])
def test_cfg_one_euler_step_is_the_guided_x0_in_closed_form(gm_model, orthogonal):
    """From t = 1 one Euler step lands on the guided x0: x0_c + (w - 1) Delta, Delta = x0_c - x0_u
    (minus its projection on x0_c); a GM model has every component mean shifted by the same bias."""
    model, _ = two_class_oracle()
    velocity = (lambda x, t, label: model(x, t, label).mean()) if not gm_model else model  # noqa: E731
    noise = torch.randn(6, 2, dtype=D)
    cond, uncond = {"label": torch.zeros(6)}, {"label": torch.full((6,), 2)}
    w = 2.5
    out = sample(
        velocity,
        noise,
        solver="euler",
        nfe=1,
        cond=cond,
        uncond=uncond,
        guidance=CFG(w, orthogonal=orthogonal),
    )
    t1 = torch.ones(6, dtype=D)
    x0_c = noise - model(noise, t1, cond["label"]).mean()
    x0_u = noise - model(noise, t1, uncond["label"]).mean()
    delta = x0_c - x0_u
    delta = delta - orthogonal * _inner(delta, x0_c) / _inner(x0_c, x0_c) * x0_c
    assert torch.allclose(out, x0_c + (w - 1) * delta, atol=1e-12)


def gaussian_classes():
    """Two Gaussian classes N(m_y, 0.5^2 I): at t = 1 the x0 posterior is the class itself (K = 1)."""
    sets = [
        GaussianMixtureData(torch.tensor([[-2.0, 1.0]], dtype=D), 0.5),
        GaussianMixtureData(torch.tensor([[1.0, 0.5]], dtype=D), 0.5),
    ]

    def model(x, t, label):
        return GaussianMixture.cat([sets[int(y)](x[i : i + 1], t[i : i + 1]) for i, y in enumerate(label)])

    return model, [s.centers[0] for s in sets], 0.5


def _pg_bias(m_c, m_u, w, sd, orthogonal):
    """b: Delta = m_c - m_u (projected off m_c), rescaled to RMS w sd."""
    delta = m_c - m_u
    delta = delta - orthogonal * (delta @ m_c) / (m_c @ m_c) * m_c
    return delta * (sd / delta.square().mean().sqrt()) * w


@pytest.mark.parametrize("orthogonal", [0.0, 1.0])
def test_probabilistic_guidance_on_a_gaussian_shifts_the_mean_and_shrinks_the_variance(orthogonal):
    """K = 1: N(m_c, s^2) N(m_c + b, (1 - w^2) s^2) / N(m_c, s^2) = N(m_c + b, (1 - w^2) s^2), Eq. 8."""
    model, (m_c, m_u), sd = gaussian_classes()
    b = _pg_bias(m_c, m_u, 0.6, sd, orthogonal)
    noise = torch.randn(5, 2, dtype=D)
    t1 = torch.ones(5, dtype=D)
    gm_c = model(noise, t1, torch.zeros(5)).u_to_x0(noise, t1)
    res = probabilistic_guidance(gm_c, m_u.expand(5, 2), 0.6, orthogonal=orthogonal)
    assert torch.allclose(res.gm.means[:, 0], (m_c + b).expand(5, 2), atol=1e-12)
    assert torch.allclose(res.gm.var.flatten(), torch.full((5,), (1 - 0.36) * sd**2, dtype=D), atol=1e-12)
    # end to end, one step from t = 1: dpm++2m lands on the guided mean, gm-sde on a guided-GM draw
    kw = dict(
        nfe=1,
        cond={"label": torch.zeros(5)},
        uncond={"label": torch.ones(5)},
        guidance=ProbabilisticGuidance(0.6, orthogonal=orthogonal),
    )
    mean = sample(model, noise, solver="dpm++2m", **kw)
    assert torch.allclose(mean, (m_c + b).expand(5, 2), atol=1e-12)
    g = torch.Generator().manual_seed(4)
    draw = sample(model, noise, solver="gm-sde", generator=g, **kw)
    g = torch.Generator().manual_seed(4)
    torch.rand(5, 1, generator=g, dtype=D)  # the component (K = 1)
    n = torch.randn(5, 2, generator=g, dtype=D)
    assert torch.allclose(draw, m_c + b + math.sqrt(1 - 0.36) * sd * n, atol=1e-12)


def test_guidance_pushes_samples_towards_the_condition():
    model, _ = two_class_oracle()
    noise = torch.randn(400, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"label": torch.zeros(400)}, {"label": torch.full((400,), 2)}
    plain = sample(
        model, noise, solver="gm-sde", nfe=4, cond=cond, generator=torch.Generator().manual_seed(1)
    )
    guided = sample(
        model,
        noise,
        solver="gm-sde",
        nfe=4,
        cond=cond,
        uncond=uncond,
        guidance=ProbabilisticGuidance(0.6, orthogonal=0.0),
        generator=torch.Generator().manual_seed(1),
    )
    # class 0 lives at x < 0; guidance moves mass further from the unconditional (class-1) side
    assert float(guided[:, 0].mean()) < float(plain[:, 0].mean())
    assert float((plain[:, 0] < 0).double().mean()) > 0.95


def test_autoguidance_scale_one_is_the_main_model_and_scale_is_a_lerp():
    good = GaussianMixtureData(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D), 0.3)
    bad = GaussianMixtureData(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D), 0.8)
    noise = torch.randn(16, 2, dtype=D)
    base = sample(good.velocity, noise, solver="euler", nfe=3)
    same = sample(good.velocity, noise, solver="euler", nfe=3, guidance=AutoGuidance(bad.velocity, 1.0))
    assert torch.allclose(base, same, atol=1e-12)
    one = sample(good.velocity, noise, solver="euler", nfe=1, guidance=AutoGuidance(bad.velocity, 1.6))
    t1 = torch.ones(16, dtype=D)
    x0g, x0b = noise - good.velocity(noise, t1), noise - bad.velocity(noise, t1)
    assert torch.allclose(one, x0b + 1.6 * (x0g - x0b), atol=1e-12)
    # GM models: means shifted by the guided bias; one Euler GM-ODE step from t = 1 lands on the guided mean
    gm_out = sample(
        good,
        noise,
        solver="gm-ode",
        nfe=1,
        substeps=1,
        substep_method="euler",
        guidance=AutoGuidance(bad, 1.5),
    )
    x0g, x0b = noise - good(noise, t1).mean(), noise - bad(noise, t1).mean()
    assert torch.allclose(gm_out, x0b + 1.5 * (x0g - x0b), atol=1e-12)


def test_guidance_errors():
    model, _ = two_class_oracle()
    noise = torch.randn(4, 2, dtype=D)
    with pytest.raises(ValueError, match="uncond"):
        sample(model, noise, solver="euler", nfe=2, cond={"label": torch.zeros(4)}, guidance=CFG(2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ProbabilisticGuidance(-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ProbabilisticGuidance(1.2)
    with pytest.raises(TypeError, match="guidance must be"):
        sample(model, noise, solver="euler", nfe=2, guidance=2.0)
    with pytest.raises(TypeError, match="ProbabilisticGuidance needs"):
        sample(
            lambda x, t, label: x,
            noise,
            solver="euler",
            nfe=2,
            cond={"label": torch.zeros(4)},
            uncond={"label": torch.ones(4)},
            guidance=ProbabilisticGuidance(0.3),
        )
    with pytest.raises(TypeError, match="callable"):
        AutoGuidance("model", 2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_guidance_scales_must_be_finite(bad):
    with pytest.raises(ValueError, match="CFG scale must be finite"):
        CFG(bad)
    with pytest.raises(ValueError, match="probabilistic guidance scale must be in"):
        ProbabilisticGuidance(bad)
    with pytest.raises(ValueError, match="AutoGuidance scale must be finite"):
        AutoGuidance(lambda x, t: x, bad)
    with pytest.raises(ValueError, match="orthogonal must be in"):
        CFG(2.0, orthogonal=bad)
