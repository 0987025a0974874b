"""What every preset-driven benchmark shares: its standard options and the run set-up."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..io import sha256_bytes


def add_run_arguments(
    p: argparse.ArgumentParser, bench: str, presets: Mapping[str, Any], datasets: Sequence[str] | None = None
) -> None:
    """``--preset --out [--datasets] --seed --threads --no-progress`` of ``gmflow bench <bench>``."""
    p.add_argument(
        "--preset", default="quick", help=f"benchmark preset: {', '.join(presets)} (default: quick)"
    )
    p.add_argument("--out", default=None, help=f"output directory (default: runs/{bench}-<preset>)")
    if datasets is not None:
        p.add_argument("--datasets", nargs="+", default=None, help=f"subset of {', '.join(datasets)}")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def start_run(
    args: argparse.Namespace, bench: str, presets: Mapping[str, Any], datasets: Sequence[str] | None = None
) -> tuple[Any, tuple[str, ...], Path]:
    """Validate ``args`` (preset, datasets), apply ``--threads`` and create the output directory.

    Returns ``(preset, datasets, out)``; ``datasets`` is ``args.datasets`` or the preset's
    ``datasets`` (empty when the benchmark has none). Raises ``ConfigError`` naming the bad option.
    """
    if args.preset not in presets:
        raise ConfigError(f"unknown benchmark preset {args.preset!r} (available: {', '.join(presets)})")
    pr = presets[args.preset]
    chosen: tuple[str, ...] = ()
    if datasets is not None:
        chosen = tuple(args.datasets or pr.datasets)
        bad = [d for d in chosen if d not in datasets]
        if bad:
            raise ConfigError(f"--datasets: unknown test bed(s) {bad}; choose from {', '.join(datasets)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{bench}-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    return pr, chosen, out


def key_digest(key: Any) -> str:
    """16 hex digits of the SHA-256 of ``key`` as sorted JSON (non-JSON values by ``str``): the identity
    of what a cached benchmark result depends on."""
    return sha256_bytes(json.dumps(key, sort_keys=True, default=str).encode())[:16]


def interleaved_step_ms(
    parts: Mapping[str, tuple[Any, Any, Any, Any]], steps: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms of a training step (objective, backward, optimizer step) for each named part.

    ``parts[name] = (model, optimizer, objective, batch(i, generator))``. The parts alternate step by
    step, so slow drifts of a shared machine hit them equally; the first ``warmup`` rounds are dropped.
    """
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(steps + warmup):
        for name, (model, opt, objective, batch) in parts.items():
            g = torch.Generator().manual_seed(i)
            b = batch(i, g)
            t0 = time.perf_counter()
            loss = objective(model, b, g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}
