"""gmflow.train.config: LoopConfig validation names the field (as ``loop.KEY`` inside an experiment)."""

from __future__ import annotations

import dataclasses

import pytest

from gmflow.config import ConfigError
from gmflow.experiments import get_preset
from gmflow.train import LOOP_NON_TRAINING, LoopConfig


@pytest.mark.parametrize(
    "value, key",
    [
        ("steps=0", "steps"),
        ("steps=-5", "steps"),
        ("batch_size=0", "batch_size"),
        ("optimizer=sgd", "optimizer"),
        ("lr=0", "lr"),
        ("lr=-1e-3", "lr"),
        ("lr=nan", "lr"),
        ("betas=0.9,1.0", "betas"),
        ("weight_decay=-1", "weight_decay"),
        ("warmup_steps=-1", "warmup_steps"),
        ("grad_clip=-1", "grad_clip"),
        ("grad_clip_start=-1", "grad_clip_start"),
        ("ema=karras", "ema"),
        ("ema_gamma=-1", "ema_gamma"),
        ("ema_halflife_kimg=0", "ema_halflife_kimg"),
        ("ema_rampup=0", "ema_rampup"),
        ("seed=-1", "seed"),
        ("ckpt_every=-1", "ckpt_every"),
        ("log_every=0", "log_every"),
        ("precision=fp16", "precision"),
        ("device=tpu", "device"),
    ],
)
def test_validation_names_the_field(value, key):
    with pytest.raises(ConfigError, match=f"^loop.{key}:"):
        get_preset("toy-smoke").with_sets([f"loop.{value}"]).validate()
    bad = get_preset("toy-smoke").with_sets([f"loop.{value}"]).loop
    with pytest.raises(ConfigError, match=f"^{key}:"):  # standalone: the prefix is the caller's
        bad.validate(prefix="")


def test_wrong_python_types_and_path_out_dir(tmp_path):
    with pytest.raises(ConfigError, match="^loop.steps: expected an integer"):
        dataclasses.replace(LoopConfig(), steps="10").validate()
    loop = dataclasses.replace(LoopConfig(), out_dir=tmp_path)  # a Path is accepted and stored as str
    assert loop.validate() is loop and loop.out_dir == str(tmp_path)


def test_defaults_and_non_training_keys():
    loop = LoopConfig().validate()
    assert (loop.optimizer, loop.lr, loop.betas, loop.warmup_steps, loop.ema, loop.ema_gamma) == (
        "adamw",
        2e-4,
        (0.9, 0.999),
        1000,
        "power",
        7.0,
    )
    assert LOOP_NON_TRAINING == {"steps", "out_dir", "ckpt_every", "log_every", "device"}
    assert LOOP_NON_TRAINING <= {f.name for f in dataclasses.fields(LoopConfig)}
