"""ReFlow objective, batches, trainer glue and the ``gmflow reflow`` command handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from gmflow import ring_gmm
from gmflow.nn import ToyMLP
from gmflow.reflow import (
    PairDataset,
    ReflowConfig,
    ReflowError,
    generate_pairs,
    reflow_batch_fn,
    reflow_objective,
    set_dropout,
    train_reflow,
)
from gmflow.reflow import cli as rcli
from gmflow.train import ConfigError


@pytest.fixture(scope="module")
def ring_pairs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ring_pairs")
    ring = ring_gmm()
    kw = dict(shard_size=512, progress=False)
    generate_pairs(ring, d / "bwd", direction="backward", n=1024, solver="dpm++2m", nfe=12, **kw)
    generate_pairs(ring, d / "fwd", direction="forward", n=512, solver="heun", nfe=13, data=ring, **kw)
    return d


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny FM ToyMLP checkpoint written by the shared trainer."""
    from gmflow.train import apply_sets, get_preset, train

    d = tmp_path_factory.mktemp("teacher")
    sets = ["model.head=velocity", "loss=fm", "steps=4", "ckpt_every=0", f"out_dir={d}", "data.name=ring"]
    train(apply_sets(get_preset("toy-smoke"), sets), progress=False)
    return d


def _net(head: str = "velocity", width: int = 32) -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP(2, width, 2, head=head, num_components=4, time_dim=16, pos_freqs=4)


