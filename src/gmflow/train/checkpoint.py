"""Checkpoints: safetensors weights + JSON config + a ``weights_only`` training state, written atomically.

Layout of a run directory::

    model.safetensors   raw weights
    ema.safetensors     EMA weights (runs with an EMA)
    config.json         the run record: {"format", "experiment", "config", "model": {"class", "config"},
                        "step", "world_size"} (see gmflow.experiments)
    state.pt            optimizer / scheduler / EMA counters / step (torch.load(weights_only=True))
    checkpoint.json     manifest: step + {file: {size, sha256}}; the commit point of a checkpoint
    log.csv             training log (not part of the checkpoint)

A checkpoint is all files of one step. Saving writes every file to a hidden ``.NAME.pending`` file
(temp file in the same directory, fsync, rename), then the manifest atomically (this is the commit),
then renames the pending files into place. A crash before the manifest leaves the previous checkpoint
untouched; a crash after it is completed on the next load ("roll forward"), so a run can be killed at
any instant and still resume. Loading verifies sizes and SHA-256 against the manifest and raises
:class:`CheckpointError` with a one-line message for anything missing or corrupt.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "MANIFEST",
    "save_checkpoint",
    "has_checkpoint",
    "read_manifest",
    "load_checkpoint",
    "RUN_FORMAT",
]

MANIFEST = "checkpoint.json"
FORMAT = "gmflow-checkpoint/1"
RUN_FORMAT = "gmflow-run/2"  # format of config.json (the run record)


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint (one-line message)."""


@dataclass
class Checkpoint:
    """A verified checkpoint loaded into memory (tensors on CPU)."""

    path: Path
    step: int
    config: dict[str, Any]
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor] | None
    train_state: dict[str, Any]


# ------------------------------------------------------------------------------------------ writing
def _pending(directory: Path, name: str) -> Path:
    return directory / f".{name}.pending"


def _safetensors_bytes(state: dict[str, Tensor], step: int) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return save(tensors, metadata={"format": "pt", "step": str(step)})


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    step: int,
    model_state: dict[str, Tensor],
    config: dict[str, Any],
    train_state: dict[str, Any],
    ema_state: dict[str, Tensor] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` into ``out_dir`` (see the module docstring); returns the manifest."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "model.safetensors": _safetensors_bytes(model_state, step),
        "config.json": (json.dumps(config, indent=2, sort_keys=False) + "\n").encode(),
        "state.pt": _torch_bytes({**train_state, "step": int(step)}),
    }
    if ema_state is not None:
        files["ema.safetensors"] = _safetensors_bytes(ema_state, step)
    for name, data in files.items():
        atomic_write_bytes(_pending(d, name), data, sync_dir=False)
    fsync_dir(d)
    manifest = {
        "format": FORMAT,
        "step": int(step),
        "files": {n: {"size": len(b), "sha256": sha256_bytes(b)} for n, b in files.items()},
    }
    atomic_write_bytes(d / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())  # commit point
    for name in files:
        os.replace(_pending(d, name), d / name)
    fsync_dir(d)
    return d / MANIFEST


# ------------------------------------------------------------------------------------------ reading
def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir`` holds a checkpoint manifest (it may still fail verification)."""
    return (Path(out_dir) / MANIFEST).is_file()


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest of ``out_dir`` (no file verification)."""
    d = Path(out_dir)
    p = d / MANIFEST
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(d)!r} does not exist")
    if not p.is_file():
        raise CheckpointError(
            f"no checkpoint in {str(d)!r} ({MANIFEST} missing: not a run directory, or no "
            "checkpoint was completed)"
        )
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
            raise ValueError("unknown format")
        int(m["step"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {str(p)!r}: {e}") from None
    return m


def _matches(path: Path, meta: dict[str, Any]) -> bool:
    try:
        if path.stat().st_size != meta["size"]:
            return False
        return sha256_file(path)[1] == meta["sha256"]
    except OSError:
        return False


def _verified_path(d: Path, name: str, meta: dict[str, Any]) -> Path:
    """Path holding the manifest's content of ``name``; completes an interrupted save if needed."""
    final, pending = d / name, _pending(d, name)
    if pending.exists() and _matches(pending, meta):
        try:
            os.replace(pending, final)  # roll forward a save interrupted after its commit
        except OSError:
            return pending  # read-only directory: read the pending copy
        return final
    if not final.exists():
        raise CheckpointError(f"checkpoint {str(d)!r} is incomplete: {name} is missing")
    if not _matches(final, meta):
        raise CheckpointError(
            f"checkpoint {str(d)!r} is corrupt: {name} does not match the manifest (size/sha256 differ)"
        )
    return final


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None


def load_checkpoint(out_dir: str | os.PathLike) -> Checkpoint:
    """Verify and load the checkpoint in ``out_dir`` (tensors on CPU)."""
    d = Path(out_dir)
    m = read_manifest(d)
    files = m["files"]
    for required in ("model.safetensors", "config.json", "state.pt"):
        if required not in files:
            raise CheckpointError(f"checkpoint manifest in {str(d)!r} does not list {required}")
    paths = {name: _verified_path(d, name, meta) for name, meta in files.items()}
    try:
        config = json.loads(paths["config.json"].read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {str(paths['config.json'])!r}: {e}") from None
    try:
        state = torch.load(paths["state.pt"], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"cannot read {str(paths['state.pt'])!r}: {' '.join(str(e).split())}") from None
    ema = _load_safetensors(paths["ema.safetensors"]) if "ema.safetensors" in paths else None
    return Checkpoint(
        path=d,
        step=int(m["step"]),
        config=config,
        model_state=_load_safetensors(paths["model.safetensors"]),
        ema_state=ema,
        train_state=state,
    )
