"""Config machinery shared by every experiment: nested dataclasses with dotted keys and coercion.

A config is a dataclass whose fields are plain values (bool, int, float, str, tuples, ``X | None``) or
nested dataclass *sections*; every leaf has a dotted key (``loop.lr``, ``model.num_components``).
Overrides come from YAML/TOML files (:func:`load_overrides`, nested mappings) and ``key=value``
strings (:func:`apply_sets`); both coerce values to the field's declared type. Every problem raises
:class:`ConfigError` (a ``ValueError``) with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "apply_sets",
    "check_types",
    "config_diff",
    "field_keys",
    "flatten",
    "from_dict",
    "load_overrides",
    "need",
    "to_dict",
]


class ConfigError(ValueError):
    """An invalid configuration value, key or file (one-line message naming the key)."""


def need(ok: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``"key: msg"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls`` with the nested mapping ``d`` applied; unknown keys and wrong types raise ConfigError."""
    return apply_overrides(cls(), d)


def check_types(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first leaf whose value does not fit its declared type."""
    for key in field_keys(cfg):
        obj, name = cfg, key
        while "." in name:
            sect, name = name.split(".", 1)
            obj = getattr(obj, sect)
        _coerce(key, typing.get_type_hints(type(obj))[name], getattr(obj, name), from_string=False)


# --------------------------------------------------------------------------------------- overrides
def field_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass (instance or class)."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    keys: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            keys += field_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(root: Any, key: str) -> ConfigError:
    keys = field_keys(root)
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


def _set(cfg: Any, key: str, value: Any, from_string: bool, prefix: str = "", root: Any = None) -> Any:
    """Return a copy of dataclass ``cfg`` with dotted ``key`` set to ``value`` (coerced)."""
    root = cfg if root is None else root
    head, _, rest = key.partition(".")
    full = prefix + key
    if head not in {f.name for f in dataclasses.fields(cfg)}:
        raise _unknown(root, full)
    cur = getattr(cfg, head)
    if dataclasses.is_dataclass(cur):
        if not rest:
            example = field_keys(cur, prefix + head + ".")[0]
            raise ConfigError(f"{full}: is a section; set one of its keys, e.g. {example}=...")
        sub = _set(cur, rest, value, from_string, prefix + head + ".", root)
        return dataclasses.replace(cfg, **{head: sub})
    if rest:
        raise _unknown(root, full)
    tp = typing.get_type_hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _coerce(full, tp, value, from_string)})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Apply a (nested or dotted-key) mapping of parsed values to ``cfg``; returns a new config."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a mapping of keys to values, got {type(overrides).__name__}")
    for k, v in flatten(overrides).items():
        cfg = _set(cfg, k, v, from_string=False)
    return cfg


def apply_sets(cfg: Any, sets: Iterable[str]) -> Any:
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


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Differences ``"key: old -> new"`` of two nested config dicts (dotted keys in ``ignore`` skipped)."""
    ignore = frozenset(ignore)
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            out.append(f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}")
    return out
