"""The training loop: deterministic, resumable, DDP-aware, interruptible.

``train(cfg)`` trains the toy model of ``cfg``; ``train(cfg, model=, objective=, batch_fn=)`` trains
anything (e.g. ReFlow on pair data) with the same machinery:

* step ``k`` (1-based) on rank ``r`` draws its batch and noise from ``step_generator(seed, k, r)``;
  the model is initialised after ``torch.manual_seed(seed)``. A resumed run therefore reproduces an
  uninterrupted one exactly;
* AdamW/Adam with linear warmup from ``0.001 lr`` (``LambdaLR``), grad-norm clipping, EMA every step,
  optional bf16 autocast for the network;
* DDP over ``torchrun`` ranks (global batch split evenly); rank 0 writes checkpoints and logs;
* a checkpoint every ``ckpt_every`` steps and at the end; running again on the same ``out_dir``
  resumes (a config that differs in a training field is refused);
* SIGINT/SIGTERM: checkpoint at the current step, then :class:`TrainingInterrupted`
  (a ``KeyboardInterrupt`` with ``exit_code`` 130/143); a second signal aborts at once;
* a non-finite loss stops training with :class:`TrainingDivergedError` before the bad update, leaving
  the last good checkpoint untouched.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, config_diff
from .distributed import DistInfo, all_reduce_sum, barrier, distributed
from .ema import EMA
from .objectives import BatchFn, Objective, make_batch_fn, make_objective, step_generator

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "train",
    "warmup_factor",
    "build_optimizer",
    "LOG_COLUMNS",
]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_ms")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training, after the checkpoint of ``step`` was saved."""

    def __init__(self, signum: int, step: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the raw weights, ``ema_model`` the EMA (or None)."""

    model: nn.Module = field(repr=False)
    ema_model: nn.Module | None = field(repr=False)
    out_dir: Path | None
    step: int
    median_step_ms: float
    last_loss: float
    resumed_from: int = 0
    skipped_updates: int = 0
    step_ms: list[float] = field(default_factory=list, repr=False)


def warmup_factor(i: int, warmup_steps: int) -> float:
    """LR multiplier of the update after ``i`` completed ones: ``0.001 + 0.999 min(i / warmup, 1)``."""
    if warmup_steps <= 0:
        return 1.0
    return 0.001 + 0.999 * min(i / warmup_steps, 1.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/Adam over trainable parameters; weight decay only on >= 2-D weights (never on biases).

    Uses the fused kernel where torch has one for the parameters' device (CPU since torch 2.4, CUDA):
    one pass over all parameters instead of ~10 small ops per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    try:
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype/torch version
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Total gradient 2-norm; scales the gradients down to ``max_norm`` if it is finite and exceeded.

    Unlike ``clip_grad_norm_(..., inf)`` this skips the pass that multiplies every gradient by 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2.0)
    total = float(torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), 2.0))
    if math.isfinite(max_norm) and math.isfinite(total) and total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total


def _model_info(model: nn.Module) -> dict[str, Any]:
    conf = getattr(model, "config", None)
    return {"class": type(model).__name__, "config": dict(conf) if isinstance(conf, dict) else None}


class _SignalTrap:
    """Turn the first SIGINT/SIGTERM into a flag (checked at step boundaries); a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            err = KeyboardInterrupt(
                f"second signal ({signal.Signals(signum).name}): aborted without a checkpoint"
            )
            err.exit_code = 128 + signum  # type: ignore[attr-defined]
            raise err
        self.received = signum

    def __enter__(self) -> _SignalTrap:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class _Log:
    """CSV (a row per ``log_every`` steps: mean loss, lr, mean grad norm, median step ms) + TensorBoard."""

    def __init__(self, out_dir: Path | None, resume_step: int, enabled: bool) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self.file = self.writer = self.tb = None
        if out_dir is None or not enabled:
            return
        path = out_dir / "log.csv"
        kept: list[list[str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                kept = [
                    r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step
                ]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([LOG_COLUMNS, *kept])
        self.file = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.file)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=resume_step + 1)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def add(self, loss: float, grad_norm: float, step_ms: float) -> None:
        self.rows.append((loss, grad_norm, step_ms))

    def flush(self, step: int, lr: float) -> float:
        """Write the row for the steps since the last flush; returns their mean loss."""
        if not self.rows:
            return math.nan
        loss = statistics.fmean(r[0] for r in self.rows)
        gn = statistics.fmean(r[1] for r in self.rows)
        ms = statistics.median(r[2] for r in self.rows)
        self.rows.clear()
        if self.writer is not None:
            self.writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{gn:.6g}", f"{ms:.3f}"])
            self.file.flush()
        if self.tb is not None:
            for k, v in (("loss", loss), ("lr", lr), ("grad_norm", gn), ("step_ms", ms)):
                self.tb.add_scalar(f"train/{k}", v, step)
        return loss

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _prepare_out_dir(d: Path) -> None:
    """Create ``d`` and check it is writable (a probe file), before any training work."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"out_dir {str(d)!r} is not writable: {e.strerror or e}") from None


def _agree(ok: bool, device: torch.device) -> bool:
    """True iff ``ok`` holds on every rank (a tensor on ``device``: nccl reduces CUDA tensors only)."""
    t = torch.tensor([0.0 if ok else 1.0], device=device)
    return float(all_reduce_sum(t)) == 0.0


def _say(info: DistInfo, enabled: bool, msg: str) -> None:
    if enabled and info.is_main:
        print(f"gmflow: {msg}", file=sys.stderr, flush=True)


def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    objective: Objective | None = None,
    batch_fn: BatchFn | None = None,
    progress: bool = True,
    verbose: bool | None = None,
) -> TrainResult:
    """Train according to ``cfg`` (see the module docstring); resumes from ``cfg.out_dir`` if it holds a run.

    Args:
        cfg: the run's :class:`TrainConfig` (validated here).
        model: network to train (default: ``ToyMLP`` from ``cfg.model``, built after ``manual_seed``).
        objective: ``objective(model, batch, generator) -> (B,)`` (default: :func:`make_objective`).
        batch_fn: ``batch_fn(step, rank, world_size, generator) -> local batch`` (default: toy data).
        progress: tqdm progress bar on stderr (rank 0).
        verbose: status lines ("resuming from step N") on stderr (rank 0); default: ``progress``.
    """
    cfg.validate()
    verbose = progress if verbose is None else verbose
    objective = objective or make_objective(cfg)
    batch_fn = batch_fn or make_batch_fn(cfg)
    with distributed(cfg.device) as info:
        if cfg.batch_size % info.world_size:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} is not divisible by the world size {info.world_size}"
            )
        out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        ck: Checkpoint | None = None
        if out_dir is not None and has_checkpoint(out_dir):
            ck = load_checkpoint(out_dir)
            diff = config_diff(ck.config.get("train", {}), cfg.to_dict())
            if diff:
                raise ConfigError(
                    f"out_dir {str(out_dir)!r} holds a run with a different config ({'; '.join(diff[:4])}); "
                    "use another --out or delete that directory"
                )
        if out_dir is not None:
            err: ConfigError | None = None
            if info.is_main:
                try:
                    _prepare_out_dir(out_dir)
                except ConfigError as e:
                    err = e
            if not _agree(err is None, info.device):
                raise err or ConfigError(f"out_dir {str(out_dir)!r} is not writable on rank 0")
        if model is None:
            from ..nn import ToyMLP

            torch.manual_seed(cfg.seed)
            model = ToyMLP(**cfg.model_kwargs(channels=2))
        model = model.to(info.device)
        opt = build_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_factor(i, cfg.warmup_steps))
        ema = None
        if cfg.ema != "none":
            ema = EMA(
                model,
                cfg.ema,
                cfg.ema_gamma,
                batch_size=cfg.batch_size,
                halflife_kimg=cfg.ema_halflife_kimg,
                rampup=cfg.ema_rampup,
            )
        start = 0
        if ck is not None:
            model.load_state_dict(ck.model_state)
            opt.load_state_dict(ck.train_state["optimizer"])
            sched.load_state_dict(ck.train_state["scheduler"])
            if ema is not None:
                if ck.ema_state is None:
                    raise ConfigError(f"out_dir {str(out_dir)!r} has no EMA weights to resume")
                ema.load_shadow(ck.ema_state)
                ema.num_updates = int(ck.train_state.get("ema_updates", ck.step))
            start = ck.step
            if int(ck.train_state.get("world_size", info.world_size)) != info.world_size:
                warnings.warn(
                    "resuming with a different number of processes: the random stream changes", stacklevel=2
                )
        if start >= cfg.steps:
            _say(
                info,
                verbose,
                f"{out_dir} is already trained to step {start} (steps={cfg.steps}); nothing to do",
            )
        elif start > 0:
            _say(info, verbose, f"resuming {out_dir} from step {start}")
        return _loop(cfg, info, model, opt, sched, ema, objective, batch_fn, out_dir, start, progress)


def _loop(cfg, info, module, opt, sched, ema, objective, batch_fn, out_dir, start, progress) -> TrainResult:
    from tqdm.auto import tqdm

    dev = info.device
    net: nn.Module = module
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in module.parameters() if p.requires_grad]
    info_json = {"format": "gmflow-run/1", "train": cfg.to_dict(), "model": _model_info(module)}
    local_b = cfg.batch_size // info.world_size
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    last_saved, last_loss, skipped, times = start, math.nan, 0, []

    def save(step: int) -> None:
        nonlocal last_saved
        if out_dir is not None:
            if info.is_main:
                save_checkpoint(
                    out_dir,
                    step=step,
                    model_state=module.state_dict(),
                    ema_state=ema.model_state_dict(module) if ema is not None else None,
                    config={**info_json, "step": step, "world_size": info.world_size},
                    train_state={
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "ema_updates": ema.num_updates if ema is not None else 0,
                        "world_size": info.world_size,
                        "skipped_updates": skipped,
                    },
                )
            barrier()
        last_saved = step

    log = _Log(out_dir, start, info.is_main)
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="train",
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    net.train()
    try:
        with _SignalTrap() as trap:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                g = step_generator(cfg.seed, step, info.rank, dev)
                batch = batch_fn(step, info.rank, info.world_size, g).to(dev)
                with autocast:
                    per = objective(net, batch, g)
                if per.shape != (batch.shape[0],) or batch.shape[0] != local_b:
                    raise ValueError(
                        f"objective must return per-sample losses of shape ({local_b},), got "
                        f"{tuple(per.shape)} for a batch of {batch.shape[0]}"
                    )
                loss = per.float().mean()
                sig = trap.received
                flags = [float(sig == signal.SIGINT), float(sig == signal.SIGTERM)]
                stats = torch.cat([loss.detach().reshape(1), torch.tensor(flags, device=loss.device)])
                stats = all_reduce_sum(stats).tolist()
                gloss = stats[0] / info.world_size
                if not math.isfinite(gloss):
                    where = (
                        f"step {last_saved} in {out_dir}" if out_dir is not None and last_saved else "none"
                    )
                    raise TrainingDivergedError(
                        f"training diverged: loss is {gloss} at step {step}; stopped before that update "
                        f"(last good checkpoint: {where})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = _grad_norm_and_clip(params, clip if step > cfg.grad_clip_start else math.inf)
                lr = opt.param_groups[0]["lr"]
                if math.isfinite(gnorm):
                    opt.step()
                else:  # a non-finite gradient norm skips the update (research/gmflow.md §3.5)
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                sched.step()
                if ema is not None:
                    ema.update(module)
                times.append((time.perf_counter() - t0) * 1e3)
                last_loss = gloss
                log.add(gloss, gnorm, times[-1])
                if step % cfg.log_every == 0 or step == cfg.steps:
                    bar.set_postfix(loss=f"{log.flush(step, lr):.4f}", refresh=False)
                bar.update(1)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                    save(step)
                if (stats[1] > 0 or stats[2] > 0) and step < cfg.steps:  # at the last step: just finish
                    signum = signal.SIGTERM if stats[2] > 0 else signal.SIGINT
                    if step != last_saved:
                        log.flush(step, lr)
                        save(step)
                    where = f"; checkpoint saved in {out_dir}" if out_dir is not None else ""
                    raise TrainingInterrupted(signum, step, f"interrupted at step {step}{where}")
    finally:
        bar.close()
        log.close()
    skip = min(5, len(times) // 4)
    return TrainResult(
        model=module,
        ema_model=ema.averaged_model(module) if ema is not None else None,
        out_dir=out_dir,
        step=max(start, cfg.steps),
        median_step_ms=statistics.median(times[skip:]) if times else math.nan,
        last_loss=last_loss,
        resumed_from=start,
        skipped_updates=skipped,
        step_ms=times,
    )
