"""Rebuild any run from its directory: the experiment config recorded in ``config.json`` and the network.

``config.json`` (format ``gmflow-run/2``) holds ``{"experiment": kind, "data": name, "config": the
experiment's nested dict, "model": {"class", "config"}, "step", ...}``; :func:`load_run` turns it back
into the experiment config (:data:`EXPERIMENTS` maps kinds to classes) and the trained network.
Runs written by gmflow 0.1 (``gmflow-run/1``, toy 2-D only) are converted on load, and configs in
the keys of an earlier version by the experiment's :meth:`~gmflow.experiments.base.Experiment.upgrade_config`
(ReFlow: :mod:`gmflow.experiments.reflow_upgrade`; a setting that no longer exists gives a warning).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..nn import WithLogLoss
from ..train import CheckpointError, load_checkpoint
from .base import Experiment
from .images import ImagesConfig
from .network import network_from_checkpoint
from .reflow import ReflowConfig
from .toy2d import Toy2DConfig

__all__ = ["EXPERIMENTS", "Run", "experiment_from_record", "load_model", "load_run"]

EXPERIMENTS: dict[str, type] = {c.kind: c for c in (Toy2DConfig, ImagesConfig, ReflowConfig)}

_V1_LOSS_KEYS = ("trans_ratio", "time_sampler", "time_loc", "time_scale", "time_eps")


def _from_v1(train: dict[str, Any]) -> dict[str, Any]:
    """A ``gmflow-run/1`` toy training config as a :class:`Toy2DConfig` dict."""
    loss = {"kind": train.get("loss", "transition"), **{k: train[k] for k in _V1_LOSS_KEYS if k in train}}
    loop = {k: v for k, v in train.items() if k not in {"data", "model", "loss", *_V1_LOSS_KEYS}}
    return {"data": train.get("data", {}), "model": train.get("model", {}), "loss": loss, "loop": loop}


def experiment_from_record(record: dict[str, Any], where: str = "config.json") -> Experiment:
    """The experiment config of a ``config.json`` record (raises CheckpointError naming ``where``)."""
    fmt = record.get("format")
    try:
        if fmt == "gmflow-run/1":
            if (record.get("model") or {}).get("class") != "ToyMLP":
                raise CheckpointError(
                    f"{where} was written by gmflow 0.1 for a non-toy run, which it did not describe "
                    "fully; retrain the run with this version"
                )
            return Toy2DConfig.from_dict(_from_v1(record.get("train", {})))
        kind = record.get("experiment")
        if kind not in EXPERIMENTS:
            raise CheckpointError(
                f"{where} records experiment {kind!r}; this version knows {', '.join(EXPERIMENTS)}"
            )
        cls = EXPERIMENTS[kind]
        config, changes = cls.upgrade_config(record.get("config", {}))
        for change in changes:
            warnings.warn(f"{where}: {change}; the run loads, but cannot be resumed", stacklevel=3)
        return cls.from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{where} is not a valid run config: {e}") from None


@dataclass
class Run:
    """A trained run: its directory, step, experiment config and network (eval mode, no gradients).

    ``model`` is what was trained (for a learned-normaliser ReFlow run a :class:`~gmflow.nn.WithLogLoss`,
    which samples like its ``net``); the properties describe the denoiser, :attr:`network`.
    """

    path: Path
    step: int
    config: Experiment
    model: nn.Module

    @property
    def network(self) -> nn.Module:
        """The denoiser: :attr:`model`, or its ``net`` when it carries a learned loss normaliser."""
        return self.model.net if isinstance(self.model, WithLogLoss) else self.model

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one sample: the network's ``event_shape``, else ``(channels,)``."""
        if hasattr(self.network, "event_shape"):
            return tuple(int(v) for v in self.network.event_shape)
        return (int(self.network.channels),)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (its null class id), 0 for an unconditional one."""
        return int(getattr(self.network, "num_classes", 0) or 0)

    @property
    def head(self) -> str:
        """``"gm"`` if the network returns a GaussianMixture, else ``"velocity"`` (the network's
        ``head`` name where it has one, else its config's)."""
        head = getattr(self.network, "head", None)
        if isinstance(head, str):
            return head
        conf = getattr(self.network, "config", None)
        return "gm" if isinstance(conf, dict) and conf.get("head") == "gm" else "velocity"


def load_run(path: str | os.PathLike, *, use_ema: bool = True, device: torch.device | str = "cpu") -> Run:
    """Load the run in directory ``path``: verified checkpoint, experiment config and network.

    ``use_ema=True`` loads the EMA weights when the run kept an EMA, the raw weights otherwise.
    """
    ck = load_checkpoint(path)
    cfg = experiment_from_record(ck.config, where=f"config.json in {str(path)!r}")
    model = network_from_checkpoint(ck, use_ema=use_ema, device=device)
    return Run(path=Path(path), step=ck.step, config=cfg, model=model)


def load_model(
    path: str | os.PathLike, *, use_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Experiment]:
    """``(network in eval mode, experiment config)`` of the run in ``path`` (see :func:`load_run`)."""
    run = load_run(path, use_ema=use_ema, device=device)
    return run.model, run.config
