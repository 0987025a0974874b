"""Spectral GM sampling and the spectral loss: the Hartley representation, the official fixture's
``spectral.*`` sample, the KR round trip, flat spectrum = plain GM sampling in distribution, the
loss's closed form, its expectation under spectral samples, and input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gmflow import GaussianMixture, spectral_loss, spectral_sample
from gmflow.kr import gm_to_standard_normal
from gmflow.nn import SpectrumMLP
from gmflow.spectral import field_to_hartley, hartley_to_field, spectral_log_ratio, spectral_noise

D = torch.float64
FIXTURE = Path(__file__).parent / "fixtures" / "official_gmdit"


def cas_matrix(h: int, w: int) -> torch.Tensor:
    """Orthonormal 2-D Hartley matrix ``cas(-2 pi (k1 n1 / H + k2 n2 / W)) / sqrt(HW)`` on flattened grids."""
    k1, k2 = (
        k.reshape(-1, 1)
        for k in torch.meshgrid(torch.arange(h, dtype=D), torch.arange(w, dtype=D), indexing="ij")
    )
    theta = 2 * math.pi * (k1 * k1.T / h + k2 * k2.T / w)
    return (torch.cos(theta) - torch.sin(theta)) / math.sqrt(h * w)


def gm_images(b=2, k=3, c=2, h=4, w=4, seed=0, logstd=-1.0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, h, w, generator=g, dtype=dtype) * 1.5
    logits = torch.randn(b, k, 1, h, w, generator=g, dtype=dtype)
    return GaussianMixture.from_logits(means, logits, torch.full((b, 1, 1, 1, 1), logstd, dtype=dtype))


def repeat(gm: GaussianMixture, n: int) -> GaussianMixture:
    """``n`` copies of the first GM of the batch."""
    return GaussianMixture(*(p[:1].expand(n, *p.shape[1:]) for p in (gm.means, gm.logweights, gm.logstds)))


def low_pass(c: int, h: int, w: int, dtype=D) -> torch.Tensor:
    """A log power spectrum with mean power 1 that favours low signed frequencies."""
    fh = torch.fft.fftfreq(h, dtype=dtype).abs().reshape(-1, 1)
    fw = torch.fft.fftfreq(w, dtype=dtype).abs().reshape(1, -1)
    lps = -8.0 * (fh + fw).expand(c, h, w)
    return lps - torch.logsumexp(lps.flatten(1), -1).reshape(c, 1, 1) + math.log(h * w)


# ------------------------------------------------------------------ Hartley representation
@pytest.mark.parametrize("size", [(4, 6), (3, 5), (1, 4), (8, 8)])
def test_hartley_maps_are_the_orthonormal_cas_transform_and_its_own_inverse(size):
    h, w = size
    z = torch.randn(2, 3, h, w, dtype=D, generator=torch.Generator().manual_seed(0))
    m = cas_matrix(h, w)
    want = (z.reshape(2, 3, -1) @ m.T).reshape(z.shape)
    assert torch.allclose(field_to_hartley(z), want, atol=1e-12)
    assert torch.allclose(hartley_to_field(z), want, atol=1e-12)  # the same involution
    assert torch.allclose(hartley_to_field(field_to_hartley(z)), z, atol=1e-12)
    assert torch.allclose(m @ m.T, torch.eye(h * w, dtype=D), atol=1e-12)


def test_spectral_noise_has_covariance_hc_diag_v_hc():
    c, h, w, n = 1, 3, 4, 40000
    gen = torch.Generator().manual_seed(1)
    m = cas_matrix(h, w)
    for lps in (torch.zeros(c, h, w, dtype=D), low_pass(c, h, w)):
        zeta = spectral_noise(lps.expand(n, c, h, w), gen).reshape(n, -1)
        want = m @ torch.diag(lps.exp().reshape(-1)) @ m.T
        assert (torch.cov(zeta.T) - want).abs().max() < 0.04
    assert (want - torch.eye(h * w, dtype=D)).abs().max() > 0.3  # the low-pass field is correlated


# ------------------------------------------------------------------ official fixture
@pytest.fixture(scope="module")
def steps() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "scheduler_steps.safetensors")


def test_spectral_sample_matches_the_official_fixture(steps):
    gm = GaussianMixture(*(steps[f"spectral.x0_gm.{k}"] for k in ("means", "logweights", "logstds")))
    surrogate = gm.to_gaussian()
    # not bit-equal on every CPU: the softmax's float32 exp differs by an ulp between machines
    torch.testing.assert_close(surrogate.mean, steps["spectral.iso_gaussian.mean"], atol=1e-6, rtol=0)
    assert torch.allclose(surrogate.var, steps["spectral.iso_gaussian.var"], atol=1e-6)
    net = SpectrumMLP.from_pretrained(FIXTURE / "spectrum_net")
    with torch.no_grad():
        lps = net(surrogate.mean, surrogate.var)
    assert (lps - steps["spectral.log_power_spectrum"]).abs().max() <= 1e-5
    lps = steps["spectral.log_power_spectrum"]
    # the recorded draw: randn (B, 1, C, H, W) from generator seed 13 = our one randn of (B, C, H, W)
    n = torch.randn(lps.shape, generator=torch.Generator().manual_seed(13))
    assert torch.equal(n, steps["spectral.randn"][:, 0])
    zeta = spectral_noise(lps, torch.Generator().manual_seed(13))
    assert (zeta - steps["spectral.gaussian_samples"][:, 0]).abs().max() <= 1e-6
    x = spectral_sample(gm, lps, torch.Generator().manual_seed(13))
    assert x.dtype == torch.float32 and x.shape == (2, 4, 8, 8)
    assert (x - steps["spectral.gm_samples"][:, 0]).abs().max() <= 2e-5


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("dtype,atol", [(D, 1e-9), (torch.float32, 1e-4)])
def test_kr_round_trip_inside_spectral_sampling(dtype, atol):
    gm = gm_images(b=3, k=4, c=3, h=4, w=5, dtype=dtype)
    lps = low_pass(3, 4, 5, dtype).expand(3, 3, 4, 5) + 0.3 * torch.randn(3, 3, 4, 5, dtype=dtype)
    x = spectral_sample(gm, lps, torch.Generator().manual_seed(7))
    n = torch.randn(lps.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    z_r = field_to_hartley(gm_to_standard_normal(gm, x))
    assert (z_r * torch.exp(-0.5 * lps) - n).abs().max() < atol
    # and log q^S/q at the sample is log N(z_r; 0, v) - log N(z_r; 0, I) of the drawn coefficients
    want = (-0.5 * (z_r.square() * torch.expm1(-lps) + lps)).flatten(1).sum(1)
    assert torch.allclose(spectral_log_ratio(gm, x, lps), want, atol=1e-5)


def _ks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-sample Kolmogorov-Smirnov statistics over the first axis, ``(n, *F) -> (*F)``."""
    a, b = a.flatten(1).T.sort(-1).values, b.flatten(1).T.sort(-1).values
    both = torch.cat([a, b], -1)
    fa = torch.searchsorted(a.contiguous(), both.contiguous(), right=True) / a.shape[-1]
    fb = torch.searchsorted(b.contiguous(), both.contiguous(), right=True) / b.shape[-1]
    return (fa - fb).abs().amax(-1)


