"""Training configuration: the :class:`TrainConfig` dataclass, named presets and overrides.

A config is a plain dataclass with two nested sections (``data``, ``model``) and flat training fields,
so every field has a dotted key for ``--set``: ``lr=1e-3``, ``model.num_components=8``,
``data.name=moons``. Overrides come from YAML/TOML files (:func:`load_overrides`, nested mappings)
and ``key=value`` strings (:func:`apply_sets`); both coerce values to the field's declared type.
Every problem raises :class:`ConfigError` (a ``ValueError``) with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "NON_TRAINING_FIELDS",
    "get_preset",
    "load_overrides",
    "apply_overrides",
    "apply_sets",
    "config_diff",
    "field_keys",
]

LOSSES = ("fm", "gm_nll", "transition")
OPTIMIZERS = ("adamw", "adam")
EMA_KINDS = ("none", "power", "rampup")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# Fields that may change between a run and its resumption (they do not change what is trained):
# ``steps`` may grow to continue a finished run.
NON_TRAINING_FIELDS = frozenset({"steps", "out_dir", "ckpt_every", "log_every", "device"})


class ConfigError(ValueError):
    """An invalid configuration value, key or file (one-line message naming the field)."""


@dataclass
class DataConfig:
    """Toy 2-D data set (:func:`gmflow.data.make_toy2d`): checkerboard, moons, swissroll or ring."""

    name: str = "checkerboard"


@dataclass
class ModelConfig:
    """:class:`gmflow.nn.ToyMLP` arguments (the data dimension comes from the data set)."""

    head: str = "gm"  # "gm" (GMFlow) or "velocity" (flow matching)
    num_components: int = 64  # K, GM head only
    width: int = 512
    depth: int = 5
    time_dim: int = 256
    pos_freqs: int = 64
    logstd_from: str = "trunk"  # "trunk" (paper toy) or "time"
    constant_logstd: float | None = None


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``batch_size`` is the GLOBAL batch (split across ranks).

    Learning rate: linear warmup from ``0.001 lr`` to ``lr`` over ``warmup_steps`` updates, then
    constant. Gradient clipping by total norm ``grad_clip`` (0 = off) from update ``grad_clip_start``
    on; an update whose gradient norm is not finite is skipped. EMA: ``"power"`` is the Karras rule
    ``beta_i = (1 - 1/i)^(ema_gamma + 1)``; ``"rampup"`` the StyleGAN rule with half-life
    ``min(ema_halflife_kimg * 1000, ema_rampup * nimg)`` images (see :mod:`gmflow.train.ema`).
    ``precision="bf16"`` runs the network under bf16 autocast; GM and loss math stay fp32.
    ``out_dir=None`` trains without checkpoints or logs (library use).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: str = "transition"  # "fm" | "gm_nll" | "transition"
    trans_ratio: float = 0.9  # lambda of the transition loss
    time_sampler: str = "uniform"  # gmflow.flow.TIME_SAMPLERS
    time_loc: float = 0.0  # logit_normal location
    time_scale: float = 1.0  # logit_normal scale
    time_eps: float = 1e-4  # t is clamped to [time_eps, 1]
    steps: int = 5000
    batch_size: int = 4096
    optimizer: str = "adamw"  # "adamw" | "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # AdamW only; never applied to biases (1-D parameters)
    warmup_steps: int = 1000
    grad_clip: float = 0.0
    grad_clip_start: int = 0
    ema: str = "power"  # "none" | "power" | "rampup"
    ema_gamma: float = 7.0
    ema_halflife_kimg: float = 30000.0  # GMFlow ImageNet config: in effect a pure ramp-up (0.05 nimg)
    ema_rampup: float | None = 0.05
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 1000  # 0: only at the end (and on interruption)
    log_every: int = 50
    precision: str = "fp32"
    device: str = "auto"

    # ------------------------------------------------------------------------------------- checks
    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first invalid field; return ``self``."""
        from ..data.toy2d import TOY2D_NAMES
        from ..flow import TIME_SAMPLERS

        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        m = self.model
        for key in field_keys(self):
            obj, name = self, key
            while "." in name:
                sect, name = name.split(".", 1)
                obj = getattr(obj, sect)
            _coerce(key, typing.get_type_hints(type(obj))[name], getattr(obj, name), from_string=False)

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(
            self.data.name in TOY2D_NAMES,
            "data.name",
            f"unknown data set {self.data.name!r}; choose one of {', '.join(TOY2D_NAMES)}",
        )
        need(m.head in ("gm", "velocity"), "model.head", f"must be 'gm' or 'velocity', got {m.head!r}")
        need(m.num_components >= 1, "model.num_components", f"K must be >= 1, got {m.num_components}")
        for k in ("width", "depth", "time_dim", "pos_freqs"):
            need(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
        need(
            m.logstd_from in ("trunk", "time"),
            "model.logstd_from",
            f"must be 'trunk' or 'time', got {m.logstd_from!r}",
        )
        need(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss == "fm":
            need(m.head == "velocity", "loss", "'fm' needs model.head='velocity' (set model.head=velocity)")
        else:
            need(m.head == "gm", "loss", f"{self.loss!r} needs model.head='gm' (or use loss=fm)")
        need(
            0.0 < self.trans_ratio <= 1.0, "trans_ratio", f"lambda must be in (0, 1], got {self.trans_ratio}"
        )
        need(
            self.time_sampler in TIME_SAMPLERS,
            "time_sampler",
            f"must be one of {', '.join(TIME_SAMPLERS)}, got {self.time_sampler!r}",
        )
        need(self.time_scale > 0, "time_scale", f"must be > 0, got {self.time_scale}")
        need(0.0 <= self.time_eps < 1.0, "time_eps", f"must be in [0, 1), got {self.time_eps}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be 'adamw' or 'adam', got {self.optimizer!r}")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.grad_clip_start >= 0, "grad_clip_start", f"must be >= 0, got {self.grad_clip_start}")
        need(self.ema in EMA_KINDS, "ema", f"must be one of {', '.join(EMA_KINDS)}, got {self.ema!r}")
        need(self.ema_gamma > -1, "ema_gamma", f"must be > -1, got {self.ema_gamma}")
        need(self.ema_halflife_kimg > 0, "ema_halflife_kimg", f"must be > 0, got {self.ema_halflife_kimg}")
        need(
            self.ema_rampup is None or self.ema_rampup > 0,
            "ema_rampup",
            f"must be > 0 or none, got {self.ema_rampup}",
        )
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(self.ckpt_every >= 0, "ckpt_every", f"must be >= 0 (0 = only at the end), got {self.ckpt_every}")
        need(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        need(self.precision in PRECISIONS, "precision", f"must be 'fp32' or 'bf16', got {self.precision!r}")
        need(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        return self

    # ------------------------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys and wrongly typed values raise :class:`ConfigError`."""
        return apply_overrides(cls(), d)

    def model_kwargs(self, channels: int = 2) -> dict[str, Any]:
        """Constructor arguments of :class:`gmflow.nn.ToyMLP`."""
        return dict(channels=channels, **dataclasses.asdict(self.model))


# ----------------------------------------------------------------------------------------- presets
PRESETS: dict[str, TrainConfig] = {
    # The paper's full toy recipe (configs/gmflow_checkerboard_k64): K=64, transition loss lambda=0.9,
    # AdamW 2e-4 wd 0, 1000-step warmup, power EMA gamma=7, batch 4096, uniform t; 5k steps (paper: 200k).
    "toy-gmflow": TrainConfig(),
    # Same trunk and recipe with a velocity head and the L2 flow-matching loss.
    "toy-fm": TrainConfig(model=ModelConfig(head="velocity"), loss="fm"),
    # The official minimal trainer (train_toymodel.py -k 64): plain GM NLL on u, Adam 2e-4, no warmup,
    # no EMA, no clipping, 5000 iterations (official_reference.md).
    "toy-official-minimal": TrainConfig(
        loss="gm_nll", optimizer="adam", warmup_steps=0, ema="none", grad_clip=0.0, steps=5000
    ),
    # Seconds-long run for tests and smoke checks.
    "toy-smoke": TrainConfig(
        model=ModelConfig(num_components=8, width=32, depth=2, time_dim=32, pos_freqs=8),
        steps=20,
        batch_size=128,
        lr=1e-3,
        warmup_steps=5,
        ckpt_every=10,
        log_every=5,
    ),
}


def get_preset(name: str) -> TrainConfig:
    """A fresh copy of the named preset (:data:`PRESETS`)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (available: {', '.join(PRESETS)})")
    return dataclasses.replace(
        PRESETS[name],
        data=dataclasses.replace(PRESETS[name].data),
        model=dataclasses.replace(PRESETS[name].model),
    )


# --------------------------------------------------------------------------------------- overrides
def field_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass (default: :class:`TrainConfig`)."""
    cfg = TrainConfig() if cfg is None else cfg
    keys: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            keys += field_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str) -> ConfigError:
    keys = field_keys()
    close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k != key]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.7) if k not in close]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _parse_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true/false, got {v!r}")


