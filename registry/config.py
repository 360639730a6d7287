"""The run configuration: frozen, validated attrs sections loaded from TOML with dotted overrides.

    selfflow train --config my.toml --set objective.gamma=0.5 --set run.steps=2000

Errors name the key, what was expected and the closest valid key::

    config key 'objective.gama': unknown key; did you mean 'objective.gamma'?
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the fix."""


# ----------------------------------------------------------------------------- sections

_v = attrs.validators


def _in(*choices: str):
    return _v.in_(choices)


@attrs.frozen(kw_only=True)
class RunSection:
    """``name``: shown in logs; ``output_dir``: where the run directory goes (``{name}`` is
    replaced, ``/`` in names become ``-``); ``device``: ``auto`` (CUDA when present) or a
    torch device string."""

    name: str = "run"
    seed: int = 0
    steps: int = attrs.field(default=1000, validator=_v.ge(1))
    batch_size: int = attrs.field(default=64, validator=_v.ge(1))
    grad_accum: int = attrs.field(default=1, validator=_v.ge(1))
    output_dir: str = "runs/{name}"
    device: str = "auto"
    threads: int = attrs.field(default=0, validator=_v.ge(0))  # 0: torch's default
    tune_allocator: bool = True  # CPU runs: keep freed memory in the process (core.runtime)


@attrs.frozen(kw_only=True)
class ModalityConfig:
    """One modality of the run: its data, its tokenizer and its Self-Flow settings.

    ``probability``: share of mini-batches from this modality (each mini-batch holds one);
    ``condition``: an optional tokenizer for the dataset's text, fed as a condition segment.
    """

    dataset: str
    tokenizer: str
    dataset_options: dict[str, Any] = attrs.field(factory=dict)
    tokenizer_options: dict[str, Any] = attrs.field(factory=dict)
    mask_ratio: float = attrs.field(default=0.25, validator=[_v.ge(0), _v.le(0.5)])
    loss_weight: float = attrs.field(default=1.0, validator=_v.ge(0))
    probability: float = attrs.field(default=1.0, validator=_v.gt(0))
    condition: str | None = None
    condition_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ModelSection:
    """``preset`` (tiny, XS, S, B, L) sets width/depth/heads; explicit values override it."""

    preset: str | None = None
    width: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(8)))
    depth: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(1)))
    heads: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(1)))
    mlp_ratio: float = attrs.field(default=4.0, validator=_v.gt(0))
    class_conditional: bool = True
    modulation: str = attrs.field(default="factored", validator=_in("factored", "dense"))
    attention_backend: str = attrs.field(default="auto", validator=_in("auto", "sdpa", "xformers"))


@attrs.frozen(kw_only=True)
class ObjectiveSection:
    """``name``: ``self-flow``, ``flow-matching`` or ``external-alignment`` (REPA-style).

    Time distribution ``time``: ``logit-normal`` (``time_mean``, ``time_std``) or
    ``uniform``, optionally shifted by ``time_shift``. Self-Flow switches: ``representation``,
    ``dual_timesteps``, ``attention_separation``, ``teacher_rule`` (``min`` or ``gap`` with
    ``teacher_gap``), ``min_gap``/``max_gap`` between t and s, ``representation_tokens``
    (``all`` or ``masked``), layers ``student_layer``/``teacher_layer`` (1-indexed; default
    round(0.3 depth), round(0.7 depth)).
    """

    name: str = attrs.field(default="self-flow", validator=_in("self-flow", "flow-matching", "external-alignment"))
    gamma: float = attrs.field(default=0.8, validator=_v.ge(0))
    representation: bool = True
    dual_timesteps: bool = True
    attention_separation: bool = False
    teacher_rule: str = attrs.field(default="min", validator=_in("min", "gap"))
    teacher_gap: float = attrs.field(default=0.2, validator=[_v.gt(0), _v.le(1)])
    min_gap: float | None = None
    max_gap: float | None = None
    representation_tokens: str = attrs.field(default="all", validator=_in("all", "masked"))
    student_layer: int | None = None
    teacher_layer: int | None = None
    label_dropout: float = attrs.field(default=0.1, validator=[_v.ge(0), _v.le(1)])
    time: str = attrs.field(default="logit-normal", validator=_in("logit-normal", "uniform"))
    time_mean: float = 0.0
    time_std: float = attrs.field(default=1.0, validator=_v.gt(0))
    time_shift: float = attrs.field(default=1.0, validator=_v.gt(0))
    encoder: str | None = None  # external-alignment: a registered metric/reference network name


