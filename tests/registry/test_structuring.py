"""``registry.structuring``: strict TOML -> attrs structuring, today's one-line messages, TOML out.

The classes below mirror the shapes of ``registry.config`` (a nested section, a table of
sections, a list of sections, a pair, optional keys, free-form ``Any`` options, validators).
"""

from __future__ import annotations

import random
import tomllib
from typing import Any

import attrs
import pytest

from selfflow.registry import compose
from selfflow.registry.structuring import ConfigError, structure, to_toml, unstructure

_v = attrs.validators


def _not_blank(instance, attribute, value: str) -> None:
    if not value.strip():
        raise ValueError("label is blank: give a name or leave the key out")


@attrs.frozen(kw_only=True)
class Section:
    steps: int = attrs.field(default=10, validator=_v.ge(1))
    gamma: float = attrs.field(default=0.8, validator=_v.ge(0))
    rule: str = attrs.field(default="min", validator=_v.in_(("min", "gap")))
    enabled: bool = True
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), converter=tuple)
    layer: int | None = None
    label: str = attrs.field(default="run", validator=_not_blank)


@attrs.frozen(kw_only=True)
class Part:
    name: str
    ratio: float = attrs.field(default=0.25, validator=[_v.ge(0), _v.le(0.5)])
    options: dict[str, Any] = attrs.field(factory=dict)
    note: str | None = None


@attrs.frozen(kw_only=True)
class Item:
    name: str
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Top:
    section: Section = attrs.field(factory=Section)
    parts: dict[str, Part] = attrs.field(factory=dict)
    items: list[Item] = attrs.field(factory=list)
    words: tuple[str, ...] = attrs.field(default=("a",), converter=tuple)
    seed: int | str = 0
    extra: Any = None

    def __attrs_post_init__(self) -> None:
        if self.section.steps % 2:
            raise ConfigError("config key 'section.steps' must be even here, got 3")


def test_builds_every_shape_and_only_widens_ints_to_floats():
    top = structure(
        Top,
        {
            "section": {"steps": 4, "gamma": 1, "betas": [0, 1.5], "layer": 2},
            "parts": {"a": {"name": "x", "options": {"k": [1, "two"]}}, "b": {"name": "y", "ratio": 0}},
            "items": [{"name": "fid"}, {"name": "kid", "options": {"subsets": 3}}],
            "words": ["p", "q"],
            "seed": "abc",
            "extra": {"anything": [1, {"goes": True}]},
        },
    )
    assert top == Top(
        section=Section(steps=4, gamma=1.0, betas=(0.0, 1.5), layer=2),
        parts={"a": Part(name="x", options={"k": [1, "two"]}), "b": Part(name="y", ratio=0.0)},
        items=[Item(name="fid"), Item(name="kid", options={"subsets": 3})],
        words=("p", "q"),
        seed="abc",
        extra={"anything": [1, {"goes": True}]},
    )
    assert type(top.section.gamma) is float and type(top.parts["b"].ratio) is float
    assert type(top.section.betas) is tuple and type(top.section.betas[0]) is float
    assert structure(Top, {}) == Top() and structure(Top, {"section": {"layer": None}}) == Top()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"section": {"gama": 1}}, "config key 'section.gama': unknown key; did you mean 'section.gamma'?"),
        ({"sectoin": {}}, "config key 'sectoin': unknown key; did you mean 'section'?"),
        (
            {"section": {"zzz": 1}},
            "config key 'section.zzz': unknown key; valid keys: steps, gamma, rule, enabled, betas, layer, label",
        ),
        ({"section": {"steps": "4"}}, "config key 'section.steps': expected an integer, got '4'"),
        ({"section": {"steps": True}}, "config key 'section.steps': expected an integer, got True"),
        ({"section": {"steps": 4.0}}, "config key 'section.steps': expected an integer, got 4.0"),
        ({"section": {"gamma": True}}, "config key 'section.gamma': expected a number, got True"),
        ({"section": {"gamma": "high"}}, "config key 'section.gamma': expected a number, got 'high'"),
        ({"section": {"enabled": 1}}, "config key 'section.enabled': expected true or false, got 1"),
        ({"section": {"rule": 3}}, "config key 'section.rule': expected a string, got 3"),
        ({"section": 3}, "config key 'section': expected a table, got 3"),
        ({"parts": []}, "config key 'parts': expected a table, got []"),
        ({"parts": {"a": "x"}}, "config key 'parts.a': expected a table, got 'x'"),
        ({"section": {"betas": 0.9}}, "config key 'section.betas': expected a list, got 0.9"),
        ({"section": {"betas": [0.9]}}, "config key 'section.betas': expected a list of 2 values, got [0.9]"),
        ({"section": {"betas": ["a", 1]}}, "config key 'section.betas[0]': expected a number, got 'a'"),
        ({"items": "fid"}, "config key 'items': expected a list, got 'fid'"),
        ({"items": [{"name": "fid"}, {"name": 1}]}, "config key 'items[1].name': expected a string, got 1"),
        ({"items": [{"nam": "fid"}]}, "config key 'items[0].nam': unknown key; did you mean 'items[0].name'?"),
        ({"items": [3]}, "config key 'items[0]': expected a table, got 3"),
        ({"words": ["p", 2]}, "config key 'words[1]': expected a string, got 2"),
        ({"parts": {"a": {}}}, "config key 'parts.a.name': required but missing"),
        ({"section": {"steps": 0}}, "config key 'section.steps': must be >= 1: 0"),
        ({"section": {"rule": "max"}}, "config key 'section.rule': expected one of ['min', 'gap'], got 'max'"),
        ({"parts": {"a": {"name": "x", "ratio": 0.7}}}, "config key 'parts.a.ratio': must be <= 0.5: 0.7"),
        ({"section": {"label": " "}}, "config table 'section': label is blank: give a name or leave the key out"),
        ({"section": {"layer": "x"}}, "config key 'section.layer': expected an integer, got 'x'"),
        ({"parts": {"a": {"name": "x", "note": 1}}}, "config key 'parts.a.note': expected a string, got 1"),
        ({"seed": [1]}, "config key 'seed': expected int or str, got [1]"),
        ({"section": {"steps": 3}}, "config key 'section.steps' must be even here, got 3"),  # the class's own
    ],
)
def test_messages_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError) as err:
        structure(Top, data)
    assert str(err.value) == message


