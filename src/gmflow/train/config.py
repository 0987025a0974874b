"""The training loop's own settings: :class:`LoopConfig` (the ``loop`` section of every experiment)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config import ConfigError, check_types, need

__all__ = ["LoopConfig", "LOOP_NON_TRAINING", "OPTIMIZERS", "EMA_KINDS", "PRECISIONS", "DEVICES"]

OPTIMIZERS = ("adamw", "adam")
EMA_KINDS = ("none", "power", "rampup")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# Loop fields that may change when a run is resumed (they do not change what is trained);
# ``steps`` may grow to continue a finished run.
LOOP_NON_TRAINING = frozenset({"steps", "out_dir", "ckpt_every", "log_every", "device"})


@dataclass
class LoopConfig:
    """Optimisation, EMA, randomness, precision and I/O of a run. ``batch_size`` is the GLOBAL batch.

    Learning rate: linear warm-up from ``0.001 lr`` to ``lr`` over ``warmup_steps`` updates, then
    constant. Gradient clipping by total norm ``grad_clip`` (0 = off) from update ``grad_clip_start``
    on; an update whose gradient norm is not finite is skipped. EMA: ``"power"`` is the Karras rule
    ``beta_i = (1 - 1/i)^(ema_gamma + 1)``; ``"rampup"`` the StyleGAN rule with half-life
    ``min(ema_halflife_kimg * 1000, ema_rampup * nimg)`` images (see :mod:`gmflow.train.ema`).
    ``precision="bf16"`` runs the network under bf16 autocast; GM and loss maths stay fp32.
    ``out_dir=None`` trains without checkpoints or logs (library use).
    """

    steps: int = 5000
    batch_size: int = 4096
    optimizer: str = "adamw"  # "adamw" | "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # AdamW only; never applied to biases (1-D parameters)
    warmup_steps: int = 1000
    grad_clip: float = 0.0
    grad_clip_start: int = 0
    ema: str = "power"  # "none" | "power" | "rampup"
    ema_gamma: float = 7.0
    ema_halflife_kimg: float = 30000.0  # GMFlow ImageNet config: in effect a pure ramp-up (0.05 nimg)
    ema_rampup: float | None = 0.05
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 1000  # 0: only at the end (and on interruption)
    log_every: int = 50
    precision: str = "fp32"
    device: str = "auto"

    def validate(self, prefix: str = "loop.") -> LoopConfig:
        """Raise :class:`~gmflow.config.ConfigError` naming the first invalid field; return ``self``."""
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        try:
            check_types(self)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
        p = prefix
        need(self.steps >= 1, f"{p}steps", f"must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"{p}batch_size", f"must be >= 1, got {self.batch_size}")
        need(
            self.optimizer in OPTIMIZERS,
            f"{p}optimizer",
            f"must be 'adamw' or 'adam', got {self.optimizer!r}",
        )
        need(math.isfinite(self.lr) and self.lr > 0, f"{p}lr", f"must be > 0, got {self.lr}")
        need(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"{p}betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        need(self.weight_decay >= 0, f"{p}weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"{p}warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.grad_clip >= 0, f"{p}grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.grad_clip_start >= 0, f"{p}grad_clip_start", f"must be >= 0, got {self.grad_clip_start}")
        need(self.ema in EMA_KINDS, f"{p}ema", f"must be one of {', '.join(EMA_KINDS)}, got {self.ema!r}")
        need(self.ema_gamma > -1, f"{p}ema_gamma", f"must be > -1, got {self.ema_gamma}")
        need(
            self.ema_halflife_kimg > 0, f"{p}ema_halflife_kimg", f"must be > 0, got {self.ema_halflife_kimg}"
        )
        need(
            self.ema_rampup is None or self.ema_rampup > 0,
            f"{p}ema_rampup",
            f"must be > 0 or none, got {self.ema_rampup}",
        )
        need(self.seed >= 0, f"{p}seed", f"must be >= 0, got {self.seed}")
        need(
            self.ckpt_every >= 0,
            f"{p}ckpt_every",
            f"must be >= 0 (0 = only at the end), got {self.ckpt_every}",
        )
        need(self.log_every >= 1, f"{p}log_every", f"must be >= 1, got {self.log_every}")
        need(
            self.precision in PRECISIONS,
            f"{p}precision",
            f"must be 'fp32' or 'bf16', got {self.precision!r}",
        )
        need(
            self.device in DEVICES, f"{p}device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}"
        )
        return self
