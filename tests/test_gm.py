"""GaussianMixture / Gaussian: densities, moments and every analytic operation, checked in closed form."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import gmflow.gaussian
import gmflow.gm
from gmflow import Gaussian, GaussianMixture, ring_gmm
from gmflow.data.gmm import GaussianMixtureData

D = torch.float64


def random_gm(b=3, k=4, c=2, spatial=(), seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, *spatial, generator=g, dtype=dtype) * 2
    logits = torch.randn(b, k, 1, *spatial, generator=g, dtype=dtype)
    logstds = torch.randn(b, 1, 1, *([1] * len(spatial)), generator=g, dtype=dtype) * 0.3 - 0.5
    return GaussianMixture.from_logits(means, logits, logstds)


def torch_mixture(gm: GaussianMixture):
    """Reference: torch.distributions over the channel event, batched over (B, *S)."""
    nd = gm.means.dim()
    perm = [0, *range(3, nd), 1, 2]  # (B, *S, K, C)
    means = gm.means.permute(perm)
    logits = gm.logweights.squeeze(2).permute([0, *range(2, nd - 1), 1])
    std = gm.logstds.exp().reshape(gm.batch_size, *([1] * (nd - 1))).expand_as(means)
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, std), 1))


@pytest.mark.parametrize("spatial", [(), (3,), (2, 3)])
def test_log_prob_and_mean_match_torch_distributions(spatial):
    gm = random_gm(spatial=spatial)
    ref = torch_mixture(gm)
    x = torch.randn(gm.batch_size, gm.channels, *spatial, dtype=D) * 2
    x_ref = x.permute(0, *range(2, x.dim()), 1)
    assert torch.allclose(gm.log_prob(x), ref.log_prob(x_ref), atol=1e-8, rtol=0)
    assert torch.allclose(gm.mean().permute(0, *range(2, x.dim()), 1), ref.mean, atol=1e-8, rtol=0)
    assert gm.log_prob(x).shape == (gm.batch_size, *spatial)


def test_weights_normalised_and_sample_moments():
    gm = random_gm(b=2, k=3, c=2, spatial=(1,))
    assert torch.allclose(gm.weights.sum(1), torch.ones(2, 1, 1, dtype=D))
    rep = GaussianMixture(
        gm.means.expand(2, 3, 2, 40000).contiguous(),
        gm.logweights.expand(2, 3, 1, 40000).contiguous(),
        gm.logstds,
    )
    x = rep.sample(torch.Generator().manual_seed(1))
    sur = gm.to_gaussian()
    assert torch.allclose(x.mean(-1), sur.mean[..., 0], atol=0.05)
    # isotropic surrogate variance = average over channels of the true per-channel variance
    assert torch.allclose(x.var(-1).mean(1), sur.var[:, 0, 0], rtol=0.03)


def test_surrogate_is_moment_matched():
    gm = random_gm(spatial=(4,))
    g = gm.to_gaussian()
    w = gm.weights
    second = (w * (gm.means.square() + gm.var)).sum(1)  # E[x_c^2] per channel
    var_c = second - g.mean.square()
    assert torch.allclose(g.var.squeeze(1), var_c.mean(1), atol=1e-12)
    assert gm.to_gaussian(spatial_average=True).var.shape == (3, 1, 1)


def _const_in_x(values: torch.Tensor) -> bool:
    """values (n_points, B, ...) should not depend on the point index."""
    return bool(torch.allclose(values, values[:1].expand_as(values), atol=1e-9))


@pytest.mark.parametrize("spatial", [(), (3,)])
def test_mul_gaussian_is_normalised_product(spatial):
    gm = random_gm(spatial=spatial)
    gen = torch.Generator().manual_seed(1)
    var = torch.rand(3, 1, *([1] * len(spatial)), dtype=D, generator=gen) + 1.0  # keeps 1 + v zeta > 0
    g = Gaussian(torch.randn(3, 2, *spatial, dtype=D, generator=gen), var)
    for pg in (1.0, 0.5, -0.3):
        prod = gm.mul_gaussian(g, power_gm=1.0, power_g=pg)
        xs = torch.randn(5, 3, 2, *spatial, dtype=D)
        diff = torch.stack([prod.log_prob(x) - gm.log_prob(x) - pg * g.log_prob(x) for x in xs])
        assert _const_in_x(diff)
        # normalised: a 1-D check of the integral on a grid for a single position
    assert torch.allclose(prod.weights.sum(1), torch.ones_like(prod.weights.sum(1)))


def test_product_normaliser_integrates_to_one():
    gm = random_gm(b=1, k=3, c=1)
    g = Gaussian(torch.tensor([[0.7]], dtype=D), torch.tensor([[0.5]], dtype=D))
    prod = gm.mul_gaussian(g)
    grid = torch.linspace(-20, 20, 40001, dtype=D)
    lp = torch.stack([prod.log_prob(v.reshape(1, 1)) for v in grid[::100]])
    dens = lp.exp().squeeze()
    integral = torch.trapezoid(dens, grid[::100])
    assert abs(float(integral) - 1.0) < 1e-6


def test_gaussian_product_and_ratio():
    g1 = Gaussian(torch.randn(2, 3, dtype=D), torch.tensor([[0.5], [2.0]], dtype=D))
    g2 = Gaussian(torch.randn(2, 3, dtype=D), torch.tensor([[1.5], [3.0]], dtype=D))
    p = g1.product(g2)
    xs = torch.randn(6, 2, 3, dtype=D)
    assert _const_in_x(torch.stack([p.log_prob(x) - g1.log_prob(x) - g2.log_prob(x) for x in xs]))
    r = g1.product(g2, 1.0, -1.0)  # ratio g1/g2 (g1 narrower -> proper)
    assert bool((r.var > 0).all())
    assert _const_in_x(torch.stack([r.log_prob(x) - g1.log_prob(x) + g2.log_prob(x) for x in xs]))
    # GM x ratio via natural parameters agrees with GM x (materialised ratio Gaussian)
    gm = random_gm(b=2, k=3, c=3)
    a = gm.mul_gaussian_ratio(g1, g2)
    b = gm.mul_gaussian(r)
    for f in ("means", "logweights", "logstds"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-10)


def test_ratio_of_identical_gaussians_is_identity():
    gm = random_gm(spatial=(2,))
    g = Gaussian(torch.randn(3, 2, 2, dtype=D), torch.full((3, 1, 1), 0.7, dtype=D))
    out = gm.mul_gaussian_ratio(g, g)
    for f in ("means", "logweights", "logstds"):
        assert torch.allclose(getattr(out, f), getattr(gm, f), atol=1e-12)


@pytest.mark.parametrize("spatial", [(), (2, 2)])
def test_reanchor_of_exact_posterior_is_exact_posterior(spatial):
    """Eq. 10: moving p(x0|x_s) to (x_t, t) gives exactly p(x0|x_t) for the GMM oracle."""
    data = GaussianMixtureData(torch.randn(5, 2, dtype=D) * 2, 0.4, spatial_shape=spatial)
    b = 4
    x_s = torch.randn(b, 2, *spatial, dtype=D) * 2
    t_s = torch.tensor([0.9, 0.6, 0.5, 0.99], dtype=D)
    t_t = torch.tensor([0.3, 0.1, 0.45, 0.01], dtype=D)
    x_t = torch.randn(b, 2, *spatial, dtype=D) * 2
    moved = data.posterior_x0(x_s, t_s).reanchor(x_s, t_s, x_t, t_t)
    exact = data.posterior_x0(x_t, t_t)
    assert torch.allclose(moved.means, exact.means, atol=1e-8)
    assert torch.allclose(moved.logweights, exact.logweights, atol=1e-8)
    assert torch.allclose(moved.logstds, exact.logstds, atol=1e-8)


@pytest.mark.parametrize("spatial", [(), (3,)])
def test_reverse_transition_matches_bayes_rule(spatial):
    """q(x_t'|x_t) from the exact posterior = p(x_t|x_t') p_t'(x_t') / p_t(x_t) in closed form."""
    centers = torch.randn(4, 2, dtype=D) * 2
    sd = 0.5
    data = GaussianMixtureData(centers, sd, spatial_shape=spatial)
    b = 3
    t = torch.tensor([0.8, 0.5, 1.0], dtype=D)
    tn = torch.tensor([0.3, 0.2, 0.6], dtype=D)
    x_t = torch.randn(b, 2, *spatial, dtype=D)
    q = data.posterior_x0(x_t, t).reverse_transition(x_t, t, tn)

    for _ in range(3):
        x_n = torch.randn(b, 2, *spatial, dtype=D)
        a_t, a_n = 1 - t, 1 - tn
        ratio = a_t / a_n
        beta = t**2 - ratio**2 * tn**2
        shp = (-1, *([1] * (1 + len(spatial))))
        fwd = Gaussian(ratio.reshape(shp) * x_n, beta.reshape(shp).expand(b, 1, *spatial)).log_prob(x_t)

        def log_marg(x, tt, shp=shp):
            a = (1 - tt).reshape(shp)
            var = a.square() * sd**2 + tt.reshape(shp).square()
            lp = torch.stack(
                [
                    Gaussian(
                        (a * centers[j].reshape(1, 2, *([1] * len(spatial)))).expand(b, 2, *spatial),
                        var.expand(b, 1, *spatial),
                    ).log_prob(x)
                    for j in range(4)
                ]
            )
            return torch.logsumexp(lp, 0) - math.log(4)

        expect = fwd + log_marg(x_n, tn) - log_marg(x_t, t)
        assert torch.allclose(q.log_prob(x_n), expect, atol=1e-9)


def test_u_x0_conversions_roundtrip():
    gm = random_gm(spatial=(2,))
    x_t = torch.randn(3, 2, 2, dtype=D)
    t = torch.tensor([0.2, 0.7, 1.0], dtype=D)
    x0 = gm.u_to_x0(x_t, t)
    assert torch.allclose(x0.mean(), x_t - t.reshape(3, 1, 1) * gm.mean(), atol=1e-12)
    back = x0.x0_to_u(x_t, t)
    assert torch.allclose(back.means, gm.means, atol=1e-10)
    assert torch.allclose(back.logstds, gm.logstds, atol=1e-12)


def test_oracle_u_and_x0_posteriors_agree():
    data = ring_gmm()
    x_t = torch.randn(6, 2, dtype=D) * 3
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95, 1.0], dtype=D)
    a = data.posterior_u(x_t, t).u_to_x0(x_t, t)
    b = data.posterior_x0(x_t, t)
    assert torch.allclose(a.means, b.means, atol=1e-10)
    assert torch.allclose(a.logstds, b.logstds, atol=1e-10)
    # t = 0: u-GM stays finite and its mean is -x0
    u0 = data.posterior_u(x_t, torch.zeros(6, dtype=D))
    assert torch.isfinite(u0.means).all() and torch.allclose(u0.mean(), -x_t, atol=1e-10)


def test_constructor_validates_shapes_and_dtypes():
    m = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="logweights"):
        GaussianMixture(m, torch.zeros(2, 3, 4), torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="logstds"):
        GaussianMixture(m, torch.zeros(2, 3, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 1, 1))
    with pytest.raises(TypeError, match="dtype"):
        GaussianMixture(m, torch.zeros(2, 3, 1, dtype=D), torch.zeros(2, 1, 1))
    with pytest.raises(TypeError, match="floating"):
        GaussianMixture(m.long(), torch.zeros(2, 3, 1), torch.zeros(2, 1, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        GaussianMixture([0.0], torch.zeros(2, 3, 1), torch.zeros(2, 1, 1))
    gm = GaussianMixture(m, torch.log_softmax(torch.zeros(2, 3, 1), 1), torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="one scalar per sample"):
        GaussianMixture(
            torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 1, 3), torch.zeros(2, 1, 1, 1)
        ).mul_gaussian(Gaussian(torch.zeros(2, 4, 3), torch.ones(2, 1, 3)))


def test_nonfinite_fields_names_each_bad_parameter():
    gm = random_gm(spatial=(3,))
    assert gm.nonfinite_fields() == ()
    nan, inf = float("nan"), float("inf")
    cases = {
        "means": (gm.means.clone().index_put_((torch.tensor([1]),), torch.tensor(nan, dtype=D)), "means"),
        "logstds": (gm.logstds.clone().fill_(inf), "logstds"),
        "logweights": (gm.logweights.clone().fill_(nan), "logweights"),
    }
    for field, (bad, name) in cases.items():
        parts = {"means": gm.means, "logweights": gm.logweights, "logstds": gm.logstds, field: bad}
        assert GaussianMixture(**parts).nonfinite_fields() == (name,)
    both = GaussianMixture(cases["means"][0], gm.logweights, cases["logstds"][0])
    assert both.nonfinite_fields() == ("means", "logstds")
    lw = gm.logweights.clone()
    lw[:, 0] = inf
    assert GaussianMixture(gm.means, lw, gm.logstds).nonfinite_fields() == ("logweights",)
    lw[:, 0] = -inf  # a component of weight zero is a valid mixture
    assert GaussianMixture(gm.means, lw, gm.logstds).nonfinite_fields() == ()
    # finite values whose sum overflows (the quick check's false alarm) are still finite
    big = torch.full_like(gm.means, 3e38, dtype=torch.float32)
    gm32 = GaussianMixture(big, gm.logweights.float(), gm.logstds.float())
    assert gm32.nonfinite_fields() == ()
    assert GaussianMixture(big.clone().fill_(inf), gm32.logweights, gm32.logstds).nonfinite_fields() == (
        "means",
    )


def test_gaussian_and_transition_coefficients_are_reexported():
    assert gmflow.gm.Gaussian is gmflow.gaussian.Gaussian is Gaussian
    assert gmflow.gm.reverse_transition_coefs is gmflow.gaussian.reverse_transition_coefs
