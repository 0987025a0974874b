"""The prepared x0-GM and its re-anchored field against the plain GaussianMixture operations."""

import pytest
import torch

from gmflow import GaussianMixture
from gmflow.sampling.solvers.gm_field import GMField, PreparedGM, Tilt

D = torch.float64
SHAPES = [(64, 6, 2), (12, 5, 3, 4, 4), (10, 4, 1, 8, 8), (16, 3, 10)]  # vectors, images, C > 8 channels


def _random_gm(shape, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    b, k = shape[:2]
    sp = shape[3:]
    return GaussianMixture.from_logits(
        torch.randn(shape, generator=g, dtype=dtype),
        2 * torch.randn(b, k, 1, *sp, generator=g, dtype=dtype),
        -1.0 + 0.3 * torch.randn(b, 1, 1, *[1] * len(sp), generator=g, dtype=dtype),
    )


def _random_tilt(gm, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, nd = gm.batch_size, gm.means.dim()
    zeta = torch.rand(b, *[1] * (nd - 2), generator=g, dtype=gm.dtype)
    return Tilt(zeta, torch.randn(b, *gm.event_shape, generator=g, dtype=gm.dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_moments_match_the_gaussian_mixture(shape):
    gm = _random_gm(shape)
    prep = PreparedGM(gm)
    assert torch.allclose(prep.unflat(prep.mean()), gm.mean(), atol=1e-13)
    got, want = prep.surrogate(), gm.to_gaussian(spatial_average=True)
    assert got.var.shape == want.var.shape and got.mean.shape == want.mean.shape
    assert torch.allclose(got.mean, want.mean, atol=1e-13) and torch.allclose(got.var, want.var, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tilted", [False, True])
def test_field_is_the_mean_of_the_reanchored_gm(shape, tilted):
    gm = _random_gm(shape)
    tilt = _random_tilt(gm) if tilted else None
    src = gm.tilt(tilt.zeta.reshape(-1), tilt.nu) if tilted else gm
    prep = PreparedGM(gm)
    x = torch.randn(gm.batch_size, *gm.event_shape, dtype=D)
    field = GMField(prep, prep.flat(x), 0.7, tilt)
    assert torch.allclose(prep.unflat(field.mean0()), src.mean(), atol=1e-12)
    for tau in (0.7, 0.4, 0.05):
        y = torch.randn_like(x)
        want = src.reanchor(x, 0.7, y, tau).mean()
        assert torch.allclose(prep.unflat(field.mean(prep.flat(y), tau)), want, atol=1e-10), tau
    # tau = 0 is finite in the tau^2-scaled form: the mean is the point itself for an isotropic GM
    y = torch.randn_like(x)
    assert torch.allclose(prep.unflat(field.mean(prep.flat(y), 0.0)), y, atol=1e-12)


def test_delta_g_is_the_difference_of_g_and_stays_finite_where_u_vanishes():
    gm = _random_gm((8, 3, 2))
    prep = PreparedGM(gm)
    x = torch.randn(8, 2, dtype=D)
    f = GMField(prep, x, 0.6)
    g = [(1 - tau) / (f.u * f.energy(tau).sqrt()) for tau in (0.6, 0.35, 0.0)]
    for (ta, ga), (tb, gb) in [((0.6, g[0]), (0.35, g[1])), ((0.35, g[1]), (0.0, g[2]))]:
        assert torch.allclose(f.delta_g(ta, tb, f.energy(ta), f.energy(tb)), gb - ga, rtol=1e-10)
    # choose the tilt so that u = 1 - v A = 0 for every sample: g itself is undefined, its increment is not
    v = prep.v
    zeta0 = (0.4**2 / 0.6**2) - 1.0 / v
    f0 = GMField(prep, x, 0.6, Tilt(zeta0.reshape(8, 1), torch.zeros(8, 2, dtype=D)))
    assert torch.allclose(f0.u, torch.zeros_like(f0.u), atol=1e-12)
    dg = f0.delta_g(0.6, 0.2, f0.energy(0.6), f0.energy(0.2))
    assert bool(torch.isfinite(dg).all() and (dg > 0).all())


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_tilted_draws_are_those_of_the_materialised_tilt(shape):
    """Same generator, same draws (component uniforms, then the normal noise) as GaussianMixture.sample."""
    gm = _random_gm(shape)
    tilt = _random_tilt(gm)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = PreparedGM(gm).sample(tilt, g1)
    want = gm.tilt(tilt.zeta.reshape(-1), tilt.nu).sample(g2)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same number of draws
