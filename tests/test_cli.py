"""Tests for the ``gmflow`` command line: kill/resume, signals, error handling, dry-run, sample, eval.

The kill/resume tests run ``python -m gmflow train`` in subprocesses (this also covers ``-m gmflow``)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gmflow.cli import main
from gmflow.train import apply_sets, get_preset, train

# A run long enough (a few seconds) to be interrupted after its first checkpoint.
TRAIN = [
    "train",
    "--preset",
    "toy-smoke",
    "--no-progress",
    "--set",
    "steps=200",
    "ckpt_every=10",
    "batch_size=64",
    "log_every=50",
]
# One thread: fast on a busy 2-core machine, and the same thread count in every run (bitwise equality).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cli(args: list[str], out: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gmflow", *args, "--out", str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _manifest_step(d: Path) -> int:
    try:
        return int(json.loads((d / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for_checkpoint(proc: subprocess.Popen, d: Path, min_step: int = 10, timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        step = _manifest_step(d)
        if step >= min_step:
            return step
        if proc.poll() is not None:
            pytest.fail(f"training exited early (rc={proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(d / "model.safetensors"),
        **{f"ema.{k}": v for k, v in load_file(d / "ema.safetensors").items()},
    }


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in its own process."""
    d = tmp_path_factory.mktemp("ref") / "run"
    p = _cli(TRAIN, d)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert _manifest_step(d) == 200
    return d


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_identical_weights(reference, tmp_path):
    d = tmp_path / "run"
    p = _cli(TRAIN, d)
    _wait_for_checkpoint(p, d)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    killed_at = _manifest_step(d)
    assert 10 <= killed_at < 200, "the run finished before it could be killed"
    p = _cli(TRAIN, d)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "resuming" in err
    assert _manifest_step(d) == 200
    _assert_same_weights(reference, d)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits(reference, tmp_path, sig, code):
    d = tmp_path / "run"
    p = _cli(TRAIN, d)
    _wait_for_checkpoint(p, d)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err[-2000:]
    line = [s for s in err.splitlines() if "interrupted at step" in s]
    assert line, err[-2000:]
    step = int(line[0].split("interrupted at step ")[1].split(";")[0])
    assert _manifest_step(d) == step and step < 200
    if sig == signal.SIGINT:  # the same command finishes the run, identical to the uninterrupted one
        p = _cli(TRAIN, d)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        _assert_same_weights(reference, d)


# ----------------------------------------------------------------------------------- in-process CLI
def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gmflow: error: "), err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "run"
    train(apply_sets(get_preset("toy-smoke"), ["steps=4", f"out_dir={d}"]), progress=False)
    return d


