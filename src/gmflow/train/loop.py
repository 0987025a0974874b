"""The training loop: ``train(loop, model, objective, batch_fn)`` — deterministic, resumable, DDP-aware.

The loop knows no experiment: it trains any ``model`` on any per-sample ``objective`` over batches
from any ``batch_fn`` (the toy, image and ReFlow experiments in :mod:`gmflow.experiments` build those
three things from their configs):

* step ``k`` (1-based) on rank ``r`` draws its batch and noise from ``step_generator(seed, k, r)``;
  the caller initialises the model after ``torch.manual_seed(seed)``. A resumed run therefore
  reproduces an uninterrupted one exactly;
* AdamW/Adam with linear warm-up from ``0.001 lr`` (``LambdaLR``), grad-norm clipping, EMA every step,
  optional bf16 autocast for the network; a model may split its parameters into groups with their
  own learning rate / weight decay (``model.optimizer_groups()``, see :mod:`gmflow.train.optim`),
  each clipped by its own gradient norm;
* DDP over ``torchrun`` ranks (global batch split evenly); rank 0 writes checkpoints and logs;
* a checkpoint every ``ckpt_every`` steps and at the end; running again on the same ``out_dir``
  resumes (a run whose recorded config differs in a training field is refused);
* SIGINT/SIGTERM: checkpoint at the current step, then :class:`TrainingInterrupted`
  (a ``KeyboardInterrupt`` with ``exit_code`` 130/143); a second signal aborts at once;
* a non-finite loss stops training with :class:`TrainingDivergedError` before the bad update, leaving
  the last good checkpoint untouched.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import ConfigError, config_diff, to_dict
from .checkpoint import RUN_FORMAT, Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from .config import LOOP_NON_TRAINING, LoopConfig
from .distributed import DistInfo, all_reduce_sum, barrier, distributed
from .ema import EMA
from .objectives import BatchFn, Objective, step_generator
from .optim import build_optimizer, grad_norm_and_clip, parameter_groups, warmup_factor
from .runlog import RunLog

__all__ = ["TrainResult", "TrainingDivergedError", "TrainingInterrupted", "train"]


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


def _to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a tuple of tensors such as ``(images, labels)``) on ``device``."""
    if isinstance(batch, tuple):
        return tuple(b.to(device) for b in batch)
    return batch.to(device)


