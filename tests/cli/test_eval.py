"""``gmflow eval``: quality tables of toy runs (sliced-W2, MMD, support) and image / ReFlow runs (FD, P/R)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gmflow.cli import main
from gmflow.experiments import ReflowConfig, run_experiment


def test_toy_eval_prints_table_and_writes_json(toy_run, velocity_run, copy_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["--solvers", "gm-sde", "gm-ode", "euler", "--nfes", "1", "2", "--n", "400", "--json", str(out)]
    assert main(["eval", "--ckpt", str(toy_run.path), *args, "--substep-method", "pc2"]) == 0
    captured = capsys.readouterr()
    assert "sw2_ratio" in captured.out and "in_support" in captured.out and "sw2 floor" in captured.err
    res = json.loads(out.read_text())
    assert (res["step"], res["weights"], res["experiment"], res["data"]) == (
        4,
        "ema",
        "toy2d",
        "checkerboard",
    )
    assert len(res["rows"]) == 6 and res["sw2_floor"] > 0 and res["n"] == 400
    assert {(r["solver"], r["order"], r["nfe"], r.get("substep_method")) for r in res["rows"]} == {
        ("gm-sde", 2, 1, None),
        ("gm-sde", 2, 2, None),
        ("gm-ode", 2, 1, "pc2"),
        ("gm-ode", 2, 2, "pc2"),
        ("euler", 1, 1, None),
        ("euler", 1, 2, None),
    }
    assert all(r["sw2_ratio"] > 0 and 0 <= r["in_support"] <= 1 and r["nonfinite"] == 0 for r in res["rows"])
    d = copy_run(velocity_run.path)
    assert main(["eval", "--ckpt", str(d), "--nfes", "1", "--n", "200", "--raw"]) == 0
    vel = json.loads((d / "eval.json").read_text())  # default: next to the checkpoint
    assert [r["solver"] for r in vel["rows"]] == ["euler", "dpm++2m"] and vel["weights"] == "raw"
    assert vel["grid"] == {"kind": "uniform"}
    warped = tmp_path / "w.json"
    args = ["--solvers", "euler", "--nfes", "2", "--n", "200", "--raw", "--json", str(warped)]
    assert main(["eval", "--ckpt", str(d), *args, "--grid", "shift", "--shift", "0.25"]) == 0
    w = json.loads(warped.read_text())
    assert w["grid"] == {"kind": "shift", "shift": 0.25}
    assert main(["eval", "--ckpt", str(d), *args, "--json", str(tmp_path / "u.json")]) == 0
    u = json.loads((tmp_path / "u.json").read_text())
    assert w["rows"][0]["sw2"] != u["rows"][0]["sw2"]  # the same noise on another grid


@pytest.mark.parametrize("fixture, experiment", [("digits_run", "images"), ("reflow_run", "reflow")])
def test_image_eval_against_the_test_split(request, fixture, experiment, tmp_path, capsys):
    run = request.getfixturevalue(fixture)
    out = tmp_path / "e.json"
    args = [
        "eval",
        "--ckpt",
        str(run.path),
        "--nfes",
        "1",
        "--solvers",
        "euler",
        "--n",
        "100",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "fd" in captured.out and "precision" in captured.out
    res = json.loads(out.read_text())
    assert (res["experiment"], res["data"], res["step"]) == (experiment, "digits16", run.result.step)
    assert res["reference"].startswith("digits16 test split (")
    (row,) = res["rows"]
    assert (row["solver"], row["nfe"], row["nonfinite"]) == ("euler", 1, 0)
    assert math.isfinite(row["fd"]) and row["fd"] > 0
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 < row["confidence"] <= 1
    cache = Path(os.environ["GMFLOW_CACHE"])  # the classifier was cached there, not in $HOME
    assert list(cache.glob("digits16_classifier_*.safetensors"))


def test_eval_errors_exit_2(toy_run, velocity_run, ring_pairs, tmp_path, capsys):
    no_data = tmp_path / "nodata"
    cfg = ReflowConfig(teacher=str(velocity_run.path)).with_sets(
        [
            f"pairs.backward={ring_pairs / 'bwd'}",
            "loop.steps=1",
            "loop.batch_size=8",
            f"loop.out_dir={no_data}",
        ]
    )
    run_experiment(cfg, progress=False)
    cases = [
        (["--ckpt", str(no_data)], "records no data set to evaluate against"),
        (["--ckpt", str(velocity_run.path), "--solvers", "gm-sde"], "needs a GM model"),
        (["--ckpt", str(toy_run.path), "--json", str(tmp_path / "no" / "e.json")], "cannot write"),
        (["--ckpt", str(toy_run.path), "--nfes", "0"], "--nfes must be >= 1"),
        (
            ["--ckpt", str(toy_run.path), "--solvers", "euler", "--substep-method", "pc3"],
            "--substep-method applies to --solvers gm-ode only",
        ),
        (["--ckpt", str(toy_run.path), "--grid", "shift"], "--grid shift needs --shift"),
        (["--ckpt", str(tmp_path / "missing")], "does not exist"),
    ]
    for args, match in cases:
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("gmflow: error: ") and match in err, (args, err)


def test_bpd_of_a_spectral_run_and_errors(spectral_run, cond_run, velocity_run, tmp_path, capsys):
    out = tmp_path / "b.json"
    args = [
        "eval",
        "--ckpt",
        str(spectral_run.path),
        "--bpd",
        "--n",
        "40",
        "--num-t",
        "2",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    assert "bpd_spectral" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert (res["n"], res["num_t"], res["dims"], res["split"], res["dequantize"]) == (40, 2, 64, "test", True)
    assert res["bin_width"] == 2 / 16  # digits8: 17 grey levels in [-1, 1]
    assert math.isfinite(res["bpd"]) and math.isfinite(res["bpd_spectral"]) and res["stderr"] > 0
    assert main([*args[:-1], str(tmp_path / "c.json"), "--no-spectral"]) == 0
    off = json.loads((tmp_path / "c.json").read_text())
    assert off["bpd_spectral"] is None and off["bpd"] == res["bpd"]  # the same draws without the net
    assert (
        main(["eval", "--ckpt", str(cond_run.path), "--bpd", "--n", "8", "--json", str(tmp_path / "d.json")])
        == 0
    )
    assert json.loads((tmp_path / "d.json").read_text())["bpd_spectral"] is None
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(velocity_run.path), "--bpd"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bpd needs a GM image run" in err


def test_class_conditional_eval_is_class_balanced(cond_run, digits_run, tmp_path, capsys):
    """A class-conditional run samples all classes equally and scores class accuracy; --uncond, --guidance."""
    base = ["eval", "--ckpt", str(cond_run.path), "--solvers", "gm-ode", "--nfes", "1", "--n", "100"]
    out = tmp_path / "c.json"
    assert main([*base, "--json", str(out)]) == 0
    assert "class_acc" in capsys.readouterr().out
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert res["classes"] == "balanced" and res["guidance"] is None and 0 <= row["class_acc"] <= 1
    assert main([*base, "--uncond", "--json", str(tmp_path / "u.json")]) == 0
    unc = json.loads((tmp_path / "u.json").read_text())
    assert unc["classes"] == "null class" and "class_acc" not in unc["rows"][0]
    assert unc["rows"][0]["fd"] != row["fd"]  # the null class is a different input than the labels
    g = ["--guidance", "cfg", "--scale", "2", "--json", str(tmp_path / "g.json")]
    assert main([*base, *g]) == 0
    guided = json.loads((tmp_path / "g.json").read_text())
    assert guided["guidance"] == {"kind": "cfg", "scale": 2.0, "orthogonal": 0.0}
    assert guided["rows"][0]["batch_factor"] == 2 and "batch_factor" not in row
    assert guided["rows"][0]["fd"] != row["fd"]
    capsys.readouterr()
    cases = [
        ([*base, "--uncond", "--guidance", "cfg", "--scale", "2"], "drop --uncond"),
        (["eval", "--ckpt", str(digits_run.path), "--uncond"], "--uncond: this run is not class-conditional"),
        (
            ["eval", "--ckpt", str(digits_run.path), "--guidance", "cfg", "--scale", "2"],
            "not class-conditional",
        ),
    ]
    for args, match in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (args, err)
