"""Training losses: flow-matching L2, GM negative log-likelihood ("GM-KL") and the transition loss.

All losses return the batch mean by default, or per-sample values with ``reduction="none"``
(shape ``(B,)``), which the trainer uses for DDP-consistent averaging and ReFlow normalisation.
GM losses run in fp32 (fp64 if the inputs are fp64) with autocast disabled.

Relations (tested): with K = 1 and ``logstd = 0``, ``gm_nll_loss = C/2 * fm_loss + C/2 log(2 pi)``
(the L2 flow-matching loss up to scale and constant), and the transition loss with ratio 1 equals the
GM NLL plus ``C log t`` per position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .flow import expand_t
from .gm import GaussianMixture, reverse_transition_coefs, sum_channels

__all__ = ["fm_loss", "gm_nll_loss", "gm_kl_loss", "transition_loss", "gm_nll_per_sample"]

_LOG_2PI = math.log(2.0 * math.pi)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _MixtureNLL(torch.autograd.Function):
    """``-logsumexp_k(log A_k - ||z_k||^2 / 2)``, ``z_k = (r + beta mu_k) inv``, per position ``(B, *S)``.

    The shared core of the GM losses with a hand-written backward (docs/maths/losses.md §3): with
    ``w = softmax_k(log A_k - ||z_k||^2 / 2)`` and upstream ``g``, the gradients are ``-w g`` (log-weights),
    ``w g z inv beta`` (means) and ``sum_{k,S} w g ||z_k||^2 / inv`` (the per-sample ``inv``). It keeps
    ``z`` and ``w`` only, instead of autograd's chain of ``(B, K, C, *S)`` intermediates.

    Shapes: ``means (B, K, C, *S)``, ``logw (B, K, 1, *S)``, ``r (B, 1, C, *S)`` and ``beta (B, 1, 1, *1)``
    (constants), ``inv (B, 1, 1, *1)``. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, means: Tensor, logw: Tensor, r: Tensor, beta: Tensor, inv: Tensor) -> Tensor:
        z = torch.addcmul(r, beta, means).mul_(inv)
        sq = sum_channels(z.square())
        comp = torch.add(logw, sq, alpha=-0.5)
        top = comp.amax(1, keepdim=True)
        w = comp.sub_(top).exp_()
        total = w.sum(1, keepdim=True)
        w.div_(total)
        ctx.save_for_backward(z, sq, w, beta, inv)
        return -(total.log_() + top).squeeze(2).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z, sq, w, beta, inv = ctx.saved_tensors
        wg = w.mul(grad.unsqueeze(1).unsqueeze(1))  # (B, K, 1, *S)
        g_means = z.mul(wg).mul_(inv * beta) if ctx.needs_input_grad[0] else None
        g_logw = wg.neg() if ctx.needs_input_grad[1] else None
        g_inv = None
        if ctx.needs_input_grad[4]:
            g_inv = (wg * sq).sum(dim=tuple(range(1, wg.dim())), keepdim=True) / inv
        return g_means, g_logw, None, None, g_inv


def fm_loss(u_pred: Tensor, u_target: Tensor, reduction: str = "mean") -> Tensor:
    """Flow-matching L2: per sample ``mean_{C,S} (u_pred - u)^2``, ``u = eps - x0``."""
    if u_pred.shape != u_target.shape:
        raise ValueError(
            f"u_pred and u_target must have the same shape, got {tuple(u_pred.shape)} and "
            f"{tuple(u_target.shape)}"
        )
    dt = _math_dtype(u_target)
    err = (u_pred.to(dt) - u_target.to(dt)).square()
    return _reduce(err.flatten(1).mean(1), reduction)


