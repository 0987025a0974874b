"""Tests for gmflow.train.checkpoint: layout, atomic writes, verification, roll-forward, load_model."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from gmflow.io import atomic_write_bytes
from gmflow.train import (
    CheckpointError,
    apply_sets,
    get_preset,
    load_checkpoint,
    load_model,
    read_manifest,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step toy-smoke run (checkpoints at steps 3 and 6)."""
    d = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = apply_sets(get_preset("toy-smoke"), ["steps=6", "ckpt_every=3", f"out_dir={d}"])
    res = train(cfg, progress=False)
    return d, res


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_layout_and_weights_only_state(run_dir):
    d, res = run_dir
    names = {p.name for p in d.iterdir()}
    assert {
        "model.safetensors",
        "ema.safetensors",
        "config.json",
        "state.pt",
        "checkpoint.json",
        "log.csv",
    } <= names
    assert not [n for n in names if n.endswith((".tmp", ".pending"))]
    state = torch.load(d / "state.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "scheduler" in state
    m = read_manifest(d)
    assert m["step"] == 6 and set(m["files"]) == {
        "model.safetensors",
        "ema.safetensors",
        "config.json",
        "state.pt",
    }
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["class"] == "ToyMLP"
    mode = stat.S_IMODE(os.stat(d / "model.safetensors").st_mode)
    assert mode & stat.S_IRGRP, "checkpoint files should get ordinary permissions, not mkstemp's 0600"


def test_load_model_ema_by_default_raw_on_request(run_dir):
    d, res = run_dir
    ema_model, cfg = load_model(d)
    raw_model, _ = load_model(d, use_ema=False)
    assert cfg.steps == 6 and not ema_model.training
    for k, v in res.ema_model.state_dict().items():
        assert torch.equal(ema_model.state_dict()[k], v)
    for k, v in res.model.state_dict().items():
        assert torch.equal(raw_model.state_dict()[k], v)
    assert any(
        not torch.equal(ema_model.state_dict()[k], raw_model.state_dict()[k]) for k in raw_model.state_dict()
    )


def test_load_model_without_ema_falls_back_to_raw(tmp_path):
    cfg = apply_sets(get_preset("toy-smoke"), ["steps=2", "ema=none", f"out_dir={tmp_path / 'r'}"])
    res = train(cfg, progress=False)
    assert not (tmp_path / "r" / "ema.safetensors").exists()
    m, _ = load_model(tmp_path / "r")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in res.model.state_dict().items())


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
            "corrupt",
        ),
        (lambda d: (d / "checkpoint.json").unlink(), "checkpoint.json missing"),
        (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
        (lambda d: (d / "checkpoint.json").write_text("{not json"), "corrupt checkpoint manifest"),
        (lambda d: (d / "config.json").write_text("{}"), "config.json does not match"),
    ],
)
def test_damaged_checkpoint_is_a_one_line_error(run_dir, tmp_path, damage, match):
    d = _copy(run_dir[0], tmp_path / "copy")
    damage(d)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(d)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def _state(v: float):
    return {"w": torch.full((3,), v)}


def _save(d, step, v):
    return save_checkpoint(
        d, step=step, model_state=_state(v), config={"step": step}, train_state={"x": torch.tensor(v)}
    )


def test_crash_before_commit_keeps_previous_checkpoint(tmp_path):
    _save(tmp_path, 1, 1.0)
    # a later save died while writing its pending files (before the manifest commit)
    (tmp_path / ".model.safetensors.pending").write_bytes(b"garbage")
    (tmp_path / ".state.pt.pending").write_bytes(b"half")
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.model_state["w"], _state(1.0)["w"])
    _save(tmp_path, 2, 2.0)  # the next save overwrites the stale pending files
    assert load_checkpoint(tmp_path).step == 2
    assert not list(tmp_path.glob(".*.pending"))


def test_crash_after_commit_rolls_forward(tmp_path):
    _save(tmp_path, 1, 1.0)
    old = {n: (tmp_path / n).read_bytes() for n in ("model.safetensors", "config.json", "state.pt")}
    _save(tmp_path, 2, 2.0)
    # simulate a crash between the manifest commit and the renames: new files still pending, old in place
    for n, data in old.items():
        os.replace(tmp_path / n, tmp_path / f".{n}.pending")
        (tmp_path / n).write_bytes(data)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and torch.equal(ck.model_state["w"], _state(2.0)["w"])
    assert torch.equal(ck.train_state["x"], torch.tensor(2.0)) and ck.config == {"step": 2}
    assert not list(tmp_path.glob(".*.pending"))


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]