def _coerce(key: str, tp: Any, v: Any, from_string: bool) -> Any:
    """Convert ``v`` (a parsed YAML/TOML value, or a raw string from ``--set``) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None or (from_string and str(v).strip().lower() in ("none", "null", "~", "")):
            return None
        return _coerce(key, args[0], v, from_string)
    if v is None:
        raise ConfigError(f"{key}: may not be none")
    if tp is bool:
        if not from_string and not isinstance(v, bool):
            raise ConfigError(f"{key}: expected true/false, got {v!r}")
        return _parse_bool(key, v)
    if tp in (int, float):
        # parsed values must already be numbers (an int is fine for a float field); strings come from --set
        if isinstance(v, bool) or (not from_string and not isinstance(v, (int, float))):
            what = "an integer" if tp is int else "a number"
            raise ConfigError(f"{key}: expected {what}, got {v!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if tp is float:
            if math.isnan(f) and str(v).strip().lower() != "nan":
                raise ConfigError(f"{key}: expected a number, got {v!r}")
            return f
        if isinstance(v, int):
            return v
        if not (math.isfinite(f) and f.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        return int(f)
    if tp is str:
        if not from_string and not isinstance(v, str):
            raise ConfigError(f"{key}: expected a string, got {v!r}")
        return str(v).strip()
    if origin is tuple:
        if from_string:
            s = str(v).strip().strip("[]()")
            v = [p for p in s.replace(",", " ").split()]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {v!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(v)
        if len(v) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(v)}")
        return tuple(_coerce(f"{key}[{i}]", a, x, from_string) for i, (a, x) in enumerate(zip(args, v)))
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _set(cfg: Any, key: str, value: Any, from_string: bool, prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with dotted ``key`` set to ``value`` (coerced)."""
    head, _, rest = key.partition(".")
    full = prefix + key
    if head not in {f.name for f in dataclasses.fields(cfg)}:
        raise _unknown(full)
    cur = getattr(cfg, head)
    if dataclasses.is_dataclass(cur):
        if not rest:
            example = field_keys(cur, prefix + head + ".")[0]
            raise ConfigError(f"{full}: is a section; set one of its keys, e.g. {example}=...")
        return dataclasses.replace(cfg, **{head: _set(cur, rest, value, from_string, prefix + head + ".")})
    if rest:
        raise _unknown(full)
    tp = typing.get_type_hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _coerce(full, tp, value, from_string)})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Apply a (nested or dotted-key) mapping of parsed values to ``cfg``; returns a new config."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a mapping of keys to values, got {type(overrides).__name__}")
    for k, v in _flatten(overrides).items():
        cfg = _set(cfg, k, v, from_string=False)
    return cfg


def apply_sets(cfg: TrainConfig, sets: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply ``["key=value", "model.num_components=8", ...]`` with coercion to the field types."""
    for item in sets:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        cfg = _set(cfg, key.strip(), value.strip(), from_string=True)
    return cfg


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of nested overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {str(p)!r}: {' '.join(str(e).split())}") from None
    elif suffix == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ConfigError("reading TOML on Python 3.10 needs the 'tomli' package; use YAML") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML in {str(p)!r}: {e}") from None
    else:
        raise ConfigError(f"config file {str(p)!r} must end in .yaml, .yml or .toml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return data


def config_diff(
    old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = NON_TRAINING_FIELDS
) -> list[str]:
    """Human-readable differences ``"key: old -> new"`` between two :meth:`TrainConfig.to_dict` dicts."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            out.append(f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}")
    return out