@pytest.fixture(scope="module")
def velocity_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vel") / "run"
    cfg = apply_sets(get_preset("toy-smoke"), ["steps=2", "loss=fm", "model.head=velocity", f"out_dir={d}"])
    train(cfg, progress=False)
    return d


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "modle.width=3"], "unknown config key 'modle.width'; did you mean model.width"),
        (["--set", "steps=-5"], "steps: must be >= 1"),
        (["--set", "model.num_components=0"], "model.num_components: K must be >= 1"),
        (["--set", "loss=fm"], "loss: 'fm' needs model.head='velocity'"),
        (["--set", "steps"], "--set expects key=value"),
        (["--config", "missing.yaml"], "cannot read config file"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_train_config_errors_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--preset", "toy-smoke", "--out", str(out), *extra]) == 2
    assert match in _err_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--preset", "toy-smoke", "--out", str(blocker / "run"), "--no-progress"]) == 2
    assert "not writable" in _err_line(capsys)


def test_resume_with_other_config_is_refused(tiny_run, capsys):
    assert main(["train", "--preset", "toy-smoke", "--out", str(tiny_run), "--set", "lr=0.5"]) == 2
    assert "different config" in _err_line(capsys)


def test_dry_run_prints_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["train", "--preset", "toy-smoke", "--set", "steps=7", "model.num_components=3", "--dry-run"])
        == 0
    )
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["steps"] == 7 and d["model"]["num_components"] == 3 and d["out_dir"] == "runs/toy-smoke"
    assert main(["train", "--preset", "toy-fm", "--dry-run", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == "fm"
    assert list(tmp_path.iterdir()) == []


def test_list_presets_and_help(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("toy-gmflow", "toy-fm", "toy-official-minimal", "toy-smoke"))
    for cmd in (["--help"], ["train", "--help"], ["sample", "--help"], ["eval", "--help"]):
        assert main(cmd) == 0
        assert "example" in capsys.readouterr().out or cmd == ["--help"]


def test_sample_writes_samples_and_png(tiny_run, tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(tiny_run),
                "--solver",
                "gm-sde",
                "--nfe",
                "2",
                "--order",
                "2",
                "--n",
                "300",
                "--batch",
                "128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    x = np.load(out)
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").stat().st_size > 1000
    pt = tmp_path / "raw.pt"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(tiny_run),
                "--solver",
                "gm-ode",
                "--nfe",
                "1",
                "--substeps",
                "4",
                "--n",
                "50",
                "--raw",
                "--out",
                str(pt),
                "--png",
                str(tmp_path / "raw.png"),
            ]
        )
        == 0
    )
    assert torch.load(pt, weights_only=True).shape == (50, 2)
    # same seed -> same samples; a deterministic solver gives them for any --batch
    again = tmp_path / "again.npy"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(tiny_run),
                "--solver",
                "gm-sde",
                "--nfe",
                "2",
                "--order",
                "2",
                "--n",
                "300",
                "--batch",
                "128",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(again), x)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, batch in ((a, "64"), (b, "100")):
        assert (
            main(
                [
                    "sample",
                    "--ckpt",
                    str(tiny_run),
                    "--solver",
                    "euler",
                    "--nfe",
                    "2",
                    "--n",
                    "200",
                    "--batch",
                    batch,
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
    torch.testing.assert_close(torch.load(a), torch.load(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--ckpt", "{missing}", "--solver", "euler", "--nfe", "2"], "does not exist"),
        (["--ckpt", "{run}", "--solver", "nope", "--nfe", "2"], "invalid choice"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "0"], "--nfe must be >= 1"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--order", "2"], "--order 2 applies"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--out", "{tmp}/x.csv"], ".pt or .npy"),
        (
            ["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--out", "{tmp}/no/dir/x.pt"],
            "cannot write",
        ),
        (["--ckpt", "{vel}", "--solver", "gm-sde", "--nfe", "2"], "needs a GM model"),
        (["--ckpt", "{corrupt}", "--solver", "euler", "--nfe", "2"], "corrupt"),
    ],
)
def test_sample_errors_exit_2(tiny_run, velocity_run, tmp_path, capsys, args, match):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for p in tiny_run.iterdir():
        if p.is_file():
            (corrupt / p.name).write_bytes(p.read_bytes())
    (corrupt / "ema.safetensors").write_bytes(b"\0" * 10)
    subs = {
        "{missing}": str(tmp_path / "missing"),
        "{run}": str(tiny_run),
        "{vel}": str(velocity_run),
        "{corrupt}": str(corrupt),
        "{tmp}": str(tmp_path),
    }
    args = [a if not any(k in a for k in subs) else _sub(a, subs) for a in args]
    assert main(["sample", *args]) == 2
    assert match in _err_line(capsys)


def _sub(a: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        a = a.replace(k, v)
    return a


def test_eval_prints_table_and_writes_json(tiny_run, velocity_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                "--ckpt",
                str(tiny_run),
                "--solvers",
                "gm-sde",
                "euler",
                "--nfes",
                "1",
                "2",
                "--n",
                "400",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "sw2_ratio" in table and "in_support" in table
    res = json.loads(out.read_text())
    assert res["step"] == 4 and res["weights"] == "ema" and len(res["rows"]) == 4
    assert {r["solver"] for r in res["rows"]} == {"gm-sde", "euler"}
    assert all(r["sw2_ratio"] > 0 and 0 <= r["in_support"] <= 1 for r in res["rows"])
    assert main(["eval", "--ckpt", str(velocity_run), "--nfes", "1", "--n", "200"]) == 0
    assert len(json.loads((velocity_run / "eval.json").read_text())["rows"]) == 2


def test_bench_subcommand(capsys):
    if (
        importlib.util.find_spec("gmflow.bench") is None
        or importlib.util.find_spec("gmflow.bench.toy2d") is None
    ):
        assert main(["bench", "toy2d"]) == 2
        assert "not available" in _err_line(capsys)
    else:
        assert main(["bench", "toy2d", "--help"]) == 0
