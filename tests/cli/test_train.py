"""``gmflow train``: kill/resume and signals in subprocesses, one-line errors, dry-run, presets, help.

The kill/resume tests run ``python -m gmflow train`` in subprocesses (this also covers ``-m gmflow``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gmflow.cli import main

# A run long enough (a few seconds) to be interrupted after its first checkpoint.
TRAIN = [
    "train",
    "--preset",
    "toy-smoke",
    "--no-progress",
    "--set",
    "loop.steps=200",
    "loop.ckpt_every=10",
    "loop.batch_size=64",
    "loop.log_every=50",
]


def _cli(args: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gmflow", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
def reference(tmp_path_factory, subprocess_env) -> Path:
    """The uninterrupted run, in its own process."""
    d = tmp_path_factory.mktemp("ref") / "run"
    p = _cli(TRAIN, d, subprocess_env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert _manifest_step(d) == 200 and "trained to step 200" in err
    return d


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_identical_weights(reference, tmp_path, subprocess_env):
    d = tmp_path / "run"
    p = _cli(TRAIN, d, subprocess_env)
    _wait_for_checkpoint(p, d)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    killed_at = _manifest_step(d)
    assert 10 <= killed_at < 200, "the run finished before it could be killed"
    p = _cli(TRAIN, d, subprocess_env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert f"resuming {d} from step" in err
    assert _manifest_step(d) == 200
    _assert_same_weights(reference, d)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits(reference, tmp_path, subprocess_env, sig, code):
    d = tmp_path / "run"
    p = _cli(TRAIN, d, subprocess_env)
    _wait_for_checkpoint(p, d)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err[-2000:]
    line = [s for s in err.splitlines() if "interrupted at step" in s]
    assert line, err[-2000:]
    step = int(line[0].split("interrupted at step ")[1].split(";")[0])
    assert _manifest_step(d) == step and step < 200
    if sig == signal.SIGINT:  # the same command finishes the run, identical to the uninterrupted one
        p = _cli(TRAIN, d, subprocess_env)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        _assert_same_weights(reference, d)


# ----------------------------------------------------------------------------------- in-process CLI
def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gmflow: error: "), err
    return err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "modle.width=3"], "unknown config key 'modle.width'; did you mean model.width"),
        (["--set", "steps=5"], "unknown config key 'steps'; did you mean loop.steps"),
        (["--set", "loop.steps=-5"], "loop.steps: must be >= 1"),
        (["--set", "loop.lr=abc"], "loop.lr: expected a number"),
        (["--set", "model.num_components=0"], "model.num_components: K must be >= 1"),
        (["--set", "loss.kind=fm"], "loss.kind: 'fm' needs model.head='velocity'"),
        (["--set", "data.name=mnist"], "data.name: unknown data set 'mnist'"),
        (["--set", "loop.steps"], "--set expects key=value"),
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


def test_diverged_run_exits_1_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["loop.lr=1e30", "loop.warmup_steps=0", "loop.steps=20", "loop.ckpt_every=0"]
    assert main(["train", "--preset", "toy-smoke", "--out", str(out), "--no-progress", "--set", *sets]) == 1
    assert "training diverged: loss is nan at step 2" in _err_line(capsys)
    assert not (out / "checkpoint.json").exists()


def test_resume_with_a_changed_training_key_is_refused(toy_run, copy_run, capsys):
    d = copy_run(toy_run.path)
    base = ["train", "--preset", "toy-smoke", "--out", str(d), "--no-progress", "--set", "loop.steps=4"]
    assert main([*base, "loop.lr=0.5"]) == 2
    assert "holds a run with a different config (loop.lr: 0.001 -> 0.5)" in _err_line(capsys)
    assert main([*base, "loop.steps=5", "loop.log_every=1"]) == 0  # more steps: resumed
    assert f"resuming {d} from step 4" in capsys.readouterr().err
    assert json.loads((d / "checkpoint.json").read_text())["step"] == 5


def test_config_file_then_sets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o.yaml").write_text("loop:\n  steps: 9\n  lr: 0.01\nmodel:\n  width: 16\n")
    assert (
        main(
            [
                "train",
                "--preset",
                "toy-smoke",
                "--config",
                "o.yaml",
                "--set",
                "loop.steps=3",
                "--dry-run",
                "--format",
                "json",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert (d["loop"]["steps"], d["loop"]["lr"], d["model"]["width"]) == (3, 0.01, 16)


def test_dry_run_prints_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "toy-smoke", "--set", "loop.steps=7", "model.num_components=3", "--dry-run"]
    assert main(args) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["experiment"] == "toy2d" and d["loop"]["steps"] == 7 and d["model"]["num_components"] == 3
    assert d["loop"]["out_dir"] == "runs/toy-smoke"
    assert main(["train", "--preset", "toy-fm", "--dry-run", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["kind"] == "fm"
    assert main(["train", "--preset", "digits-smoke", "--set", "data.name=digits16", "--dry-run"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert (d["experiment"], d["data"]["name"], d["model"]["base"]) == ("images", "digits16", 8)
    assert list(tmp_path.iterdir()) == []


def test_train_an_image_preset(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "digits-smoke", "--out", str(out), "--no-progress", "--set", "loop.steps=2"]
    assert main(args) == 0
    assert "trained to step 2" in capsys.readouterr().err
    rec = json.loads((out / "config.json").read_text())
    assert (rec["experiment"], rec["data"], rec["model"]["class"]) == ("images", "digits8", "SmallUNet")


def test_list_presets_and_help(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in ("toy-gmflow", "toy-fm", "toy-official-minimal", "toy-smoke", "digits-smoke"):
        assert name in out
    assert "data=digits8" in out and "K=64" in out and "velocity head" in out
    for cmd in (
        ["train", "--help"],
        ["sample", "--help"],
        ["eval", "--help"],
        ["reflow", "train", "--help"],
        ["reflow", "pairs", "--help"],
        ["bench", "--help"],
    ):
        assert main(cmd) == 0
        assert "example" in capsys.readouterr().out, cmd
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sample", "eval", "bench", "reflow"))
    assert main([]) == 2 and "usage" in capsys.readouterr().err
