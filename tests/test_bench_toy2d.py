"""``gmflow bench toy2d``: the smoke preset end to end (records, tables, figures)."""

import argparse
import json

from gmflow.bench import toy2d

REQUIRED = {"model", "K", "solver", "order", "nfe", "sw2", "sw2_floor", "mmd", "in_support", "cell_kl"}


def test_smoke_preset_writes_records_tables_and_figures(tmp_path, capsys):
    p = argparse.ArgumentParser()
    toy2d.add_arguments(p)
    out = tmp_path / "bench"
    assert toy2d.run(p.parse_args(["--preset", "smoke", "--out", str(out), "--no-progress"])) == 0
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
    assert "figures:" in capsys.readouterr().out


def test_unknown_preset_is_a_config_error(tmp_path):
    import pytest

    from gmflow.train import ConfigError

    p = argparse.ArgumentParser()
    toy2d.add_arguments(p)
    with pytest.raises(ConfigError, match="unknown benchmark preset"):
        toy2d.run(p.parse_args(["--preset", "huge", "--out", str(tmp_path)]))
