"""gmflow.experiments.reflow_upgrade: ReFlow runs saved before the loss rework load, sample and resume."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch

from gmflow.cli import main
from gmflow.config import ConfigError
from gmflow.experiments import RECIPES, ReflowConfig, load_network, load_run, run_experiment
from gmflow.experiments.reflow_upgrade import upgrade_reflow_config
from gmflow.train import load_checkpoint, save_checkpoint

# The `loss` and `pairs` sections of config.json as the previous version wrote them (copied from a
# tiny digits ReFlow run trained with it): "plain" = its defaults, "simple" = the knobs of the
# `reflow_run` fixture in the old keys (normalize true, blur HPF, per-batch projection).
OLD_LOSS = {
    "plain": {"normalize": False, "time_sampler": "uniform", "weight": "velocity", "hpf_lambda": 0.0,
              "hpf_sigma": 1.0, "norm_eps": 1e-08, "time_eps": 0.0001},
    "simple": {"normalize": True, "time_sampler": "pow10", "weight": "velocity", "hpf_lambda": 1.0,
               "hpf_sigma": 1.0, "norm_eps": 1e-08, "time_eps": 0.0001},
}  # fmt: skip
OLD_PAIRS = {
    "plain": {"rho": 0.0, "projection_alpha": 0.0, "projection_method": "ot", "projection_pool": 1.0},
    "simple": {"rho": 0.25, "projection_alpha": 0.5, "projection_method": "ot", "projection_pool": 1.0},
}


def _old_run(reflow_run, tmp_path, shape: str, *, loss=(), pairs=()):
    """A copy of ``reflow_run`` with its config.json in the old keys (``shape``, then the ``loss`` /
    ``pairs`` items), committed like any checkpoint."""
    ck = load_checkpoint(reflow_run.path)
    d = tmp_path / f"old-{shape}"
    new = ck.config["config"]
    config = {
        **new,
        "loss": {**OLD_LOSS[shape], **dict(loss)},
        "pairs": {k: new["pairs"][k] for k in ("backward", "forward")} | OLD_PAIRS[shape] | dict(pairs),
        "loop": {**new["loop"], "out_dir": str(d)},
    }
    save_checkpoint(
        d,
        step=ck.step,
        model_state=ck.model_state,
        ema_state=ck.ema_state,
        config={**ck.config, "config": config},
        train_state=ck.train_state,
    )
    return d


def test_old_configs_load_with_the_mapped_keys_and_sample(reflow_run, tmp_path, capsys):
    plain = _old_run(reflow_run, tmp_path, "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing about plain 2-RF changed: no warning
        cfg = load_run(plain).config.validate()
    assert (cfg.loss.normalize, cfg.loss.hpf_radius, cfg.loss.norm_floor) == ("none", 0.1, 1e-4)
    assert (cfg.pairs.projection_lambda, cfg.pairs.projection_block, cfg.loss.time_max) == (0.0, 1024, 1.0)
    simple = _old_run(reflow_run, tmp_path, "simple")
    with pytest.warns(UserWarning) as caught:
        run = load_run(simple)
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and "cannot be resumed" in said[0] and "cannot be resumed" in said[1]
    assert "loss.hpf_sigma=1.0: the Gaussian-blur HPF" in said[0] and "pairs.projection_alpha=0.5" in said[1]
    cfg = run.config.validate()
    assert (cfg.loss.normalize, cfg.loss.norm_floor, cfg.loss.hpf_lambda, cfg.loss.hpf_radius) == (
        "sample",
        1e-8,
        1.0,
        0.1,
    )
    assert cfg.pairs.projection_lambda == 1.0  # a = 0.5: (1 - a) x0 + a y = (x0 + 1 y) / 2
    want = load_network(reflow_run.path).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in run.model.state_dict().items())
    out = tmp_path / "s.pt"
    with pytest.warns(UserWarning, match="cannot be resumed"):
        assert main(["sample", "--ckpt", str(simple), "--solver", "euler", "--nfe", "2", "--n", "4",
                     "--out", str(out)]) == 0  # fmt: skip
    x = torch.load(out, weights_only=True)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()
    assert f"wrote 4 samples to {out}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "shape, alpha, keys",
    [
        ("simple", 0.5, ["loss.hpf_sigma=1.0", "pairs.projection_alpha=0.5"]),
        ("simple", 0.0, ["loss.hpf_sigma=1.0"]),
        ("plain", 0.25, ["pairs.projection_alpha=0.25"]),
    ],
)
def test_resume_is_refused_where_the_loss_changed(reflow_run, tmp_path, shape, alpha, keys):
    d = _old_run(reflow_run, tmp_path, shape, pairs={"projection_alpha": alpha})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_run(d).config.with_sets(["loop.steps=4"])
    with pytest.raises(ConfigError, match="cannot resume") as info:
        run_experiment(cfg, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"out_dir {str(d)!r}: ") and "new out_dir" in msg
    assert all(k in msg for k in keys)
    assert [k for k in ("loss.hpf_sigma", "pairs.projection_alpha") if k in msg] == [
        k.split("=")[0] for k in keys
    ]
    assert load_checkpoint(d).step == 3  # nothing was trained or written


def test_old_configs_resume_where_the_meaning_is_unchanged(reflow_run, digits_run, tmp_path):
    """Plain 2-RF resumes under a config built from today's defaults (as the CLI builds it); so does
    ``normalize: true`` without HPF or projection, given its recorded ``norm_floor``."""
    d = _old_run(reflow_run, tmp_path, "plain")
    rec = load_checkpoint(d).config["config"]
    base = ReflowConfig(teacher=str(digits_run.path), data="digits16").with_sets(
        [f"pairs.backward={rec['pairs']['backward']}", f"pairs.forward={rec['pairs']['forward']}"]
        + [f"loop.{k}={rec['loop'][k]}" for k in ("batch_size", "warmup_steps", "out_dir")]
    )
    res = run_experiment(base.with_sets(["loop.steps=4"]), progress=False)
    assert (res.resumed_from, res.step) == (3, 4)
    d = _old_run(reflow_run, tmp_path, "simple", loss={"hpf_lambda": 0.0}, pairs={"projection_alpha": 0.0})
    cfg = base.with_sets(
        [
            f"loop.out_dir={d}",
            "loop.steps=4",
            "pairs.rho=0.25",
            "loss.time_sampler=pow10",
            "loss.normalize=sample",
        ]
    )
    with pytest.raises(ConfigError, match="different config .*loss.norm_floor: 1e-08 -> 0.0001"):
        run_experiment(cfg, progress=False)  # the default floor changed: say so, do not guess
    res = run_experiment(cfg.with_sets(["loss.norm_floor=1e-8"]), progress=False)
    assert (res.resumed_from, res.step) == (3, 4)


def test_new_format_configs_round_trip_unchanged(reflow_run):
    saved = json.loads((reflow_run.path / "config.json").read_text())
    for config in [saved["config"], *(c.to_dict() for c in RECIPES.values())]:
        up, changes = upgrade_reflow_config(config)
        assert up == config and up is not config and changes == []
        assert ReflowConfig.from_dict(up).to_dict() == config
    assert ReflowConfig.upgrade_record(saved) == saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_run(reflow_run.path).config.to_dict() == saved["config"]


def test_the_mapping_of_each_old_key():
    up, changes = upgrade_reflow_config(
        {"loss": {"normalize": True, "norm_eps": 0.0}, "pairs": {"projection_alpha": 1.0}}
    )
    assert up["loss"] == {"normalize": "sample", "norm_floor": sys.float_info.min}  # l / sg[l] as before
    assert math.isinf(up["pairs"]["projection_lambda"]) and len(changes) == 1  # alpha 1: lambda -> inf
    up, changes = upgrade_reflow_config({"loss": {"hpf_sigma": 2.0, "hpf_lambda": 0.0, "normalize": False}})
    assert up == {"loss": {"hpf_radius": 0.1, "hpf_lambda": 0.0, "normalize": "none"}} and changes == []
    with pytest.raises(ConfigError, match="loss.norm_eps and loss.norm_floor: old and new name"):
        upgrade_reflow_config({"loss": {"norm_eps": 1e-8, "norm_floor": 1e-4}})
    with pytest.raises(ConfigError, match="pairs.projection_alpha and pairs.projection_lambda"):
        upgrade_reflow_config({"pairs": {"projection_alpha": 0.1, "projection_lambda": 0.1}})
    assert upgrade_reflow_config("nope") == ("nope", [])
