"""TOML tables <-> frozen attrs configs, with one-line errors that name the key and the fix.

``structure`` builds a config class with a cattrs ``Converter`` (unknown keys forbidden,
detailed validation) and strict scalar hooks: TOML has real types, so ``"3"`` or ``true`` is
not an integer and a config never holds a silently coerced value. cattrs reports *every*
problem as a tree of exception groups; the user gets the first one, as one line::

    config key 'objective.gama': unknown key; did you mean 'objective.gamma'?
    config key 'run.steps': expected an integer, got '3'
    config key 'modalities.image.mask_ratio': must be <= 0.5: 0.7

"First" is the order in which the user wrote the keys: at each table, unknown keys, then the
given values in order, then missing required keys, then the class's own validators.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
import tomli_w
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the fix."""


class _Mismatch(Exception):
    """A hook's verdict on a value of the wrong type; the key is added while translating."""

    def __init__(self, expected: str, value: Any) -> None:
        super().__init__(expected, value)
        self.expected, self.value = expected, value


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


# ----------------------------------------------------------------------------- hooks


def _strict(expected: str, ok: typing.Callable[[Any], bool], cast: typing.Callable[[Any], Any] = lambda v: v):
    def hook(value: Any, _tp: Any) -> Any:
        if not ok(value):
            raise _Mismatch(expected, value)
        return cast(value)

    return hook


