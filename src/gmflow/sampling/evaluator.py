"""Model evaluation for the samplers: guidance batching, output checks (shape, dtype, NaN/Inf), NFEs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..gm import GaussianMixture
from ..guidance import CFG, AutoGuidance, GuidedGM, ProbabilisticGuidance, cfg_x0, probabilistic_guidance
from .solvers import SOLVERS, GMPrediction, MeanPrediction

Guidance = CFG | ProbabilisticGuidance | AutoGuidance


def _cat_cond(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k, v in cond.items():
        u = uncond[k]
        if isinstance(v, Tensor) and isinstance(u, Tensor):
            out[k] = torch.cat([v, u])
        elif v == u:
            out[k] = v
        else:
            raise ValueError(f"cond[{k!r}] and uncond[{k!r}] differ but are not tensors that can be batched")
    return out


class Evaluator:
    """Calls ``model(x_t, t, **cond)`` and returns x0-space predictions in the working dtype.

    One call = one NFE (:attr:`nfe`), also when the conditional and unconditional halves are batched
    together; AutoGuidance's guide-model calls are counted separately in :attr:`guide_nfe`.
    """

    def __init__(
        self,
        model: Callable[..., Tensor | GaussianMixture],
        work_dtype: torch.dtype,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        guidance: Guidance | None = None,
        *,
        solver: str,
    ) -> None:
        if not callable(model):
            raise TypeError("model must be callable as model(x_t, t, **cond)")
        if guidance is not None and not isinstance(guidance, (CFG, ProbabilisticGuidance, AutoGuidance)):
            raise TypeError(
                "guidance must be gmflow.CFG, gmflow.ProbabilisticGuidance or gmflow.AutoGuidance, "
                f"got {type(guidance).__name__}"
            )
        if isinstance(guidance, (CFG, ProbabilisticGuidance)) and uncond is None:
            raise ValueError(f"{type(guidance).__name__} needs uncond= (the unconditional model inputs)")
        self.model = model
        self.work_dtype = work_dtype
        self.cond = dict(cond or {})
        self.uncond = None if uncond is None else dict(uncond)
        self.guidance = guidance
        self.solver = solver
        self.nfe = 0
        self.guide_nfe = 0

    # ------------------------------------------------------------------ raw calls
    def _check(self, out: object, x: Tensor, who: str, at: tuple[int, float]) -> Tensor | GaussianMixture:
        if isinstance(out, GaussianMixture):
            if tuple(out.means.shape[:1]) + tuple(out.means.shape[2:]) != tuple(x.shape):
                raise ValueError(
                    f"{who} returned a GaussianMixture with means {tuple(out.means.shape)}; expected "
                    f"(B, K, *x_t.shape[1:]) for x_t {tuple(x.shape)}"
                )
            dt = out.dtype
        elif isinstance(out, Tensor):
            if out.shape != x.shape:
                raise ValueError(
                    f"{who} returned a tensor of shape {tuple(out.shape)}; expected the velocity with the "
                    f"shape of x_t {tuple(x.shape)}"
                )
            if not out.is_floating_point():
                raise TypeError(f"{who} returned dtype {out.dtype}; expected a floating-point velocity")
            dt = out.dtype
        else:
            raise TypeError(f"{who} must return a Tensor or a GaussianMixture, got {type(out).__name__}")
        if self.work_dtype == torch.float64 and dt != torch.float64:
            raise TypeError(
                f"{who} returned {dt} for float64 noise; run the model in float64 (e.g. model.double()) "
                "or pass float32 noise"
            )
        if isinstance(out, GaussianMixture):
            bad = " and ".join(out.nonfinite_fields())
        else:
            bad = "" if bool(torch.isfinite(out).all()) else "velocity values"
        if bad:
            step, t = at
            raise ValueError(
                f"solver {self.solver!r}, step {step} (t={t:.6g}): {who} returned non-finite {bad} "
                "(NaN or Inf)"
            )
        return out.to(dtype=self.work_dtype)

    def _call(
        self, model: Callable, x: Tensor, t: Tensor, cond: dict[str, Any], who: str, at: tuple[int, float]
    ):
        return self._check(model(x, t, **cond), x, who, at)

    def _raw(
        self, x: Tensor, t: Tensor, at: tuple[int, float]
    ) -> tuple[Tensor | GaussianMixture, Tensor | GaussianMixture | None]:
        """Returns (main output, reference output) in u-space; reference = uncond or bad model."""
        self.nfe += 1
        g = self.guidance
        if isinstance(g, (CFG, ProbabilisticGuidance)):
            both = self._call(
                self.model,
                torch.cat([x, x]),
                torch.cat([t, t]),
                _cat_cond(self.cond, self.uncond),
                "model",
                at,
            )
            b = x.shape[0]
            return both[:b], both[b:]
        out = self._call(self.model, x, t, self.cond, "model", at)
        if isinstance(g, AutoGuidance):
            gc = self.cond if g.guide_cond is None else g.guide_cond
            self.guide_nfe += 1
            return out, self._call(g.guide_model, x, t, gc, "guide_model", at)
        return out, None

    def _tvec(self, x: Tensor, t: float) -> Tensor:
        return torch.full((x.shape[0],), t, device=x.device, dtype=self.work_dtype)

    # ------------------------------------------------------------------ x0-space predictions
    def predict(self, x: Tensor, t: float, step: int) -> MeanPrediction:
        """Guided ``(x0, u)`` at the scalar time ``t`` (GM models: the guided GM mean); ``x0 = x - t u``.

        ``step`` (the grid interval) only labels errors.
        """
        tv = self._tvec(x, t)
        out, ref = self._raw(x, tv, (step, t))
        tb = _tb(tv, x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if isinstance(out, GaussianMixture):
                if ref is None:
                    u = out.mean()
                    return MeanPrediction(x - tb * u, u)
                gm = self._guide_gm(out.u_to_x0(x, tv), _x0_of(ref, x, tv))
                x0 = gm.gm.mean() if isinstance(gm, GuidedGM) else gm.mean()
            elif ref is None:
                return MeanPrediction(x - tb * out, out)
            else:
                x0 = self._guide_tensor(x - tb * out, _x0_mean_of(ref, x, tv))
            return MeanPrediction(x0, (x - x0) / tb.clamp_min(1e-6))

    def x0_gm(self, x: Tensor, t: float, step: int) -> GMPrediction:
        """Guided x0-GM at the scalar time ``t`` (and the probabilistic-guidance details, if any)."""
        tv = self._tvec(x, t)
        out, ref = self._raw(x, tv, (step, t))
        if not isinstance(out, GaussianMixture):
            others = ", ".join(repr(n) for n, c in SOLVERS.items() if not c.needs_gm)
            raise TypeError(
                f"solver {self.solver!r} needs a model that returns a gmflow.GaussianMixture; this model "
                f"returned a velocity tensor (use one of {others})"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            res = self._guide_gm(out.u_to_x0(x, tv), None if ref is None else _x0_of(ref, x, tv))
        if isinstance(res, GuidedGM):
            return GMPrediction(res.gm, res)
        return GMPrediction(res, None)

    def _guide_tensor(self, x0: Tensor, x0_ref: Tensor) -> Tensor:
        g = self.guidance
        if isinstance(g, CFG):
            return cfg_x0(x0, x0_ref, g.scale, g.orthogonal)
        if isinstance(g, AutoGuidance):
            return x0_ref + g.scale * (x0 - x0_ref)
        raise TypeError(
            "ProbabilisticGuidance needs a model that returns a GaussianMixture; use CFG for velocity models"
        )

    def _guide_gm(
        self, gm: GaussianMixture, ref: GaussianMixture | Tensor | None
    ) -> GaussianMixture | GuidedGM:
        g = self.guidance
        if ref is None or g is None:
            return gm
        ref_mean = ref.mean() if isinstance(ref, GaussianMixture) else ref
        if isinstance(g, ProbabilisticGuidance):
            return probabilistic_guidance(gm, ref_mean, g.scale, g.orthogonal)
        # CFG / AutoGuidance on a GM: shift every component mean by the guided bias ("vanilla" GM CFG)
        cond_mean = gm.mean()
        guided = self._guide_tensor(cond_mean, ref_mean)
        return GaussianMixture(gm.means + (guided - cond_mean).unsqueeze(1), gm.logweights, gm.logstds)


def _tb(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _x0_of(out: Tensor | GaussianMixture, x: Tensor, t: Tensor) -> Tensor | GaussianMixture:
    if isinstance(out, GaussianMixture):
        return out.u_to_x0(x, t)
    return x - _tb(t, x) * out


def _x0_mean_of(out: Tensor | GaussianMixture, x: Tensor, t: Tensor) -> Tensor:
    r = _x0_of(out, x, t)
    return r.mean() if isinstance(r, GaussianMixture) else r
