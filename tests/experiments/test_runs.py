"""gmflow.experiments.runs / network: rebuild any run (toy, images, ReFlow, gmflow 0.1 toy)."""

from __future__ import annotations

import json

import pytest
import torch

from gmflow.experiments import (
    ImagesConfig,
    ReflowConfig,
    Run,
    Toy2DConfig,
    build_model,
    experiment_from_record,
    get_preset,
    load_model,
    load_network,
    load_run,
    run_experiment,
)
from gmflow.nn import SmallUNet, ToyMLP
from gmflow.train import CheckpointError, load_checkpoint, save_checkpoint


def _equal_state(model: torch.nn.Module, ref: torch.nn.Module) -> bool:
    a, b = model.state_dict(), ref.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "fixture, cls, net, shape, head, data",
    [
        ("toy_run", Toy2DConfig, ToyMLP, (2,), "gm", "checkerboard"),
        ("velocity_run", Toy2DConfig, ToyMLP, (2,), "velocity", "checkerboard"),
        ("digits_run", ImagesConfig, SmallUNet, (1, 16, 16), "velocity", "digits16"),
        ("reflow_run", ReflowConfig, SmallUNet, (1, 16, 16), "velocity", "digits16"),
    ],
)
def test_load_run_rebuilds_every_kind_of_run(request, fixture, cls, net, shape, head, data):
    tiny = request.getfixturevalue(fixture)
    run = load_run(tiny.path)
    assert isinstance(run, Run) and run.path == tiny.path and run.step == tiny.result.step
    assert type(run.config) is cls and run.config.data_name == data
    assert run.config.loop.out_dir == str(tiny.path) and run.config.validate() is run.config
    assert run.config.to_dict() == json.loads((tiny.path / "config.json").read_text())["config"]
    assert type(run.model) is net and run.event_shape == shape and run.head == head
    assert not run.model.training and not any(p.requires_grad for p in run.model.parameters())
    assert _equal_state(run.model, tiny.result.ema_model)  # EMA weights by default
    raw = load_run(tiny.path, use_ema=False)
    assert _equal_state(raw.model, tiny.result.model) and not _equal_state(raw.model, run.model)
    model, cfg = load_model(tiny.path)
    assert _equal_state(model, run.model) and cfg == run.config
    assert _equal_state(load_network(tiny.path), run.model)


def test_reflow_run_records_its_teacher_data_and_pairs(reflow_run, digits_run, digits_pairs):
    cfg = load_run(reflow_run.path).config
    assert (cfg.teacher, cfg.data) == (str(digits_run.path), "digits16")
    assert (cfg.pairs.backward, cfg.pairs.forward) == tuple(map(str, digits_pairs))
    assert (cfg.pairs.rho, cfg.pairs.projection_lambda, cfg.loss.normalize) == (0.25, 1.0, "sample")
    rec = json.loads((reflow_run.path / "config.json").read_text())
    assert (rec["format"], rec["experiment"], rec["data"]) == ("gmflow-run/2", "reflow", "digits16")
    assert set(rec["pairs"]) == {"backward", "forward"} and rec["pairs"]["backward"]["n"] == 32
    assert rec["pairs"]["backward"]["solver"] == "euler" and rec["pairs"]["forward"]["nfe"] == 2
    assert not (reflow_run.path / "reflow.json").exists()


def test_run_without_ema_loads_the_raw_weights(tmp_path):
    cfg = get_preset("toy-smoke").with_sets(
        ["loop.steps=2", "loop.ema=none", f"loop.out_dir={tmp_path / 'r'}"]
    )
    res = run_experiment(cfg, progress=False)
    assert res.ema_model is None and not (tmp_path / "r" / "ema.safetensors").exists()
    assert _equal_state(load_run(tmp_path / "r").model, res.model)


