"""``gmflow bench NAME``: every benchmark is reachable and shows its own options."""

from __future__ import annotations

import pytest

from gmflow.cli import main
from gmflow.cli.bench import BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_has_help(name, capsys):
    assert main(["bench", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gmflow bench {name}") and "--out" in out


def test_unknown_benchmark_and_bad_options(capsys):
    assert main(["bench", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["bench", "toy2d", "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmflow: error: unrecognized arguments: --bogus") and len(err.splitlines()) == 1
