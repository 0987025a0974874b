"""Knothe–Rosenblatt transport GM <-> N(0, I)."""

import pytest
import torch

from gmflow import GaussianMixture
from gmflow.kr import principal_axes

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
    x = gm.from_standard_normal(z)
    z2 = gm.to_standard_normal(x)
    assert torch.allclose(z, z2, atol=1e-7)
    x2 = gm.from_standard_normal(z2)
    assert torch.allclose(x, x2, atol=1e-7)


def test_roundtrip_fp32_default_newton_steps():
    gm = gm_batch(dtype=torch.float32)
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    x = gm.from_standard_normal(z)
    assert x.dtype == torch.float32
    assert torch.allclose(gm.to_standard_normal(x), z, atol=2e-3)


def test_pushforward_of_gaussian_is_the_gm():
    """Inverse KR of N(0, I) samples has the GM's moments; forward KR of GM samples is N(0, I)."""
    gm = gm_batch(b=1, k=3, c=2, spatial=(1,), seed=5)
    n = 20000
    rep = GaussianMixture(
        gm.means.expand(1, 3, 2, n).contiguous(), gm.logweights.expand(1, 3, 1, n).contiguous(), gm.logstds
    )
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, n, generator=gen, dtype=D)
    x = rep.from_standard_normal(z)
    w = gm.weights[0, :, 0, 0]
    mu = gm.means[0, :, :, 0]
    mean = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (mu - mean)[:, :, None] * (mu - mean)[:, None, :]).sum(0) + gm.var.flatten()[
        0
    ] * torch.eye(2, dtype=D)
    assert torch.allclose(x[0].mean(1), mean, atol=0.05)
    assert torch.allclose(torch.cov(x[0]), cov, atol=0.1, rtol=0.05)
    zz = rep.to_standard_normal(rep.sample(gen))
    assert torch.allclose(zz[0].mean(1), torch.zeros(2, dtype=D), atol=0.04)
    assert torch.allclose(torch.cov(zz[0]), torch.eye(2, dtype=D), atol=0.05)


def test_tails_are_finite():
    gm = gm_batch(spatial=(2,))
    z = torch.tensor([-7.5, 0.0, 7.5], dtype=D).reshape(1, 3, 1).expand(2, 3, 2).contiguous()
    x = gm.from_standard_normal(z)
    assert torch.isfinite(x).all()
    assert torch.allclose(gm.to_standard_normal(x), z, atol=1e-5)


def test_principal_axes_are_orthonormal_and_sorted():
    gm = gm_batch(spatial=(3,))
    v = principal_axes(gm)
    eye = torch.eye(3, dtype=D).expand(2, 3, 3)
    assert torch.allclose(v.transpose(1, 2) @ v, eye, atol=1e-10)
