"""Optimizer, learning-rate warm-up and gradient-norm clipping of the training loop.

**Parameter groups hook.** A model may offer ``model.optimizer_groups() -> list[dict]``: a partition of
its trainable parameters, each dict ``{"params": [...]}`` plus optional overrides ``"lr"`` and
``"weight_decay"`` of the loop's values (e.g. :class:`~gmflow.nn.SpectralDenoiser`: the trunk and the
spectrum net with its own learning rate). Without the hook all trainable parameters form one group.
Each group is split into decayed (>= 2-D weights) and undecayed (biases, norms) optimizer groups, and
gradient clipping applies to each group's own norm, so one group's gradients never rescale another's
update (the spectral loss cannot change the trunk's steps). The warm-up factor multiplies every
group's learning rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import LoopConfig

__all__ = ["build_optimizer", "grad_norm_and_clip", "parameter_groups", "warmup_factor"]

_GROUP_KEYS = frozenset({"params", "lr", "weight_decay"})


def warmup_factor(i: int, warmup_steps: int) -> float:
    """LR multiplier of the update after ``i`` completed ones: ``0.001 + 0.999 min(i / warmup, 1)``."""
    if warmup_steps <= 0:
        return 1.0
    return 0.001 + 0.999 * min(i / warmup_steps, 1.0)


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``model.optimizer_groups()`` checked (see the module docstring), or one group of every trainable
    parameter. Raises ValueError unless the groups partition the trainable parameters exactly."""
    hook = getattr(model, "optimizer_groups", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not callable(hook):
        return [{"params": trainable}]
    groups = hook()
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"{type(model).__name__}.optimizer_groups() must return a non-empty list of dicts")
    seen: set[int] = set()
    for i, g in enumerate(groups):
        extra = sorted(set(g) - _GROUP_KEYS)
        if "params" not in g or extra:
            raise ValueError(
                f"{type(model).__name__}.optimizer_groups()[{i}] must have 'params' and only "
                f"{', '.join(sorted(_GROUP_KEYS))}; got keys {sorted(g)}"
            )
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"{type(model).__name__}.optimizer_groups(): a parameter is in two groups")
            seen.add(id(p))
    if seen != {id(p) for p in trainable}:
        raise ValueError(
            f"{type(model).__name__}.optimizer_groups() must hold every trainable parameter exactly once"
        )
    return [{**g, "params": list(g["params"])} for g in groups]


def build_optimizer(model: nn.Module, loop: LoopConfig) -> torch.optim.Optimizer:
    """AdamW/Adam over :func:`parameter_groups`; weight decay only on >= 2-D weights (never on biases).

    Optimizer groups come in the order decay / no-decay of group 0, then of group 1, ... (empty ones
    left out). Uses the fused kernel where torch has one for the parameters' device (CPU since torch
    2.4, CUDA): one pass over all parameters instead of ~10 small ops per tensor.
    """
    cls = torch.optim.AdamW if loop.optimizer == "adamw" else torch.optim.Adam
    groups = []
    for g in parameter_groups(model):
        lr = float(g.get("lr", loop.lr))
        wd = float(g.get("weight_decay", loop.weight_decay))
        groups += [
            {"params": [p for p in g["params"] if p.ndim >= 2], "lr": lr, "weight_decay": wd},
            {"params": [p for p in g["params"] if p.ndim < 2], "lr": lr, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    try:
        return cls(groups, lr=loop.lr, betas=tuple(loop.betas), fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype/torch version
        return cls(groups, lr=loop.lr, betas=tuple(loop.betas))


def grad_norm_and_clip(params: list[nn.Parameter] | list[list[nn.Parameter]], max_norm: float) -> float:
    """Total gradient 2-norm; scales the gradients down to ``max_norm`` if it is finite and exceeded.

    ``params``: a list of parameters, or a list of parameter groups (lists), each clipped by its own
    norm; the return value is the norm over all groups. Unlike ``clip_grad_norm_(..., inf)`` this skips
    the pass that multiplies every gradient by 1.
    """
    sets = params if params and isinstance(params[0], list) else [params]
    norms = []
    for group in sets:
        grads = [p.grad for p in group if p.grad is not None]
        if not grads:
            continue
        each = torch._foreach_norm(grads, 2.0)
        norm = float(torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in each]), 2.0))
        if math.isfinite(max_norm) and math.isfinite(norm) and norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        norms.append(norm)
    if len(norms) <= 1:
        return norms[0] if norms else 0.0
    return math.sqrt(sum(n * n for n in norms))
