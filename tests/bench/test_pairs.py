"""``gmflow bench pairs``: GM teacher + gm-ode vs FM teacher for ReFlow pairs, smoke preset end to end."""

import json

import pytest

from gmflow.cli import main

REQUIRED = {"dataset", "teacher", "solver", "order", "nfe", "pair_rmse", "sw2", "sw2_floor", "ms_per_1k"}


@pytest.mark.slow
def test_smoke_preset_records_tables_and_figures(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["bench", "pairs", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert records and all(REQUIRED <= set(r) for r in records)
    assert {r["dataset"] for r in records} == {"checkerboard", "ring"}
    cb = {(r["teacher"], r["solver"], r["order"]) for r in records if r["dataset"] == "checkerboard"}
    assert cb == {("fm", "euler", 1), ("fm", "dpm++2m", 1), ("gmflow", "gm-ode", 1), ("gmflow", "gm-ode", 2),
                  ("gmflow", "euler", 1), ("gmflow", "dpm++2m", 1)}  # fmt: skip
    ring = {(r["teacher"], r["solver"]) for r in records if r["dataset"] == "ring"}
    assert ("exact-gm", "euler") not in ring and ("exact-mean", "euler") in ring  # one exact teacher
    # the exact ring GM: gm-ode's analytic sub-steps follow the ODE at NFE 1, one Euler step cannot
    by = {(r["teacher"], r["solver"], r["order"], r["nfe"]): r for r in records if r["dataset"] == "ring"}
    assert (
        by[("exact-gm", "gm-ode", 2, 1)]["pair_rmse"] < 0.1 * by[("exact-mean", "euler", 1, 1)]["pair_rmse"]
    )
    assert all(r["ms_per_1k"] > 0 and r["nonfinite"] == 0 for r in records)
    md = (out / "results.md").read_text()
    assert "Headline" in md and "| GMFlow teacher gm-ode o2 |" in md and "| exact GM gm-ode o1 |" in md
    for ds in ("checkerboard", "ring"):
        for kind in ("error", "cost"):
            assert (out / f"pair_{kind}_{ds}.png").stat().st_size > 1000
    assert "figures:" in capsys.readouterr().out


@pytest.mark.slow
def test_reuses_finished_teachers_and_rejects_bad_input(tmp_path, capsys):
    teachers = tmp_path / "toy"
    args = ["bench", "pairs", "--preset", "smoke", "--datasets", "checkerboard", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--teachers", str(teachers)]) == 0
    stamp = {p: p.stat().st_mtime_ns for p in teachers.rglob("*.safetensors")}
    assert stamp  # trained into --teachers, not into --out
    assert not (tmp_path / "a" / "models").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--teachers", str(teachers)]) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in teachers.rglob("*.safetensors")}  # reused as is
    capsys.readouterr()
    assert main(["bench", "pairs", "--preset", "huge", "--out", str(tmp_path / "c")]) == 2
    assert (
        main(["bench", "pairs", "--preset", "smoke", "--datasets", "moons", "--out", str(tmp_path / "d")])
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown benchmark preset 'huge'" in err and "moons" in err


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_presets_reference_existing_toy2d_presets(name):
    from gmflow.bench import pairs, toy2d

    assert pairs.PRESETS[name].toy2d_preset in toy2d.PRESETS
