"""ReFlow configs saved before the loss rework, read in today's keys (one explicit upgrade step).

ReFlow runs written before the FFT-mask HPF, the normaliser choice and the fixed projection coupling
(``config.json`` format ``gmflow-run/2`` with the old keys) are mapped key by key
(docs/maths/reflow.md §4, §5, §9), and each mapping says whether resuming the run would train it as
before:

* ``loss.normalize: true / false`` -> ``"sample"`` / ``"none"``. Resumes.
* ``loss.norm_eps: e`` -> ``loss.norm_floor: e``. The old weight ``1 / (sg[l] + e)`` is today's
  ``1 / max(sg[l], e)`` over ``1 + min(l, e) / max(l, e)``: equal up to ``e / l`` for ``l >> e`` (the
  same ``l / sg[l]`` for ``e = 0``, mapped to the smallest positive float). With ``normalize: false``
  the value entered no loss and is dropped (today's default), so that the run resumes under today's
  defaults. Resumes.
* ``loss.hpf_sigma`` -> ``loss.hpf_radius`` at its default: the Gaussian-blur HPF distance no longer
  exists. With ``hpf_lambda = 0`` no HPF was used and the run resumes; with ``hpf_lambda > 0`` the
  loss would change, so resuming is refused (loading, sampling and evaluation work).
* ``pairs.projection_alpha: a`` -> ``pairs.projection_lambda = a / (1 - a)`` (``inf`` for ``a = 1``):
  the old step ``x0 <- (1 - a) x0 + a y`` is today's ``(x0 + lambda y) / (1 + lambda)``. But the old
  projection re-matched fresh real samples on every batch, today's is one fixed coupling, so with
  ``a > 0`` resuming is refused; ``a = 0`` (no projection) resumes.

Keys added since (``loss.time_max``, ``pairs.projection_block``) take their defaults, which
reproduce the old behaviour. A config in today's keys is returned unchanged.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from ..config import ConfigError
from ..reflow.objective import ReflowLoss

__all__ = ["upgrade_reflow_config"]

_RENAMED = {("loss", "norm_eps"): "norm_floor", ("loss", "hpf_sigma"): "hpf_radius",
            ("pairs", "projection_alpha"): "projection_lambda"}  # fmt: skip


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def upgrade_reflow_config(config: Any) -> tuple[Any, list[str]]:
    """``(config in today's keys, changes)`` of a saved ReFlow ``config`` dict (module docstring).

    ``changes`` holds one line per old key whose training no longer exists, naming the key (empty:
    the run resumes as it was trained). Raises :class:`~gmflow.config.ConfigError` for a config with
    both the old and the new name of one setting. Values of the wrong type are passed on for
    :meth:`ReflowConfig.from_dict` to report.
    """
    if not isinstance(config, dict):
        return config, []
    cfg = copy.deepcopy(config)
    sections = {s: cfg[s] if isinstance(cfg.get(s), dict) else {} for s in ("loss", "pairs")}
    for (sect, old), new in _RENAMED.items():
        if old in sections[sect] and new in sections[sect]:
            raise ConfigError(f"{sect}.{old} and {sect}.{new}: old and new name of one setting; keep one")
    loss, pairs = sections["loss"], sections["pairs"]
    changes: list[str] = []
    if isinstance(loss.get("normalize"), bool):
        loss["normalize"] = "sample" if loss["normalize"] else "none"
    if "norm_eps" in loss:
        eps = loss.pop("norm_eps")
        if loss.get("normalize", "none") != "none":
            loss["norm_floor"] = sys.float_info.min if eps == 0 else eps
    if "hpf_sigma" in loss:
        sigma = loss.pop("hpf_sigma")
        loss["hpf_radius"] = ReflowLoss().hpf_radius
        if _positive(loss.get("hpf_lambda", 0.0)):
            changes.append(
                f"loss.hpf_sigma={sigma}: the Gaussian-blur HPF distance it was trained with no longer "
                f"exists (loaded with the FFT-mask HPF, loss.hpf_radius={loss['hpf_radius']})"
            )
    if "projection_alpha" in pairs:
        a = pairs.pop("projection_alpha")
        number = isinstance(a, (int, float)) and not isinstance(a, bool)
        pairs["projection_lambda"] = (a / (1.0 - a) if a < 1 else float("inf")) if number else a
        if _positive(a):
            changes.append(
                f"pairs.projection_alpha={a}: its per-batch projection no longer exists (loaded as the "
                f"fixed coupling pairs.projection_lambda={pairs['projection_lambda']:g})"
            )
    return cfg, changes
