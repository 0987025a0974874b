"""``gmflow bench images --part ddpm``: cells, summary, and the smoke run end to end with resumption."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images_ddpm as dd
from gmflow.cli import main
from gmflow.experiments import load_run


def test_cells_repeat_only_the_smallest_nfe():
    pr = dd.DDPM_PRESETS["quick"]
    assert pr.nfes == (10, 25, 50, 100) and pr.components == 2
    c = dd.cells(pr)
    assert len(c) == len(set(c)) == len(dd.METHODS) * (len(pr.nfes) - 1 + pr.draws)
    assert {d for m, k, d in c if k == 10} == set(range(pr.draws)) and {d for m, k, d in c if k > 10} == {0}


def test_summary_reports_the_relative_fd_gap():
    pr = dd.DDPM_PRESETS["smoke"]
    fds = (("gm-sde 2", 6.0), ("ddpm small", 10.0), ("ddpm large", 5.0))
    recs = [{"method": m, "nfe": 2, "draw": d, "fd": fd + d} for m, fd in fds for d in (0, 1)]
    small, large = dd.summary_lines(recs, pr)
    assert "GM-SDE 2 lower by 38%" in small  # 1 - 6.5 / 10.5
    assert "GM-SDE 2 higher by 18%" in large  # 6.5 / 5.5 - 1


@pytest.mark.slow
def test_smoke_run_is_unconditional_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "images", "--part", "ddpm", "--preset", "smoke", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    res = out / "ddpm"
    records = json.loads((res / "results.json").read_text())
    pr = dd.DDPM_PRESETS["smoke"]
    assert len(records) == len(dd.cells(pr))
    rows = {(r["method"], r["solver"], r["order"], r["variance"]) for r in records}
    assert rows == {("gm-sde 2", "gm-sde", 2, None), ("ddpm small", "ddpm", 1, "small"),
                    ("ddpm large", "ddpm", 1, "large")}  # fmt: skip
    assert all({"fd", "precision", "recall"} <= set(r) for r in records)
    for name in ("gmflow", "fm"):  # both runs are unconditional DiTs with the same trunk
        run = load_run(res / "models" / name)
        assert run.num_classes == 0 and not run.config.model.conditional and run.config.model.arch == "dit"
    assert load_run(res / "models" / "gmflow").model.config["num_gaussians"] == 2
    text = (res / "results.md").read_text()
    assert "FD at NFE 2 (2 draws): GM-SDE 2" in text and "| ddpm large |" in text
    assert (res / "fd_vs_nfe.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing retrained, no new cells
    assert json.loads((res / "results.json").read_text()) == records
    assert capsys.readouterr().err.count("already trained") == 2
