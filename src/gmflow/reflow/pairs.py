"""ReFlow training pairs: deterministic teacher pair generation into a resumable sharded store.

Naming (Simple ReFlow §2; ``docs/maths/reflow.md``; t = 1 is noise, t = 0 is data):

* **backward pairs** — ``x1 ~ N(0, I)``, ``x0 = Phi_{1->0}(x1)``: the teacher ODE integrated down from
  noise (any solver of :func:`gmflow.sample`; ``gm-sde``/``ddpm`` make the coupling stochastic and
  the manifest records ``stochastic: true``). Exact noise marginal, model data marginal.
* **forward pairs** — a *real* ``x0``, ``x1 = Phi_{0->1}(x0)``: the teacher ODE integrated up on the
  reversed (increasing) grid with ``euler`` or ``heun`` (inversion). Exact data marginal, approximate
  noise marginal.

Shard ``i`` is a pure function of ``(settings, i)``: its random draws come from a generator seeded by
``sha256(seed, direction, i)`` (:func:`shard_seed`). Files, manifest and resume live in
:mod:`gmflow.reflow.store`, so an interrupted run resumes after its last listed shard and ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..flow import time_grid
from ..io import sha256_file
from ..sampling import SOLVERS, get_solver, num_steps, sample
from ..sampling.solvers.substeps import DEFAULT_SUBSTEP_METHOD
from .store import PairError, PairManifest, commit_shard, open_store, shard_committed

__all__ = ["generate_pairs", "shard_seed", "teacher_hash"]

DIRECTIONS = ("backward", "forward")
FORWARD_SOLVERS = tuple(n for n, c in SOLVERS.items() if c.invertible)
STOCHASTIC_SOLVERS = tuple(n for n, c in SOLVERS.items() if c.stochastic)
SOLVER_KWARGS = ("substeps", "substep_method", "times", "shift", "kappa", "r", "variance")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------ identity
def shard_seed(seed: int, direction: str, index: int) -> int:
    """Per-shard seed ``int(sha256("gmflow-pairs/{seed}/{direction}/{index}")[:8]) mod 2^63``."""
    h = hashlib.sha256(f"gmflow-pairs/{int(seed)}/{direction}/{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _fingerprint(obj: Any) -> str | None:
    """A content id for tensors, ``nn.Module`` weights and simple objects (e.g. GaussianMixtureData)."""
    h = hashlib.sha256()
    if isinstance(obj, Tensor):
        h.update(f"{tuple(obj.shape)}{obj.dtype}".encode() + _tensor_bytes(obj))
        return f"tensor:sha256:{h.hexdigest()}"
    if hasattr(obj, "__self__") and hasattr(obj, "__name__"):  # bound method, e.g. data.velocity
        inner = _fingerprint(obj.__self__)
        return None if inner is None else f"{inner}.{obj.__name__}"
    name = type(obj).__qualname__  # weights/fields carry the identity; module paths may move
    if isinstance(obj, nn.Module):
        for k, v in obj.state_dict().items():
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode() + _tensor_bytes(v))
        return f"{name}:sha256:{h.hexdigest()}"
    fields = {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())}
    simple = (int, float, str, bool, tuple, type(None))
    used = False
    for k, v in fields.items():
        if isinstance(v, Tensor):
            h.update(k.encode() + f"{tuple(v.shape)}{v.dtype}".encode() + _tensor_bytes(v))
            used = True
        elif isinstance(v, simple):
            h.update(f"{k}={v!r};".encode())
            used = True
    return f"{name}:sha256:{h.hexdigest()}" if used else None


def teacher_hash(ckpt_dir: str | os.PathLike, *, use_ema: bool = True) -> str:
    """``"sha256:<hex>"`` of the weights file :func:`gmflow.train.load_model` would load from ``ckpt_dir``
    (``ema.safetensors`` when present and ``use_ema``, else ``model.safetensors``); a file path is
    hashed directly."""
    p = Path(ckpt_dir)
    if p.is_dir():
        ema, raw = p / "ema.safetensors", p / "model.safetensors"
        p = ema if (use_ema and ema.is_file()) else raw
    if not p.is_file():
        raise PairError(f"teacher checkpoint weights {str(p)!r} not found")
    return "sha256:" + sha256_file(p)[1]


# ------------------------------------------------------------------------------------------ generation
def _check_solver_kwargs(kw: dict[str, Any] | None) -> dict[str, Any]:
    kw = dict(kw or {})
    bad = sorted(set(kw) - set(SOLVER_KWARGS))
    if bad:
        raise ValueError(f"solver_kwargs may only hold {SOLVER_KWARGS}; got {bad}")
    if "times" in kw:
        kw["times"] = [float(v) for v in torch.as_tensor(kw["times"], dtype=torch.float64).flatten()]
    try:
        return json.loads(json.dumps(kw, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"solver_kwargs must be JSON-serialisable (they are recorded in the manifest): {e}"
        ) from None


def _times(direction: str, solver: str, nfe: int, grid: str, kw: dict[str, Any]) -> list[float]:
    """Integration grid: the descending grid for backward pairs, the same grid reversed for forward."""
    if "times" in kw:
        ts = kw["times"]
        ok = (
            all(a < b for a, b in zip(ts, ts[1:]))
            if direction == "forward"
            else all(a > b for a, b in zip(ts, ts[1:]))
        )
        if not ok:
            want = "increase (data -> noise)" if direction == "forward" else "decrease (noise -> data)"
            raise ValueError(f"solver_kwargs['times'] must {want} for {direction} pairs")
        return ts
    g = time_grid(num_steps(solver, nfe), grid, shift=kw.get("shift", 1.0), kappa=kw.get("kappa", 20.0))
    return (g.flip(0) if direction == "forward" else g).tolist()


def _infer_event_shape(direction: str, teacher: Any, data: Any, event_shape: Any) -> tuple[int, ...]:
    if isinstance(data, Tensor):
        shape = tuple(data.shape[1:])
    elif data is not None and hasattr(data, "event_shape"):
        shape = tuple(data.event_shape)
    elif data is not None:
        shape = tuple(data.sample(1, generator=torch.Generator().manual_seed(0)).shape[1:])
    elif event_shape is not None:
        shape = tuple(event_shape)
    elif hasattr(teacher, "event_shape"):
        shape = tuple(teacher.event_shape)
    else:
        raise ValueError(f"{direction} pairs need event_shape= (or data= / a teacher with .event_shape)")
    if event_shape is not None and tuple(int(v) for v in event_shape) != shape:
        raise ValueError(f"event_shape={tuple(event_shape)} does not match the data's event shape {shape}")
    return tuple(int(v) for v in shape)


def _make_shard(
    teacher, m: PairManifest, index: int, count: int, data, device, dtype
) -> tuple[Tensor, Tensor]:
    """Shard ``index`` of ``m``: a pure function of the settings and the index."""
    s = shard_seed(m.seed, m.direction, index)
    g = torch.Generator().manual_seed(s)
    kw = {k: v for k, v in m.solver_kwargs.items() if k != "times"}
    ts = torch.tensor(_times(m.direction, m.solver, m.nfe, m.grid, m.solver_kwargs), dtype=torch.float64)
    run = dict(solver=m.solver, nfe=m.nfe, order=m.order, grid=m.grid, times=ts, **kw)
    if m.direction == "backward":
        x1 = torch.randn((count, *m.event_shape), generator=g, dtype=dtype).to(device)
        sg = None
        if m.stochastic:
            sg = torch.Generator(device=device).manual_seed(shard_seed(m.seed, "solver", index))
        x0 = sample(teacher, x1, generator=sg, **run)
    else:
        if isinstance(data, Tensor):
            start = index * m.shard_size
            x0 = data[start : start + count].to(device=device, dtype=dtype)
        else:
            x0 = data.sample(count, generator=g, device=device, dtype=dtype)
        x1 = sample(teacher, x0, **run)
    return x0, x1


def generate_pairs(
    teacher: Callable[..., Any],
    out_dir: str | os.PathLike,
    *,
    direction: str,
    n: int,
    shard_size: int = 4096,
    solver: str = "dpm++2m",
    nfe: int = 32,
    order: int = 1,
    grid: str = "uniform",
    data: Any = None,
    event_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    teacher_id: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    solver_kwargs: dict[str, Any] | None = None,
) -> PairManifest:
    """Generate ``n`` teacher pairs ``(x0, x1)`` into ``out_dir``, resuming a previous run there.

    Args:
        teacher: ``teacher(x_t, t)`` -> velocity ``u`` or its GaussianMixture (a GM uses its mean for
            ``euler``/``heun``/``dpm*``; ``gm-ode``/``gm-sde`` use the full GM).
        direction: ``"backward"`` (``x1 ~ N(0, I)`` -> ``x0``, any solver) or ``"forward"`` (real ``x0``
            -> ``x1``, ``euler``/``heun`` on the reversed grid).
        n, shard_size: total pairs and pairs per shard file.
        data: forward pairs: an object with ``.sample(n, generator=, device=, dtype=)`` (drawn per shard
            with the shard generator) or a tensor ``(N, *event)`` walked in order (``n <= N``).
        event_shape: backward pairs: shape of one sample (default ``data.event_shape`` or
            ``teacher.event_shape``).
        seed: base seed; shard ``i`` draws from ``shard_seed(seed, direction, i)``.
        teacher_id: identity recorded in the manifest and checked on resume, e.g.
            :func:`teacher_hash` of a checkpoint; default: a hash of an ``nn.Module``'s weights or of a
            simple object's fields (``GaussianMixtureData``), else ``None`` (unchecked).
        dtype: compute dtype (pairs are stored as float32).
        solver_kwargs: extra :func:`gmflow.sample` options (``substeps, substep_method, times, shift, kappa,
            r, variance``). For ``gm-ode`` the sub-step method is always recorded (the default if not
            given), so a store made with another method's default is not resumed with this one.

    Raises:
        PairError: ``out_dir`` holds pairs made with different settings (the message names the field),
            or a listed shard is corrupt and regenerates differently.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    for name, v in (("n", n), ("shard_size", shard_size), ("nfe", nfe)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    get_solver(solver)  # ValueError naming the valid solvers
    if direction == "forward" and solver not in FORWARD_SOLVERS:
        raise ValueError(
            f"forward pairs integrate the teacher ODE upwards (t: 0 -> 1), which only {FORWARD_SOLVERS} "
            f"support; got solver={solver!r}"
        )
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    kw = _check_solver_kwargs(solver_kwargs)
    if "substep_method" in get_solver(solver).options:
        kw.setdefault("substep_method", DEFAULT_SUBSTEP_METHOD)
    _times(direction, solver, nfe, grid, kw)  # validates a custom grid early
    data_id = None
    if direction == "forward":
        if data is None:
            raise ValueError("forward pairs need data= (real x0: a sampler object or a tensor)")
        if isinstance(data, Tensor):
            if data.dim() < 2 or data.shape[0] < n:
                raise ValueError(f"data tensor {tuple(data.shape)} must hold at least n={n} samples")
        elif not hasattr(data, "sample"):
            raise TypeError("data must be a tensor or an object with .sample(n, generator=, device=, dtype=)")
        data_id = _fingerprint(data[:n] if isinstance(data, Tensor) else data)
    shape = _infer_event_shape(direction, teacher, data, event_shape)
    m = PairManifest(
        direction=direction,
        teacher_id=teacher_id if teacher_id is not None else _fingerprint(teacher),
        solver=solver, nfe=nfe, order=order, grid=grid, solver_kwargs=kw, seed=int(seed), n=n,
        shard_size=shard_size, event_shape=shape, dtype=str(dtype).removeprefix("torch."), data_id=data_id,
        stochastic=solver in STOCHASTIC_SOLVERS,
    )  # fmt: skip
    d = open_store(out_dir, m)
    bar = tqdm(
        total=n, initial=m.count, unit="pair", desc=f"{direction} pairs", disable=None if progress else True
    )
    try:
        for i in range(m.num_shards):
            if shard_committed(d, m, i):
                continue
            count = min(shard_size, n - i * shard_size)
            x0, x1 = _make_shard(teacher, m, i, count, data, device, dtype)
            meta = {**m.settings(), "index": i, "count": count, "shard_seed": shard_seed(seed, direction, i)}
            if commit_shard(d, m, i, x0, x1, meta):  # the manifest write is the commit point of shard i
                bar.update(count)
    finally:
        bar.close()
    return m