# bool is a subclass of int, so `isinstance(True, int)` alone would let `steps = true` through
_converter.register_structure_hook(int, _strict("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)))
_converter.register_structure_hook(
    float, _strict("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float)
)
_converter.register_structure_hook(bool, _strict("true or false", lambda v: isinstance(v, bool)))
_converter.register_structure_hook(str, _strict("a string", lambda v: isinstance(v, str)))


def _is_mapping(tp: Any) -> bool:
    return tp in (dict, Mapping) or typing.get_origin(tp) in (dict, Mapping)


def _is_sequence(tp: Any) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (list, tuple)


def _table(make: typing.Callable[[Any, cattrs.Converter], Any]):
    """cattrs' own hook for ``tp``, behind a check that the value is a table: cattrs would index
    a string or a number and report a ``TypeError`` about subscripting."""

    def factory(tp: Any) -> Any:
        inner = make(tp, _converter)

        def hook(value: Any, _tp: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _Mismatch("a table", value)
            return inner(value, tp)

        return hook

    return factory


_converter.register_structure_hook_factory(attrs.has, _table(make_dict_structure_fn))
_converter.register_structure_hook_factory(_is_mapping, _table(make_mapping_structure_fn))


def _structure_sequence(value: Any, tp: Any) -> list | tuple:
    # Written here rather than taken from cattrs: cattrs structures any iterable as a list (a
    # string becomes its characters), words tuple-length errors its own way, and its public
    # list/tuple hook factories only appeared after 23.2. Item errors are raised the way
    # cattrs raises them (IterableValidationError, index notes) so one translator reads both.
    if not isinstance(value, (list, tuple)):
        raise _Mismatch("a list", value)
    args = typing.get_args(tp)
    fixed = bool(args) and args[-1] is not Ellipsis and typing.get_origin(tp) is tuple  # tuple[float, float]
    if fixed and len(args) != len(value):
        raise _Mismatch(f"a list of {len(args)} values", value)
    item_types = args if fixed else [args[0] if args else Any] * len(value)
    items = []
    for i, (item_type, item) in enumerate(zip(item_types, value)):
        try:
            items.append(_converter.structure(item, item_type))
        except Exception as err:  # noqa: BLE001 - any failure of an item is reported with its index, as cattrs does
            note = IterableValidationNote(f"Structuring {tp} @ index {i}", i, item_type)
            err.__notes__ = [*getattr(err, "__notes__", []), note]
            raise IterableValidationError(f"While structuring {tp!r}", [err], tp) from None
    # ``tuple[str, ...]`` is handed on as the list that was written, as before: the fields that
    # declare it convert it themselves (``converter=tuple``-like) and their messages echo it
    return tuple(items) if fixed else items


_converter.register_structure_hook_func(_is_sequence, _structure_sequence)


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()


def _type_name(tp: Any) -> str:
    if _members(tp):
        return " or ".join(_type_name(a) for a in _members(tp))
    if tp is type(None):
        return "nothing (omit the key)"
    if attrs.has(tp) or _is_mapping(tp):
        return "a table"
    if _is_sequence(tp):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _structure_union(value: Any, tp: Any) -> Any:
    # cattrs handles ``X | None`` itself; a union of several types (``int | str``) it cannot
    # structure without a tagging strategy, so try each member in the order written.
    if value is None and type(None) in _members(tp):
        return None
    for member in _members(tp):
        if member is not type(None):
            try:
                return _converter.structure(value, member)
            except Exception:  # noqa: BLE001 - a member that refuses the value, in any way, means: try the next
                continue
    raise _Mismatch(_type_name(tp), value)


_converter.register_structure_hook_func(
    lambda tp: len([a for a in _members(tp) if a is not type(None)]) > 1, _structure_union
)
# unstructure: tuples (``betas``) become lists, like every other TOML array
_converter.register_unstructure_hook_func(
    lambda tp: tuple in (tp, typing.get_origin(tp)), lambda v: [_converter.unstructure(x) for x in v]
)


# ----------------------------------------------------------------------------- public


def structure(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """Build the attrs class ``cls`` from a TOML table, validating every key.

    ``where`` prefixes every key in messages (``"tokenizer 'image/patch'"`` for a registry
    entry's options). Raises ``ConfigError`` naming the first problem; a ``ConfigError`` the
    class raises itself (``__attrs_post_init__``) comes through unchanged.
    """
    try:
        return _converter.structure(data, cls)
    except Exception as err:
        found = _first_problem(err, data, where)
        if isinstance(found, str):
            raise ConfigError(found) from err
        raise found from None  # the class's own error, as it raised it


def unstructure(obj: Any) -> Any:
    """Plain dicts and lists (``None`` kept) of an attrs config, ready for ``to_toml``."""
    return _converter.unstructure(obj)


def to_toml(data: Mapping[str, Any]) -> str:
    """``data`` as TOML; ``None`` values are left out at every level (they mean "default")."""
    return tomli_w.dumps(_without_none(data))


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------- errors


def _first_problem(err: BaseException, value: Any, key: str) -> str | BaseException:
    """The message for the first problem in cattrs' error tree, or an exception to re-raise as
    it is. ``value`` is the data at ``key``, walked alongside to order keys as written."""
    if isinstance(err, _Mismatch):
        return f"config key '{key}': expected {err.expected}, got {err.value!r}"
    if isinstance(err, ClassValidationError) and isinstance(value, Mapping):
        return _first_in_table(err, value, key)
    if isinstance(err, IterableValidationError):
        with_notes, _ = err.group_exceptions()
        if with_notes:  # a list stops at its first bad item; a table's items come in its order
            sub, note = with_notes[0]
            i = note.index
            return _first_problem(sub, value[i], f"{key}[{i}]" if isinstance(i, int) else _join(key, i))
    return err


def _first_in_table(err: ClassValidationError, table: Mapping[str, Any], key: str) -> str | BaseException:
    names = [f.name for f in attrs.fields(err.cl)]
    with_notes, others = err.group_exceptions()
    for extra in others:
        if isinstance(extra, ForbiddenExtraKeysError):  # its key set is unordered: use the table's
            bad = next(k for k in table if k in extra.extra_fields)
            near = difflib.get_close_matches(bad, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{_join(key, near[0])}'?" if near else f"; valid keys: {', '.join(names)}"
            return f"config key '{_join(key, bad)}': unknown key{hint}"
    if with_notes:
        written = list(table)

        def order(found: tuple[Exception, Any]) -> tuple[int, int]:  # given keys as written, then missing ones
            name = found[1].name
            return (0, written.index(name)) if name in table else (1, names.index(name))

        sub, note = min(with_notes, key=order)
        if note.name not in table:  # cattrs' KeyError from reading the key
            return f"config key '{_join(key, note.name)}': required but missing"
        return _first_problem(sub, table[note.name], _join(key, note.name))
    # every value had the right type: the class itself refused them (validators, post-init)
    refused = others[0]
    if isinstance(refused, ConfigError):
        return refused
    if isinstance(refused, ValueError):
        return _validator_message(refused, key)
    if isinstance(refused, TypeError):
        return f"config table '{key or 'top level'}': {refused}"
    return refused


def _validator_message(err: ValueError, key: str) -> str:
    # attrs' in_ raises ValueError(msg, attribute, options, value)
    if len(err.args) >= 4 and isinstance(err.args[1], attrs.Attribute):
        attr, bound, value = err.args[1], err.args[2], err.args[3]
        msg = str(err.args[0])
        if "must be in" in msg:
            return f"config key '{_join(key, attr.name)}': expected one of {list(bound)}, got {value!r}"
        return f"config key '{_join(key, attr.name)}': {msg}"
    msg = str(err.args[0]) if err.args else str(err)
    m = re.match(r"^'(\w+)' (.*)$", msg)  # attrs' number validators: "'steps' must be >= 1: 0"
    if m:
        return f"config key '{_join(key, m.group(1))}': {m.group(2)}"
    return f"config table '{key or 'top level'}': {msg}"


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)
