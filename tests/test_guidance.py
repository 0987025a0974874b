"""Guidance: CFG (+ orthogonal projection), probabilistic guidance, AutoGuidance, conditional sampling."""

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


def test_guided_sampling_runs_for_every_solver_and_counts_one_nfe_per_batched_call():
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
        assert torch.isfinite(x).all()
    x = sample(
        counting, noise, solver="euler", nfe=4, cond=cond, uncond=uncond, guidance=CFG(2.0, orthogonal=1.0)
    )
    assert torch.isfinite(x).all()


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
    # GM models: means shifted by the guided bias
    gm_out = sample(good, noise, solver="gm-ode", nfe=2, guidance=AutoGuidance(bad, 1.5))
    assert torch.isfinite(gm_out).all()


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
