"""On-disk store of ReFlow pairs: manifest, shard files, verification and resume.

Directory layout (one direction per directory)::

    pairs-{direction}-{index:05d}.safetensors   tensors x0, x1 (float32, (count, *event_shape)) and one
                                                metadata key "gmflow_pairs" (sorted JSON: shard settings)
    manifest.json                               format, settings (teacher_id, solver, nfe, order, grid,
                                                solver_kwargs, seed, n, shard_size, event_shape, ...)
                                                and per shard {file, index, count, size, sha256}

Every shard and then the manifest are written atomically (:func:`gmflow.io.atomic_write_bytes`); the
manifest is the commit point. :func:`open_store` resumes a directory (its settings must match) and
:func:`commit_shard` adds one shard after the last listed one; a shard written but not yet listed is
regenerated. :func:`load_shard` checks a shard's size and SHA-256 against its manifest entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

from ..io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PairError",
    "PairManifest",
    "ShardInfo",
    "commit_shard",
    "load_shard",
    "open_store",
    "read_manifest",
    "shard_committed",
    "shard_name",
]

FORMAT = "gmflow-pairs/1"
MANIFEST = "manifest.json"
_META_KEY = "gmflow_pairs"


class PairError(ValueError):
    """Missing, corrupt or inconsistent pair files, or a resume with different settings."""


@dataclass
class ShardInfo:
    """One committed shard: file name, shard index, number of pairs, byte size and SHA-256."""

    file: str
    index: int
    count: int
    size: int
    sha256: str


@dataclass
class PairManifest:
    """Settings of a pair directory plus its committed shards (``manifest.json``)."""

    direction: str
    teacher_id: str | None
    solver: str
    nfe: int
    order: int
    grid: str
    solver_kwargs: dict[str, Any]
    seed: int
    n: int
    shard_size: int
    event_shape: tuple[int, ...]
    dtype: str = "float32"
    data_id: str | None = None
    stochastic: bool = False
    format: str = FORMAT
    shards: list[ShardInfo] = field(default_factory=list)

    SETTINGS = (
        "format", "direction", "teacher_id", "data_id", "solver", "nfe", "order", "grid",
        "solver_kwargs", "seed", "n", "shard_size", "event_shape", "dtype", "stochastic",
    )  # fmt: skip

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    @property
    def count(self) -> int:
        """Pairs committed so far."""
        return sum(s.count for s in self.shards)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards and self.count == self.n

    def settings(self) -> dict[str, Any]:
        """The settings as JSON values (what a resume must match)."""
        d = json.loads(json.dumps(asdict(self)))
        return {k: d[k] for k in self.SETTINGS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings(), "complete": self.complete, "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairManifest:
        kw = {k: d[k] for k in cls.SETTINGS}
        kw["event_shape"] = tuple(int(v) for v in kw["event_shape"])
        return cls(**kw, shards=[ShardInfo(**s) for s in d["shards"]])


def shard_name(direction: str, index: int) -> str:
    return f"pairs-{direction}-{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------ reading
def read_manifest(directory: str | os.PathLike) -> PairManifest:
    """Parse ``directory/manifest.json`` (no shard verification)."""
    d = Path(directory)
    p = d / MANIFEST
    if not d.is_dir():
        raise PairError(f"pair directory {str(d)!r} does not exist")
    if not p.is_file():
        raise PairError(f"pair directory {str(d)!r} is empty or not a pair directory ({MANIFEST} missing)")
    try:
        d_ = json.loads(p.read_text(encoding="utf-8"))
        if d_.get("format") != FORMAT:
            raise ValueError(f"unknown format {d_.get('format')!r} (expected {FORMAT!r})")
        m = PairManifest.from_dict(d_)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise PairError(f"corrupt pair manifest {str(p)!r}: {e}") from None
    for i, s in enumerate(m.shards):
        if s.index != i or s.file != shard_name(m.direction, i):
            raise PairError(f"corrupt pair manifest {str(p)!r}: shard entry {i} is {s.file!r}")
    return m


def load_shard(directory: str | os.PathLike, info: ShardInfo, event_shape: tuple[int, ...], *,
               verify: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Load one shard as ``(x0, x1)`` after checking it against its manifest entry (``PairError`` if not)."""
    path = Path(directory) / info.file
    if not path.is_file():
        raise PairError(f"shard {info.file} listed in {str(Path(directory) / MANIFEST)!r} is missing")
    data = path.read_bytes()
    if len(data) != info.size:
        raise PairError(f"shard {str(path)!r} is truncated or resized ({len(data)} != {info.size} bytes)")
    if verify and sha256_bytes(data) != info.sha256:
        raise PairError(f"shard {str(path)!r} is corrupt: its sha256 does not match the manifest")
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise PairError(f"cannot read shard {str(path)!r}: {' '.join(str(e).split())}") from None
    want = (info.count, *event_shape)
    for k in ("x0", "x1"):
        if k not in tensors:
            raise PairError(f"shard {str(path)!r} has no tensor {k!r}")
        if tuple(tensors[k].shape) != want:
            raise PairError(f"shard {str(path)!r}: {k} has shape {tuple(tensors[k].shape)}, expected {want}")
    return tensors["x0"], tensors["x1"]


