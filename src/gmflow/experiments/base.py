"""What every experiment config shares: validation, dict round trip, overrides and the run record.

An experiment is a dataclass with its own sections (``data``, ``model``, ``loss``, ...) and a
``loop`` section (:class:`~gmflow.train.LoopConfig`). It builds the four things the training loop
needs — the loop config, the model, the objective and the batch function — in :meth:`build`, and its
kind and real data set are written to every run's ``config.json`` (:meth:`record`), so that
:func:`gmflow.experiments.load_run` can rebuild any run.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from ..config import ConfigError, apply_overrides, apply_sets, check_types, to_dict
from ..train import TrainResult, train

__all__ = ["Experiment", "run_experiment"]


class Experiment:
    """Mix-in of experiment dataclasses.

    A subclass sets :attr:`kind` (the name in ``config.json``) and :attr:`resume_ignore` (dotted keys,
    besides the loop's I/O fields, that may change when a run is resumed), and provides
    ``validate() -> self``, ``build() -> (model, objective, batch_fn)`` (the model initialised after
    ``torch.manual_seed(loop.seed)``), the property ``data_name`` (the real data set, or ``None``)
    and ``dataset(split)`` (that data set, for sampling and evaluation).
    """

    kind: ClassVar[str]
    resume_ignore: ClassVar[frozenset[str]] = frozenset()

    # ---------------------------------------------------------------------------- config handling
    def check_types(self) -> None:
        """Every leaf has its declared type (raises :class:`~gmflow.config.ConfigError`)."""
        check_types(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys and wrongly typed values raise ConfigError."""
        return apply_overrides(cls(), d)

    def with_sets(self, sets: list[str] | tuple[str, ...]):
        """A copy with ``["key=value", ...]`` applied (dotted keys, values coerced)."""
        return apply_sets(self, sets)

    def with_overrides(self, overrides: dict[str, Any]):
        """A copy with a nested (or dotted-key) mapping of parsed values applied."""
        return apply_overrides(self, overrides)

    def copy(self):
        return copy.deepcopy(self)

    # ------------------------------------------------------------------------------- the run record
    @classmethod
    def upgrade_config(cls, config: Any) -> tuple[Any, list[str]]:
        """``(config, changes)``: a saved config dict in today's keys, and one line per setting whose
        training no longer exists (naming its key; such a run loads but cannot resume). Default: as is."""
        return config, []

    @classmethod
    def upgrade_record(cls, record: dict[str, Any]) -> dict[str, Any]:
        """A saved record in today's keys (:meth:`upgrade_config`), completed by today's defaults.

        Raises :class:`~gmflow.config.ConfigError` naming the keys when resuming the run would change
        its training (an upgrade ``change``). A record that does not parse as this experiment is
        returned unchanged (the comparison then reports the differences).
        """
        try:
            config, changes = cls.upgrade_config(record.get("config", {}))
            upgraded = cls.from_dict(config).to_dict()
        except ValueError:
            return record
        if changes:
            raise ConfigError(
                f"cannot resume, the run's training no longer exists: {'; '.join(changes)}; train it "
                "again into a new out_dir (the run still loads for sampling and eval)"
            )
        return {**record, "config": upgraded}

    def record(self) -> dict[str, Any]:
        """What ``config.json`` records: ``{"experiment": kind, "data": name, "config": dict}``."""
        return {"experiment": self.kind, "data": self.data_name, "config": self.to_dict()}


def run_experiment(cfg: Experiment, *, progress: bool = True, verbose: bool | None = None) -> TrainResult:
    """Validate ``cfg``, build its parts and train (resuming from ``cfg.loop.out_dir`` if it holds a run)."""
    cfg.validate()
    model, objective, batch_fn = cfg.build()
    return train(
        cfg.loop,
        model,
        objective,
        batch_fn,
        record=cfg.record(),
        resume_ignore=cfg.resume_ignore,
        upgrade_record=cfg.upgrade_record,
        progress=progress,
        verbose=verbose,
    )