def _batch_len(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, tuple) else batch).shape[0])


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
    loop: LoopConfig,
    model: nn.Module,
    objective: Objective,
    batch_fn: BatchFn,
    *,
    record: dict[str, Any] | None = None,
    resume_ignore: Iterable[str] = (),
    upgrade_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    progress: bool = True,
    verbose: bool | None = None,
) -> TrainResult:
    """Train ``model`` (see the module docstring); resumes from ``loop.out_dir`` if it holds a run.

    Args:
        loop: optimisation / EMA / I/O settings (validated here).
        model: the network, already initialised (after ``torch.manual_seed(loop.seed)``); moved to
            the run's device.
        objective: ``objective(model, batch, generator) -> (B_local,)`` per-sample losses.
        batch_fn: ``batch_fn(step, rank, world_size, generator) -> local batch``: a tensor, or a tuple
            of tensors with the batch on their first axis (e.g. ``(images, labels)``).
        record: what the run is, written to ``config.json``, e.g. ``{"experiment": kind, "data": name,
            "config": nested dict}`` (see :mod:`gmflow.experiments`); default ``{"experiment": None,
            "config": {"loop": ...}}``. Resuming compares every entry with the saved record.
        resume_ignore: dotted keys of ``record["config"]`` that may differ on resumption, on top of
            ``loop.steps / out_dir / ckpt_every / log_every / device``.
        upgrade_record: maps the saved record to the current format before the comparison (e.g. fills
            config keys added by a later version with their defaults), so such runs still resume; a
            ConfigError it raises (a run that cannot resume) is reported with ``out_dir``.
        progress: tqdm progress bar on stderr (rank 0).
        verbose: status lines ("resuming from step N") on stderr (rank 0); default: ``progress``.
    """
    loop.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    record = record if record is not None else {"experiment": None, "config": {"loop": to_dict(loop)}}
    record = json.loads(json.dumps(record))  # as saved (tuples become lists): resuming compares alike
    ignore = {f"config.{k}" for k in resume_ignore} | {f"config.loop.{k}" for k in LOOP_NON_TRAINING}
    verbose = progress if verbose is None else verbose
    with distributed(loop.device) as info:
        if loop.batch_size % info.world_size:
            raise ConfigError(
                f"loop.batch_size: {loop.batch_size} is not divisible by the world size {info.world_size}"
            )
        out_dir = Path(loop.out_dir) if loop.out_dir is not None else None
        ck: Checkpoint | None = None
        if out_dir is not None and has_checkpoint(out_dir):
            ck = load_checkpoint(out_dir)
            try:
                saved_record = upgrade_record(ck.config) if upgrade_record is not None else ck.config
            except ConfigError as e:
                raise ConfigError(f"out_dir {str(out_dir)!r}: {e}") from None
            saved = {k: saved_record.get(k) for k in record}
            diff = [d.removeprefix("config.") for d in config_diff(saved, record, ignore)]
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
        model = model.to(info.device)
        opt = build_optimizer(model, loop)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_factor(i, loop.warmup_steps))
        ema = None
        if loop.ema != "none":
            ema = EMA(
                model,
                loop.ema,
                loop.ema_gamma,
                batch_size=loop.batch_size,
                halflife_kimg=loop.ema_halflife_kimg,
                rampup=loop.ema_rampup,
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
        if start >= loop.steps:
            _say(
                info,
                verbose,
                f"{out_dir} is already trained to step {start} (steps={loop.steps}); nothing to do",
            )
        elif start > 0:
            _say(info, verbose, f"resuming {out_dir} from step {start}")
        run_json = {"format": RUN_FORMAT, **record, "model": _model_info(model)}
        return _loop(
            loop, info, model, opt, sched, ema, objective, batch_fn, out_dir, start, run_json, progress
        )


def _loop(loop, info, module, opt, sched, ema, objective, batch_fn, out_dir, start, run_json, progress):
    dev = info.device
    net: nn.Module = module
    if info.world_size > 1:
        # gradient_as_bucket_view: with the default copy-back, torch 2.13 (CPU, gloo) left the gradients
        # of some GM-DiT parameters un-averaged in the first backward of a process (test_distributed.py)
        ids = [dev.index] if dev.type == "cuda" else None
        net = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
    clip_groups = [g["params"] for g in parameter_groups(module)]  # each clipped by its own norm
    local_b = loop.batch_size // info.world_size
    clip = loop.grad_clip if loop.grad_clip > 0 else math.inf
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
                    config={**run_json, "step": step, "world_size": info.world_size},
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

    log = RunLog(out_dir, start, info.is_main)
    bar = tqdm(
        total=loop.steps,
        initial=start,
        desc="train",
        disable=None if (progress and info.is_main) else True,  # None: only on a terminal
        dynamic_ncols=True,
        file=sys.stderr,
    )
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=loop.precision == "bf16")
    net.train()
    try:
        with _SignalTrap() as trap:
            for step in range(start + 1, loop.steps + 1):
                t0 = time.perf_counter()
                g = step_generator(loop.seed, step, info.rank, dev)
                batch = _to_device(batch_fn(step, info.rank, info.world_size, g), dev)
                with autocast:
                    per = objective(net, batch, g)
                n = _batch_len(batch)
                if per.shape != (n,) or n != local_b:
                    raise ValueError(
                        f"objective must return per-sample losses of shape ({local_b},), got "
                        f"{tuple(per.shape)} for a batch of {n}"
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
                gnorm = grad_norm_and_clip(clip_groups, clip if step > loop.grad_clip_start else math.inf)
                lr = opt.param_groups[0]["lr"]
                if math.isfinite(gnorm):
                    opt.step()
                else:  # a non-finite gradient norm skips the update
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                sched.step()
                if ema is not None:
                    ema.update(module)
                times.append((time.perf_counter() - t0) * 1e3)
                last_loss = gloss
                log.add(gloss, gnorm, times[-1])
                if step % loop.log_every == 0 or step == loop.steps:
                    bar.set_postfix(loss=f"{log.flush(step, lr):.4f}", refresh=False)
                bar.update(1)
                if (loop.ckpt_every and step % loop.ckpt_every == 0) or step == loop.steps:
                    save(step)
                if (stats[1] > 0 or stats[2] > 0) and step < loop.steps:  # at the last step: just finish
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
        step=max(start, loop.steps),
        median_step_ms=statistics.median(times[skip:]) if times else math.nan,
        last_loss=last_loss,
        resumed_from=start,
        skipped_updates=skipped,
        step_ms=times,
    )