# ------------------------------------------------------------------------------------------ writing
def open_store(directory: str | os.PathLike, m: PairManifest) -> Path:
    """Create ``directory`` for the pairs described by ``m``, or resume it.

    A directory that already holds a manifest must have the same :attr:`PairManifest.SETTINGS`
    (``PairError`` naming the first differing field otherwise); its committed shards are copied into
    ``m.shards``. Temp files of writes killed before their rename are removed.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / MANIFEST).exists():
        old = read_manifest(d)
        new_s, old_s = m.settings(), old.settings()
        for k in PairManifest.SETTINGS:
            if new_s[k] != old_s[k]:
                raise PairError(
                    f"{str(d)!r} holds pairs generated with {k}={old_s[k]!r}, but this call has "
                    f"{k}={new_s[k]!r}; use matching arguments to resume, or another out_dir"
                )
        m.shards = old.shards
    for stale in d.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return d


def shard_committed(directory: Path, m: PairManifest, index: int) -> bool:
    """Shard ``index`` is listed in ``m`` and its file has the listed size and SHA-256."""
    if index >= len(m.shards):
        return False
    listed, path = m.shards[index], directory / shard_name(m.direction, index)
    return path.is_file() and sha256_file(path) == (listed.size, listed.sha256)


def _shard_bytes(x0: Tensor, x1: Tensor, meta: dict[str, Any]) -> bytes:
    t = {"x0": x0.detach().to("cpu", torch.float32).contiguous(), "x1": x1.detach().to("cpu", torch.float32)}
    t["x1"] = t["x1"].contiguous()
    # a single metadata key: safetensors writes a multi-key metadata map in random order (Rust HashMap)
    return save(t, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def commit_shard(directory: Path, m: PairManifest, index: int, x0: Tensor, x1: Tensor,
                 meta: dict[str, Any]) -> bool:  # fmt: skip
    """Write shard ``index`` (float32 ``x0``, ``x1`` and the JSON ``meta``), then list it in the manifest.

    A shard already listed (a damaged file being rewritten) must regenerate to the same bytes
    (``PairError`` otherwise) and leaves the manifest alone. Returns whether the shard is new.
    """
    blob = _shard_bytes(x0, x1, meta)
    info = ShardInfo(shard_name(m.direction, index), index, int(x0.shape[0]), len(blob), sha256_bytes(blob))
    listed = m.shards[index] if index < len(m.shards) else None
    if listed is not None and listed != info:
        raise PairError(
            f"shard {info.file} in {str(directory)!r} is missing or corrupt and regenerates to different "
            "content (the teacher or platform is not deterministic); delete the directory to restart"
        )
    atomic_write_bytes(directory / info.file, blob)
    if listed is not None:
        return False
    m.shards.append(info)
    atomic_write_json(directory / MANIFEST, m.to_dict())
    return True
