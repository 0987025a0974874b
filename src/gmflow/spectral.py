"""Spectral GM sampling and the spectral loss (GMFlow App. A.3, Eqs. 19-20; docs/maths/spectral.md).

A pixel-wise x0-GM ``q`` (:class:`~gmflow.gm.GaussianMixture` on ``(B, C, H, W)``) is pushed to
``N(0, I)`` by the Knothe–Rosenblatt map ``T`` (:mod:`gmflow.kr`, channel ``c`` of ``T(x)`` is the
``c``-th principal axis). The orthonormal 2-D discrete Hartley transform ``Hc`` (real, symmetric,
its own inverse) maps the Gaussian field ``zeta = T(x)`` to real spectral coefficients
``z_r = Hc(zeta)``; with ``F = fft2(., norm="ortho")``, ``Hc(zeta) = Re F(zeta) + Im F(zeta)``.
A log power spectrum ``lps = log v`` (``(B, C, H, W)``, from a
:class:`~gmflow.nn.SpectrumMLP`) defines the spectral density (Eq. 19)

    q^S(x) = q(x) N(z_r; 0, diag v) / N(z_r; 0, I),       z_r = Hc(T(x)),

which is normalised because ``T`` pushes ``q`` to ``N(0, I)`` and ``Hc`` is orthogonal. Sampling it is
``x = T^{-1}(Hc(exp(lps/2) n))`` with white ``n ~ N(0, I)`` (:func:`spectral_sample`); a flat
spectrum (``lps = 0``) gives exactly the distribution of :meth:`GaussianMixture.sample`. The
spectral loss (Eq. 20) is ``-log q^S/q`` per pixel, with no gradient through ``T`` or the GM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .gm import GaussianMixture
from .kr import gm_to_standard_normal, standard_normal_to_gm

__all__ = [
    "hartley_to_field",
    "field_to_hartley",
    "spectral_noise",
    "spectral_sample",
    "spectral_log_ratio",
    "spectral_loss",
    "resolve_spectrum_net",
]

SpectrumNet = Callable[[Tensor, Tensor], Tensor]


def _check_image(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {tuple(x.shape)}")
    return x


def hartley_to_field(z_r: Tensor) -> Tensor:
    """Real field ``zeta = Hc(z_r)`` of real spectral coefficients ``z_r (..., H, W)`` (same shape).

    The Hermitian half-spectrum of the field: with ``z_-[k] = z_r[-k mod (H, W)]``,
    ``Re F = (z_r + z_-)/2`` (even part), ``Im F = (z_r - z_-)/2`` (odd part); then
    ``zeta = irfft2(Re F + i Im F, s=(H, W), norm="ortho")`` from the first ``W//2 + 1`` columns.
    Inverse of :func:`field_to_hartley` (and numerically the same linear map).
    """
    _check_image("z_r", z_r)
    h, w = z_r.shape[-2:]
    z_neg = torch.flip(torch.roll(z_r, shifts=(-1, -1), dims=(-2, -1)), dims=(-2, -1))
    half = torch.complex(z_r + z_neg, z_r - z_neg)[..., : w // 2 + 1] / 2
    return torch.fft.irfft2(half, s=(h, w), norm="ortho")


def field_to_hartley(zeta: Tensor) -> Tensor:
    """Real spectral coefficients ``z_r = Re F(zeta) + Im F(zeta)`` of a real field ``(..., H, W)``."""
    _check_image("zeta", zeta)
    f = torch.fft.fft2(zeta, norm="ortho")
    return f.real + f.imag


def _check_lps(log_power: Tensor, gm: GaussianMixture) -> Tensor:
    _check_image("log_power", log_power)
    want = (gm.batch_size, *gm.event_shape)
    if len(want) != 4:
        raise ValueError(f"spectral sampling needs a GM over (B, C, H, W) images, got {tuple(want[1:])}")
    if tuple(log_power.shape) != want:
        raise ValueError(f"log_power must have the GM's sample shape {want}, got {tuple(log_power.shape)}")
    return log_power


def spectral_noise(log_power: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian field ``zeta = Hc(exp(lps/2) n)``, ``n ~ N(0, I)``, shaped like ``log_power`` ``(..., H, W)``.

    One ``torch.randn`` of ``log_power``'s shape from ``generator`` (the draw order of the reference
    sampler). ``Cov(zeta) = Hc diag(v) Hc``; ``lps = 0`` gives white unit-variance noise.
    """
    _check_image("log_power", log_power)
    n = torch.randn(log_power.shape, generator=generator, device=log_power.device, dtype=log_power.dtype)
    return hartley_to_field(n * torch.exp(0.5 * log_power))


