"""GM-ODE sub-step integrators on the analytic re-anchored field of one network output.

Between two network calls the GM-ODE integrates ``dx/dtau = (x - D(x, tau)) / tau`` from ``t`` to
``t'`` with ``D`` the mean of the re-anchored x0-GM (:class:`~.gm_field.GMField`), on ``n`` equal
sub-steps ``tau_j = t + (j/n)(t' - t)``:

* ``"euler"`` (GMFlow Eq. 10; the paper's and the reference code's sub-steps): ``n - 1`` field
  evaluations, ``x <- x + (tau' - tau)(x - D(x, tau)) / tau``.
* ``"pc2"`` / ``"pc3"``: the Gaussian-exact exponential predictor-corrector of order 2 / 3. With
  ``w = x / sqrt(E)`` and ``g = (1 - tau) / (u sqrt(E))`` the ODE is exactly ``dw/dg = mbar - v c``:
  the Gaussian part of the field is integrated in closed form, only the mixture average ``mbar``
  (constant once the component weights settle) is interpolated, by a polynomial in ``g`` through
  the last ``order - 1`` nodes (predictor) and then through the new node (corrector). ``n`` field
  evaluations; exact for a single Gaussian component.

Derivation and the weights: docs/maths/solvers.md §5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gm_field import GMField

__all__ = ["SUBSTEP_METHODS", "DEFAULT_SUBSTEP_METHOD", "default_substeps", "integrate"]

SUBSTEP_METHODS: tuple[str, ...] = ("euler", "pc2", "pc3")
DEFAULT_SUBSTEP_METHOD = "pc3"
_PC_PER_UNIT = 16  # pc sub-steps per unit of t


def default_substeps(nfe: int, method: str = DEFAULT_SUBSTEP_METHOD, length: float | None = None) -> int:
    """Sub-steps of one network step of ``length`` in t (default ``1 / nfe``, the uniform grid's).

    ``"euler"``: ``ceil(128 / nfe)`` on every step (the paper's toy setting). ``"pc2"`` / ``"pc3"``:
    sub-steps no longer than ``1/16``, ``ceil(16 * length)`` (at least 1): as accurate as the paper's
    Euler sub-steps on the uniform grid (docs/maths/solvers.md §5.5), and spent where a warped grid
    has its long steps.
    """
    if method not in SUBSTEP_METHODS:
        raise ValueError(f"substep_method must be one of {SUBSTEP_METHODS}, got {method!r}")
    if method == "euler":
        return math.ceil(128 / nfe)
    length = 1.0 / nfe if length is None else length
    return max(1, math.ceil(_PC_PER_UNIT * length - 1e-9))


def integrate(field: GMField, x: Tensor, t: float, t_next: float, n: int, method: str) -> Tensor:
    """Integrate the flat state ``x (B, C[, P])`` from ``t`` to ``t_next`` in ``n`` sub-steps."""
    if method == "euler":
        return _euler(field, x, t, t_next, n)
    return _predictor_corrector(field, x, t, t_next, n, 3 if method == "pc3" else 2)


def _euler(field: GMField, x: Tensor, t: float, t_next: float, n: int) -> Tensor:
    for j in range(n):
        tau = t + (j / n) * (t_next - t)
        tau_next = t + ((j + 1) / n) * (t_next - t)
        x0 = field.mean0() if j == 0 else field.mean(x, tau)
        x = x + (tau_next - tau) * (x - x0) / tau
    return x


def _predictor_corrector(field: GMField, x: Tensor, t: float, t_next: float, n: int, order: int) -> Tensor:
    taus = [t + (j / n) * (t_next - t) for j in range(n)] + [t_next]
    energy = [field.energy(tau) for tau in taus]
    vc = field.v * field.c
    m, m_prev, dg_prev = field.mbar0(), None, None
    for j in range(n):
        e_a, e_b = energy[j], energy[j + 1]
        dg = field.delta_g(taus[j], taus[j + 1], e_a, e_b)
        sq_b = e_b.sqrt()
        k = sq_b * dg  # x-space weight of a constant mbar over the sub-step
        base = (sq_b / e_a.sqrt()) * x - k * vc
        if m_prev is None or order == 2:
            pred = base + k * m
            m_new = field.mbar(pred, taus[j + 1], e_b)
            x = base + (0.5 * k) * (m + m_new)  # trapezoid in g
        else:
            # s = (g_{j-1} - g_j) / dg < 0. Where the sub-step is more than twice as long in g as the last
            # one (-1/2 < s < 0: a sharp GM passing its knee in g) the weights grow like 1/s and amplify
            # the change of mbar, so those positions get the pc2 weights (predictor 0, corrector 1/2, 1/2).
            s = -dg_prev / dg
            short = s > -0.5
            s = s.clamp_max(-0.5)
            # predictor linear in g through (g_{j-1}, g_j): weights 1/(2s), 1 - 1/(2s)
            pred = base + k * (m + torch.where(short, 0.0, 0.5 / s) * (m_prev - m))
            m_new = field.mbar(pred, taus[j + 1], e_b)
            # corrector: quadratic through (s, 0, 1) integrated over [0, 1]
            w_prev = torch.where(short, 0.0, -1.0 / (6.0 * s * (s - 1.0)))
            w_cur = torch.where(short, 0.5, 0.5 - 1.0 / (6.0 * s))
            w_new = torch.where(short, 0.5, (1.0 / 3.0 - 0.5 * s) / (1.0 - s))
            x = base + k * (w_prev * m_prev + w_cur * m + w_new * m_new)
        m_prev, m, dg_prev = m, m_new, dg
    return x
