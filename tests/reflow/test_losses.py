"""Simple ReFlow loss pieces: normalisation (per sample, learned) and the FFT-mask HPF distance."""

from __future__ import annotations

import math

import pytest
import torch

from gmflow.reflow import error_distance, hpf_mask, log_loss_fit, normalized, normalized_by, reflow_distance


# ------------------------------------------------------------------------------------------ normalisation
def test_normalized_value_is_one_and_gradient_is_grad_log():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def per_sample(w):
        return ((w - x) ** 2).sum(1) * torch.linspace(0.1, 10.0, 5, dtype=torch.float64)

    val = normalized(per_sample(w), floor=1e-300)
    assert torch.allclose(val, torch.ones(5, dtype=torch.float64), atol=0, rtol=1e-15)
    (grad,) = torch.autograd.grad(val.sum(), w)
    (ref,) = torch.autograd.grad(per_sample(w).log().sum(), w)
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-14)
    # below the floor the value is l / floor and the gradient grad l / floor
    tiny = normalized(torch.tensor([1e-6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(tiny, torch.tensor([1e-2, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="floor"):
        normalized(tiny, floor=0.0)


def test_normalized_gradient_by_finite_differences():
    w0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def loss(w):  # one sample
        return (w.square() * torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)).sum().reshape(1) + 0.1

    w = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(normalized(loss(w)).sum(), w)
    h = 1e-6
    fd = torch.stack(
        [(loss(w0 + h * e).log() - loss(w0 - h * e).log()).sum() / (2 * h) for e in torch.eye(3)]
    )
    assert torch.allclose(g, fd.to(g), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ HPF
def _checkerboard(c: int, h: int, w: int) -> torch.Tensor:
    """The Nyquist pattern (-1)^(i + j): all its energy sits in the highest-frequency bin."""
    cb = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2.0 - 1.0).to(torch.float64)
    return cb.expand(1, c, h, w).clone()


def test_hpf_mask_bins():
    m = hpf_mask(32, 32, 3.0)
    assert m[0, 0] == 0.25 and m[16, 16] == 1.0  # DC is low, Nyquist is high
    assert int((m < 1).sum()) == 21  # the bins within 0.1 * 16 sqrt(2) = 2.26 of DC
    assert torch.equal(m, m.flip(0).roll(1, 0).flip(1).roll(1, 1))  # M(k) = M(-k): real in, real out
    assert int((hpf_mask(16, 16, 1.0) < 1).sum()) == 5 and torch.all(hpf_mask(8, 8, 0.0) == 1.0)


def test_hpf_lambda_zero_is_mse():
    g = torch.Generator().manual_seed(1)
    d, x0 = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    ref = (d - x0).square().flatten(1).mean(1)
    assert torch.allclose(reflow_distance(d, x0), ref)
    assert torch.allclose(reflow_distance(d, x0, hpf_lambda=0.0), ref)
    v, v0 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)  # vector data at lambda = 0
    assert torch.allclose(reflow_distance(v, v0), (v - v0).square().mean(1))
    # Parseval: lambda > 0 with an empty low disc is the MSE too
    assert torch.allclose(error_distance(d - x0, hpf_lambda=5.0, radius=0.0), ref, rtol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 10.0, 1000.0])
def test_constant_error_costs_one_over_one_plus_lambda_squared(lam):
    err = torch.full((3, 2, 16, 12), 0.3, dtype=torch.float64)
    err[1] = -2.5
    mse = err.square().flatten(1).mean(1)
    torch.testing.assert_close(
        error_distance(err, hpf_lambda=lam), mse / (1.0 + lam) ** 2, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (2, 28, 28)])
def test_high_frequency_pattern_costs_exactly_its_mse(shape):
    cb = 0.7 * _checkerboard(*shape)
    torch.testing.assert_close(error_distance(cb, hpf_lambda=10.0), cb.square().flatten(1).mean(1))


def test_hpf_is_the_masked_quadratic_form():
    """d(e) = mean |IDFT(M DFT(e))|^2 (the definition) and the form is positive definite."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(5, 2, 10, 10, generator=g, dtype=torch.float64)
    lam = 4.0
    m = hpf_mask(10, 10, lam)
    filtered = torch.fft.ifft2(m * torch.fft.fft2(e))
    assert filtered.imag.abs().max() < 1e-12  # the symmetric mask keeps real errors real
    torch.testing.assert_close(error_distance(e, hpf_lambda=lam), filtered.abs().square().flatten(1).mean(1))
    n = 2 * 10 * 10
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 2, 10, 10)
    filt = torch.fft.ifft2(m * torch.fft.fft2(basis)).real.reshape(n, n)
    q = filt @ filt.T  # d(e) = e^T Q e / n
    assert torch.linalg.eigvalsh(q).min() >= (1.0 + lam) ** -2 - 1e-10


def test_hpf_minimiser_is_the_mean():
    """argmin_D E_x0 d(D, x0) over one prediction D is E[x0]: the gradient vanishes exactly there."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 2, 8, 8, generator=g, dtype=torch.float64) * 2.0 + 0.5
    x0[:, :, ::2] += 1.0  # structured data with high frequencies

    def expected_loss(d):
        return reflow_distance(d.expand_as(x0), x0, hpf_lambda=10.0).mean()

    mean = x0.mean(0, keepdim=True).requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_loss(mean), mean)
    assert grad.abs().max() < 1e-12
    other = (x0.median(0, keepdim=True).values + 0.01).requires_grad_(True)
    (grad2,) = torch.autograd.grad(expected_loss(other), other)
    assert grad2.abs().max() > 1e-4
    assert expected_loss(other) > expected_loss(mean)