def spectral_sample(
    gm: GaussianMixture,
    log_power: Tensor,
    generator: torch.Generator | None = None,
    newton_steps: int | None = None,
) -> Tensor:
    """One sample of ``q^S`` (Eq. 19) per GM, ``(B, C, H, W)``: ``T^{-1}(spectral_noise(lps))``.

    ``log_power`` ``(B, C, H, W)`` indexes (principal axis, frequency); ``T^{-1}`` is
    :func:`gmflow.kr.standard_normal_to_gm` (``newton_steps`` Newton iterations, default 16 in fp32).
    Runs in fp32 (fp64 for an fp64 GM) with autocast disabled; draws one ``randn`` of the sample shape.
    """
    _check_lps(log_power, gm)
    dt = torch.float64 if gm.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=gm.device.type, enabled=False):
        zeta = spectral_noise(log_power.to(dt), generator)
        return standard_normal_to_gm(gm.to(dtype=dt), zeta, newton_steps=newton_steps)


def spectral_log_ratio(gm: GaussianMixture, x0: Tensor, log_power: Tensor) -> Tensor:
    """``log q^S(x0) - log q(x0)`` per sample, ``(B,)`` (Eq. 19); differentiable in ``log_power`` only.

    ``= sum_{c,h,w} -(z_r^2 (exp(-lps) - 1) + lps) / 2`` with ``z_r = Hc(T(x0))`` computed without
    gradient. Add it to the GM log-likelihood for the spectral model's NLL.
    """
    _check_lps(log_power, gm)
    if tuple(x0.shape) != tuple(log_power.shape):
        raise ValueError(f"x0 must have the sample shape {tuple(log_power.shape)}, got {tuple(x0.shape)}")
    dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x0.device.type, enabled=False):
        with torch.no_grad():
            z_r = field_to_hartley(gm_to_standard_normal(gm.detach().to(dtype=dt), x0.detach().to(dt)))
        lps = log_power.to(dt)
        per = z_r.square() * torch.expm1(-lps) + lps
        return -0.5 * per.flatten(1).sum(1)


def spectral_loss(
    spectrum_net: SpectrumNet, gm_x0: GaussianMixture, x0: Tensor, reduction: str = "mean"
) -> Tensor:
    """Spectral loss (GMFlow Eq. 20): per sample ``-(log q^S(x0) - log q(x0)) / (H W)``.

    Closed form, with ``lps = spectrum_net(m, v)`` of the surrogate ``N(m, v)`` =
    ``sg[gm_x0].to_gaussian()`` and ``z_r = Hc(T(x0))`` of the stop-gradient KR map of ``sg[gm_x0]``::

        L = 1/(2 H W) sum_{c,h,w} [ z_r^2 (exp(-lps) - 1) + lps ]        (per sample)

    i.e. the channel-summed, pixel-averaged ``-log N(z_r; 0, diag v) + log N(z_r; 0, I)``, the same
    reduction as the GM losses of :mod:`gmflow.losses` (add it to the transition loss; the reference
    code's weight is 1). Only ``spectrum_net`` receives gradients. Training call, with the u-GM
    ``gm_u = model(x_high, t_high, ...)`` of the transition loss and the clean batch ``x0``::

        loss = transition_loss(gm_u, x_high, t_high, x_low, t_low, reduction="none") + spectral_loss(
            spectrum_net, gm_u.u_to_x0(x_high, t_high), x0, reduction="none")

    (the loss is the same in u-space: ``x0 = x_high - t u`` only flips the sign of ``T``).
    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``(B,)``).
    """
    if not isinstance(gm_x0, GaussianMixture):
        raise TypeError(f"gm_x0 must be a gmflow.GaussianMixture, got {type(gm_x0).__name__}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}")
    want = (gm_x0.batch_size, *gm_x0.event_shape)
    if tuple(x0.shape) != want:
        raise ValueError(f"x0 must have gm_x0's sample shape {want}, got {tuple(x0.shape)}")
    if not callable(spectrum_net):
        raise TypeError("spectrum_net must be callable as spectrum_net(mean, var) -> log power spectrum")
    with torch.no_grad(), torch.autocast(device_type=x0.device.type, enabled=False):
        g = gm_x0.detach().to_gaussian()
    lps = spectrum_net(g.mean, g.var)
    if not isinstance(lps, Tensor) or tuple(lps.shape) != want:
        got = tuple(lps.shape) if isinstance(lps, Tensor) else type(lps).__name__
        raise ValueError(f"spectrum_net must return a log power spectrum of shape {want}, got {got}")
    per = -spectral_log_ratio(gm_x0, x0, lps) / (want[-2] * want[-1])
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def resolve_spectrum_net(spectral: SpectrumNet | bool | None, model: object) -> SpectrumNet | None:
    """The spectrum net asked for by a ``spectral=`` argument: ``None`` -> the model's own
    ``spectrum_net`` attribute (or ``None``), ``False`` -> ``None``, ``True`` -> the model's (an error
    without one), a callable -> itself."""
    own = getattr(model, "spectrum_net", None)
    if spectral is None:
        return own
    if spectral is False:
        return None
    if spectral is True:
        if own is None:
            raise ValueError("spectral=True needs a model with a spectrum_net attribute (or pass the net)")
        return own
    if not callable(spectral):
        raise TypeError(
            f"spectral must be a spectrum net, True, False or None, got {type(spectral).__name__}"
        )
    return spectral
