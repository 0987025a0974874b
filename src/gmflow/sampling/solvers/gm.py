"""GM-SDE and GM-ODE (GMFlow Eqs. 9-10) and their second-order multistep extrapolation (GMFlow App. A.2).

Each step consumes a :class:`~gmflow.sampling.solvers.base.GMPrediction`: the x0-GM ``q(x0 | x_t)``
of one network evaluation. GM maths runs with autocast disabled. Derivations: docs/maths/solvers.md.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ...gaussian import Gaussian, reverse_transition_coefs
from ...gm import GaussianMixture
from ...guidance import GuidedGM
from ...spectral import SpectrumNet, spectral_sample
from .base import GMPrediction, Solver, check_int
from .gm_field import GMField, PreparedGM, Tilt
from .substeps import DEFAULT_SUBSTEP_METHOD, SUBSTEP_METHODS, default_substeps, integrate

__all__ = [
    "GMSDE", "GMODE", "OUTPUT_MODES", "SecondOrder", "default_substeps", "gaussian_ratio_tilt",
    "guidance_tilt",
]  # fmt: skip

OUTPUT_MODES = ("sample", "mean")  # GM-SDE x0 estimate: a draw from the x0-GM, or its mean

_DAMP_CA = 0.005  # damping sqrt(max(0, 1 - (w~^2 + ca) s_c^2 / h_prev^2)) of the second-order step


class SecondOrder:
    """Multistep second-order GM update with the ``q^(x0 | x_t)`` conversion (GMFlow App. A.2).

    At step ``i > 0`` with step sizes ``h = t_i - t_{i+1}`` and ``h_prev``:

    1. ``m_prev`` = mean of the cached (post-guidance, pre-extrapolation) x0-GM moved to the current
       ``(x_t, t)`` by re-anchoring (Eq. 10), from the cached :class:`GMField` (no second preparation).
    2. ``d = (m_cur - m_prev) (h / 2 h_prev) sqrt(max(0, 1 - (w~^2 + 0.005) s^2 / h_prev^2))`` with
       ``s^2`` the spatially averaged surrogate variance and ``w~`` the probabilistic-guidance scale
       (0 without it).
    3. ``B = d (+ b_guidance)``; ``P = mean(B^2)``; if ``P > s^2``, ``B`` is rescaled to power ``s^2``.
    4. Target ``N(m_base + B, s^2 max(1 - P/s^2, 1e-6))``; the new GM is the base GM times
       ``N(target)/N(base)``, returned as that :class:`Tilt` of the base GM (``None`` on the first step).

    ``prep`` is the prepared base GM: the conditional GM under probabilistic guidance, else the GM.
    """

    def __init__(self) -> None:
        self.prev: tuple[GMField, float] | None = None
        self.target: Gaussian | None = None  # the last call's target (None if it did not extrapolate)

    def __call__(
        self, prep: PreparedGM, info: GuidedGM | None, x: Tensor, t: float, t_next: float
    ) -> Tilt | None:
        h = t - t_next
        out, self.target = None, None
        if self.prev is not None:
            prev_field, prev_h = self.prev
            if info is not None:
                base, bias, cur = info.base, info.bias, info.gm.mean()
                w2 = float(info.scale) ** 2
            else:
                base, bias = prep.surrogate(), None
                cur = base.mean
                w2 = 0.0
            avg_var = base.var
            m_prev = prep.unflat(prev_field.mean(prep.flat(x), t))
            damp = (1.0 - (w2 + _DAMP_CA) * avg_var / prev_h**2).clamp_min(0.0).sqrt()
            big_b = (cur - m_prev) * (0.5 * h / prev_h) * damp
            if bias is not None:
                big_b = big_b + bias
            power = big_b.square().flatten(1).mean(1).reshape(avg_var.shape)
            big_b = torch.where(power > avg_var, big_b * torch.sqrt(avg_var / power.clamp_min(1e-30)), big_b)
            self.target = Gaussian(base.mean + big_b, avg_var * (1.0 - power / avg_var).clamp_min(1e-6))
            out = gaussian_ratio_tilt(self.target, base)
        self.prev = (GMField(prep, prep.flat(x), t, guidance_tilt(info)), h)
        return out


def gaussian_ratio_tilt(num: Gaussian, den: Gaussian) -> Tilt:
    """The tilt ``N(num) / N(den)``: ``zeta = 1/w1 - 1/w2``, ``nu = m1/w1 - m2/w2`` (as
    :meth:`GaussianMixture.mul_gaussian_ratio`)."""
    return Tilt(1.0 / num.var - 1.0 / den.var, num.mean / num.var - den.mean / den.var)


def guidance_tilt(info: GuidedGM | None) -> Tilt | None:
    """Probabilistic guidance as a tilt of the conditional GM (``None`` without it or at scale 0)."""
    if info is None or info.scale == 0:
        return None
    w2 = float(info.scale) ** 2
    return gaussian_ratio_tilt(Gaussian(info.base.mean + info.bias, info.base.var * (1.0 - w2)), info.base)


class _GMSolver(Solver):
    """Shared GM-solver driver: GM maths with autocast disabled, then :meth:`_gm_step`."""

    needs_gm = True
    orders = (1, 2)
    options: tuple[str, ...] = ("order",)

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        if isinstance(order, bool) or order not in self.orders:
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = order

    def _reset(self) -> None:
        self._second = SecondOrder() if self.order == 2 else None  # caches the previous GM's field

    def _advance(self, p: GMPrediction, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._gm_step(p.gm, p.guided, x, t, t_next, generator), True

    @abstractmethod
    def _gm_step(
        self,
        gm: GaussianMixture,
        info: GuidedGM | None,
        x: Tensor,
        t: float,
        t_next: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One GM step ``t -> t'`` from the (guided) x0-GM and its guidance details."""


