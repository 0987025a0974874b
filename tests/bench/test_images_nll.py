"""``gmflow bench images --part nll --preset smoke``: records, tables, figures and resumption end to end."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images_nll
from gmflow.cli import main

pytestmark = pytest.mark.slow


def test_smoke_preset_end_to_end_and_resume(tmp_path, capsys):
    root = tmp_path / "bench"
    cmd = ["bench", "images", "--part", "nll", "--preset", "smoke", "--out", str(root), "--no-progress"]
    assert main(cmd) == 0
    out = root / "nll"  # each part of gmflow bench images writes into DIR/<part>/
    pr = images_nll.NLL_PRESETS["smoke"]
    records = json.loads((out / "results.json").read_text())
    bpd = {r["K"]: r for r in records if r["part"] == "bpd"}
    assert sorted(bpd) == list(pr.components)
    assert (
        all(r["bpd_spectral"] is None for k, r in bpd.items() if k != 16)
        and bpd[16]["bpd_spectral"] is not None
    )
    assert all(r["n"] == pr.n_test and r["dequantize"] for r in bpd.values())
    fd = {(r["spectral"], r["draw"]) for r in records if r["part"] == "fd"}
    assert fd == {(s, d) for s in (False, True) for d in range(pr.draws)}
    assert all({"fd", "precision", "recall", "class_acc", "nonfinite"} <= set(r) for r in records
               if r["part"] == "fd")  # fmt: skip
    text = (out / "results.md").read_text()
    assert "| 16 |" in text and "K = 16 + spectral" in text and "FD of GM-SDE 2 at NFE 4" in text
    for name in ("bpd_vs_k.png", "spectrum.png"):
        assert (out / name).stat().st_size > 1000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["estimate"]["total_s"] > 0 and len(meta["spectra"]["curves"]) == len(pr.spectrum_t)
    cfg = json.loads((out / "models" / "k16" / "config.json").read_text())
    assert cfg["model"]["class"] == "SpectralDenoiser"
    # re-running reuses the trained models and the scored cells
    before = (out / "models" / "k16" / "checkpoint.json").read_text()
    capsys.readouterr()
    assert main(cmd) == 0
    assert (out / "models" / "k16" / "checkpoint.json").read_text() == before
    assert json.loads((out / "results.json").read_text()) == records
    assert "already trained" in capsys.readouterr().err