def gm_nll_per_sample(gm: GaussianMixture, target: Tensor, inv_std_max: float = 1e4) -> Tensor:
    """Mean over positions of ``-log q(target)`` (channel-summed per position), shape ``(B,)``.

    ``-logsumexp_k(a_k - ||(x - mu_k) min(1/s, inv_std_max)||^2 / 2 - C log s) + C/2 log 2 pi``
    (GMFlow Eq. 5-6, docs/maths/losses.md §2; the inverse-std clamp follows the reference code, acts only
    when ``s < 1/inv_std_max``).
    """
    if tuple(target.shape) != (gm.batch_size, *gm.event_shape):
        raise ValueError(
            f"target must have shape (B, C, *S) = {(gm.batch_size, *gm.event_shape)}, "
            f"got {tuple(target.shape)}"
        )
    dt = _math_dtype(target)
    with torch.autocast(device_type=target.device.type, enabled=False):
        means, logw, logs = gm.means.to(dt), gm.logweights.to(dt), gm.logstds.to(dt)
        inv = torch.exp(-logs).clamp_max(inv_std_max)
        minus_one = torch.full_like(inv, -1.0)  # z_k = (x - mu_k) inv
        core = _MixtureNLL.apply(means, logw, target.to(dt).unsqueeze(1), minus_one, inv)  # (B, *S)
        c = gm.channels
        per = core.reshape(core.shape[0], -1).mean(1)
        return per + c * logs.reshape(-1) + 0.5 * c * _LOG_2PI


def gm_nll_loss(gm: GaussianMixture, u_target: Tensor, reduction: str = "mean") -> Tensor:
    """GM negative log-likelihood of the velocity ``u = eps - x0`` under the predicted u-GM (Eq. 5-6)."""
    return _reduce(gm_nll_per_sample(gm, u_target), reduction)


gm_kl_loss = gm_nll_loss  # the paper calls it the GM-KL loss (KL up to the data entropy)


def transition_loss(
    gm_u: GaussianMixture,
    x_high: Tensor,
    t_high: Tensor,
    x_low: Tensor,
    t_low: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Transition loss (docs/maths/losses.md §3): NLL of ``x_low`` under ``q(x_low | x_high)``.

    The u-GM predicted at ``(x_high, t_high)`` is mapped to x0 space and then through the reverse
    transition (Eq. 9) to ``t_low``: ``sum_k A_k N(c1 x_high + c2 mu^x_k, (c3 + c2^2 s_x^2) I)``.
    Build ``(x_low, t_low, x_high)`` with :func:`gmflow.flow.transition_pair`.
    """
    if tuple(x_high.shape) != (gm_u.batch_size, *gm_u.event_shape) or x_low.shape != x_high.shape:
        raise ValueError(
            f"x_high and x_low must have shape (B, C, *S) = {(gm_u.batch_size, *gm_u.event_shape)}, "
            f"got {tuple(x_high.shape)} and {tuple(x_low.shape)}"
        )
    dt = _math_dtype(x_high)
    with torch.autocast(device_type=x_high.device.type, enabled=False):
        xh, xl = x_high.to(dt), x_low.to(dt)
        nd = xh.dim()
        th = expand_t(t_high, nd, like=xh)
        tl = expand_t(t_low, nd, like=xh)
        if bool((tl >= th).any()):
            raise ValueError("transition_loss needs t_low < t_high for every sample")
        c1, c2, c3 = reverse_transition_coefs(th.reshape(-1), tl.reshape(-1), nd, like=xh)
        # fused form: x0-GM means x_h - t mu_k, transition means c1 x_h + c2 (x_h - t mu_k), so
        # x_low - mean_k = r + beta mu_k with r = x_low - (c1 + c2) x_h and beta = c2 t
        r = (xl - (c1 + c2) * xh).unsqueeze(1)
        beta = (c2 * th.clamp_min(1e-6)).unsqueeze(1)
        logs = gm_u.logstds.to(dt)
        sc = (c2 * th.clamp_min(1e-6)).reshape(logs.shape)
        log_std = 0.5 * torch.logaddexp(2.0 * (logs + torch.log(sc)), torch.log(c3.reshape(logs.shape)))
        inv = torch.exp(-log_std).clamp_max(1e4)
        core = _MixtureNLL.apply(gm_u.means.to(dt), gm_u.logweights.to(dt), r, beta, inv)  # (B, *S)
        c = gm_u.channels
        per = core.reshape(core.shape[0], -1).mean(1) + c * log_std.reshape(-1) + 0.5 * c * _LOG_2PI
        return _reduce(per, reduction)
