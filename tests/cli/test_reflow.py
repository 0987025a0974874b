"""``gmflow reflow pairs`` and ``gmflow reflow train``, then ``gmflow sample``/``eval`` on the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gmflow.cli import main
from gmflow.experiments import ReflowConfig, load_run
from gmflow.reflow import generate_pairs


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gmflow: error: "), err
    return err[0]


def _pairs(teacher: Path, out: Path, direction: str = "backward", *extra: str, n: int = 64) -> int:
    return main(
        [
            "reflow",
            "pairs",
            "--teacher",
            str(teacher),
            "--direction",
            direction,
            "--n",
            str(n),
            "--nfe",
            "4",
            "--shard-size",
            "32",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def ring_teacher(tmp_path_factory) -> Path:
    """A tiny flow-matching ToyMLP on the ring GMM."""
    d = tmp_path_factory.mktemp("teacher") / "run"
    sets = ["model.head=velocity", "loss.kind=fm", "loop.steps=4", "loop.ckpt_every=0", "data.name=ring"]
    assert main(["train", "--preset", "toy-smoke", "--out", str(d), "--no-progress", "--set", *sets]) == 0
    return d


def test_toy_pairs_train_sample_and_eval(ring_teacher, tmp_path, capsys):
    bwd, fwd, run = tmp_path / "bwd", tmp_path / "fwd", tmp_path / "run"
    assert _pairs(ring_teacher, bwd) == 0
    assert _pairs(ring_teacher, fwd, "forward", "--data", "ring") == 0
    assert "64 forward pairs (heun, nfe 4)" in capsys.readouterr().err
    base = [
        "reflow",
        "train",
        "--teacher",
        str(ring_teacher),
        "--pairs",
        str(bwd),
        "--forward-pairs",
        str(fwd),
        "--out",
        str(run),
        "--no-progress",
        "--data",
        "ring",
    ]
    sets = ["--set", "loop.steps=3", "loop.batch_size=16", "loss.normalize=sample", "loss.time_sampler=pow10"]
    assert main([*base, "--rho", "0.4", *sets, "--dry-run"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["experiment"] == "reflow"
        and info["pairs"]["rho"] == 0.4
        and info["loss"]["normalize"] == "sample"
    )
    assert (
        info["pair_settings"]["backward"]["nfe"] == 4 and info["pair_settings"]["forward"]["solver"] == "heun"
    )
    assert not run.exists()
    assert main([*base, "--rho", "0.4", *sets]) == 0
    assert "trained the ReFlow student to step 3" in capsys.readouterr().err
    rec = json.loads((run / "config.json").read_text())
    assert (rec["experiment"], rec["data"], rec["config"]["loss"]["time_sampler"]) == (
        "reflow",
        "ring",
        "pow10",
    )
    assert (run / "checkpoint.json").is_file() and not (run / "reflow.json").exists()
    # resuming with a different training knob is refused, with an inference knob it is not
    assert main([*base, "--rho", "0.2", *sets]) == 2
    assert "different config (pairs.rho: 0.4 -> 0.2)" in _one_error(capsys)
    assert main([*base, "--rho", "0.4", *sets, "loop.steps=4", "sampling.solver=heun"]) == 0
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 4
    # the student is a run like any other
    assert main(["sample", "--ckpt", str(run), "--solver", "euler", "--nfe", "1", "--n", "50"]) == 0
    assert torch.load(run / "samples_euler_nfe1.pt", weights_only=True).shape == (50, 2)
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--nfes", "1", "--n", "200"]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert (res["experiment"], res["data"], res["step"]) == ("reflow", "ring", 4) and len(res["rows"]) == 2
    assert "sw2_ratio" in capsys.readouterr().out


def test_recipe_and_real_data_alias(ring_teacher, tmp_path, capsys):
    bwd, fwd = tmp_path / "bwd", tmp_path / "fwd"
    assert _pairs(ring_teacher, bwd) == 0 and _pairs(ring_teacher, fwd, "forward", "--data", "ring") == 0
    capsys.readouterr()
    args = [
        "reflow",
        "train",
        "--recipe",
        "simple",
        "--teacher",
        str(ring_teacher),
        "--pairs",
        str(bwd),
        "--forward-pairs",
        str(fwd),
        "--real-data",
        "ring",
        "--raw",
        "--set",
        "loss.hpf_lambda=0",
        "pairs.projection_lambda=1.0",
        "--dry-run",
    ]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = ReflowConfig.from_dict({k: v for k, v in info.items() if k not in ("experiment", "pair_settings")})
    assert (cfg.data, cfg.teacher_ema, cfg.pairs.rho, cfg.pairs.projection_lambda) == (
        "ring",
        False,
        0.4,
        1.0,
    )
    assert (cfg.sampling.solver, cfg.loss.time_sampler, cfg.loop.out_dir) == (
        "dpm-solver-2",
        "pow10",
        "runs/reflow-simple",
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--kappa", "0"], "--kappa: the sigmoid-grid kappa must be > 0"),
        (["--r", "0"], "r must be in"),
        (["--r", "1.5"], "r must be in"),
        (["--direction", "forward"], "--data"),
        (
            ["--direction", "forward", "--data", "moon"],
            "--data: unknown data set 'moon'; valid names: checkerboard",
        ),
        (["--n", "0"], "must be >= 1"),
    ],
)
def test_pairs_bad_input(ring_teacher, tmp_path, capsys, extra, match):
    args = [
        "reflow",
        "pairs",
        "--teacher",
        str(ring_teacher),
        "--direction",
        "backward",
        "--n",
        "8",
        "--nfe",
        "2",
        "--out",
        str(tmp_path / "p"),
        "--no-progress",
    ]
    assert main([*args, *extra]) == 2
    assert match in _one_error(capsys)


def test_train_bad_input(ring_teacher, tmp_path, capsys):
    bwd = tmp_path / "bwd"
    assert _pairs(ring_teacher, bwd, n=16) == 0
    capsys.readouterr()
    base = [
        "reflow",
        "train",
        "--teacher",
        str(ring_teacher),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    (tmp_path / "empty").mkdir()
    cases = [
        (
            ["--pairs", str(bwd), "--rho", "1.5"],
            "pairs.rho: the forward-pair ratio must be a number in [0, 1]",
        ),
        (["--pairs", str(bwd), "--rho", "0.4"], "pass --forward-pairs"),
        (["--pairs", str(bwd), "--set", "pairs.projection_lambda=1.0"], "pass --data"),
        (["--pairs", str(bwd), "--set", "sampling.kappa=-1"], "sampling.kappa"),
        (["--pairs", str(bwd), "--set", "sampling.r=0"], "sampling.r:"),
        (["--pairs", str(bwd), "--set", "kappa=1"], "did you mean sampling.kappa"),
        (["--pairs", str(bwd), "--data", "mnist"], "data: unknown data set 'mnist'"),
        (["--pairs", str(tmp_path / "missing")], "does not exist"),
        (["--pairs", str(bwd), "--teacher", str(tmp_path / "nope")], "checkpoint"),
        (["--pairs", str(tmp_path / "empty")], "empty"),
        (["--pairs", str(bwd), "--recipe", "3rf"], "invalid choice"),
    ]
    for argv, match in cases:
        assert main([*base, "--set", "loop.steps=1", *argv]) == 2, argv
        assert match in _one_error(capsys), argv
    assert not (tmp_path / "run").exists()
    shard = next(bwd.glob("pairs-*.safetensors"))  # a corrupt shard
    shard.write_bytes(shard.read_bytes()[:-8] + b"corrupt!")
    assert main([*base, "--pairs", str(bwd)]) == 2
    assert "corrupt" in _one_error(capsys)
    # teacher / pair mismatch: image pairs for a 2-D teacher
    generate_pairs(
        lambda x, t: -x,
        tmp_path / "img",
        direction="backward",
        n=4,
        solver="euler",
        nfe=1,
        event_shape=(1, 4, 4),
        teacher_id="img",
        progress=False,
    )
    assert main([*base, "--pairs", str(tmp_path / "img")]) == 2
    assert "pairs: event shape" in _one_error(capsys)


@pytest.mark.slow
def test_digits_end_to_end_through_the_cli(tmp_path, capsys):
    """Image teacher -> pairs -> ReFlow student on digits16, then sample and eval it, all via ``gmflow``."""
    teacher, bwd, fwd, run = tmp_path / "teacher", tmp_path / "bwd", tmp_path / "fwd", tmp_path / "srf"
    assert (
        main(
            [
                "train",
                "--preset",
                "digits-smoke",
                "--out",
                str(teacher),
                "--no-progress",
                "--set",
                "data.name=digits16",
                "loop.steps=3",
                "loop.batch_size=16",
            ]
        )
        == 0
    )
    assert _pairs(teacher, bwd, "backward", "--solver", "euler", n=32) == 0
    assert _pairs(teacher, fwd, "forward", "--data", "digits16", n=32) == 0
    assert (
        main(
            [
                "reflow",
                "train",
                "--recipe",
                "simple",
                "--teacher",
                str(teacher),
                "--pairs",
                str(bwd),
                "--forward-pairs",
                str(fwd),
                "--data",
                "digits16",
                "--out",
                str(run),
                "--no-progress",
                "--set",
                "loop.steps=3",
                "loop.batch_size=8",
                "pairs.projection_lambda=1.0",
                "student_dropout=0.05",
            ]
        )
        == 0
    )
    rec = json.loads((run / "config.json").read_text())
    assert (rec["format"], rec["experiment"], rec["data"], rec["step"]) == (
        "gmflow-run/2",
        "reflow",
        "digits16",
        3,
    )
    assert rec["config"]["teacher"] == str(teacher) and rec["model"]["config"]["dropout"] == 0.05
    assert load_run(run).config.pairs.projection_lambda == 1.0
    assert main(["sample", "--ckpt", str(run), "--solver", "dpm-solver-2", "--nfe", "2", "--n", "16"]) == 0
    assert torch.load(run / "samples_dpm-solver-2_nfe2.pt", weights_only=True).shape == (16, 1, 16, 16)
    assert (run / "samples_dpm-solver-2_nfe2.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--solvers", "euler", "--nfes", "1", "2", "--n", "100"]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert (res["experiment"], res["data"]) == ("reflow", "digits16") and len(res["rows"]) == 2
    assert all(r["fd"] > 0 and 0 <= r["precision"] <= 1 for r in res["rows"])
    assert "fd" in capsys.readouterr().out