def _close(a: torch.Tensor, b: torch.Tensor, z: float = 5.0) -> bool:
    """Sample means of per-draw statistics ``(n, *F)`` agree within ``z`` standard errors everywhere."""
    se = torch.sqrt((a.var(0) + b.var(0)) / a.shape[0])
    return bool(((a.mean(0) - b.mean(0)).abs() <= z * se).all())


def _same_distribution(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Per-pixel KS, means, variances and horizontal / vertical neighbour covariances agree."""
    if bool((_ks(a, b) > 2.23 * math.sqrt(2.0 / a.shape[0])).any()):  # alpha = 1e-4 per pixel
        return False
    da, db = a - a.mean(0), b - b.mean(0)
    stats = [(a, b), (da.square(), db.square())]
    stats += [(da * da.roll(1, dim), db * db.roll(1, dim)) for dim in (-1, -2)]
    return all(_close(sa, sb) for sa, sb in stats)


def test_flat_spectrum_equals_plain_gm_sampling_in_distribution():
    n = 6000
    gm = repeat(gm_images(b=1, k=3, c=2, h=4, w=4, seed=3, logstd=-0.7), n)
    plain = gm.sample(torch.Generator().manual_seed(0))
    flat = spectral_sample(gm, torch.zeros(n, 2, 4, 4, dtype=D), torch.Generator().manual_seed(1))
    assert _same_distribution(flat, plain)
    coloured = spectral_sample(gm, low_pass(2, 4, 4).expand(n, 2, 4, 4), torch.Generator().manual_seed(1))
    assert not _same_distribution(coloured, plain)  # the check detects a wrong spectrum


# ------------------------------------------------------------------ spectral loss
def test_spectral_loss_equals_its_closed_form_on_a_tiny_case():
    # C = 1, K = 1: the KR map is (x0 - mu) / s and z_r its explicit Hartley transform
    torch.manual_seed(0)
    b, h, w = 2, 2, 3
    mu = torch.randn(b, 1, 1, h, w, dtype=D)
    logs = torch.tensor([-0.5, 0.2], dtype=D).reshape(b, 1, 1, 1, 1)
    gm = GaussianMixture(mu, torch.zeros(b, 1, 1, h, w, dtype=D), logs)
    x0 = torch.randn(b, 1, h, w, dtype=D)
    net = SpectrumMLP(base_size=[1, h, w], layers=[4]).double()
    torch.nn.init.normal_(net.mlp[-1].weight)
    lps = net(mu[:, 0], logs.exp().square().reshape(b, 1, 1, 1).expand(b, 1, h, w)).detach()
    z_r = ((x0 - mu[:, 0]) / logs[:, 0].exp()).reshape(b, -1) @ cas_matrix(h, w).T
    closed = (z_r.square() * (torch.exp(-lps.reshape(b, -1)) - 1) + lps.reshape(b, -1)).sum(1) / (2 * h * w)
    per = spectral_loss(net, gm, x0, reduction="none")
    assert per.shape == (b,)
    assert torch.allclose(per, closed, atol=1e-12)
    assert torch.allclose(spectral_loss(net, gm, x0), closed.mean(), atol=1e-12)
    assert torch.allclose(spectral_loss(net, gm, x0, reduction="sum"), closed.sum(), atol=1e-12)


def test_spectral_loss_trains_only_the_net():
    gm = gm_images(b=2, k=3, c=2, h=4, w=4, dtype=torch.float32)
    means = gm.means.clone().requires_grad_(True)
    gm = GaussianMixture(means, gm.logweights, gm.logstds)
    net = SpectrumMLP(base_size=[2, 4, 4], layers=[8])
    x0 = torch.randn(2, 2, 4, 4, requires_grad=True)
    spectral_loss(net, gm, x0).backward()
    assert means.grad is None and x0.grad is None
    assert net.mlp[-1].weight.grad is not None and net.mlp[-1].weight.grad.abs().max() > 0


def test_spectral_loss_expectation_under_spectral_samples():
    """For x0 ~ q^S(lps*), E[L(lps)] = 1/(2HW) sum [v*(1/v - 1) + log v], minimal at lps = lps*."""
    n, c, h, w = 4000, 2, 4, 4
    gm = repeat(gm_images(b=1, k=3, c=c, h=h, w=w, seed=5), n)
    true = low_pass(c, h, w)
    x0 = spectral_sample(gm, true.expand(n, c, h, w), torch.Generator().manual_seed(2))
    for lps in (true, torch.zeros(c, h, w, dtype=D), 0.5 * true):
        loss = spectral_loss(lambda m, v, lps=lps: lps.expand(m.shape), gm, x0)  # noqa: B023
        want = (true.exp() * torch.expm1(-lps) + lps).sum() / (2 * h * w)
        assert abs(float(loss) - float(want)) < 0.02
    assert float(want) > float((true.exp() * torch.expm1(-true) + true).sum() / (2 * h * w))


def test_log_ratio_is_the_same_in_u_space():
    """x0 = x_t - t u flips the sign of the KR map; the spectral term does not change."""
    gm_u = gm_images(b=2, k=3, c=2, h=4, w=3, seed=4)
    x_t = torch.randn(2, 2, 4, 3, dtype=D)
    t = torch.tensor([0.7, 0.3], dtype=D)
    u = torch.randn(2, 2, 4, 3, dtype=D)
    x0 = x_t - t.reshape(-1, 1, 1, 1) * u
    lps = 0.5 * torch.randn(2, 2, 4, 3, dtype=D)
    a = spectral_log_ratio(gm_u.u_to_x0(x_t, t), x0, lps)
    assert torch.allclose(a, spectral_log_ratio(gm_u, u, lps), atol=1e-9)


# ------------------------------------------------------------------ input checks
def test_bad_inputs_name_the_argument():
    gm = gm_images(b=2, c=2, h=4, w=4)
    net = SpectrumMLP(base_size=[2, 4, 4], layers=[8]).double()
    x0 = torch.zeros(2, 2, 4, 4, dtype=D)
    with pytest.raises(ValueError, match=r"log_power must have the GM's sample shape \(2, 2, 4, 4\)"):
        spectral_sample(gm, torch.zeros(2, 2, 4, 3, dtype=D))
    vec = GaussianMixture(torch.zeros(2, 3, 2, dtype=D), torch.full((2, 3, 1), -math.log(3), dtype=D),
                          torch.zeros(2, 1, 1, dtype=D))  # fmt: skip
    with pytest.raises(ValueError, match=r"needs a GM over \(B, C, H, W\) images"):
        spectral_sample(vec, torch.zeros(2, 2, dtype=D))
    with pytest.raises(ValueError, match=r"x0 must have gm_x0's sample shape \(2, 2, 4, 4\)"):
        spectral_loss(net, gm, torch.zeros(2, 2, 4, 5, dtype=D))
    with pytest.raises(TypeError, match="gm_x0 must be a gmflow.GaussianMixture"):
        spectral_loss(net, x0, x0)
    with pytest.raises(ValueError, match=r"spectrum_net must return a log power spectrum of shape"):
        spectral_loss(lambda m, v: m[:, :1], gm, x0)
    with pytest.raises(TypeError, match="spectrum_net must be callable"):
        spectral_loss(None, gm, x0)
    with pytest.raises(ValueError, match="reduction must be"):
        spectral_loss(net, gm, x0, reduction="avg")
    with pytest.raises(ValueError, match=r"x0 must have the sample shape"):
        spectral_log_ratio(gm, x0[:1], torch.zeros(2, 2, 4, 4, dtype=D))
    with pytest.raises(TypeError, match="z_r must be a floating-point"):
        hartley_to_field(torch.zeros(4, 4, dtype=torch.int64))
