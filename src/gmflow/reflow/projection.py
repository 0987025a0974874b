"""Coupling projection (reconstructed, docs/maths/reflow.md §9): move generated x0 towards real data.

:func:`project_coupling` computes a fixed projected coupling once over a whole pair set (in blocks);
:func:`project_pairs` is its per-block solver.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["project_coupling", "project_pairs"]


def project_pairs(
    x0_gen: Tensor,
    x1: Tensor,
    x0_real: Tensor,
    *,
    alpha: float = 1.0,
    method: str = "ot",
    epsilon: float = 0.05,
    iters: int = 500,
) -> tuple[Tensor, Tensor]:
    """Minibatch coupling projection: move generated ``x0`` towards matched real data.

    A CPU stand-in for Simple ReFlow's coupling projection (App. D.3, Algorithms 1–2: GAN + Sinkhorn,
    not public). This is a **reconstruction**: match the ``B`` generated ``x0_gen`` to the ``M >= B`` real
    ``x0_real`` by optimal transport on the cost ``C_ij = ||x0_gen_i - x0_real_j||^2`` and return::

        ((1 - alpha) x0_gen + alpha T(x0_gen), x1)

    * ``method="ot"``: ``T`` is the exact assignment ``argmin_sigma sum_i C_{i sigma(i)}``
      (``scipy.optimize.linear_sum_assignment``; scipy is optional, imported lazily).
    * ``method="sinkhorn"``: entropic OT with uniform marginals, ``P = argmin <P, C> - eps' H(P)``
      with ``eps' = epsilon * mean(C)`` (log-domain, ``iters`` iterations), and ``T`` the barycentric
      projection ``T(x_i) = sum_j P_ij x0_real_j / sum_j P_ij`` (pure torch).

    ``alpha = 0`` returns the inputs unchanged; ``x1`` is never modified.
    """
    if x0_gen.shape != x1.shape:
        raise ValueError(f"x0_gen {tuple(x0_gen.shape)} and x1 {tuple(x1.shape)} must have the same shape")
    if x0_real.shape[1:] != x0_gen.shape[1:]:
        raise ValueError(
            f"x0_real {tuple(x0_real.shape)} and x0_gen {tuple(x0_gen.shape)} differ in event shape"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    b, m = x0_gen.shape[0], x0_real.shape[0]
    if alpha == 0.0:
        return x0_gen, x1
    g = x0_gen.reshape(b, -1).double()
    r = x0_real.reshape(m, -1).to(g)
    cost = torch.cdist(g, r).square()
    if method == "ot":
        if m < b:
            raise ValueError(
                f"method='ot' gives each generated sample its own real one: needs M >= B, got {m} < {b}"
            )
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            raise ImportError(
                "project_pairs(method='ot') needs scipy: `pip install scipy` (or use method='sinkhorn')"
            ) from None
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        idx = torch.empty(b, dtype=torch.long)
        idx[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        matched = x0_real[idx.to(x0_real.device)].to(x0_gen.dtype)
    elif method == "sinkhorn":
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        eps = epsilon * float(cost.mean().clamp_min(1e-30))
        log_a = torch.full((b, 1), -math.log(b), dtype=g.dtype, device=g.device)
        log_b = torch.full((1, m), -math.log(m), dtype=g.dtype, device=g.device)
        f = torch.zeros_like(log_a)
        h = torch.zeros_like(log_b)
        for _ in range(iters):
            f = eps * log_a - eps * torch.logsumexp((h - cost) / eps, dim=1, keepdim=True)
            h = eps * log_b - eps * torch.logsumexp((f - cost) / eps, dim=0, keepdim=True)
        logp = (f + h - cost) / eps
        w = torch.softmax(logp, dim=1)  # rows normalised: P_ij / sum_j P_ij
        matched = (w @ r).reshape(x0_gen.shape).to(x0_gen.dtype)
    else:
        raise ValueError(f"method must be 'ot' or 'sinkhorn', got {method!r}")
    return (1.0 - alpha) * x0_gen + alpha * matched, x1


class _RealStream:
    """Real samples in blocks: a tensor is read through seeded permutations (each sample once per
    pass, a new permutation when a pass is used up); a sampler is asked for ``.sample(m, generator=)``."""

    def __init__(self, real_data: Any, g: torch.Generator) -> None:
        self.data, self.g = real_data, g
        self.order = torch.empty(0, dtype=torch.long)

    def take(self, m: int) -> Tensor:
        if not isinstance(self.data, Tensor):
            return self.data.sample(m, generator=self.g)
        while len(self.order) < m:
            self.order = torch.cat([self.order, torch.randperm(len(self.data), generator=self.g)])
        idx, self.order = self.order[:m], self.order[m:]
        return self.data[idx.to(self.data.device)]


def project_coupling(
    x0_gen: Tensor,
    real_data: Any,
    *,
    lam: float,
    method: str = "ot",
    pool: float = 1.0,
    block: int = 1024,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The projected ``x0`` of a whole backward pair set, computed once (its ``x1`` are unchanged).

    The pairs are shuffled (``generator``) into blocks of ``block``; each block is matched by
    :func:`project_pairs` to ``ceil(pool * len(block))`` real samples (from a tensor ``(N, *event)``:
    consecutive slices of seeded permutations, so with ``pool * n <= N`` no real sample is used twice;
    from a sampler: ``real_data.sample(m, generator=)``), and::

        x0 <- (x0 + lam y) / (1 + lam)  = (1 - alpha) x0 + alpha y,   alpha = lam / (1 + lam),

    the minimiser of ``||z - x0||^2 + lam ||z - y||^2``: ``lam`` weighs the distance to the matched real
    sample ``y`` (our stand-in for the paper's marginal penalty) against moving away from the teacher's
    ``x0``. ``lam = 0`` returns a copy of ``x0_gen``; ``lam = inf`` is not allowed (use a large value).
    Returns a tensor shaped like ``x0_gen``.
    """
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (projection lambda) must be a finite number >= 0, got {lam!r}")
    if not (isinstance(pool, (int, float)) and math.isfinite(pool) and pool >= 1):
        raise ValueError(f"pool must be a number >= 1, got {pool!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    out = x0_gen.clone()
    if lam == 0:
        return out
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x0_gen), generator=g)
    stream = _RealStream(real_data, g)
    alpha = lam / (1.0 + lam)
    for start in range(0, len(perm), block):
        idx = perm[start : start + block].to(x0_gen.device)
        real = stream.take(math.ceil(pool * len(idx))).to(x0_gen)
        part = x0_gen[idx]
        out[idx], _ = project_pairs(part, part, real, alpha=alpha, method=method)
    return out
