"""Rebuild a run's network from its ``config.json`` record and load its weights."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import nn as gnn
from ..train import Checkpoint, CheckpointError, load_checkpoint

__all__ = ["build_model", "load_network", "network_from_checkpoint"]


def build_model(model_info: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``config.json["model"]`` = ``{"class": name, "config": kwargs}``.

    ``name`` must be a class of :mod:`gmflow.nn` with a ``from_config`` class method.
    """
    name = model_info.get("class") if isinstance(model_info, dict) else None
    cls = getattr(gnn, str(name), None)
    if cls is None or not hasattr(cls, "from_config") or not isinstance(model_info.get("config"), dict):
        raise CheckpointError(f"config.json does not describe a rebuildable gmflow.nn model (class {name!r})")
    try:
        return cls.from_config(model_info["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild {name} from config.json: {e}") from None


def network_from_checkpoint(
    ck: Checkpoint, *, use_ema: bool = True, device: torch.device | str = "cpu"
) -> nn.Module:
    """The network of a loaded checkpoint, in eval mode without gradients.

    ``use_ema=True`` takes the EMA weights when the run kept an EMA, the raw weights otherwise.
    """
    model = build_model(ck.config.get("model", {}))
    state = ck.ema_state if (use_ema and ck.ema_state is not None) else ck.model_state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(
            f"weights in {str(ck.path)!r} do not fit the model in config.json: {msg[:300]}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def load_network(
    path: str | os.PathLike, *, use_ema: bool = True, device: torch.device | str = "cpu"
) -> nn.Module:
    """The network of the run directory ``path`` (see :func:`network_from_checkpoint`)."""
    return network_from_checkpoint(load_checkpoint(path), use_ema=use_ema, device=device)
