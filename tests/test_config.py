"""gmflow.config: dotted keys, coercion of --set strings and parsed files, errors naming the key, diffs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from gmflow.config import (
    ConfigError,
    apply_overrides,
    apply_sets,
    check_types,
    config_diff,
    field_keys,
    flatten,
    from_dict,
    load_overrides,
    need,
    to_dict,
)
from gmflow.experiments import Toy2DConfig, get_preset


@dataclass
class Inner:
    k: int = 1
    scale: float | None = None


@dataclass
class Outer:
    name: str = "a"
    flag: bool = False
    pair: tuple[float, float] = (0.5, 0.25)
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def smoke() -> Toy2DConfig:
    return get_preset("toy-smoke")


def test_field_keys_flatten_and_dict_round_trip():
    assert field_keys(Outer) == ["name", "flag", "pair", "sizes", "inner.k", "inner.scale"]
    assert field_keys(Outer()) == field_keys(Outer)
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    d = to_dict(Outer())
    assert d == {
        "name": "a",
        "flag": False,
        "pair": [0.5, 0.25],
        "sizes": [1, 2],
        "inner": {"k": 1, "scale": None},
    }
    assert from_dict(Outer, d) == Outer()
    cfg = smoke()
    assert Toy2DConfig.from_dict(cfg.to_dict()) == cfg


def test_set_coercion_of_strings():
    cfg = apply_sets(
        smoke(),
        [
            "loop.steps=1e2",
            "loop.lr=3e-4",
            "model.num_components=16",
            "loop.betas=0.9,0.95",
            "loop.ema_rampup=none",
            "data.name=moons",
            "model.constant_logstd=-1",
            "loop.out_dir=/tmp/x",
        ],
    )
    assert cfg.loop.steps == 100 and isinstance(cfg.loop.steps, int)
    assert cfg.loop.lr == 3e-4 and cfg.model.num_components == 16 and cfg.loop.betas == (0.9, 0.95)
    assert cfg.loop.ema_rampup is None and cfg.data.name == "moons" and cfg.model.constant_logstd == -1.0
    assert cfg.loop.out_dir == "/tmp/x"
    assert Toy2DConfig.from_dict(cfg.to_dict()) == cfg
    assert apply_sets(cfg, ["loop.betas=[0.8, 0.9]"]).loop.betas == (0.8, 0.9)
    o = apply_sets(Outer(), ["flag=yes", "sizes=3 4 5", "inner.scale=2", "name= b "])
    assert (o.flag, o.sizes, o.inner.scale, o.name) == (True, (3, 4, 5), 2.0, "b")
    assert apply_sets(o, ["flag=off", "inner.scale=null"]).flag is False
    assert smoke().loop.steps == 20  # apply_sets returns a copy


@pytest.mark.parametrize(
    "item, match",
    [
        (
            "model.num_componets=3",
            "unknown config key 'model.num_componets'; did you mean model.num_components",
        ),
        ("head=gm", "did you mean model.head"),
        ("steps=10", "did you mean loop.steps"),  # the flat keys of gmflow 0.1 point to their section
        ("loop.steps=abc", "loop.steps: expected an integer"),
        ("loop.steps=1.5", "loop.steps: expected an integer"),
        ("loop.lr=fast", "loop.lr: expected a number"),
        ("loop.betas=0.9", "loop.betas: expected 2 values"),
        ("model=3", "model: is a section; set one of its keys, e.g. model.head="),
        ("model.head.x=1", "unknown config key 'model.head.x'"),
        ("nonsense", "--set expects key=value"),
        ("=3", "--set expects key=value"),
    ],
)
def test_set_errors_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match) as info:
        apply_sets(smoke(), [item])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"flag": "yes"}, "flag: expected true/false"),  # parsed files are not coerced from strings
        ({"inner": {"k": "3"}}, "inner.k: expected an integer"),
        ({"inner": {"k": 2.5}}, "inner.k: expected an integer"),
        ({"inner": {"k": True}}, "inner.k: expected an integer"),
        ({"pair": 0.5}, "pair: expected a list"),
        ({"name": 3}, "name: expected a string"),
        ({"name": None}, "name: may not be none"),
        ({"inner": {"nope": 1}}, "unknown config key 'inner.nope'"),
    ],
)
def test_parsed_overrides_are_type_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Outer(), overrides)


def test_overrides_accept_nested_and_dotted_mappings():
    a = apply_overrides(Outer(), {"inner": {"k": 5}, "pair": [1, 2]})
    b = apply_overrides(Outer(), {"inner.k": 5, "pair": (1.0, 2.0)})
    assert a == b and a.inner.k == 5 and a.pair == (1.0, 2.0)
    with pytest.raises(ConfigError, match="mapping"):
        apply_overrides(Outer(), [("inner.k", 5)])


def test_check_types_and_need():
    check_types(Outer())
    with pytest.raises(ConfigError, match="^inner.k: expected an integer"):
        check_types(dataclasses.replace(Outer(), inner=Inner(k="3")))
    need(True, "x", "never raised")
    with pytest.raises(ConfigError, match=r"^a\.b: must be positive$"):
        need(False, "a.b", "must be positive")
    assert issubclass(ConfigError, ValueError)


def test_load_overrides_yaml_and_toml(tmp_path):
    y = tmp_path / "o.yaml"
    y.write_text("loop:\n  steps: 7\n  betas: [0.9, 0.95]\nmodel:\n  num_components: 4\n")
    t = tmp_path / "o.toml"
    t.write_text('[loop]\nlr = 0.003\n[model]\nhead = "velocity"\n[data]\nname = "ring"\n')
    cfg = apply_overrides(smoke(), load_overrides(y))
    assert (cfg.loop.steps, cfg.model.num_components, cfg.loop.betas) == (7, 4, (0.9, 0.95))
    cfg = apply_overrides(cfg, load_overrides(t))
    assert (cfg.loop.lr, cfg.model.head, cfg.data.name) == (0.003, "velocity", "ring")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="model.widht"):
        apply_overrides(smoke(), load_overrides(bad))
    (tmp_path / "empty.yaml").write_text("")
    assert load_overrides(tmp_path / "empty.yaml") == {}
    for name, text, match in [
        ("x.json", "{}", "must end in .yaml, .yml or .toml"),
        ("b.toml", "a = [", "invalid TOML"),
        ("b.yaml", "a: [1,\n", "invalid YAML"),
        ("l.yaml", "- 1\n- 2\n", "mapping"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=match) as info:
            load_overrides(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_overrides(tmp_path / "missing.yaml")


def test_config_diff_names_changed_and_missing_keys():
    old = {"loop": {"lr": 1e-3, "steps": 5}, "a": 1}
    new = {"loop": {"lr": 2e-3, "steps": 9}, "b": 2}
    assert config_diff(old, new) == [
        "a: 1 -> '<missing>'",
        "b: '<missing>' -> 2",
        "loop.lr: 0.001 -> 0.002",
        "loop.steps: 5 -> 9",
    ]
    assert config_diff(old, new, ignore=["a", "b", "loop.steps"]) == ["loop.lr: 0.001 -> 0.002"]
    assert config_diff(old, old) == []
