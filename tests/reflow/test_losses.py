"""Simple ReFlow loss pieces: per-sample normalisation and the high-pass-filter (HPF) distance."""

from __future__ import annotations

import pytest
import torch

from gmflow.reflow import error_distance, hpf_operator, normalized, reflow_distance
from gmflow.reflow.losses import gaussian_kernel1d


def _matrix_of(op, shape: tuple[int, ...]) -> torch.Tensor:
    """Dense matrix of a linear image operator acting on one (C, H, W) image."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return op(basis).reshape(n, n).T


# ------------------------------------------------------------------------------------------ normalisation
def test_normalized_value_is_one_and_gradient_is_grad_log():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def per_sample(w):
        return ((w - x) ** 2).sum(1) * torch.linspace(0.1, 10.0, 5, dtype=torch.float64)

    val = normalized(per_sample(w), eps=0.0)
    assert torch.allclose(val, torch.ones(5, dtype=torch.float64), atol=0, rtol=1e-15)
    (grad,) = torch.autograd.grad(val.sum(), w)
    (ref,) = torch.autograd.grad(per_sample(w).log().sum(), w)
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-14)
    # with the default eps the value is 1 up to eps / l
    assert torch.allclose(normalized(per_sample(w)), torch.ones(5, dtype=torch.float64), atol=1e-6)


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
def test_gaussian_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel1d(1.5)
    assert k.numel() == 2 * 5 + 1
    assert torch.isclose(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(k, k.flip(0))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(0.0)


def test_hpf_lambda_zero_is_mse():
    g = torch.Generator().manual_seed(1)
    d, x0 = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    ref = (d - x0).square().flatten(1).mean(1)
    assert torch.allclose(reflow_distance(d, x0), ref)
    assert torch.allclose(reflow_distance(d, x0, hpf_lambda=0.0), ref)
    v, v0 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)  # vector data at lambda = 0
    assert torch.allclose(reflow_distance(v, v0), (v - v0).square().mean(1))


def test_hpf_kills_constants_and_passes_high_frequencies():
    const = torch.full((2, 3, 8, 8), 0.7, dtype=torch.float64)
    const[1] = -2.5
    assert hpf_operator(const).abs().max() < 1e-14
    # a constant error has no high-pass energy: the HPF distance equals the MSE
    err = torch.full((2, 1, 8, 8), 0.3, dtype=torch.float64)
    assert torch.allclose(error_distance(err, hpf_lambda=10.0), err.square().flatten(1).mean(1))
    # a pixel-level checkerboard is almost all high frequency
    cb = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    cb = cb.to(torch.float64).reshape(1, 1, 8, 8)
    assert hpf_operator(cb).square().mean() > 0.5 * cb.square().mean()


def test_hpf_is_linear_per_channel_and_spd():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64).unbind(0)
    a, b = a[None], b[None]
    assert torch.allclose(hpf_operator(2.0 * a - 3.0 * b), 2.0 * hpf_operator(a) - 3.0 * hpf_operator(b))
    # per channel: channel 1 of the input does not affect channel 0 of the output
    a2 = a.clone()
    a2[:, 1] += torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(hpf_operator(a2)[:, 0], hpf_operator(a)[:, 0])
    h = _matrix_of(hpf_operator, (1, 5, 5))
    lam = 10.0
    q = torch.eye(25, dtype=torch.float64) + lam * h.T @ h
    assert torch.allclose(q, q.T)
    assert torch.linalg.eigvalsh(q).min() >= 1.0 - 1e-10
    # the distance is that quadratic form: d(e) = e^T Q e / n
    e = torch.randn(1, 1, 5, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(error_distance(e, hpf_lambda=lam), (e.flatten() @ q @ e.flatten()).reshape(1) / 25)


def test_hpf_minimiser_is_the_mean():
    """argmin_D E_x0 d(D, x0) over one constant prediction D is E[x0]: the gradient vanishes exactly there."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 2, 6, 6, generator=g, dtype=torch.float64) * 2.0 + 0.5
    x0[:, :, ::2] += 1.0  # structured data with high frequencies

    def expected_loss(d):
        return reflow_distance(d.expand_as(x0), x0, hpf_lambda=10.0, sigma=1.0).mean()

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
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hpf_operator(torch.zeros(4, 2))