@attrs.frozen(kw_only=True)
class EMASection:
    """The EMA teacher / evaluation model. Short runs need a small decay (see SELF_FLOW_SPEC)."""

    decay: float = attrs.field(default=0.999, validator=[_v.ge(0), _v.lt(1)])
    warmup: bool = True


@attrs.frozen(kw_only=True)
class OptimizerSection:
    """AdamW with linear warmup then a constant or cosine schedule, gradients clipped."""

    lr: float = attrs.field(default=1e-4, validator=_v.gt(0))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), converter=tuple)
    weight_decay: float = attrs.field(default=0.0, validator=_v.ge(0))
    eps: float = attrs.field(default=1e-8, validator=_v.gt(0))
    warmup_steps: int = attrs.field(default=0, validator=_v.ge(0))
    schedule: str = attrs.field(default="constant", validator=_in("constant", "cosine"))
    final_lr_fraction: float = attrs.field(default=0.1, validator=[_v.ge(0), _v.le(1)])
    grad_clip: float = attrs.field(default=1.0, validator=_v.gt(0))
    fused: bool = True  # torch's fused AdamW kernel (one pass per tensor); false: the foreach one


@attrs.frozen(kw_only=True)
class SamplerSection:
    """``name``: a registered sampler (``ode/euler``, ``ode/heun``, ``sde/euler-maruyama``);
    ``options``: its settings (e.g. ``{steps = 25}``); ``cfg_scale`` with the guidance
    interval ``[cfg_low, cfg_high]`` in t."""

    name: str = "ode/euler"
    options: dict[str, Any] = attrs.field(factory=dict)
    cfg_scale: float = attrs.field(default=1.0, validator=_v.ge(0))
    cfg_low: float = attrs.field(default=0.0, validator=[_v.ge(0), _v.le(1)])
    cfg_high: float = attrs.field(default=1.0, validator=[_v.ge(0), _v.le(1)])


@attrs.frozen(kw_only=True)
class OutputSection:
    """Cadences in steps (0 = only at the end) and what the run writes."""

    log_every: int = attrs.field(default=25, validator=_v.ge(1))
    sample_every: int = attrs.field(default=0, validator=_v.ge(0))
    checkpoint_every: int = attrs.field(default=0, validator=_v.ge(0))
    keep_checkpoints: int = attrs.field(default=3, validator=_v.ge(1))
    samples_per_class: int = attrs.field(default=8, validator=_v.ge(1))
    num_samples: int = attrs.field(default=64, validator=_v.ge(1))  # unconditional runs
    progress: bool = True


@attrs.frozen(kw_only=True)
class MetricSpec:
    name: str
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class EvalSection:
    """Metrics run by ``selfflow eval`` and at the end of training (``at_end``)."""

    metrics: list[MetricSpec] = attrs.field(factory=list)
    num_samples: int = attrs.field(default=500, validator=_v.ge(1))
    seed: int = 1234
    at_end: bool = False


