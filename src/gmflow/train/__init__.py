"""Training: config/presets, trainer, EMA, checkpoints and torchrun/DDP helpers.

Example::

    from gmflow.train import get_preset, apply_sets, train, load_model

    cfg = apply_sets(get_preset("toy-gmflow"), ["steps=2000", "out_dir=runs/k64"])
    result = train(cfg)                   # run it again to resume
    model, cfg = load_model("runs/k64")   # EMA weights by default
"""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    has_checkpoint,
    load_checkpoint,
    load_model,
    read_manifest,
    save_checkpoint,
)
from .config import (
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    apply_sets,
    config_diff,
    get_preset,
    load_overrides,
)
from .distributed import DistInfo, distributed, init_distributed
from .ema import EMA, ema_beta
from .objectives import make_batch_fn, make_objective, objective, step_generator, step_seed
from .trainer import (
    TrainingDivergedError,
    TrainingInterrupted,
    TrainResult,
    build_optimizer,
    train,
    warmup_factor,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DistInfo",
    "EMA",
    "ModelConfig",
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "apply_overrides",
    "apply_sets",
    "build_model",
    "build_optimizer",
    "config_diff",
    "distributed",
    "ema_beta",
    "get_preset",
    "has_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "load_model",
    "load_overrides",
    "make_batch_fn",
    "make_objective",
    "objective",
    "read_manifest",
    "save_checkpoint",
    "step_generator",
    "step_seed",
    "train",
    "warmup_factor",
]
