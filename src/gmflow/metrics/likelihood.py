"""Negative log-likelihood in bits per dimension (GMFlow Eq. 21, Table 3; docs/maths/evaluation.md §10).

For clean data ``x0`` ``(N, *event)`` with ``D = prod(event)`` dimensions, ``t ~ U(0, 1)`` clamped at
``time_eps``, ``eps ~ N(0, I)`` and ``x_t = (1 - t) x0 + t eps``, the model's x0-GM at ``x_t`` is
``q(. | x_t) = model(x_t, t, **cond).u_to_x0(x_t, t)`` and::

    NLL(x0)  = E_{t, eps} [ -log q(x0 | x_t) ]                        nats per sample (Eq. 21)
    bits/dim = NLL / (D ln 2) - log2(bin_width)

``bin_width`` is the spacing of the data's quantisation levels in model units (``2/255`` for 8-bit
pixels scaled to ``[-1, 1]``; ``None``: no offset, for continuous data), so ``-log2(bin_width)``
turns the density on ``[-1, 1]`` into bits of the stored levels. ``dequantize=True`` first adds
uniform noise over one level, ``x0 + (v - 1/2) bin_width`` with ``v ~ U(0, 1)``.

With a spectrum net (:mod:`gmflow.spectral`, Eq. 19) the spectral model's density is
``log q^S(x0 | x_t) = log q(x0 | x_t) + spectral_log_ratio(q, x0, spectrum_net(surrogate of q))``;
both values come from the same draws. The expectation over ``t`` is estimated with ``num_t``
stratified draws per sample (draw ``j`` in ``[j/num_t, (j+1)/num_t)``), which is unbiased and has a
far smaller variance than independent draws.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..flow import interpolate
from ..gm import GaussianMixture
from ..spectral import SpectrumNet, resolve_spectrum_net, spectral_log_ratio

__all__ = ["BitsPerDim", "bits_per_dim"]


@dataclass(frozen=True)
class BitsPerDim:
    """Bits/dim of a model on a data set (see the module docstring).

    ``bpd`` and ``stderr`` (standard error over samples) are those of the GM ``q``; ``bpd_spectral`` /
    ``stderr_spectral`` those of the spectral density ``q^S`` (None without a spectrum net).
    """

    bpd: float
    stderr: float
    bpd_spectral: float | None
    stderr_spectral: float | None
    n: int
    dims: int
    num_t: int
    bin_width: float | None
    dequantize: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _spectrum_net(spectral: SpectrumNet | bool | None, model: object, x0: Tensor) -> SpectrumNet | None:
    if x0.dim() != 4:
        if spectral is None or spectral is False:
            return None
        raise ValueError(f"spectral needs images x0 of shape (N, C, H, W), got {tuple(x0.shape)}")
    return resolve_spectrum_net(spectral, model)


def _check(x0: Any, cond: Any, bin_width: Any, dequantize: bool, time_eps: Any) -> dict[str, Tensor]:
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (N, *event) with N >= 1, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or Inf values")
    cond = {} if cond is None else cond
    if not isinstance(cond, dict) or not all(isinstance(v, Tensor) for v in cond.values()):
        raise TypeError("cond must be a dict of tensors (e.g. {'class_labels': labels})")
    for k, v in cond.items():
        if v.dim() < 1 or v.shape[0] != x0.shape[0]:
            raise ValueError(
                f"cond[{k!r}] must have x0's first dimension {x0.shape[0]}, got {tuple(v.shape)}"
            )
    if bin_width is not None and not (isinstance(bin_width, numbers.Real) and 0 < bin_width < math.inf):
        raise ValueError(f"bin_width must be None or a finite number > 0, got {bin_width!r}")
    if dequantize and bin_width is None:
        raise ValueError("dequantize=True needs bin_width (the spacing of the data's levels)")
    if not (isinstance(time_eps, numbers.Real) and 0.0 <= time_eps < 1.0):
        raise ValueError(f"time_eps must be in [0, 1), got {time_eps!r}")
    return cond


@torch.no_grad()
def bits_per_dim(
    model: Callable[..., GaussianMixture],
    x0: Tensor,
    *,
    cond: dict[str, Tensor] | None = None,
    num_t: int = 4,
    batch_size: int = 256,
    bin_width: float | None = None,
    dequantize: bool = False,
    spectral: SpectrumNet | bool | None = None,
    time_eps: float = 1e-4,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> BitsPerDim:
    """Bits/dim of the GM ``model`` on ``x0`` by Eq. 21 (see the module docstring).

    Args:
        model: ``model(x_t, t, **cond) -> GaussianMixture`` over ``u`` (eval mode is the caller's).
        x0: ``(N, *event)`` clean data (e.g. a test split in ``[-1, 1]``); fp64 keeps the maths in fp64.
        cond: per-sample keyword inputs, each ``(N, ...)`` (``{"class_labels": labels}``), batched
            with ``x0``.
        num_t: stratified ``t`` draws per sample.
        batch_size: samples per model call.
        bin_width: level spacing of the data in model units (``None``: continuous data, no offset).
        dequantize: add uniform noise over one level before noising (needs ``bin_width``).
        spectral: a spectrum net, ``True`` (``model.spectrum_net``), ``False``, or ``None`` (default:
            ``model.spectrum_net`` when the model has one and ``x0`` holds images).
        time_eps: ``t`` is clamped to ``[time_eps, 1]`` (the reference code's 1e-4).
        generator: randomness (per batch, in order: dequantisation noise, then per draw ``t`` and
            ``eps``), on ``x0``'s device.
        progress: a tqdm bar on stderr when stderr is a terminal.
    """
    cond = _check(x0, cond, bin_width, dequantize, time_eps)
    num_t = _check_int("num_t", num_t, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    net = _spectrum_net(spectral, model, x0)
    n, dims = int(x0.shape[0]), math.prod(x0.shape[1:])
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    nll = torch.zeros(n, dtype=torch.float64)
    nll_s = torch.zeros(n, dtype=torch.float64) if net is not None else None
    starts = range(0, n, batch_size)
    bar = tqdm(total=len(starts) * num_t, desc="bits/dim", leave=False, file=sys.stderr,
               disable=None if progress else True)  # fmt: skip
    for i in starts:
        x = x0[i : i + batch_size].to(work)
        c = {k: v[i : i + batch_size] for k, v in cond.items()}
        b = x.shape[0]
        if dequantize:
            v = torch.rand(x.shape, generator=generator, device=x.device, dtype=work)
            x = x + (v - 0.5) * float(bin_width)
        for j in range(num_t):
            u = torch.rand(b, generator=generator, device=x.device, dtype=work)
            t = ((j + u) / num_t).clamp(time_eps, 1.0)
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=work)
            x_t = interpolate(x, eps, t)
            out = model(x_t, t, **c)
            if not isinstance(out, GaussianMixture):
                raise TypeError(
                    f"model must return a gmflow.GaussianMixture (a GM head), got {type(out).__name__}"
                )
            with torch.autocast(device_type=x.device.type, enabled=False):
                q = out.to(dtype=work).u_to_x0(x_t, t)
                logp = q.log_prob(x).flatten(1).sum(1)
                nll[i : i + b] -= logp.double().cpu() / num_t
                if nll_s is not None:
                    g = q.to_gaussian()
                    ratio = spectral_log_ratio(q, x, net(g.mean, g.var))
                    nll_s[i : i + b] -= (logp + ratio).double().cpu() / num_t
            bar.update()
    bar.close()
    offset = -math.log2(bin_width) if bin_width is not None else 0.0

    def summary(per: Tensor) -> tuple[float, float]:
        bpd = per / (dims * math.log(2.0)) + offset
        sd = float(bpd.std()) if n > 1 else math.nan
        return float(bpd.mean()), sd / math.sqrt(n)

    bpd, se = summary(nll)
    bpd_s, se_s = summary(nll_s) if nll_s is not None else (None, None)
    return BitsPerDim(bpd, se, bpd_s, se_s, n, dims, num_t, None if bin_width is None else float(bin_width),
                      bool(dequantize))  # fmt: skip