@attrs.frozen(kw_only=True)
class RunConfig:
    run: RunSection = attrs.field(factory=RunSection)
    modalities: dict[str, ModalityConfig] = attrs.field(factory=dict)
    model: ModelSection = attrs.field(factory=ModelSection)
    objective: ObjectiveSection = attrs.field(factory=ObjectiveSection)
    ema: EMASection = attrs.field(factory=EMASection)
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    sampler: SamplerSection = attrs.field(factory=SamplerSection)
    output: OutputSection = attrs.field(factory=OutputSection)
    eval: EvalSection = attrs.field(factory=EvalSection)

    def __attrs_post_init__(self) -> None:
        if not self.modalities:
            raise ConfigError("config has no [modalities.NAME] table: add one, e.g. [modalities.image] "
                              "with dataset = 'image/mnist' and tokenizer = 'image/patch'")
        if self.sampler.cfg_low > self.sampler.cfg_high:
            raise ConfigError("config key 'sampler.cfg_low' is larger than 'sampler.cfg_high'; the guidance interval is [cfg_low, cfg_high]")
        if self.run.batch_size % self.run.grad_accum:
            raise ConfigError(f"config key 'run.batch_size'={self.run.batch_size} is not divisible by run.grad_accum={self.run.grad_accum}")

    @property
    def run_dir_name(self) -> str:
        return self.run.name.replace("/", "-")


# ----------------------------------------------------------------------------- structuring


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "nothing (omit the key)"
    if attrs.has(tp):
        return "a table"
    if origin in (dict, Mapping):
        return "a table"
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, got {value!r}"
        )
    if attrs.has(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return structure(tp, value, where=key)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def structure(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """Build the attrs class ``cls`` from a TOML table, validating every key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{where}': expected a table, got {data!r}")
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"config key '{prefix}{key}': unknown key{hint}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:
        missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in data]
        if missing:
            raise ConfigError(f"config key '{prefix}{missing[0]}': required but missing") from err
        raise ConfigError(f"config table '{where or 'top level'}': {err}") from err
    except ValueError as err:
        raise ConfigError(_validator_message(err, prefix)) from err


def _validator_message(err: ValueError, prefix: str) -> str:
    # attrs validators raise ValueError(msg, attribute, bound, value)
    if len(err.args) >= 4 and isinstance(err.args[1], attrs.Attribute):
        attr, bound, value = err.args[1], err.args[2], err.args[3]
        msg = str(err.args[0])
        if "must be in" in msg:
            return f"config key '{prefix}{attr.name}': expected one of {list(bound)}, got {value!r}"
        return f"config key '{prefix}{attr.name}': {msg}"
    msg = str(err.args[0]) if err.args else str(err)
    m = re.match(r"^'(\w+)' (.*)$", msg)  # attrs' number validators: "'steps' must be >= 1: 0"
    if m:
        return f"config key '{prefix}{m.group(1)}': {m.group(2)}"
    return f"config table '{prefix.rstrip('.') or 'top level'}': {msg}"


def unstructure(obj: Any) -> Any:
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, Mapping):
        return {k: unstructure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- TOML in and out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"objective.gamma=0.5"`` -> (["objective", "gamma"], 0.5); values are TOML
    (``true``, ``[1, 2]``, ``{steps = 25}``); anything else is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set objective.gamma=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a table")
            node = nxt
        node[path[-1]] = value
    return data


def parse_toml(text: str, *, source: str = "<config>") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from err


def load_config(text: str, overrides: list[str] | None = None, *, source: str = "<config>") -> RunConfig:
    data = apply_overrides(parse_toml(text, source=source), list(overrides or []))
    return structure(RunConfig, data)


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return load_config(path.read_text(), overrides, source=str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (``None`` values are omitted: they mean "default")."""
    data = unstructure(config)
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        for k, v in body.items():
            if v is None:
                continue
            if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
                continue  # arrays of tables below
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
        for k, v in body.items():
            if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
                for item in v:
                    lines.append(f"[[{name}.{k}]]")
                    lines.extend(f"{_toml_key(a)} = {_toml_value(b)}" for a, b in item.items() if b is not None)
                    lines.append("")

    for section, body in data.items():
        if section == "modalities":
            for name, mod in body.items():
                table(f"modalities.{_toml_key(name)}", mod)
        else:
            table(section, body)
    return "\n".join(lines)
