"""What every ``gmflow`` subcommand shares: the one-line usage error, argument types, checks."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..sampling import sample

__all__ = [
    "Parser",
    "UsageError",
    "check_writable",
    "draw_samples",
    "fmt",
    "is_main_rank",
    "one_line",
    "positive",
]


class UsageError(Exception):
    """A bad command line (reported as one line, exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def fmt(description: str, epilog: str | None = None) -> dict[str, Any]:
    """Wrapped description, verbatim epilog (examples)."""
    return {
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "description": textwrap.fill(description, 88),
        "epilog": epilog,
    }


def positive(name: str):
    """argparse type: an integer >= 1 (the message names ``name``)."""

    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return conv


def positive_float(name: str):
    """argparse type: a finite number > 0 (the message names ``name``)."""

    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {s!r}")
        return v

    return conv


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {str(path)!r}: directory {str(parent)!r} is missing or not writable")


def draw_samples(
    model: Any,
    event_shape: tuple[int, ...],
    n: int,
    batch: int,
    seed: int,
    device: str,
    desc: str,
    *,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    **kw: Any,
) -> torch.Tensor:
    """``n`` samples of shape ``event_shape`` in chunks of ``batch`` (on CPU).

    The noise is drawn up front from ``seed``, so deterministic solvers give the same samples for any
    ``batch``; stochastic ones (gm-sde, ddpm) continue the same generator chunk by chunk. ``labels``
    ``(n,)`` condition a class-conditional model (``class_labels``); guidance (``kw["guidance"]``)
    uses ``null_label`` as the unconditional input, batched with the conditional one.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *event_shape, generator=g)
    out = []
    bar = tqdm(range(0, n, batch), desc=desc, leave=False, file=sys.stderr, disable=n <= batch or None)
    for i in bar:
        x = noise[i : i + batch].to(device)
        cond: dict[str, Any] = {}
        if labels is not None:
            y = labels[i : i + batch].to(device)
            cond["cond"] = {"class_labels": y}
            if kw.get("guidance") is not None:
                cond["uncond"] = {"class_labels": torch.full_like(y, int(null_label))}
        out.append(sample(model, x, generator=g, **cond, **kw).cpu())
    return torch.cat(out)
