"""Knothe–Rosenblatt transport GM <-> N(0, I)."""

import pytest
import torch
from torch.distributions import Normal

from gmflow import GaussianMixture
from gmflow.kr import gm_to_standard_normal, principal_axes, standard_normal_to_gm

D = torch.float64


def gm_batch(b=2, k=5, c=3, spatial=(4,), seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, *spatial, generator=g, dtype=dtype) * 2
    logits = torch.randn(b, k, 1, *spatial, generator=g, dtype=dtype)
    logstds = torch.full((b, 1, 1, *([1] * len(spatial))), -1.0, dtype=dtype)
    return GaussianMixture.from_logits(means, logits, logstds)


@pytest.mark.parametrize("spatial", [(), (4,), (2, 3)])
def test_roundtrip_fp64(spatial):
    gm = gm_batch(spatial=spatial)
    z = torch.randn(2, 3, *spatial, dtype=D, generator=torch.Generator().manual_seed(3))
    x = standard_normal_to_gm(gm, z)
    z2 = gm_to_standard_normal(gm, x)
    assert torch.allclose(z, z2, atol=1e-7)
    x2 = standard_normal_to_gm(gm, z2)
    assert torch.allclose(x, x2, atol=1e-7)


def test_roundtrip_fp32_default_newton_steps():
    gm = gm_batch(dtype=torch.float32)
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    x = standard_normal_to_gm(gm, z)
    assert x.dtype == torch.float32
    assert torch.allclose(gm_to_standard_normal(gm, x), z, atol=2e-3)


def test_pushforward_of_gaussian_is_the_gm():
    """Inverse KR of N(0, I) samples has the GM's moments; forward KR of GM samples is N(0, I)."""
    gm = gm_batch(b=1, k=3, c=2, spatial=(1,), seed=5)
    n = 20000
    rep = GaussianMixture(
        gm.means.expand(1, 3, 2, n).contiguous(), gm.logweights.expand(1, 3, 1, n).contiguous(), gm.logstds
    )
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, n, generator=gen, dtype=D)
    x = standard_normal_to_gm(rep, z)
    w = gm.weights[0, :, 0, 0]
    mu = gm.means[0, :, :, 0]
    mean = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (mu - mean)[:, :, None] * (mu - mean)[:, None, :]).sum(0) + gm.var.flatten()[
        0
    ] * torch.eye(2, dtype=D)
    assert torch.allclose(x[0].mean(1), mean, atol=0.05)
    assert torch.allclose(torch.cov(x[0]), cov, atol=0.1, rtol=0.05)
    zz = gm_to_standard_normal(rep, rep.sample(gen))
    assert torch.allclose(zz[0].mean(1), torch.zeros(2, dtype=D), atol=0.04)
    assert torch.allclose(torch.cov(zz[0]), torch.eye(2, dtype=D), atol=0.05)


def test_tails_are_finite():
    gm = gm_batch(spatial=(2,))
    z = torch.tensor([-7.5, 0.0, 7.5], dtype=D).reshape(1, 3, 1).expand(2, 3, 2).contiguous()
    x = standard_normal_to_gm(gm, z)
    assert torch.isfinite(x).all()
    assert torch.allclose(gm_to_standard_normal(gm, x), z, atol=1e-5)


def _averaged_covariance(gm):
    """sum_k A_k (mu_k - m)(mu_k - m)^T averaged over positions, (B, C, C), written out per position."""
    b, k, c = gm.means.shape[:3]
    mu = gm.means.reshape(b, k, c, -1)  # (B, K, C, P)
    w = gm.weights.reshape(b, k, 1, -1)
    m = (w * mu).sum(1, keepdim=True)
    d = mu - m
    return torch.einsum("bkip,bkjp->bij", w * d, d) / mu.shape[-1]


def test_principal_axes_are_orthonormal_and_sorted():
    gm = gm_batch(spatial=(3,))
    v = principal_axes(gm)
    eye = torch.eye(3, dtype=D).expand(2, 3, 3)
    assert torch.allclose(v.transpose(1, 2) @ v, eye, atol=1e-10)
    cov = _averaged_covariance(gm)
    lam = torch.einsum("bij,bjk,bkl->bil", v.transpose(1, 2), cov, v)  # V^T S V is diagonal ...
    diag = torch.diagonal(lam, dim1=1, dim2=2)
    assert torch.allclose(lam, torch.diag_embed(diag), atol=1e-10)
    assert bool((diag[:, :-1] >= diag[:, 1:]).all())  # ... with descending eigenvalues
    assert torch.allclose(diag, torch.linalg.eigvalsh(cov).flip(-1), atol=1e-10)


def test_forward_map_is_the_conditional_mixture_cdf_chain():
    """z_j = Phi^{-1}(F_j(x'_j | x'_{<j})) in the principal basis x' = V^T x, with F_j the 1-D mixture
    CDF whose weights are A_k N(x'_{<j}; mu'_k, s^2) renormalised (written with torch.distributions)."""
    gm = gm_batch(b=2, k=4, c=3, spatial=(), seed=7)
    x = gm.sample(torch.Generator().manual_seed(8))
    v = principal_axes(gm)
    xr = torch.einsum("bcd,bc->bd", v, x)  # V^T x
    mur = torch.einsum("bcd,bkc->bkd", v, gm.means)  # rotated component means (B, K, C)
    s = gm.logstds.exp().reshape(2, 1)
    std_normal = Normal(torch.zeros((), dtype=D), torch.ones((), dtype=D))
    logw = gm.logweights[:, :, 0]  # (B, K)
    want = torch.empty_like(xr)
    for j in range(3):
        w = torch.softmax(logw, dim=1)
        comp = Normal(mur[:, :, j], s)
        want[:, j] = std_normal.icdf((w * comp.cdf(xr[:, j : j + 1])).sum(1))
        logw = logw + comp.log_prob(xr[:, j : j + 1])
    assert torch.allclose(gm_to_standard_normal(gm, x), want, atol=1e-9)


def test_fp32_inverse_converges_to_the_fp64_solution():
    """Converged Newton iterates land on a bracket end point and must stay there (16 fp32 steps)."""
    gm = gm_batch(k=8, spatial=(64,), dtype=torch.float32)
    z = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    x = standard_normal_to_gm(gm, z)
    x64 = standard_normal_to_gm(gm.to(dtype=D), z.to(D))
    assert (x.to(D) - x64).abs().max() < 1e-3
    assert (standard_normal_to_gm(gm, z, newton_steps=64) - x).abs().max() < 1e-5  # no drift


def test_early_stop_of_the_inverse_keeps_its_accuracy(monkeypatch):
    """Stopping once no iterate moves (checked every few iterations) = running every Newton step."""
    import gmflow.kr as kr

    gm = gm_batch(k=8, spatial=(64,), dtype=torch.float32)
    z = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    early = standard_normal_to_gm(gm, z)
    monkeypatch.setattr(kr, "_CHECK_EVERY", 10**9)
    torch.testing.assert_close(early, standard_normal_to_gm(gm, z), rtol=0, atol=1e-5)
