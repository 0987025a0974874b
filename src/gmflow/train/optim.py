"""Optimizer, learning-rate warm-up and gradient-norm clipping of the training loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoopConfig

__all__ = ["build_optimizer", "grad_norm_and_clip", "warmup_factor"]


def warmup_factor(i: int, warmup_steps: int) -> float:
    """LR multiplier of the update after ``i`` completed ones: ``0.001 + 0.999 min(i / warmup, 1)``."""
    if warmup_steps <= 0:
        return 1.0
    return 0.001 + 0.999 * min(i / warmup_steps, 1.0)


def build_optimizer(model: nn.Module, loop: LoopConfig) -> torch.optim.Optimizer:
    """AdamW/Adam over trainable parameters; weight decay only on >= 2-D weights (never on biases).

    Uses the fused kernel where torch has one for the parameters' device (CPU since torch 2.4, CUDA):
    one pass over all parameters instead of ~10 small ops per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    cls = torch.optim.AdamW if loop.optimizer == "adamw" else torch.optim.Adam
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": loop.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    try:
        return cls(groups, lr=loop.lr, betas=tuple(loop.betas), fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype/torch version
        return cls(groups, lr=loop.lr, betas=tuple(loop.betas))


def grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Total gradient 2-norm; scales the gradients down to ``max_norm`` if it is finite and exceeded.

    Unlike ``clip_grad_norm_(..., inf)`` this skips the pass that multiplies every gradient by 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2.0)
    total = float(torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), 2.0))
    if math.isfinite(max_norm) and math.isfinite(total) and total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total
