"""The run log: ``log.csv`` (one row per ``log_every`` steps) and, when installed, TensorBoard."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

__all__ = ["LOG_COLUMNS", "RunLog"]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_ms")


class RunLog:
    """Collects per-step ``(loss, grad_norm, step_ms)``; :meth:`flush` writes their mean/median as a row.

    Resuming at ``resume_step`` keeps the CSV rows up to that step and drops later ones (they belong
    to steps that are trained again). Without ``out_dir`` (or on a non-main rank) nothing is written.
    """

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
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

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