# gmflow 0.1 wrote {"format": "gmflow-run/1", "train": <flat TrainConfig>, "model", "step", "world_size"}
V1_TRAIN = {
    "data": {"name": "moons"},
    "model": {
        "head": "gm",
        "num_components": 8,
        "width": 32,
        "depth": 2,
        "time_dim": 32,
        "pos_freqs": 8,
        "logstd_from": "trunk",
        "constant_logstd": None,
    },
    "loss": "gm_nll",
    "trans_ratio": 0.8,
    "time_sampler": "logit_normal",
    "time_loc": 0.1,
    "time_scale": 1.2,
    "time_eps": 1e-4,
    "steps": 4,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 1e-3,
    "betas": [0.9, 0.99],
    "weight_decay": 0.0,
    "warmup_steps": 5,
    "grad_clip": 1.0,
    "grad_clip_start": 2,
    "ema": "power",
    "ema_gamma": 7.0,
    "ema_halflife_kimg": 30000.0,
    "ema_rampup": 0.05,
    "seed": 3,
    "out_dir": "runs/old",
    "ckpt_every": 10,
    "log_every": 5,
    "precision": "fp32",
    "device": "auto",
}


def _v1_run(tmp_path, toy_run, model_class="ToyMLP"):
    ck = load_checkpoint(toy_run.path)
    rec = {
        "format": "gmflow-run/1",
        "train": V1_TRAIN,
        "model": {**ck.config["model"], "class": model_class},
        "step": 4,
        "world_size": 1,
    }
    d = tmp_path / "v1"
    save_checkpoint(
        d, step=4, model_state=ck.model_state, ema_state=ck.ema_state, config=rec, train_state=ck.train_state
    )
    return d, ck


def test_gmflow_run_1_toy_config_converts(tmp_path, toy_run):
    d, ck = _v1_run(tmp_path, toy_run)
    run = load_run(d)
    want = get_preset("toy-smoke").with_sets(
        [
            "data.name=moons",
            "loss.kind=gm_nll",
            "loss.trans_ratio=0.8",
            "loss.time_sampler=logit_normal",
            "loss.time_loc=0.1",
            "loss.time_scale=1.2",
            "loop.steps=4",
            "loop.optimizer=adam",
            "loop.betas=0.9,0.99",
            "loop.grad_clip=1",
            "loop.grad_clip_start=2",
            "loop.seed=3",
            "loop.out_dir=runs/old",
        ]
    )
    assert run.config == want and run.config.validate() is run.config and run.step == 4
    assert run.model.config == ck.config["model"]["config"] and _equal_state(
        run.model, toy_run.result.ema_model
    )


def test_bad_records_are_one_line_checkpoint_errors(tmp_path, toy_run):
    d, _ = _v1_run(tmp_path, toy_run, model_class="SmallUNet")
    with pytest.raises(CheckpointError, match="written by gmflow 0.1 for a non-toy run"):
        load_run(d)
    rec = json.loads((toy_run.path / "config.json").read_text())
    with pytest.raises(
        CheckpointError, match="records experiment 'mnist'; this version knows toy2d, images, reflow"
    ):
        experiment_from_record({**rec, "experiment": "mnist"})
    bad = {**rec, "config": {**rec["config"], "loop": {**rec["config"]["loop"], "stepz": 3}}}
    with pytest.raises(
        CheckpointError, match="^here is not a valid run config: unknown config key 'loop.stepz'"
    ):
        experiment_from_record(bad, where="here")
    with pytest.raises(CheckpointError, match="class 'Nope'"):
        build_model({"class": "Nope", "config": {}})
    with pytest.raises(CheckpointError, match="cannot rebuild ToyMLP"):
        build_model({"class": "ToyMLP", "config": {"bogus": 1}})


def test_weights_that_do_not_fit_the_recorded_model(tmp_path, toy_run):
    ck = load_checkpoint(toy_run.path)
    model = {**ck.config["model"], "config": {**ck.config["model"]["config"], "width": 16}}
    save_checkpoint(
        tmp_path / "r",
        step=4,
        model_state=ck.model_state,
        config={**ck.config, "model": model},
        train_state={},
    )
    with pytest.raises(CheckpointError, match="do not fit the model in config.json") as info:
        load_run(tmp_path / "r")
    assert "\n" not in str(info.value)
