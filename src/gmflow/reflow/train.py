"""Simple ReFlow training: one ReFlow round on teacher pairs, with the paper's knobs as a config.

Objective (research/simple_reflow.md §1.3, Eq. (13) reconstructed), for a pair ``(x0, x1)``::

    t ~ T,   x_t = (1 - t) x0 + t x1,   D = x_t - t u_theta(x_t, t)        (GM student: u = GM mean)
    l  = w(t) d(D, x0),     d = mean(e^2 + lambda (H e)^2),  e = D - x0   (HPF distance, lambda = hpf_lambda)
    w  = 1/t^2 ("velocity": l = d((x1 - x0) - u), the plain velocity MSE of 2-rectified flow) or 1 ("none")
    L  = l / sg[l]  if normalize  (value 1, gradient grad log l: Simple ReFlow's per-sample weight)

With ``normalize`` the weight ``w(t)`` cancels in the gradient (it does not depend on theta). The
student starts as a copy of the teacher (``student_dropout`` replaces its dropout rate) and is trained
by :func:`gmflow.train.train`, so checkpoints, resume, EMA and DDP come for free.

The trainer moves batches with ``.to(device)``, so a batch is the stacked tensor ``(B, 2, *event)``
(``[:, 0] = x0``, ``[:, 1] = x1``); the objective also accepts a tuple ``(x0, x1)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import GRID_KINDS, TIME_SAMPLERS, sample_time
from ..gm import GaussianMixture
from ..io import atomic_write_json
from .dataset import PairDataset
from .losses import error_distance, normalized
from .projection import project_pairs

__all__ = [
    "ReflowConfig",
    "ReflowError",
    "RECIPES",
    "apply_reflow_sets",
    "reflow_objective",
    "reflow_batch_fn",
    "set_dropout",
    "train_reflow",
    "REFLOW_JSON",
]

REFLOW_JSON = "reflow.json"
WEIGHTS = ("velocity", "none")
PROJECTION_METHODS = ("ot", "sinkhorn")
SAMPLE_SOLVERS = ("euler", "heun", "dpm-solver-2", "dpm++2m")
# ReflowConfig fields that may differ when a run is resumed (they do not change what is trained)
_NON_TRAINING = frozenset(
    {
        "steps",
        "out_dir",
        "ckpt_every",
        "log_every",
        "device",
        "solver",
        "grid",
        "kappa",
        "r",
        "guidance_scale",
    }
)


_CHOICES = {
    "time_sampler": TIME_SAMPLERS, "weight": WEIGHTS, "projection_method": PROJECTION_METHODS,
    "solver": SAMPLE_SOLVERS, "grid": GRID_KINDS,
}  # fmt: skip
_RANGES = {
    "hpf_lambda": "[0, inf)", "hpf_sigma": "(0, inf)", "student_dropout": "[0, 1)", "rho": "[0, 1]",
    "projection_alpha": "[0, 1]", "norm_eps": "[0, inf)", "time_eps": "[0, 1)", "kappa": "(0, inf)",
    "r": "(0, 1]", "guidance_scale": "(-inf, inf)", "projection_pool": "[1, inf)",
}  # fmt: skip
_WHAT = {"rho": "the forward-pair ratio ", "kappa": "the sigmoid-grid kappa ", "r": "DPM-Solver-2's r "}


def _within(v: float, spec: str) -> bool:
    """``v`` in an interval written like ``"(0, 1]"`` (finite values only)."""
    lo, hi = (float(p) for p in spec[1:-1].split(","))
    ok_lo = v >= lo if spec[0] == "[" else v > lo
    ok_hi = v <= hi if spec[-1] == "]" else v < hi
    return math.isfinite(v) and ok_lo and ok_hi


class ReflowError(ValueError):
    """Inconsistent ReFlow inputs (teacher / student / pairs); the message names the argument."""


@dataclass
class ReflowConfig:
    """A ReFlow run: the rung knobs of Simple ReFlow, the optimisation recipe and inference settings.

    Rung knobs (defaults = the 2-rectified-flow baseline):
        normalize: per-sample loss normalisation ``l / sg[l]``.
        time_sampler: ``"uniform"``, ``"u_shaped"`` (2-RF++), ``"pow10"`` (Simple ReFlow, ``∝ 10^t``), ...
        weight: ``"velocity"`` (plain velocity MSE = ``1/t^2`` in D-space) or ``"none"`` (D-space MSE).
        hpf_lambda, hpf_sigma: HPF loss weight (images only) and Gaussian-blur width of ``H``.
        student_dropout: dropout of the student (None: keep the teacher's).
        rho: probability of drawing a forward pair (needs forward pairs).
        projection_alpha: coupling projection of the backward part of each batch (0 = off): minibatch
            OT match of the generated ``x0`` to as many real ones, ``x0 <- (1 - a) x0 + a match``.
        projection_method: ``"ot"`` (exact assignment) or ``"sinkhorn"``.
        projection_pool: real draws per projected pair, ``M = ceil(pool B)`` (>= 1). ``1`` matches the
            batch marginal exactly (each real used once); larger pools give closer matches but bias the
            projected marginal towards the generated one.
    Inference (recorded in ``reflow.json``; :meth:`sample_kwargs` for :func:`gmflow.sample`):
        solver, grid, kappa (sigmoid grid, > 0), r (DPM-Solver-2, in (0, 1]), guidance_scale (EDM2 lerp
        convention ``D_bad + w (D_good - D_bad)``: ``w = 1`` is no guidance; the paper's "0.6" is 1.6).
    """

    # rung knobs
    normalize: bool = False
    time_sampler: str = "uniform"
    weight: str = "velocity"
    hpf_lambda: float = 0.0
    hpf_sigma: float = 1.0
    student_dropout: float | None = None
    rho: float = 0.0
    projection_alpha: float = 0.0
    projection_method: str = "ot"
    projection_pool: float = 1.0
    norm_eps: float = 1e-8
    time_eps: float = 1e-4
    # optimisation (passed on to TrainConfig)
    steps: int = 2000
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema: str = "power"
    ema_gamma: float = 7.0
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 1000
    log_every: int = 50
    precision: str = "fp32"
    device: str = "auto"
    # inference
    solver: str = "euler"
    grid: str = "uniform"
    kappa: float = 20.0
    r: float = 0.4
    guidance_scale: float = 1.0

    def validate(self) -> ReflowConfig:
        """Raise :class:`~gmflow.train.ConfigError` naming the first invalid field; return ``self``."""
        from ..train.config import ConfigError

        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize: expected true/false, got {self.normalize!r}")
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key, spec in _RANGES.items():
            v = getattr(self, key)
            if v is None and key == "student_dropout":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _within(float(v), spec):
                raise ConfigError(f"{key}: {_WHAT.get(key, '')}must be a number in {spec}, got {v!r}")
        self.to_train_config(head="velocity").validate()  # optimisation fields
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReflowConfig:
        return apply_reflow_sets(cls(), [f"{k}={'none' if v is None else v}" for k, v in d.items()])

    def sample_kwargs(self) -> dict[str, Any]:
        """``solver``/``grid``/``kappa``/``r`` keywords of :func:`gmflow.sample` (guidance is separate)."""
        kw: dict[str, Any] = {"solver": self.solver, "grid": self.grid, "kappa": self.kappa}
        if self.solver == "dpm-solver-2":
            kw["r"] = self.r
        return kw

    def to_train_config(self, head: str = "velocity"):
        """The :class:`~gmflow.train.TrainConfig` of the run.

        ``data.name``, ``loss`` and ``model.*`` are placeholders (the trainer ignores them when it is
        given ``model``, ``objective`` and ``batch_fn``); ``model.head`` matches the student's head so
        that tools reading the run's config see the right output type.
        """
        from ..train.config import DataConfig, ModelConfig, TrainConfig

        return TrainConfig(
            data=DataConfig(name="checkerboard"),
            model=ModelConfig(head=head),
            loss="fm" if head == "velocity" else "gm_nll",
            time_sampler=self.time_sampler,
            time_eps=self.time_eps,
            **{k: getattr(self, k) for k in (
                "steps", "batch_size", "optimizer", "lr", "warmup_steps", "weight_decay", "grad_clip", "ema",
                "ema_gamma", "seed", "out_dir", "ckpt_every", "log_every", "precision", "device",
            )},
        )  # fmt: skip


RECIPES: dict[str, ReflowConfig] = {
    # 2-rectified flow (Liu et al. 2023) from the teacher: uniform t, velocity MSE, teacher dropout,
    # backward pairs, Euler on the uniform grid
    "2rf": ReflowConfig(),
    # Simple ReFlow, CIFAR10 values of appendix D.1.1 where known (lambda 10, rho 0.4, kappa 20, r 0.4,
    # guidance 0.6 -> 1.6 in the lerp convention); set student_dropout and projection per data set
    "simple": ReflowConfig(
        normalize=True,
        time_sampler="pow10",
        hpf_lambda=10.0,
        rho=0.4,
        solver="dpm-solver-2",
        grid="sigmoid",
        kappa=20.0,
        r=0.4,
    ),  # fmt: skip
}


def _coerce(key: str, tp: Any, s: Any) -> Any:
    from ..train.config import ConfigError

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if s is None or str(s).strip().lower() in ("none", "null", ""):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    s = str(s).strip()
    try:
        if tp is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if tp is float:
            return float(s)
    except ValueError:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {s!r}") from None
    return s


def apply_reflow_sets(cfg: ReflowConfig, sets: list[str] | tuple[str, ...]) -> ReflowConfig:
    """Apply ``["normalize=true", "rho=0.4", ...]`` (values coerced to the field types); returns a copy."""
    import difflib

    from ..train.config import ConfigError

    hints = typing.get_type_hints(ReflowConfig)
    changes: dict[str, Any] = {}
    for item in sets:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            raise ConfigError(
                f"unknown reflow key {key!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
            )
        changes[key] = _coerce(key, hints[key], value)
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------------ objective
def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor) and batch.dim() >= 3 and batch.shape[1] == 2:
        return batch[:, 0], batch[:, 1]
    raise ValueError("a ReFlow batch is a tuple (x0, x1) or a stacked tensor (B, 2, *event)")


def reflow_objective(cfg: ReflowConfig):
    """``objective(model, (x0, x1), generator) -> (B,)`` per-sample ReFlow losses (module docstring)."""

    def objective(model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        x0, x1 = _unpack(batch)
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        t = sample_time(
            x0.shape[0], cfg.time_sampler, generator=generator, device=x0.device, dtype=dt, eps=cfg.time_eps
        )
        tb = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = (1.0 - tb) * x0 + tb * x1
        out = model(x_t, t)
        u = out.mean() if isinstance(out, GaussianMixture) else out
        # D - x0 = x_t - t u - x0 = t ((x1 - x0) - u): the velocity error times t (no cancellation)
        err_v = (x1 - x0).to(dt) - u.to(dt)
        loss = error_distance(err_v, hpf_lambda=cfg.hpf_lambda, sigma=cfg.hpf_sigma)  # = d(D, x0) / t^2
        if cfg.weight == "none":
            loss = loss * t.square()
        return normalized(loss, cfg.norm_eps) if cfg.normalize else loss

    objective.__name__ = "reflow_objective"
    return objective


# ------------------------------------------------------------------------------------------ batches
def _cpu_generator(g: torch.Generator) -> torch.Generator:
    if g.device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return torch.Generator().manual_seed(seed)


def _real(real_data: Any, n: int, g: torch.Generator) -> Tensor:
    if isinstance(real_data, Tensor):
        return real_data[torch.randint(len(real_data), (n,), generator=g)]
    return real_data.sample(n, generator=g)


def reflow_batch_fn(pairs: PairDataset, cfg: ReflowConfig, real_data: Any = None):
    """``batch_fn(step, rank, world_size, generator) -> (B_local, 2, *event)`` of ``pairs``.

    Each element is a forward pair with probability ``cfg.rho`` and a backward pair otherwise (uniform
    with replacement inside each set: the rule of :meth:`PairDataset.sample`). With
    ``cfg.projection_alpha > 0`` the backward part is projected onto the data marginal with
    :func:`~gmflow.reflow.project_pairs` against ``ceil(projection_pool * n_backward)`` fresh draws of
    ``real_data`` (a tensor ``(N, *event)`` or an object with ``.sample(n, generator=)``).
    """
    if cfg.rho > 0 and pairs.forward is None:
        raise ReflowError(f"rho={cfg.rho} > 0 draws forward pairs, but pairs has no forward pairs")
    if cfg.projection_alpha > 0 and real_data is None:
        raise ReflowError("projection_alpha > 0 needs real_data (real x0 to project the backward pairs onto)")
    global_batch = int(cfg.batch_size)

    def batch_fn(step: int, rank: int, world_size: int, generator: torch.Generator) -> Tensor:
        n = global_batch // world_size
        g = _cpu_generator(generator)
        is_fwd = torch.rand(n, generator=g) < cfg.rho
        ib = torch.randint(len(pairs.backward[0]), (n,), generator=g)
        x0, x1 = pairs.backward[0][ib].clone(), pairs.backward[1][ib].clone()
        if pairs.forward is not None and bool(is_fwd.any()):
            jf = torch.randint(len(pairs.forward[0]), (int(is_fwd.sum()),), generator=g)
            x0[is_fwd], x1[is_fwd] = pairs.forward[0][jf], pairs.forward[1][jf]
        bwd = ~is_fwd
        if cfg.projection_alpha > 0 and bool(bwd.any()):
            real = _real(real_data, math.ceil(cfg.projection_pool * int(bwd.sum())), g).to(x0)
            x0[bwd], _ = project_pairs(
                x0[bwd], x1[bwd], real, alpha=cfg.projection_alpha, method=cfg.projection_method
            )
        return torch.stack([x0, x1], dim=1)

    return batch_fn


# ------------------------------------------------------------------------------------------ training
def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout rate of ``model`` (``model.set_dropout`` when it has one)."""
    if hasattr(model, "set_dropout"):
        model.set_dropout(p)
        return
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not drops and p > 0:
        raise ReflowError(
            f"student_dropout={p}: the teacher model ({type(model).__name__}) has no dropout layers"
        )
    for m in drops:
        m.p = float(p)


def _check_student(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.state_dict(), teacher.state_dict()
    if type(student) is not type(teacher):
        raise ReflowError(
            f"student is a {type(student).__name__} but teacher_model a {type(teacher).__name__}"
        )
    for k in sorted(set(s) | set(t)):
        if k not in s or k not in t:
            where = "student" if k not in s else "teacher_model"
            raise ReflowError(
                f"student and teacher_model architectures differ: {where} has no parameter {k!r}"
            )
        if s[k].shape != t[k].shape:
            raise ReflowError(
                f"student and teacher_model architectures differ: {k!r} has shape {tuple(s[k].shape)} in "
                f"student but {tuple(t[k].shape)} in teacher_model"
            )


def _check_pairs_fit(model: nn.Module, pairs: PairDataset) -> str:
    """Run ``model`` on two of the pairs; returns its head kind, ``"velocity"`` or ``"gm"``."""
    x = pairs.backward[1][:2]
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            out = model(x, torch.full((x.shape[0],), 0.5, dtype=x.dtype, device=x.device))
    except (ValueError, RuntimeError, TypeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise ReflowError(
            f"pairs: event shape {tuple(pairs.event_shape)} does not fit teacher_model ({msg})"
        ) from None
    u = out.mean() if isinstance(out, GaussianMixture) else out
    if not isinstance(u, Tensor) or u.shape != x.shape:
        raise ReflowError(
            f"pairs: teacher_model maps event shape {tuple(pairs.event_shape)} to another shape"
        )
    return "gm" if isinstance(out, GaussianMixture) else "velocity"


def _pairs_record(pairs: PairDataset) -> dict[str, Any]:
    keys = ("teacher_id", "data_id", "solver", "nfe", "grid", "seed", "n")
    return {d: {k: getattr(m, k) for k in keys} for d, m in pairs.manifests.items()}


def train_reflow(
    cfg: ReflowConfig,
    teacher_model: nn.Module,
    pairs: PairDataset,
    *,
    real_data: Any = None,
    student: nn.Module | None = None,
    progress: bool = True,
    verbose: bool | None = None,
):
    """Train a ReFlow student on ``pairs``, initialised from ``teacher_model``; returns a ``TrainResult``.

    Args:
        cfg: the run (validated here); ``cfg.out_dir`` receives checkpoints and ``reflow.json`` (config
            and pair settings); running again resumes, and a different training config is refused.
        teacher_model: the network the student starts from (normally the teacher that made the pairs);
            deep-copied, never modified.
        pairs: backward (and, for ``rho > 0``, forward) pairs.
        real_data: real ``x0`` for ``projection_alpha > 0``.
        student: optional module of the teacher's architecture to receive the teacher's weights
            (default: a deep copy of ``teacher_model``).
    """
    from ..train import train
    from ..train.checkpoint import has_checkpoint
    from ..train.config import ConfigError

    cfg.validate()
    if not isinstance(teacher_model, nn.Module):
        raise ReflowError(
            "teacher_model must be an nn.Module to initialise the student from, got "
            f"{type(teacher_model).__name__}"
        )
    if not isinstance(pairs, PairDataset):
        raise ReflowError(f"pairs must be a gmflow.reflow.PairDataset, got {type(pairs).__name__}")
    if pairs.rho not in (0.0, cfg.rho):
        raise ReflowError(f"pairs.rho={pairs.rho} differs from cfg.rho={cfg.rho}; the batches use cfg.rho")
    if cfg.hpf_lambda > 0 and len(pairs.event_shape) != 3:
        raise ConfigError(
            f"hpf_lambda: the HPF loss needs image pairs (C, H, W); these pairs have event shape "
            f"{tuple(pairs.event_shape)} (set hpf_lambda=0)"
        )
    if student is None:
        student = copy.deepcopy(teacher_model)
    else:
        _check_student(student, teacher_model)
        student.load_state_dict(teacher_model.state_dict())
    student.requires_grad_(True)
    head = _check_pairs_fit(student, pairs)
    if cfg.student_dropout is not None:
        set_dropout(student, cfg.student_dropout)
    record = {"format": "gmflow-reflow/1", "reflow": cfg.to_dict(), "pairs": _pairs_record(pairs)}
    if cfg.out_dir is not None:
        out_dir = Path(cfg.out_dir)
        old_path = out_dir / REFLOW_JSON
        if has_checkpoint(out_dir) and old_path.is_file():
            old = json.loads(old_path.read_text(encoding="utf-8"))
            diff = [
                f"{k}: {old['reflow'].get(k)!r} -> {v!r}"
                for k, v in record["reflow"].items()
                if k not in _NON_TRAINING and old["reflow"].get(k) != v
            ]
            if old.get("pairs") != record["pairs"]:
                diff.append("pairs: different pair settings")
            if diff:
                raise ConfigError(
                    f"out_dir {str(out_dir)!r} holds a ReFlow run with a different config "
                    f"({'; '.join(diff[:4])}); use another out_dir or delete that directory"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(old_path, record)
    return train(
        cfg.to_train_config(head=head),
        model=student,
        objective=reflow_objective(cfg),
        batch_fn=reflow_batch_fn(pairs, cfg, real_data),
        progress=progress,
        verbose=verbose,
    )