class GMSDE(_GMSolver):
    """GM-SDE (GMFlow Eq. 9): ``x' = c1 x + c2 x0^ + sqrt(c3) n`` with ``x0^ ~ q(x0 | x_t)``.

    ``c1, c2, c3`` from :func:`~gmflow.gaussian.reverse_transition_coefs`; an exact sample of the
    reverse transition, and at ``t' = 0`` (no noise) an exact sample of the x0-GM. Draws the GM
    sample, then ``n``, from the step's ``generator``. ``order=2`` adds :class:`SecondOrder`.

    ``spectrum_net`` (e.g. a :class:`~gmflow.nn.SpectrumMLP`): spectral sampling (GMFlow App. A.3,
    docs/maths/spectral.md §5): ``x0^ = spectral_sample(gm, spectrum_net(m, v))`` with ``N(m, v)`` the
    step's Gaussian target: the second-order target when the step extrapolates, else the guided
    numerator ``N(mu_c + b, (1 - w~^2) s_c^2)`` under probabilistic guidance, else ``gm.to_gaussian()``.

    ``output_mode="mean"``: ``x0^`` is the mean of the (extrapolated) x0-GM instead of a draw, i.e. the
    ancestral DDPM step on the GM mean (order 1: :class:`~gmflow.sampling.solvers.DDPM` with
    ``variance="small"``); only the transition noise is drawn.
    """

    name = "gm-sde"
    stochastic = True
    options = ("order", "spectrum_net", "output_mode")

    def __init__(
        self, order: int = 1, spectrum_net: SpectrumNet | None = None, output_mode: str = "sample"
    ) -> None:
        super().__init__(order)
        if spectrum_net is not None and not callable(spectrum_net):
            raise TypeError(
                "spectrum_net must be None or callable as spectrum_net(mean, var), "
                f"got {type(spectrum_net).__name__}"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be 'sample' or 'mean', got {output_mode!r}")
        if output_mode == "mean" and spectrum_net is not None:
            raise ValueError("spectrum_net applies to output_mode='sample' only (the mean is not drawn)")
        self.spectrum_net = spectrum_net
        self.output_mode = output_mode

    def _spectral_target(self, gm: GaussianMixture, info: GuidedGM | None) -> Gaussian:
        if self._second is not None and self._second.target is not None:
            return self._second.target
        if info is not None:
            return Gaussian(info.base.mean + info.bias, info.avg_var * (1.0 - float(info.scale) ** 2))
        return gm.to_gaussian()

    def _gm_step(
        self,
        gm: GaussianMixture,
        info: GuidedGM | None,
        x: Tensor,
        t: float,
        t_next: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        tilt = None
        if self._second is not None:
            prep = PreparedGM(gm if info is None else info.cond)
            tilt = self._second(prep, info, x, t, t_next)
        if self.output_mode == "mean":
            x0_hat = gm.mean() if tilt is None else prep.unflat(prep.tilted_mean(tilt))
        elif self.spectrum_net is None:
            x0_hat = gm.sample(generator) if tilt is None else prep.sample(tilt, generator)
        else:
            target = self._spectral_target(gm, info)
            drawn = gm if tilt is None else prep.gm.tilt(tilt.zeta, tilt.nu)
            x0_hat = spectral_sample(drawn, self.spectrum_net(target.mean, target.var), generator)
        c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
        out = c1 * x + c2 * x0_hat
        if t_next > 0:
            out = out + c3.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return out


class GMODE(_GMSolver):
    """GM-ODE: ``substeps`` analytic sub-steps in x0 form on one network output (GMFlow Eq. 10).

    The field is the mean of ``q^(x0 | x_tau)`` re-anchored from ``(x_t, t)`` (:class:`GMField`);
    ``substep_method`` picks the integrator of :mod:`~gmflow.sampling.solvers.substeps`: ``"pc3"``
    (default) / ``"pc2"``, the Gaussian-exact exponential predictor-corrector of order 3 / 2, or
    ``"euler"``, the paper's Euler sub-steps. ``substeps`` (per network step) defaults to
    :func:`default_substeps` of the run's ``nfe``, the method and the step's length. ``order=2`` adds
    :class:`SecondOrder` (a tilt of the field).
    """

    name = "gm-ode"
    options = ("order", "substeps", "substep_method")

    def __init__(
        self, order: int = 1, substeps: int | None = None, substep_method: str | None = None
    ) -> None:
        super().__init__(order)
        self.substeps = None if substeps is None else check_int("substeps", substeps, 1)
        method = DEFAULT_SUBSTEP_METHOD if substep_method is None else substep_method
        if method not in SUBSTEP_METHODS:
            raise ValueError(f"substep_method must be one of {SUBSTEP_METHODS}, got {substep_method!r}")
        self.substep_method = method

    def _gm_step(
        self,
        gm: GaussianMixture,
        info: GuidedGM | None,
        x: Tensor,
        t: float,
        t_next: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        prep = PreparedGM(gm if info is None else info.cond)
        tilt = guidance_tilt(info)
        if self._second is not None:
            extrapolated = self._second(prep, info, x, t, t_next)
            tilt = tilt if extrapolated is None else extrapolated
        n = self.substeps
        if n is None:
            n = default_substeps(self.nfe, self.substep_method, t - t_next)
        field = GMField(prep, prep.flat(x), t, tilt)
        return prep.unflat(integrate(field, prep.flat(x), t, t_next, n, self.substep_method))
