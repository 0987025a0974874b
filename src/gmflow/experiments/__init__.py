"""Experiments: configs that build a model, an objective and batches for the generic training loop.

Each experiment is a dataclass with its own sections plus a ``loop`` section; its kind and real data
set are recorded in every run's ``config.json`` so that :func:`load_run` rebuilds any run.

=========  ==========================  =====================================================
kind       config                      what it trains
=========  ==========================  =====================================================
toy2d      :class:`Toy2DConfig`        ToyMLP (GM or velocity head) on a toy 2-D data set
images     :class:`ImagesConfig`       SmallUNet or GM-DiT on an image data set
reflow     :class:`ReflowConfig`       a Simple ReFlow student on teacher pairs
=========  ==========================  =====================================================

Example::

    from gmflow.experiments import get_preset, load_run, run_experiment

    cfg = get_preset("toy-gmflow").with_sets(["loop.steps=2000", "loop.out_dir=runs/k64"])
    result = run_experiment(cfg)              # run it again to resume
    run = load_run("runs/k64")                # run.model (EMA weights), run.config, run.step
"""

import difflib

from ..config import ConfigError
from .base import Experiment, run_experiment
from .images import IMAGE_DATASETS, IMAGES_PRESETS, ImageData, ImageModel, ImagesConfig
from .network import build_model, load_network, network_from_checkpoint
from .reflow import (
    RECIPES,
    ReflowConfig,
    ReflowSampling,
    pairs_record,
    prepare_student,
    recipe,
    set_dropout,
    train_reflow,
)
from .runs import EXPERIMENTS, Run, experiment_from_record, load_model, load_run
from .toy2d import TOY2D_PRESETS, Toy2DConfig, Toy2DData, ToyModel

# The training presets of `gmflow train --preset NAME` (ReFlow runs start from RECIPES instead).
PRESETS: dict[str, Experiment] = {**TOY2D_PRESETS, **IMAGES_PRESETS}


def get_preset(name: str) -> Experiment:
    """A fresh copy of the named preset (:data:`PRESETS`)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (available: {', '.join(PRESETS)})")
    return PRESETS[name].copy()


__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "IMAGES_PRESETS",
    "IMAGE_DATASETS",
    "ImageData",
    "ImagesConfig",
    "PRESETS",
    "RECIPES",
    "ReflowConfig",
    "ReflowSampling",
    "Run",
    "TOY2D_PRESETS",
    "Toy2DConfig",
    "Toy2DData",
    "ToyModel",
    "ImageModel",
    "build_model",
    "experiment_from_record",
    "get_preset",
    "load_model",
    "load_network",
    "load_run",
    "network_from_checkpoint",
    "pairs_record",
    "prepare_student",
    "recipe",
    "run_experiment",
    "set_dropout",
    "train_reflow",
]
