"""``gmflow bench toy2d``: the smoke preset end to end (records, tables, figures)."""

import argparse
import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import pytest

from gmflow.bench import toy2d
from gmflow.config import ConfigError

REQUIRED = {"model", "K", "solver", "order", "nfe", "sw2", "sw2_floor", "mmd", "in_support", "cell_kl"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    """The smoke benchmark's output directory and what it printed."""
    p = argparse.ArgumentParser()
    toy2d.add_arguments(p)
    out = tmp_path_factory.mktemp("toy2d") / "bench"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert toy2d.run(p.parse_args(["--preset", "smoke", "--out", str(out), "--no-progress"])) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_smoke_preset_writes_records_tables_and_figures(smoke):
    out, printed = smoke
    records = json.loads((out / "results.json").read_text())
    assert records and all(REQUIRED <= set(r) for r in records)
    preset = toy2d.PRESETS["smoke"]
    fm = [r for r in records if r["model"] == "fm"]
    gm = [r for r in records if r["model"] == "gmflow"]
    assert len(fm) == len(preset.fm_solvers) * len(preset.nfes)
    assert len(gm) == len(preset.components) * len(preset.gm_solvers) * len(preset.nfes)
    assert {r["K"] for r in gm} == set(preset.components) and all(r["K"] is None for r in fm)
    md = (out / "results.md").read_text()
    assert "| FM | euler | 1 |" in md and "sliced-W2 / floor" in md
    for name in ("histograms.png", "sw2_vs_nfe.png", "in_support_vs_nfe.png", "cell_kl_vs_nfe.png"):
        assert (out / name).stat().st_size > 1000
    assert "figures:" in printed


@pytest.mark.slow
def test_seed_repeats_script_on_a_smoke_run(smoke, tmp_path, monkeypatch, capsys):
    out = smoke[0]
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "toy2d_seed_repeats.py"
    argv = [str(script), "--run", str(out), "--K", "4", "--gm-nfe", "1", "--fm-nfe", "2", "--seeds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    rep = json.loads((out / "seed_repeats.json").read_text())
    assert len(rep["records"]) == 8 and all(len(r["seeds"]) == 2 for r in rep["records"])
    assert all(r["sw2_ratio_mean"] > 0 and r["sw2_ratio_sd"] >= 0 for r in rep["records"])
    assert "gmflow-k4" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [str(script), "--run", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="not found"):
        runpy.run_path(str(script), run_name="__main__")


def test_unknown_preset_is_a_config_error(tmp_path):
    p = argparse.ArgumentParser()
    toy2d.add_arguments(p)
    with pytest.raises(ConfigError, match="unknown benchmark preset"):
        toy2d.run(p.parse_args(["--preset", "huge", "--out", str(tmp_path)]))