def test_only_the_first_problem_is_reported_in_the_order_the_keys_were_written():
    def one(data: dict) -> str:
        with pytest.raises(ConfigError) as err:
            structure(Top, data)
        assert "\n" not in str(err.value)
        return str(err.value)

    # unknown keys of a table come before its values, whatever the order
    assert one({"section": {"steps": "x", "zzz": 1}}).startswith("config key 'section.zzz': unknown key")
    assert one({"section": {"steps": "x"}, "zzz": 1}).startswith("config key 'zzz': unknown key")
    # then the values as written, not as declared
    assert one({"section": {"gamma": "x", "steps": 4.5}}) == "config key 'section.gamma': expected a number, got 'x'"
    assert one({"section": {"steps": 4.5, "gamma": "x"}}) == "config key 'section.steps': expected an integer, got 4.5"
    # then missing keys, then the validators
    assert one({"parts": {"a": {"ratio": "x"}}}) == "config key 'parts.a.ratio': expected a number, got 'x'"
    assert one({"parts": {"a": {"ratio": 0.9}}}) == "config key 'parts.a.name': required but missing"
    assert one({"section": {"steps": 0, "gamma": -1}}) == "config key 'section.steps': must be >= 1: 0"


def test_a_config_error_from_the_class_comes_through_unchanged():
    with pytest.raises(ConfigError) as err:
        structure(Top, {"section": {"steps": 3}})
    assert str(err.value) == "config key 'section.steps' must be even here, got 3"
    assert isinstance(err.value, ValueError)  # callers catch ValueError too


def test_where_prefixes_every_key():
    where = "tokenizer 'image/patch'"
    with pytest.raises(ConfigError) as err:
        structure(Section, {"stpes": 2}, where=where)
    assert str(err.value) == f"config key '{where}.stpes': unknown key; did you mean '{where}.steps'?"
    with pytest.raises(ConfigError) as err:
        structure(Section, {"steps": 0}, where=where)
    assert str(err.value) == f"config key '{where}.steps': must be >= 1: 0"
    with pytest.raises(ConfigError) as err:
        structure(Section, 3, where=where)
    assert str(err.value) == f"config key '{where}': expected a table, got 3"
    with pytest.raises(ConfigError) as err:
        structure(Section, {"label": ""})
    assert str(err.value) == "config table 'top level': label is blank: give a name or leave the key out"


def test_unstructure_gives_plain_dicts_and_lists():
    top = Top(section=Section(layer=4), items=[Item(name="fid")], words=("p",))
    assert unstructure(top) == {
        "section": {
            "steps": 10,
            "gamma": 0.8,
            "rule": "min",
            "enabled": True,
            "betas": [0.9, 0.999],
            "layer": 4,
            "label": "run",
        },
        "parts": {},
        "items": [{"name": "fid", "options": {}}],
        "words": ["p"],
        "seed": 0,
        "extra": None,
    }


def test_to_toml_leaves_out_none_and_keeps_empty_tables():
    data = {
        "a": {"x": None, "t": (1.0, 2.5), "options": {}, "sub": {"y": None, "z": 1}},
        "items": [{"name": "fid", "note": None, "options": {}}],
        "gone": None,
    }
    assert tomllib.loads(to_toml(data)) == {
        "a": {"t": [1.0, 2.5], "options": {}, "sub": {"z": 1}},
        "items": [{"name": "fid", "options": {}}],
    }


def _random_top(rng: random.Random) -> Top:
    def opts() -> dict[str, Any]:
        return rng.choice([{}, {"steps": rng.randint(1, 50)}, {"kind": "x", "scale": rng.random(), "on": True}])

    return Top(
        section=Section(
            steps=2 * rng.randint(1, 50),
            gamma=rng.random(),
            rule=rng.choice(["min", "gap"]),
            enabled=rng.random() < 0.5,
            betas=(rng.random(), rng.random()),
            layer=rng.choice([None, rng.randint(1, 9)]),
            label=rng.choice(["run", "a b", 'q"uote']),
        ),
        parts={
            f"p{i}": Part(name=f"n{i}", ratio=rng.random() / 2, options=opts(), note=rng.choice([None, "x"]))
            for i in range(rng.randint(0, 3))
        },
        items=[Item(name=f"m{i}", options=opts()) for i in range(rng.randint(0, 3))],
        words=tuple(rng.choice("abc") for _ in range(rng.randint(1, 3))),
        seed=rng.choice([rng.randint(-5, 5), "s"]),
        extra=rng.choice([None, {"k": [1, 2]}, {}]),
    )


@pytest.mark.parametrize("seed", range(20))
def test_random_configs_round_trip_through_toml(seed):
    top = _random_top(random.Random(seed))
    assert structure(Top, tomllib.loads(to_toml(unstructure(top)))) == top


def test_every_registered_run_config_round_trips_through_toml():
    regs = compose.default_registries()
    assert len(regs.runs) > 0
    for entry in regs.runs:
        cfg = compose.resolve_config(entry.name)
        assert structure(type(cfg), tomllib.loads(to_toml(unstructure(cfg)))) == cfg, entry.name
