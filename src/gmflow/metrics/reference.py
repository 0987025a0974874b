"""The evaluation reference protocol of the 2-D benchmarks: one seeded reference set and its floor.

Protocol (``docs/maths/evaluation.md``): one ``torch.Generator`` seeded with :data:`REFERENCE_SEED`
draws the ``n``-point reference set first, then an independent ``n``-point floor set. Samples are
scored by :func:`~gmflow.metrics.sliced_w2_mean` against the reference (projection seeds 0, 1, 2;
256 directions) and reported relative to the **floor**, the same score of the floor set: what real
data itself scores, so a perfect sampler sits at ratio ~1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..data.registry import load_dataset
from .toy2d import sliced_w2_mean

__all__ = ["REFERENCE_SEED", "reference_set", "sw2_floor"]

REFERENCE_SEED = 20251121


def _draw(sampler: Any, n: int, generator: torch.Generator) -> Tensor:
    if hasattr(sampler, "sample"):
        return sampler.sample(n, generator=generator)
    if callable(sampler):
        return sampler(n, generator)
    raise ValueError(
        "data must be a data set name, callable as sampler(n, generator) or have a .sample(n, generator=) "
        "method"
    )


def reference_set(
    data: str | Callable[[int, torch.Generator], Tensor] | Any,
    n: int,
    *,
    seed: int = REFERENCE_SEED,
    seeds: Sequence[int] = (0, 1, 2),
    n_projections: int = 256,
    repeats: int = 1,
) -> tuple[Tensor, float]:
    """``(reference, floor)``: ``n`` reference points of ``data`` and the sliced-W2 floor against them.

    One generator seeded with ``seed`` draws ``reference`` (first draw, ``(n, 2)`` as ``data`` returns
    it), then ``repeats`` floor sets (further draws);
    ``floor = mean over floor sets of sliced_w2_mean(floor_set, reference, seeds, n_projections)``.
    ``repeats=1`` is the protocol (second draw against first draw). One floor set is itself noisy
    (sd ~25 % at n = 20,000 on the checkerboard); ``repeats > 1`` estimates what a perfect sampler
    scores against this reference.

    ``data`` is a name of :data:`gmflow.data.DATASETS` (a 2-D one), a callable ``sampler(n, generator)``
    or an object with ``.sample(n, generator=...)`` (e.g. :class:`gmflow.data.Checkerboard`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got n={n!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got repeats={repeats!r}")
    sampler = load_dataset(data) if isinstance(data, str) else data
    g = torch.Generator().manual_seed(int(seed))
    ref = _draw(sampler, n, g)
    vals = [
        sliced_w2_mean(_draw(sampler, n, g), ref, seeds=seeds, n_projections=n_projections)
        for _ in range(repeats)
    ]
    return ref, sum(vals) / repeats


def sw2_floor(
    sampler: str | Callable[[int, torch.Generator], Tensor] | Any,
    n: int,
    *,
    seed: int = REFERENCE_SEED,
    seeds: Sequence[int] = (0, 1, 2),
    n_projections: int = 256,
    repeats: int = 1,
) -> float:
    """The floor of :func:`reference_set` alone (same arguments, same draws)."""
    return reference_set(sampler, n, seed=seed, seeds=seeds, n_projections=n_projections, repeats=repeats)[1]
