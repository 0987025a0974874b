"""The Simple ReFlow experiment: one ReFlow round on teacher pairs, with the paper's knobs as a config.

The student starts as a copy of the teacher (``student_dropout`` replaces its dropout rate) and is
trained by the generic loop, so checkpoints, resume, EMA and DDP come for free. The objective and
the pair batches are :mod:`gmflow.reflow.objective`; the maths is in ``docs/maths/reflow.md``.

Keys (``--set``): ``teacher`` (run directory), ``data`` (real data set name), ``student_dropout``,
``loss.*`` (:class:`~gmflow.reflow.ReflowLoss`), ``pairs.*`` (:class:`~gmflow.reflow.PairMixing`),
``sampling.*`` (:class:`ReflowSampling`, inference settings), ``loop.*``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import ConfigError, apply_sets
from ..data import DATASETS, load_dataset
from ..flow import GRID_KINDS, TIME_SAMPLERS
from ..gm import GaussianMixture
from ..nn import LogLossNet, WithLogLoss
from ..reflow import PairDataset, read_manifest
from ..reflow.objective import (
    NORMALIZATIONS,
    PROJECTION_METHODS,
    WEIGHTS,
    PairMixing,
    ReflowError,
    ReflowLoss,
    reflow_batch_fn,
    reflow_objective,
)
from ..sampling import SOLVERS
from ..train import LoopConfig, TrainResult, train
from .base import Experiment
from .network import load_network
from .reflow_upgrade import upgrade_reflow_config

__all__ = [
    "RECIPES",
    "ReflowConfig",
    "ReflowSampling",
    "pairs_record",
    "prepare_student",
    "recipe",
    "set_dropout",
    "train_reflow",
]

# the student's inference solvers: deterministic, and run on its velocity (mean) prediction
SAMPLE_SOLVERS = tuple(n for n, c in SOLVERS.items() if not c.needs_gm and not c.stochastic)


@dataclass
class ReflowSampling:
    """Inference settings of the student (recorded; :meth:`sample_kwargs` for :func:`gmflow.sample`).

    solver, grid, kappa (sigmoid grid, > 0), r (DPM-Solver-2, in (0, 1]), guidance_scale (EDM2 lerp
    convention ``D_bad + w (D_good - D_bad)``: ``w = 1`` is no guidance; the paper's "0.6" is 1.6).
    """

    solver: str = "euler"
    grid: str = "uniform"
    kappa: float = 20.0
    r: float = 0.4
    guidance_scale: float = 1.0

    def sample_kwargs(self) -> dict[str, Any]:
        """``solver``/``grid``/``kappa``/``r`` keywords of :func:`gmflow.sample` (guidance is separate)."""
        kw: dict[str, Any] = {"solver": self.solver, "grid": self.grid, "kappa": self.kappa}
        if self.solver == "dpm-solver-2":
            kw["r"] = self.r
        return kw


_CHOICES = {
    "loss.normalize": NORMALIZATIONS, "loss.time_sampler": TIME_SAMPLERS, "loss.weight": WEIGHTS,
    "pairs.projection_method": PROJECTION_METHODS,
    "sampling.solver": SAMPLE_SOLVERS, "sampling.grid": GRID_KINDS,
}  # fmt: skip
_RANGES = {
    "loss.hpf_lambda": "[0, inf)", "loss.hpf_radius": "(0, 1]", "loss.norm_floor": "(0, inf)",
    "loss.time_eps": "[0, 1)", "loss.time_max": "(0, 1]", "student_dropout": "[0, 1)", "pairs.rho": "[0, 1]",
    "pairs.projection_lambda": "[0, inf)", "pairs.projection_pool": "[1, inf)",
    "pairs.projection_block": "[1, inf)", "sampling.kappa": "(0, inf)",
    "sampling.r": "(0, 1]", "sampling.guidance_scale": "(-inf, inf)",
}  # fmt: skip
_WHAT = {"pairs.rho": "the forward-pair ratio ", "sampling.kappa": "the sigmoid-grid kappa ",
         "sampling.r": "DPM-Solver-2's r "}  # fmt: skip


def _within(v: float, spec: str) -> bool:
    """``v`` in an interval written like ``"(0, 1]"`` (finite values only)."""
    lo, hi = (float(p) for p in spec[1:-1].split(","))
    ok_lo = v >= lo if spec[0] == "[" else v > lo
    ok_hi = v <= hi if spec[-1] == "]" else v < hi
    return math.isfinite(v) and ok_lo and ok_hi


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass
class ReflowConfig(Experiment):
    """A ReFlow run; the defaults are the 2-rectified-flow baseline (see :data:`RECIPES`)."""

    kind: ClassVar[str] = "reflow"
    resume_ignore: ClassVar[frozenset[str]] = frozenset(
        {"teacher", "pairs.backward", "pairs.forward"}
        | {f"sampling.{k}" for k in ReflowSampling.__annotations__}
    )

    teacher: str | None = None  # teacher run directory (None: the teacher is given in memory)
    teacher_ema: bool = True  # start from the teacher's EMA weights (False: its raw weights)
    data: str | None = None  # the real data set (projection target, evaluation), e.g. "digits16"
    student_dropout: float | None = None  # None: keep the teacher's
    loss: ReflowLoss = field(default_factory=ReflowLoss)
    pairs: PairMixing = field(default_factory=PairMixing)
    sampling: ReflowSampling = field(default_factory=ReflowSampling)
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=2000, batch_size=256, optimizer="adam", warmup_steps=100)
    )

    @classmethod
    def upgrade_config(cls, config: Any) -> tuple[Any, list[str]]:
        """Configs saved before the loss rework in today's keys (:func:`upgrade_reflow_config`)."""
        return upgrade_reflow_config(config)

    def validate(self) -> ReflowConfig:
        """Raise :class:`~gmflow.config.ConfigError` naming the first invalid field; return ``self``."""
        self.check_types()
        for key, choices in _CHOICES.items():
            if _get(self, key) not in choices:
                raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {_get(self, key)!r}")
        for key, spec in _RANGES.items():
            v = _get(self, key)
            if v is None and key == "student_dropout":
                continue
            if not _within(float(v), spec):
                raise ConfigError(f"{key}: {_WHAT.get(key, '')}must be a number in {spec}, got {v!r}")
        if self.loss.time_eps >= self.loss.time_max:
            raise ConfigError(
                f"loss.time_max: must exceed loss.time_eps={self.loss.time_eps}, got {self.loss.time_max}"
            )
        if self.data is not None and self.data not in DATASETS:
            raise ConfigError(f"data: unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        self.loop.validate()
        return self

    @property
    def data_name(self) -> str | None:
        return self.data

    def dataset(self, split: str = "train") -> Any:
        if self.data is None:
            raise ConfigError("data: this ReFlow run records no data set (set data=NAME when training)")
        return load_dataset(self.data, split)

    def real_data(self) -> Any:
        """Real ``x0`` for the projection: toy sets as samplers, image sets as the train-split tensor."""
        ds = self.dataset("train")
        return ds.tensor() if hasattr(ds, "tensor") else ds

    def build(self):
        """Student, objective and batches from the recorded paths (``teacher``, ``pairs.*``, ``data``)."""
        if self.teacher is None or self.pairs.backward is None:
            raise ConfigError("teacher and pairs.backward: a ReFlow run from a config needs both paths")
        if self.pairs.rho > 0 and self.pairs.forward is None:
            raise ConfigError(
                f"pairs.forward: rho={self.pairs.rho} > 0 draws forward pairs; set the directory"
            )
        if self.pairs.projection_lambda > 0 and self.data is None:
            raise ConfigError("data: projection_lambda > 0 projects onto real data; name the data set")
        teacher = load_network(self.teacher, use_ema=self.teacher_ema)
        pairs = PairDataset(self.pairs.backward, self.pairs.forward, rho=self.pairs.rho)
        real = self.real_data() if self.pairs.projection_lambda > 0 else None
        return prepare_student(self, teacher, pairs, real_data=real)

    def record(self) -> dict[str, Any]:
        """The base record plus the settings of the pairs in ``pairs.backward`` / ``pairs.forward``."""
        rec = super().record()
        if self.pairs.backward is not None:
            dirs = {"backward": self.pairs.backward, "forward": self.pairs.forward}
            rec["pairs"] = pairs_record({d: read_manifest(p) for d, p in dirs.items() if p is not None})
        return rec


def pairs_record(manifests: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its pairs (per direction): teacher, data, solver, NFE, grid, seed, count."""
    keys = ("teacher_id", "data_id", "solver", "nfe", "grid", "seed", "n")
    return {d: {k: getattr(m, k) for k in keys} for d, m in manifests.items()}


RECIPES: dict[str, ReflowConfig] = {
    # 2-rectified flow (Liu et al. 2023) from the teacher: uniform t, velocity MSE, teacher dropout,
    # backward pairs, Euler on the uniform grid: the reference rung of the ladder on every test bed.
    "2rf": ReflowConfig(),
    # Simple ReFlow for images: per-sample normalisation (teacher pairs), t ∝ 10^t, DPM-Solver-2 (r 0.4)
    # on the sigmoid grid; kappa 5, not the brief's 20: with N = 4-5 steps kappa 20 spends steps at
    # t ~ 1 and t ~ 0 (docs/maths/reflow.md §10). Off by measurement (docs/RESULTS.md §17 / §17b, FD vs
    # the test split, the ladder's rung changes at NFE 1 / 9): the HPF distance (lambda 10: Fashion-MNIST
    # +4.8 / +2.8 %, digits +2.1 / +1.7 %), forward pairs (rho 0.4: Fashion-MNIST +14.3 / +4.8 %; digits
    # +1.5 / -3.7 %) and the projection (it hurt in every measured setting, §9). Set student_dropout
    # per data set. Vector data get the overrides of `recipe` (measured, §13).
    "simple": ReflowConfig(
        loss=ReflowLoss(normalize="sample", time_sampler="pow10"),
        sampling=ReflowSampling(solver="dpm-solver-2", grid="sigmoid", kappa=5.0, r=0.4),
    ),
}

# `recipe(name, event_shape)` for vector (non-image) data, chosen on the 2-D beds by the ladder
# (docs/maths/reflow.md §13, docs/RESULTS.md §10). The normaliser, recipe vs 2-RF in sliced-W2 at NFE
# 1 / 2: checkerboard sample -12 / -9 %, none -16 / -13 %, learned -32 / -25 %; ring sample +15 / -1 %,
# none -12 / -12 %, learned -13 / -9 %. Forward pairs (rho 0.4), the rung's change at NFE 1 / 2:
# checkerboard +0.2 / +0.2 %, ring -2.1 / -4.1 %.
_VECTOR_SETS: dict[str, list[str]] = {
    "2rf": [],
    "simple": ["loss.normalize=learned", "pairs.rho=0.4"],
}


def recipe(name: str, event_shape: tuple[int, ...] | None = None) -> ReflowConfig:
    """The config of recipe ``name`` for data of ``event_shape`` (``(C, H, W)`` images, else vectors).

    ``event_shape=None`` returns :data:`RECIPES` ``[name]`` itself (the image form).
    """
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    cfg = RECIPES[name]
    if event_shape is None or len(tuple(event_shape)) == 3:
        return copy.deepcopy(cfg)
    return apply_sets(cfg, _VECTOR_SETS[name])


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


def _check_pairs_fit(model: nn.Module, pairs: PairDataset) -> None:
    """Run ``model`` on two of the pairs: it must map the pairs' event shape to itself."""
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


def prepare_student(
    cfg: ReflowConfig,
    teacher_model: nn.Module,
    pairs: PairDataset,
    *,
    real_data: Any = None,
    student: nn.Module | None = None,
):
    """``(student, objective, batch_fn)`` of a ReFlow run (see :func:`train_reflow`)."""
    cfg.validate()
    if not isinstance(teacher_model, nn.Module):
        raise ReflowError(
            "teacher_model must be an nn.Module to initialise the student from, got "
            f"{type(teacher_model).__name__}"
        )
    if not isinstance(pairs, PairDataset):
        raise ReflowError(f"pairs must be a gmflow.reflow.PairDataset, got {type(pairs).__name__}")
    if pairs.rho not in (0.0, cfg.pairs.rho):
        raise ReflowError(
            f"pairs.rho={pairs.rho} differs from cfg.pairs.rho={cfg.pairs.rho}; the batches use cfg.pairs.rho"
        )
    if cfg.loss.hpf_lambda > 0 and len(pairs.event_shape) != 3:
        raise ConfigError(
            f"loss.hpf_lambda: the HPF loss needs image pairs (C, H, W); these pairs have event shape "
            f"{tuple(pairs.event_shape)} (set loss.hpf_lambda=0)"
        )
    if student is None:
        student = copy.deepcopy(teacher_model)
    else:
        _check_student(student, teacher_model)
        student.load_state_dict(teacher_model.state_dict())
    student.requires_grad_(True)
    _check_pairs_fit(student, pairs)
    if cfg.student_dropout is not None:
        set_dropout(student, cfg.student_dropout)
    if cfg.loss.normalize == "learned":
        torch.manual_seed(cfg.loop.seed)
        student = WithLogLoss(student, LogLossNet(tuple(pairs.event_shape)))
    objective = reflow_objective(cfg.loss)
    batch_fn = reflow_batch_fn(pairs, cfg.pairs, cfg.loop.batch_size, real_data, seed=cfg.loop.seed)
    return student, objective, batch_fn


def train_reflow(
    cfg: ReflowConfig,
    teacher_model: nn.Module,
    pairs: PairDataset,
    *,
    real_data: Any = None,
    student: nn.Module | None = None,
    progress: bool = True,
    verbose: bool | None = None,
) -> TrainResult:
    """Train a ReFlow student on ``pairs``, initialised from ``teacher_model``; returns a ``TrainResult``.

    Args:
        cfg: the run (validated here); ``cfg.loop.out_dir`` receives checkpoints and ``config.json``
            (the config, its data set and the pair settings); running again resumes, and a different
            training config or different pairs are refused.
        teacher_model: the network the student starts from (normally the teacher that made the pairs);
            deep-copied, never modified.
        pairs: backward (and, for ``rho > 0``, forward) pairs.
        real_data: real ``x0`` for ``pairs.projection_lambda > 0`` (a tensor or a sampler; the train
            split only: it must not be the data the student is evaluated against).
        student: optional module of the teacher's architecture to receive the teacher's weights
            (default: a deep copy of ``teacher_model``).
    """
    model, objective, batch_fn = prepare_student(
        cfg, teacher_model, pairs, real_data=real_data, student=student
    )
    record = {**Experiment.record(cfg), "pairs": pairs_record(pairs.manifests)}
    return train(
        cfg.loop,
        model,
        objective,
        batch_fn,
        record=record,
        resume_ignore=cfg.resume_ignore,
        upgrade_record=cfg.upgrade_record,
        progress=progress,
        verbose=verbose,
    )
