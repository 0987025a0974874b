"""torchrun / DDP plumbing: one process unless launched by ``torchrun``.

``torchrun --standalone --nproc_per_node=N ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` reads them and starts a process group (gloo on CPU, nccl on CUDA).
:func:`distributed` is the context manager to use: it ALWAYS ends with ``barrier()`` and
``destroy_process_group()`` in a ``finally`` (without it gloo runs often abort at exit). Rank 0 writes
files; the others wait at a :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "distributed",
    "barrier",
    "all_reduce_sum",
    "is_distributed",
    "resolve_device",
]


class DistInfo(NamedTuple):
    """``(rank, world_size, local_rank, device)``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one member is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA (``cuda:local_rank``) when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read the torchrun environment and start the process group if ``WORLD_SIZE > 1``.

    Returns ``(rank, world_size, local_rank, device)``; a single process gives ``(0, 1, 0, device)``.
    Calling it again while a group is running reuses that group.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """Context manager around :func:`init_distributed`.

    On exit it always runs ``barrier(); destroy_process_group()`` (only for a group it started). After
    an exception the barrier waits at most 60 s (gloo ``monitored_barrier``) so a rank that failed
    alone cannot hang the others forever.
    """
    started = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    failed = False
    try:
        yield info
    except BaseException:
        failed = True
        raise
    finally:
        if started and dist.is_available() and dist.is_initialized():
            try:
                if failed and dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except Exception:  # noqa: BLE001 - still tear the group down
                pass
            finally:
                dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
