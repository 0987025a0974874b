"""gmflow.train.checkpoint: layout, atomic writes, verification, roll-forward after a crash."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from gmflow.experiments import get_preset, run_experiment
from gmflow.io import atomic_write_bytes
from gmflow.train import CheckpointError, has_checkpoint, load_checkpoint, read_manifest, save_checkpoint

FILES = {"model.safetensors", "ema.safetensors", "config.json", "state.pt"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step toy-smoke run (checkpoints at steps 3 and 6)."""
    d = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = get_preset("toy-smoke").with_sets(["loop.steps=6", "loop.ckpt_every=3", f"loop.out_dir={d}"])
    return d, run_experiment(cfg, progress=False)


def test_layout_and_weights_only_state(run_dir):
    d, res = run_dir
    names = {p.name for p in d.iterdir()}
    assert FILES | {"checkpoint.json", "log.csv"} <= names
    assert not [n for n in names if n.endswith((".tmp", ".pending")) or n.startswith(".")]
    state = torch.load(d / "state.pt", weights_only=True)
    assert state["step"] == 6 and {"optimizer", "scheduler", "ema_updates", "world_size"} <= set(state)
    assert state["ema_updates"] == 6 and state["world_size"] == 1 and state["skipped_updates"] == 0
    m = read_manifest(d)
    assert m["step"] == 6 and set(m["files"]) == FILES and has_checkpoint(d)
    rec = json.loads((d / "config.json").read_text())
    assert (rec["format"], rec["experiment"], rec["data"]) == ("gmflow-run/2", "toy2d", "checkerboard")
    assert rec["config"]["loop"]["steps"] == 6 and rec["config"]["model"]["num_components"] == 8
    assert rec["model"]["class"] == "ToyMLP" and (rec["step"], rec["world_size"]) == (6, 1)
    mode = stat.S_IMODE(os.stat(d / "model.safetensors").st_mode)
    assert mode & stat.S_IRGRP, "checkpoint files should get ordinary permissions, not mkstemp's 0600"
    ck = load_checkpoint(d)
    assert ck.step == 6 and ck.config == rec
    for k, v in res.model.state_dict().items():
        assert torch.equal(ck.model_state[k], v)
    for k, v in res.ema_model.state_dict().items():
        assert torch.equal(ck.ema_state[k], v)


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
            "model.safetensors does not match the manifest",
        ),
        (lambda d: (d / "checkpoint.json").unlink(), "checkpoint.json missing"),
        (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
        (lambda d: (d / "checkpoint.json").write_text("{not json"), "corrupt checkpoint manifest"),
        (lambda d: (d / "config.json").write_text("{}"), "config.json does not match"),
    ],
)
def test_damaged_checkpoint_is_a_one_line_error(run_dir, copy_run, damage, match):
    d = copy_run(run_dir[0])
    damage(d)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(d)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    assert not has_checkpoint(tmp_path)


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
    assert ck.step == 1 and torch.equal(ck.model_state["w"], _state(1.0)["w"]) and ck.ema_state is None
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
