"""The generic training loop and its parts: loop config, optimizer, EMA, checkpoints, run log, DDP.

Example (any model, objective and batches; experiments in :mod:`gmflow.experiments` build these)::

    import torch
    from gmflow.data import make_toy2d
    from gmflow.nn import ToyMLP
    from gmflow.train import FlowLoss, LoopConfig, dataset_batch_fn, flow_objective, train

    loop = LoopConfig(steps=2000, batch_size=1024, out_dir="runs/k64")
    torch.manual_seed(loop.seed)
    result = train(loop, ToyMLP(channels=2), flow_objective(FlowLoss()),
                   dataset_batch_fn(make_toy2d("checkerboard"), loop.batch_size))   # rerun to resume
"""

from .checkpoint import (
    RUN_FORMAT,
    Checkpoint,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from .config import LOOP_NON_TRAINING, LoopConfig
from .distributed import DistInfo, distributed, init_distributed
from .ema import EMA, ema_beta
from .loop import TrainingDivergedError, TrainingInterrupted, TrainResult, train
from .objectives import (
    LOSSES,
    BatchFn,
    FlowLoss,
    Objective,
    dataset_batch_fn,
    flow_loss,
    flow_objective,
    step_generator,
    step_seed,
)
from .optim import build_optimizer, grad_norm_and_clip, parameter_groups, warmup_factor
from .runlog import LOG_COLUMNS, RunLog

__all__ = [
    "BatchFn",
    "Checkpoint",
    "CheckpointError",
    "DistInfo",
    "EMA",
    "FlowLoss",
    "LOG_COLUMNS",
    "LOOP_NON_TRAINING",
    "LOSSES",
    "LoopConfig",
    "Objective",
    "RUN_FORMAT",
    "RunLog",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_optimizer",
    "dataset_batch_fn",
    "distributed",
    "ema_beta",
    "flow_loss",
    "flow_objective",
    "grad_norm_and_clip",
    "has_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "parameter_groups",
    "read_manifest",
    "save_checkpoint",
    "step_generator",
    "step_seed",
    "train",
    "warmup_factor",
]
