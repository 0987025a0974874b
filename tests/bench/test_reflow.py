"""``gmflow bench reflow``: the smoke preset end to end, reuse on re-run, and the report helpers."""

from __future__ import annotations

import argparse
import json

import pytest

from gmflow.bench import reflow as bench
from gmflow.config import ConfigError


def _args(out, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    ns = p.parse_args(["--preset", "smoke", "--out", str(out), "--threads", "1", "--no-progress"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.slow
def test_smoke_run_writes_results_and_reuses_them(tmp_path, capsys):
    assert bench.run(_args(tmp_path)) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {r["dataset"] for r in records} == {"checkerboard", "ring"}
    for r in records:
        for key in ("dataset", "variant", "nfe", "sw2", "sw2_floor", "rel_change", "prev_variant"):
            assert key in r, key
        assert r["sw2"] > 0 and r["sw2_floor"] > 0
    variants = [r["variant"] for r in records if r["dataset"] == "ring" and r["nfe"] == 1]
    assert variants == [
        "teacher", "2rf", "+norm", "+pow10", "+forward", "+projection", "+sigmoid", "+dpm", "full"
    ]  # fmt: skip
    assert {r["nfe"] for r in records} == set(bench.PRESETS["smoke"].nfes)
    by = {(r["dataset"], r["variant"], r["nfe"]): r for r in records}
    r = by[("ring", "+forward", 2)]
    assert r["prev_variant"] == "+pow10"
    prev = by[("ring", "+pow10", 2)]["sw2"]
    assert r["rel_change"] == pytest.approx((r["sw2"] - prev) / prev)
    text = (tmp_path / "results.md").read_text()
    assert "## ring: sw2" in text and "Headline" in text and "| full |" in text
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(diag["ring"]["straightness"]) == {"teacher", "2rf", "full"}
    assert len(diag["ring"]["relative_loss"]["reflow_2rf_pairs"]["max"]) == 11
    for f in ("ring_sw2_vs_nfe.png", "checkerboard_histograms.png", "ring_relative_loss.png"):
        assert (tmp_path / f).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "headline" in out and "ring (sw2): NFE 1" in out
    # a second run reuses teachers, pairs, students and evaluations: none of their files is rewritten
    stamp = _stamps(tmp_path)
    assert any("students" in p.parts for p in stamp) and any("cache" in p.parts for p in stamp)
    assert bench.run(_args(tmp_path, datasets=["ring"])) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert [x["sw2"] for x in again] == [x["sw2"] for x in records if x["dataset"] == "ring"]
    assert _stamps(tmp_path) == stamp


def _stamps(out) -> dict:
    """Modification times of every file the benchmark reuses (teachers, pairs, students, evaluations);
    the content of training logs (a finished run that is asked to train again rewrites its log as is)."""
    dirs = [out / d for d in ("teachers", "pairs", "students", "cache")]
    files = [p for d in dirs for p in d.rglob("*") if p.is_file()]
    return {p: p.read_bytes() if p.name == "log.csv" else p.stat().st_mtime_ns for p in files}


def test_bad_preset_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match="preset"):
        bench.run(_args(tmp_path, preset="nope"))
    with pytest.raises(ConfigError, match="datasets"):
        bench.run(_args(tmp_path, datasets=["mnist"]))


def test_relative_changes_and_headline():
    recs = [
        {"dataset": "digits", "variant": v, "nfe": k, "fd": fd}
        for v, k, fd in [
            ("teacher", 1, 40.0), ("2rf", 1, 10.0), ("+norm", 1, 8.0), ("+hpf", 1, 9.0), ("full", 1, 5.0),
            ("2rf", 2, 4.0), ("full", 2, 5.0),
        ]
    ]  # fmt: skip
    bench.add_relative_changes(recs)
    by = {(r["variant"], r["nfe"]): r for r in recs}
    assert by[("2rf", 1)]["rel_change"] == pytest.approx(-0.75)
    assert by[("+hpf", 1)]["prev_variant"] == "+norm"
    assert by[("+hpf", 1)]["rel_change"] == pytest.approx(0.125)
    assert by[("full", 2)]["prev_variant"] == "2rf"
    assert by[("teacher", 1)]["rel_change"] is None
    (line,) = bench.headline(recs)
    assert line.startswith("digits (fd)") and "(-50.0%)" in line and "(+25.0%)" in line
