"""Pair data set: verified backward/forward pairs in memory, mixed with ratio rho."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from .projection import project_coupling
from .store import PairError, PairManifest, load_shard, read_manifest

__all__ = ["PairDataset"]


class PairDataset:
    """All pairs of a backward directory (and optionally a forward one), verified, in memory.

    :meth:`draw` (and :meth:`sample`, which drops the mask) takes every element from the forward pairs
    with probability ``rho`` and from the backward pairs otherwise (Simple ReFlow §2.2(5), mixing ratio
    rho; 0.4 for CIFAR10; ``docs/maths/reflow.md``), uniformly with replacement inside each set.

    Attributes:
        backward, forward: ``(x0, x1)`` tensors of each set (``forward`` is ``None`` without forward_dir).
        event_shape: shape of one sample.
        manifests: the :class:`PairManifest` of each directory, keyed by direction.
    """

    def __init__(
        self,
        backward_dir: str | os.PathLike,
        forward_dir: str | os.PathLike | None = None,
        rho: float = 0.0,
        *,
        verify: bool = True,
        allow_partial: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if not (isinstance(rho, (int, float)) and 0.0 <= float(rho) <= 1.0):
            raise ValueError(f"rho (forward-pair mixing ratio) must be in [0, 1], got {rho!r}")
        if rho > 0 and forward_dir is None:
            raise ValueError(f"rho={rho} > 0 draws forward pairs, so it needs forward_dir")
        self.rho = float(rho)
        self.manifests: dict[str, PairManifest] = {}
        self.backward = self._load(backward_dir, "backward", "backward_dir", verify, allow_partial, device)
        self.event_shape = self.manifests["backward"].event_shape
        self.forward: tuple[Tensor, Tensor] | None = None
        if forward_dir is not None:
            self.forward = self._load(forward_dir, "forward", "forward_dir", verify, allow_partial, device)
            fshape = self.manifests["forward"].event_shape
            if fshape != self.event_shape:
                raise PairError(
                    f"forward_dir pairs have event shape {fshape} but backward_dir pairs have "
                    f"{self.event_shape}"
                )

    def _load(self, directory, direction: str, arg: str, verify: bool, allow_partial: bool, device):
        try:
            m = read_manifest(directory)
        except PairError as e:
            raise PairError(f"{arg}: {e}") from None
        if m.direction != direction:
            raise PairError(f"{arg} {str(directory)!r} holds {m.direction} pairs, expected {direction} pairs")
        if not m.shards:
            raise PairError(f"{arg} {str(directory)!r} holds no completed shard")
        if not m.complete and not allow_partial:
            raise PairError(
                f"{arg} {str(directory)!r} is incomplete ({m.count} of {m.n} pairs); rerun generate_pairs "
                "with the same arguments to finish it, or pass allow_partial=True"
            )
        parts = [load_shard(directory, s, m.event_shape, verify=verify) for s in m.shards]
        self.manifests[direction] = m
        return (torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device))

    def __len__(self) -> int:
        return len(self.backward[0]) + (0 if self.forward is None else len(self.forward[0]))

    def draw(
        self, n: int, rho: float | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, x1, is_forward)`` of ``n`` pairs mixed with ratio ``rho`` (default :attr:`rho`).

        ``x0``, ``x1``: ``(n, *event_shape)`` on the pairs' device; ``is_forward``: ``(n,)`` bool, which
        elements are forward pairs. Draws from the CPU ``generator``, in this order (training and the
        benchmarks depend on it)::

            is_forward = rand(n) < rho
            ib = randint(len(backward), (n,))                  # one backward index per element
            jf = randint(len(forward), (is_forward.sum(),))    # only if some element is forward
            x0, x1 = backward[ib];  x0[is_forward], x1[is_forward] = forward[jf]
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        rho = self.rho if rho is None else rho
        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and 0.0 <= float(rho) <= 1.0):
            raise ValueError(f"rho (forward-pair mixing ratio) must be in [0, 1], got {rho!r}")
        if rho > 0 and self.forward is None:
            raise ValueError(f"rho={rho} > 0 draws forward pairs, but this PairDataset has no forward_dir")
        dev = self.backward[0].device
        is_fwd = torch.rand(n, generator=generator) < rho
        ib = torch.randint(len(self.backward[0]), (n,), generator=generator).to(dev)
        x0, x1 = self.backward[0][ib], self.backward[1][ib]
        is_fwd = is_fwd.to(dev)
        if self.forward is not None and bool(is_fwd.any()):
            jf = torch.randint(len(self.forward[0]), (int(is_fwd.sum()),), generator=generator).to(dev)
            x0[is_fwd], x1[is_fwd] = self.forward[0][jf], self.forward[1][jf]
        return x0, x1, is_fwd

    def projected(
        self,
        real_data: Any,
        *,
        lam: float,
        method: str = "ot",
        pool: float = 1.0,
        block: int = 1024,
        seed: int = 0,
    ) -> PairDataset:
        """A copy whose backward ``x0`` are replaced by :func:`~gmflow.reflow.project_coupling` (once).

        The projection is a pure function of the pairs, ``real_data`` and ``seed``; the forward pairs
        and every ``x1`` are shared with ``self`` unchanged.
        """
        out = copy.copy(self)
        x0, x1 = self.backward
        g = torch.Generator().manual_seed(int(seed))
        x0p = project_coupling(x0, real_data, lam=lam, method=method, pool=pool, block=block, generator=g)
        out.backward = (x0p, x1)
        return out

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x0, x1)`` of :meth:`draw` with ratio :attr:`rho`."""
        x0, x1, _ = self.draw(n, generator=generator)
        return x0, x1