# ------------------------------------------------------------------------------------------ objective
def test_objective_matches_velocity_and_denoiser_mse(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd")
    x0, x1 = pairs.sample(64, generator=torch.Generator().manual_seed(0))
    net = _net()

    def ref(weight: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        t = torch.rand(64, generator=g, dtype=torch.float64).clamp(1e-4, 1.0).float()[:, None]
        x_t = (1 - t) * x0 + t * x1
        u = net(x_t, t[:, 0])
        if weight == "velocity":
            return (u - (x1 - x0)).square().mean(1)
        return (x_t - t * u - x0).square().mean(1)

    for weight in ("velocity", "none"):
        obj = reflow_objective(ReflowConfig(weight=weight))
        got = obj(net, torch.stack([x0, x1], 1), torch.Generator().manual_seed(5))
        assert got.shape == (64,)
        assert torch.allclose(got, ref(weight), rtol=1e-4, atol=1e-6)
        tup = obj(net, (x0, x1), torch.Generator().manual_seed(5))  # tuple batches work too
        assert torch.allclose(tup, got)
    norm = reflow_objective(ReflowConfig(normalize=True))(net, (x0, x1), torch.Generator().manual_seed(5))
    assert torch.allclose(norm, torch.ones(64), atol=1e-5)


def test_gm_student_uses_the_gm_mean(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd")
    x0, x1 = pairs.sample(16, generator=torch.Generator().manual_seed(1))
    net = _net("gm")
    loss = reflow_objective(ReflowConfig(time_sampler="pow10"))(
        net, (x0, x1), torch.Generator().manual_seed(2)
    )
    assert loss.shape == (16,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert net.head is not None and any(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("normalize", [False, True])
def test_reflow_training_decreases_the_loss(ring_pairs, normalize):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd", rho=0.4)
    teacher = _net()
    x0, x1 = pairs.sample(512, generator=torch.Generator().manual_seed(3))
    plain = reflow_objective(ReflowConfig())

    def eval_loss(m) -> float:
        with torch.no_grad():
            return float(plain(m, (x0, x1), torch.Generator().manual_seed(4)).mean())

    cfg = ReflowConfig(
        steps=60, batch_size=256, lr=3e-3, warmup_steps=5, normalize=normalize, time_sampler="pow10",
        rho=0.4, projection_alpha=0.5, ema="none",
    )  # fmt: skip
    res = train_reflow(cfg, teacher, pairs, real_data=ring_gmm(), progress=False)
    # the normalised loss optimises E log l, which lowers the plain loss more slowly
    assert eval_loss(res.model) < (0.85 if normalize else 0.7) * eval_loss(teacher)
    assert res.step == 60
    # the teacher is never modified
    assert torch.equal(teacher.state_dict()["trunk.0.weight"], _net().state_dict()["trunk.0.weight"])


def test_batch_fn_mixing_and_projection(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd")
    g = torch.Generator().manual_seed(0)
    fwd_x0 = {tuple(v.tolist()) for v in pairs.forward[0]}
    b = reflow_batch_fn(pairs, ReflowConfig(batch_size=32, rho=1.0))(1, 0, 1, g)
    assert b.shape == (32, 2, 2)
    assert all(tuple(v.tolist()) in fwd_x0 for v in b[:, 0])
    real = torch.randn(500, 2) * 0.01 + 7.0  # far from the ring: projected x0 must land on these
    cfg = ReflowConfig(batch_size=32, projection_alpha=1.0)
    b = reflow_batch_fn(pairs, cfg, real_data=real)(1, 0, 1, torch.Generator().manual_seed(0))
    assert (b[:, 0] - 7.0).abs().max() < 0.1
    bwd_x1 = {tuple(v.tolist()) for v in pairs.backward[1]}
    assert all(tuple(v.tolist()) in bwd_x1 for v in b[:, 1])  # x1 untouched
    with pytest.raises(ReflowError, match="real_data"):
        reflow_batch_fn(pairs, cfg)


@pytest.mark.parametrize("rho, world_size", [(0.0, 1), (0.4, 1), (0.4, 2), (1.0, 1)])
def test_pair_draw_reproduces_the_batch_fn(ring_pairs, rho, world_size):
    """PairDataset.draw consumes the generator exactly as reflow_batch_fn (without projection) does."""
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd")
    fn = reflow_batch_fn(pairs, ReflowConfig(batch_size=64, rho=rho))
    g_batch, g_draw = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for step in range(3):  # the generators stay in step across calls
        batch = fn(step, 0, world_size, g_batch)
        x0, x1, is_fwd = pairs.draw(64 // world_size, rho, generator=g_draw)
        assert torch.equal(batch, torch.stack([x0, x1], dim=1))
    assert torch.equal(g_batch.get_state(), g_draw.get_state())
    fwd_x0 = {tuple(v.tolist()) for v in pairs.forward[0]}
    assert [tuple(v.tolist()) in fwd_x0 for v in x0] == is_fwd.tolist()
    if rho == 0.4:
        assert 0 < int(is_fwd.sum()) < len(is_fwd)


def test_pair_sample_is_draw_with_the_dataset_rho(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd", rho=0.4)
    x0, x1 = pairs.sample(50, generator=torch.Generator().manual_seed(2))
    d0, d1, _ = pairs.draw(50, 0.4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x0, d0) and torch.equal(x1, d1)
    with pytest.raises(ValueError, match="rho"):
        pairs.draw(4, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        pairs.draw(0)
    with pytest.raises(ValueError, match="no forward_dir"):
        PairDataset(ring_pairs / "bwd").draw(4, 0.5)


# ------------------------------------------------------------------------------------------ errors
def test_teacher_student_and_pair_mismatch(ring_pairs, tmp_path):
    pairs = PairDataset(ring_pairs / "bwd")
    with pytest.raises(ReflowError, match="student.*shape"):
        train_reflow(ReflowConfig(steps=1), _net(width=32), pairs, student=_net(width=16), progress=False)
    with pytest.raises(ReflowError, match="teacher_model must be an nn.Module"):
        train_reflow(ReflowConfig(steps=1), ring_gmm(), pairs, progress=False)
    img = torch.randn(8, 1, 4, 4)
    generate_pairs(lambda x, t: -x, tmp_path / "img", direction="backward", n=8, solver="euler", nfe=1,
                   event_shape=(1, 4, 4), teacher_id="img", progress=False)  # fmt: skip
    with pytest.raises(ReflowError, match="pairs: event shape"):
        train_reflow(ReflowConfig(steps=1), _net(), PairDataset(tmp_path / "img"), progress=False)
    with pytest.raises(ConfigError, match="hpf_lambda"):
        train_reflow(ReflowConfig(steps=1, hpf_lambda=1.0), _net(), pairs, progress=False)
    del img


@pytest.mark.parametrize(
    "sets, key",
    [
        (["rho=1.5"], "rho"),
        (["kappa=0"], "kappa"),
        (["r=0"], "r"),
        (["r=1.2"], "r"),
        (["weight=x"], "weight"),
    ],
)
def test_config_validation_names_the_field(sets, key):
    from gmflow.reflow import apply_reflow_sets

    with pytest.raises(ConfigError, match=rf"^{key}:"):
        apply_reflow_sets(ReflowConfig(), sets).validate()


def test_config_round_trip_and_recipes():
    from gmflow.reflow import RECIPES

    for cfg in (*RECIPES.values(), ReflowConfig(student_dropout=0.05, out_dir="runs/x", norm_eps=1e-9)):
        assert ReflowConfig.from_dict(cfg.to_dict()) == cfg.validate()
    simple = RECIPES["simple"]
    assert simple.sample_kwargs() == {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": 20.0, "r": 0.4}
    tc = ReflowConfig(time_sampler="u_shaped", steps=7).to_train_config(head="gm")
    assert tc.validate().steps == 7 and tc.time_sampler == "u_shaped" and tc.model.head == "gm"


def test_set_dropout_on_unet():
    from gmflow.nn.unet import SmallUNet

    teacher = SmallUNet(1, 8, (1, 2), dropout=0.13, image_size=8)
    import copy

    student = copy.deepcopy(teacher)
    set_dropout(student, 0.05)
    assert student.dropout == 0.05 and student.config["dropout"] == 0.05 and teacher.dropout == 0.13
    with pytest.raises(ReflowError, match="no dropout"):
        set_dropout(_net(), 0.1)


# ------------------------------------------------------------------------------------------ CLI
def _pairs_args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rcli.add_pairs_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args([*argv, "--no-progress"])


def _train_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rcli.add_train_arguments(p)
    return p.parse_args([*argv, "--no-progress"])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gmflow: error: "), err
    return err[0]


def test_cli_pairs_and_train_end_to_end(teacher_ckpt, tmp_path, capsys):
    bwd, fwd, run = tmp_path / "bwd", tmp_path / "fwd", tmp_path / "run"
    common = dict(teacher=teacher_ckpt, n=64, nfe=4, shard_size=32)
    assert rcli.run_pairs(_pairs_args(direction="backward", out=bwd, **common)) == 0
    assert rcli.run_pairs(_pairs_args(direction="forward", out=fwd, data="ring", **common)) == 0
    base = [
        "--teacher",
        str(teacher_ckpt),
        "--pairs",
        str(bwd),
        "--forward-pairs",
        str(fwd),
        "--out",
        str(run),
    ]
    sets = ["--set", "steps=3", "batch_size=16", "normalize=true", "time_sampler=pow10"]
    capsys.readouterr()
    assert rcli.run_train(_train_args(*base, "--rho", "0.4", *sets, "--dry-run")) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["reflow"]["rho"] == 0.4 and info["reflow"]["normalize"] is True
    assert not run.exists()
    assert rcli.run_train(_train_args(*base, "--rho", "0.4", *sets)) == 0
    rec = json.loads((run / "reflow.json").read_text())
    assert rec["reflow"]["time_sampler"] == "pow10" and (run / "checkpoint.json").is_file()
    capsys.readouterr()
    # resuming with a different training knob is refused
    assert rcli.run_train(_train_args(*base, "--rho", "0.2", *sets)) == 2
    assert "different config" in _one_error(capsys)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kappa=0), "kappa"),
        (dict(r=0), "r must be in"),
        (dict(r=1.5), "r must be in"),
        (dict(direction="forward"), "--data"),
        (
            dict(direction="forward", data="moon"),
            "--data: unknown data set 'moon'; valid names: checkerboard",
        ),
    ],
)
def test_cli_pairs_bad_input(teacher_ckpt, tmp_path, capsys, kw, match):
    args = dict(teacher=teacher_ckpt, direction="backward", n=8, nfe=2, out=tmp_path / "p")
    assert rcli.run_pairs(_pairs_args(**{**args, **kw})) == 2
    assert match in _one_error(capsys)


def test_cli_train_bad_input(teacher_ckpt, tmp_path, capsys):
    bwd = tmp_path / "bwd"
    assert rcli.run_pairs(_pairs_args(teacher=teacher_ckpt, direction="backward", n=16, nfe=2, out=bwd)) == 0
    capsys.readouterr()
    base = ["--teacher", str(teacher_ckpt), "--out", str(tmp_path / "run"), "--set", "steps=1"]
    cases = [
        (["--pairs", str(bwd), "--rho", "1.5"], "rho"),
        (["--pairs", str(bwd), "--set", "kappa=-1"], "kappa"),
        (["--pairs", str(bwd), "--set", "r=0"], "r:"),
        (["--pairs", str(tmp_path / "missing")], "does not exist"),
        (["--pairs", str(bwd), "--teacher", str(tmp_path / "nope")], "checkpoint"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["--pairs", str(tmp_path / "empty")], "empty"))
    for argv, match in cases:
        assert rcli.run_train(_train_args(*base, *argv)) == 2, argv
        assert match in _one_error(capsys), argv
    shard = next(bwd.glob("pairs-*.safetensors"))  # a corrupt shard
    shard.write_bytes(shard.read_bytes()[:-8] + b"corrupt!")
    assert rcli.run_train(_train_args(*base, "--pairs", str(bwd))) == 2
    assert "corrupt" in _one_error(capsys)
    # teacher / pair mismatch: image pairs for a 2-D teacher
    generate_pairs(lambda x, t: -x, tmp_path / "img", direction="backward", n=4, solver="euler", nfe=1,
                   event_shape=(1, 4, 4), teacher_id="img", progress=False)  # fmt: skip
    assert rcli.run_train(_train_args(*base, "--pairs", str(tmp_path / "img"))) == 2
    assert "pairs: event shape" in _one_error(capsys)