def test_hpf_errors():
    v = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="image data"):
        reflow_distance(v, v, hpf_lambda=1.0)
    with pytest.raises(ValueError, match="hpf_lambda"):
        reflow_distance(v, v, hpf_lambda=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        reflow_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="radius"):
        hpf_mask(4, 4, 1.0, radius=-0.1)


# ------------------------------------------------------------------------------------- learned normaliser
def test_normalized_by_and_log_loss_fit():
    l = torch.tensor([0.5, 2.0, 1e-6], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.0, math.log(2.0), -30.0], dtype=torch.float64, requires_grad=True)
    v = normalized_by(l, g, floor=1e-4)
    torch.testing.assert_close(v.detach(), torch.tensor([0.5, 1.0, 1e-2], dtype=torch.float64))
    (gl,) = torch.autograd.grad(v.sum(), l)
    torch.testing.assert_close(gl, torch.tensor([1.0, 0.5, 1e4], dtype=torch.float64))  # no grad to g
    fit = log_loss_fit(l, g)
    assert fit[1].abs() < 1e-12 and (fit >= 0).all()
    (gg,) = torch.autograd.grad(fit.sum(), g)
    assert gg[1].abs() < 1e-12 and gg[0] > 0  # pushes g = 0 down towards log 0.5


def test_learned_normaliser_converges_to_log_conditional_mean():
    """A LogLossNet fitted with log_loss_fit on l ~ c(t) * Exp(1) learns log E[l | t] = log c(t)."""
    from gmflow.nn import LogLossNet

    torch.manual_seed(0)
    net = LogLossNet((2,), width=32, time_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def c(t):
        return 0.01 * torch.exp(5.0 * t)  # E[l | t]; l is random given (x_t, t)

    net.initialize(math.log(float(c(torch.rand(4096, generator=gen)).mean())))
    for i in range(1500):
        if i == 1000:
            opt.param_groups[0]["lr"] = 1e-3
        t = torch.rand(256, generator=gen)
        x = torch.randn(256, 2, generator=gen)  # uninformative x_t
        l = c(t) * -torch.log(torch.rand(256, generator=gen))  # exponential, mean c(t)
        loss = log_loss_fit(l, net(x, t)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.linspace(0.05, 0.95, 19)
    with torch.no_grad():
        pred = net(torch.randn(19, 2, generator=gen), t)
    err = (pred - c(t).log()).abs()
    assert err.max() < 0.15 and err.mean() < 0.06, err
    # E[log l | t] = log c(t) - 0.577 (Euler's gamma): the fit is the log-mean, not the mean log
    assert (pred - (c(t).log() - 0.5772)).abs().mean() > 0.4
