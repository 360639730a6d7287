"""The run configuration: frozen, validated attrs sections loaded from TOML with dotted overrides.

    selfflow train --config my.toml --set objective.gamma=0.5 --set run.steps=2000

Errors name the key, what was expected and the closest valid key::

    config key 'objective.gama': unknown key; did you mean 'objective.gamma'?
"""

from __future__ import annotations

import itertools
import re
import string
import tomllib
from pathlib import Path
from typing import Any

import attrs

from selfflow.core.acceleration import PRECISIONS
from selfflow.core.distill import EMAConfig
from selfflow.core.loop import LoopGuard, LoopOutput
from selfflow.core.objectives import SelfFlowConfig
from selfflow.core.timesteps import MASK_UNITS, check_mask_ratio
from selfflow.registry.structuring import ConfigError, structure, unstructure
from selfflow.registry.structuring import to_toml as _to_toml

# ----------------------------------------------------------------------------- sections

_v = attrs.validators


def _in(*choices: str):
    return _v.in_(choices)


# the choices of the objective's names; registry.builders maps each to what it builds (and
# checks at import that its tables have exactly these keys)
OBJECTIVE_NAMES = ("self-flow", "flow-matching", "external-alignment")
TIME_NAMES = ("logit-normal", "uniform")
TEACHER_RULE_NAMES = ("min", "gap")


def _mask_ratio(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None:
        try:
            check_mask_ratio(attribute.name, value)
        except ValueError:  # the attrs form, so the message names the key
            raise ValueError(
                f"must lie in [0, 0.5], got {value}: Self-Flow masks at most half the tokens "
                "(the paper uses image 0.25, video 0.10, audio 0.50)",
                attribute,
                None,
                value,
            ) from None


def _output_dir(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    """``run.output_dir`` may hold the placeholder ``{name}`` only: a typo (``{nme}``) is
    caught when the config is loaded, not as a ``KeyError`` when the run starts."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as err:
        raise ValueError(
            f"{err} in {value!r}; the only placeholder is {{name}} (write {{{{ or }}}} for a literal brace)",
            attribute,
            None,
            value,
        ) from None
    bad = [f for f in fields if f != "name"]
    if bad:
        raise ValueError(f"unknown placeholder {{{bad[0]}}} in {value!r}; use {{name}}", attribute, None, value)


def _compile_choice(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"must be 'auto', true or false, got {value!r}", attribute, None, value)


def _nonempty(instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    if not value:
        raise ValueError("must name at least one modality (what the stream's batches train)", attribute, None, value)


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
    output_dir: str = attrs.field(default="runs/{name}", validator=_output_dir)
    device: str = "auto"
    threads: int = attrs.field(default=0, validator=_v.ge(0))  # 0: torch's, fewer when others keep cores busy
    # under torchrun: "ddp" replicates the model, "fsdp" shards student, teacher and heads (FSDP2); docs/distributed.md
    parallel: str = attrs.field(default="ddp", validator=_in("ddp", "fsdp"))
    tune_allocator: bool = True  # CPU runs: keep freed memory in the process (core.runtime)
    # GPU speed (docs/scale.md): "auto" is bf16 autocast on CUDA (fp32 master weights, losses in fp32), fp32 elsewhere
    precision: str = attrs.field(default="auto", validator=_in(*PRECISIONS))
    # torch.compile of the model (student and teacher): "auto" is on for CUDA, off on CPU; or true / false
    compile: Any = attrs.field(default="auto", validator=_compile_choice)
    data_workers: int = attrs.field(default=2, validator=_v.ge(0))  # DataLoader workers per rank, streams[i].shards


@attrs.frozen(kw_only=True)
class ModalityConfig:
    """What the model knows of one modality (``[modalities.NAME]``): its tokenizer, its
    Self-Flow mask ratio (``None``: the tokenizer's default, the paper's image 0.25, video
    0.10, audio 0.50), the weight of its flow loss, and the reference network its media
    metrics and REPA-style alignment use (``None``: the entry named after the modality).
    ``mask_unit``: ``"token"`` masks tokens independently (the paper's); ``"frame"`` masks whole
    time steps (every token at one ``t`` position, e.g. a latent video frame, shares a draw)."""

    tokenizer: str
    tokenizer_options: dict[str, Any] = attrs.field(factory=dict)
    mask_ratio: float | None = attrs.field(default=None, validator=_mask_ratio)  # core.timesteps.check_mask_ratio
    # "token" (the paper's) or "frame": every token of one time step shares one mask draw
    mask_unit: str = attrs.field(default="token", validator=_in(*MASK_UNITS))
    loss_weight: float = attrs.field(default=1.0, validator=_v.ge(0))
    reference: str | None = None
    reference_options: dict[str, Any] = attrs.field(factory=dict)
    # options of the modality's writer (the entry named after the modality), e.g. {fps = 10}
    writer_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class StreamConfig:
    """What a mini-batch is (``[[streams]]``): a dataset, which of its modalities the model
    generates and which it is given clean as conditions, and how often the stream is drawn.

    ``condition_probability``: generated modality -> probability that its whole segment is
    given as a condition in a batch instead (any-to-any training); ``probability``: relative
    share of mini-batches drawn from this stream; ``batch_size``: its global batch
    (default ``run.batch_size``); ``name``: how logs and sample files call it (default: the
    dataset's name); ``shards``: read the stream's encoded tokens from this directory of
    WebDataset shards (``selfflow encode``, ``plugins.shards``) instead of holding them in memory.
    """

    dataset: str
    generate: list[str] = attrs.field(validator=_nonempty)
    dataset_options: dict[str, Any] = attrs.field(factory=dict)
    condition: list[str] = attrs.field(factory=list)
    condition_probability: dict[str, float] = attrs.field(factory=dict)
    probability: float = attrs.field(default=1.0, validator=_v.gt(0))
    batch_size: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(1)))
    name: str | None = None
    # a directory written by `selfflow encode` (WebDataset shards, streamed; docs/scale.md); unset: encoded in memory
    shards: str | None = None
    # 0: the in-memory order (a permutation of all items per epoch); N: shuffle N shards at a time (docs/scale.md)
    shard_window: int = attrs.field(default=0, validator=_v.ge(0))

    @property
    def label(self) -> str:
        return self.name or self.dataset

    @property
    def modalities(self) -> tuple[str, ...]:
        """The stream's segments in batch order: generated, then conditions."""
        return (*self.generate, *self.condition)


@attrs.frozen(kw_only=True)
class ModelSection:
    """``preset`` (tiny, XS, S, B, L) sets width/depth/heads; explicit values override it.
    ``class_conditional``: a label embedding when the data is labelled. The other keys are
    ``core.model.ModelConfig``'s (``mlp_ratio``, ``modulation``, ``attention_backend``,
    ``rope_theta``, ``rope_axes``, ``abs_pos``): unset, they take its defaults, and it validates them."""

    preset: str | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    class_conditional: bool = True
    mlp_ratio: float | None = None
    modulation: str | None = None
    attention_backend: str | None = None
    rope_theta: float | None = None
    rope_axes: list[int] | None = None
    abs_pos: str | None = None

    def core_options(self) -> dict[str, Any]:
        """The keys that go to ``ModelConfig`` unchanged (unset ones: its defaults)."""
        keys = ("mlp_ratio", "modulation", "attention_backend", "rope_theta", "rope_axes", "abs_pos")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@attrs.frozen(kw_only=True)
class ObjectiveSection(SelfFlowConfig):
    """``name``: ``self-flow``, ``flow-matching`` or ``external-alignment`` (REPA-style,
    aligned to each generated modality's reference network).

    The Self-Flow switches (``gamma``, ``representation``, ``student_layer``,
    ``teacher_layer``, ``representation_tokens``, ``attention_separation``,
    ``label_dropout``) are ``core.objectives.SelfFlowConfig``'s own fields, defaults and
    validators: this section derives from it. Added here: the time distribution ``time``
    (``logit-normal`` with ``time_mean``, ``time_std``, or ``uniform``), optionally shifted
    by ``time_shift``; ``dual_timesteps``; ``teacher_rule`` (``min``, or ``gap`` with
    ``teacher_gap``); ``min_gap``/``max_gap`` between t and s; ``alignment_cache_mb``: REPA's
    per-item target cache (``registry.builders.TokenFeatureCache``; 0 recomputes every step).
    """

    name: str = attrs.field(default="self-flow", validator=_in(*OBJECTIVE_NAMES))
    dual_timesteps: bool = True
    teacher_rule: str = attrs.field(default="min", validator=_in(*TEACHER_RULE_NAMES))
    teacher_gap: float = attrs.field(default=0.2, validator=[_v.gt(0), _v.le(1)])
    min_gap: float | None = None
    max_gap: float | None = None
    time: str = attrs.field(default="logit-normal", validator=_in(*TIME_NAMES))
    time_mean: float = 0.0
    time_std: float = attrs.field(default=1.0, validator=_v.gt(0))
    time_shift: float = attrs.field(default=1.0, validator=_v.gt(0))
    alignment_cache_mb: float = attrs.field(default=512.0, validator=_v.ge(0))

    def self_flow(self) -> SelfFlowConfig:
        """The core config this section derives from."""
        return SelfFlowConfig(**{f.name: getattr(self, f.name) for f in attrs.fields(SelfFlowConfig)})


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
class OutputSection(LoopOutput):
    """Cadences in steps (0 = only at the end) and what the run writes. ``log_every``,
    ``checkpoint_every``, ``keep_checkpoints`` and ``progress`` are the loop's own
    (``core.loop.LoopOutput``); sampling: ``samples`` (write samples through each generated
    modality's writer, at ``sample_every`` and at the end), ``samples_per_class`` (class-
    conditional runs: one row per class), ``num_samples`` (unconditional runs)."""

    samples: bool = True
    sample_every: int = attrs.field(default=0, validator=_v.ge(0))
    samples_per_class: int = attrs.field(default=8, validator=_v.ge(1))
    num_samples: int = attrs.field(default=64, validator=_v.ge(1))


@attrs.frozen(kw_only=True)
class MetricSpec:
    """One ``[[eval.metrics]]`` table: a registered media metric or model probe, the
    modality it scores (default: the only generated one) and its options."""

    name: str
    modality: str | None = None
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class EvalSection:
    """Metrics run by ``selfflow eval`` and, with ``at_end``, after the last training step
    (the report goes to ``eval/`` in the run directory)."""

    metrics: list[MetricSpec] = attrs.field(factory=list)
    num_samples: int = attrs.field(default=500, validator=_v.ge(1))
    seed: int = 1234
    at_end: bool = False


@attrs.frozen(kw_only=True)
class RunConfig:
    run: RunSection = attrs.field(factory=RunSection)
    modalities: dict[str, ModalityConfig] = attrs.field(factory=dict)
    streams: list[StreamConfig] = attrs.field(factory=list)
    model: ModelSection = attrs.field(factory=ModelSection)
    objective: ObjectiveSection = attrs.field(factory=ObjectiveSection)
    ema: EMAConfig = attrs.field(factory=EMAConfig)
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    sampler: SamplerSection = attrs.field(factory=SamplerSection)
    output: OutputSection = attrs.field(factory=OutputSection)
    eval: EvalSection = attrs.field(factory=EvalSection)
    guard: LoopGuard = attrs.field(factory=LoopGuard)  # what bad steps do (core.loop.LoopGuard)

    def __attrs_post_init__(self) -> None:
        if not self.modalities:
            raise ConfigError(
                "config has no [modalities.NAME] table: add one, e.g. [modalities.image] "
                "with tokenizer = 'image/patch', and a [[streams]] table with dataset = 'image/mnist'"
            )
        if not self.streams:
            raise ConfigError(
                "config has no [[streams]] table: add one, e.g. [[streams]] dataset = 'image/mnist', "
                "generate = ['image'] (or give the dataset in the modality's table: the short form)"
            )
        declared = sorted(self.modalities)
        seen: dict[str, int] = {}
        used: set[str] = set()
        for i, st in enumerate(self.streams):
            key = f"streams[{i}]"
            if st.label in seen:
                raise ConfigError(
                    f"config key '{key}.name': stream name {st.label!r} is also streams[{seen[st.label]}]'s; "
                    "give each stream a distinct name"
                )
            seen[st.label] = i
            for field in ("generate", "condition"):
                for m in getattr(st, field):
                    if m not in self.modalities:
                        raise ConfigError(
                            f"config key '{key}.{field}': {m!r} is not a modality of the run; "
                            f"declared: {declared} (add a [modalities.{m}] table)"
                        )
            dup = sorted({m for m in st.modalities if st.modalities.count(m) > 1})
            if dup:
                raise ConfigError(
                    f"config key '{key}.condition': {dup} are listed twice (a modality is generated or "
                    "a condition, not both; use condition_probability for sometimes-a-condition)"
                )
            for m in st.condition_probability:
                if m not in st.generate:
                    raise ConfigError(
                        f"config key '{key}.condition_probability.{m}': {m!r} is not generated by this "
                        f"stream (generate = {st.generate}); only generated segments can be given clean"
                    )
            if st.shard_window and st.shards is None:
                raise ConfigError(
                    f"config key '{key}.shard_window': a shuffle window of shards needs {key}.shards "
                    "(a directory written by selfflow encode); the in-memory path permutes all items"
                )
            batch = st.batch_size or self.run.batch_size
            if batch % self.run.grad_accum:
                raise ConfigError(
                    f"config key '{key}.batch_size'={batch} is not divisible by run.grad_accum={self.run.grad_accum}"
                )
            used.update(st.modalities)
        unused = sorted(set(self.modalities) - used)
        if unused:
            raise ConfigError(
                f"config table 'modalities.{unused[0]}': no stream uses it; add it to a stream's "
                "generate or condition list, or remove the table"
            )
        if self.sampler.cfg_low > self.sampler.cfg_high:
            raise ConfigError(
                "config key 'sampler.cfg_low' is larger than 'sampler.cfg_high'; "
                "the guidance interval is [cfg_low, cfg_high]"
            )
        if self.run.batch_size % self.run.grad_accum:
            raise ConfigError(
                f"config key 'run.batch_size'={self.run.batch_size} is not divisible by "
                f"run.grad_accum={self.run.grad_accum}"
            )

    @property
    def run_dir_name(self) -> str:
        return self.run.name.replace("/", "-")

    def batch_size(self, stream: StreamConfig) -> int:
        """A stream's global batch of one optimiser step."""
        return stream.batch_size or self.run.batch_size

    def generated(self) -> list[str]:
        """Every modality some stream generates, in first-seen order."""
        return list(dict.fromkeys(m for st in self.streams for m in st.generate))


# ----------------------------------------------------------------------------- resuming

# What ``train --resume RUN --set KEY=VALUE`` may change, and it takes effect: how long to
# train and on what, the learning-rate schedule (the peak ``lr`` too: the NaN error's hint is
# to resume with a lower one), gradient clipping, what the run writes, how it samples and
# evaluates, what bad steps do. Everything else (model, modalities, streams, objective, EMA,
# seed, batch, AdamW's betas/eps/weight_decay/fused) is what the checkpoint's weights,
# optimiser moments and data position mean; changing it is a new run.
RESUMABLE = (
    "run.name",
    "run.steps",
    "run.threads",
    "run.device",
    "run.tune_allocator",
    "run.precision",
    "run.compile",
    "run.data_workers",
    "optimizer.lr",
    "optimizer.warmup_steps",
    "optimizer.schedule",
    "optimizer.final_lr_fraction",
    "optimizer.grad_clip",
    "output",
    "sampler",
    "eval",
    "guard",
)
RESUMABLE_TEXT = (
    "run.steps/threads/device/name/tune_allocator/precision/compile/data_workers, streams[i].shards, "
    "optimizer.lr/warmup_steps/schedule/final_lr_fraction/grad_clip, "
    "output.*, sampler.*, eval.* and guard.*"
)
_UNSET = "<unset>"


def _flat(value: Any, key: str = "") -> dict[str, Any]:
    """Dotted keys (``streams[0].dataset``) of plain config data -> their values."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}" if key else name).items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def changed_keys(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two configs: ``{key: (old, new)}``."""
    a, b = _flat(unstructure(old)), _flat(unstructure(new))
    keys = list(dict.fromkeys([*a, *b]))
    return {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in keys if a.get(k, _UNSET) != b.get(k, _UNSET)}


def _shown(value: Any) -> str:
    return "unset" if value is None or value == _UNSET else repr(value)


def resumable(key: str) -> bool:
    # a stream's shards may move, appear or go (in memory <-> shards): the batches and the data
    # position are the same either way, and build_run checks the shards are this stream's data
    if re.fullmatch(r"streams\[\d+\]\.shards", key):
        return True
    return any(key == r or key.startswith((f"{r}.", f"{r}[")) for r in RESUMABLE)


def check_resume(recorded: RunConfig, new: RunConfig, *, source: str) -> list[str]:
    """The keys a resumed run changes (all in ``RESUMABLE``); a ``ConfigError`` naming the
    others when any differ from what the checkpoint recorded (``source`` names it)."""
    changed = changed_keys(recorded, new)
    frozen = [k for k in changed if not resumable(k)]
    if frozen:
        names = ", ".join(f"'{k}'" for k in frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        shown = "; ".join(
            f"{k}: {_shown(changed[k][0])} in the checkpoint, {_shown(changed[k][1])} now" for k in frozen[:3]
        )
        raise ConfigError(
            f"config key{'s' if len(frozen) > 1 else ''} {names} cannot change on resume ({shown}; {source}); "
            "keep the checkpoint's values, or start a new run (without --resume, a new --out). "
            f"On resume only {RESUMABLE_TEXT} may change"
        )
    return list(changed)


# ----------------------------------------------------------------------------- the short form and old files

_MOVED = {
    "condition": "the condition is now a modality of its own",
    "condition_options": "the condition is now a modality of its own",
    "probability": "the share of mini-batches is now a stream's",
}


def normalise(data: dict[str, Any]) -> dict[str, Any]:
    """The short form of a single-stream run -- ``dataset`` (and ``dataset_options``) in
    the one ``[modalities.NAME]`` table -- becomes one ``[[streams]]`` table generating that
    modality; keys of the old shape get an error that explains the new one."""
    mods = data.get("modalities")
    if not isinstance(mods, dict):
        return data
    for name, table in mods.items():
        if not isinstance(table, dict):
            continue
        for key, why in _MOVED.items():
            if key in table:
                raise ConfigError(
                    f"config key 'modalities.{name}.{key}': {why} (the run-config shape changed). The model's "
                    "modalities are [modalities.NAME] tables (tokenizer, mask_ratio, loss_weight, reference); a "
                    "mini-batch is a [[streams]] table: dataset, dataset_options, "
                    f"generate = ['{name}'], condition = ['text'], probability, batch_size. A text condition: "
                    "add [modalities.text] with tokenizer = 'text/chars' and condition = ['text'] in the stream. "
                    "See the README's 'Run configs'"
                )
    stream_keys = {"dataset", "dataset_options", "shards", "shard_window"}
    short = [n for n, t in mods.items() if isinstance(t, dict) and (stream_keys & set(t))]
    if not short:
        return data
    if "streams" in data:
        raise ConfigError(
            f"config key 'modalities.{short[0]}.dataset': the run has [[streams]] tables, so the "
            "dataset goes in a stream (dataset = ..., generate = [...]), not in the modality's table"
        )
    if len(short) > 1:
        raise ConfigError(
            f"config key 'modalities.{short[1]}.dataset': the short form (a dataset in the modality's "
            "table) takes one modality; for several, write [[streams]] tables"
        )
    name = short[0]
    table = dict(mods[name])
    if "dataset" not in table:
        raise ConfigError(f"config key 'modalities.{name}.dataset': required with dataset_options (the short form)")
    stream: dict[str, Any] = {"dataset": table.pop("dataset"), "generate": [name]}
    for key in ("dataset_options", "shards", "shard_window"):  # the stream's own keys, given in the short form
        if key in table:
            stream[key] = table.pop(key)
    return {**data, "modalities": {**mods, name: table}, "streams": [stream]}


# ----------------------------------------------------------------------------- TOML in and out


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """``"objective.gamma=0.5"`` -> (["objective", "gamma"], 0.5); ``streams[0].batch_size=8``
    indexes an array of tables; values are TOML (``true``, ``[1, 2]``, ``{steps = 25}``);
    anything else is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set objective.gamma=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    path: list[str | int] = []
    for part in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if m is None:
            raise ConfigError(f"override {item!r}: {part!r} is not a key or key[index]")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for part, nxt_part in itertools.pairwise(path):
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    size = len(node) if isinstance(node, list) else 0
                    hint = (
                        (
                            "; this run gives its dataset in the short form: override "
                            "modalities.NAME.dataset_options... instead"
                        )
                        if path[0] == "streams" and not size
                        else ""
                    )
                    raise ConfigError(f"override {item!r}: index [{part}] is outside the {size} tables there{hint}")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is inside a value, not a table")
            nxt = node.setdefault(part, [] if isinstance(nxt_part, int) else {})
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a table")
            node = nxt
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise ConfigError(f"override {item!r}: index [{last}] is outside the tables there")
        elif not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: cannot set '{last}' inside a value")
        node[last] = value
    return data


def parse_toml(text: str, *, source: str = "<config>") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from err


def load_config(text: str, overrides: list[str] | None = None, *, source: str = "<config>") -> RunConfig:
    """Parse, apply ``--set`` overrides, expand the short form, validate."""
    data = apply_overrides(parse_toml(text, source=source), list(overrides or []))
    return structure(RunConfig, normalise(data))


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not a TOML file: it is not UTF-8 text ({err.reason} at byte {err.start}); "
            "give a run config written in TOML"
        ) from None
    return load_config(text, overrides, source=str(path))


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (always the long form; ``None`` values are omitted: they
    mean "default")."""
    return _to_toml(unstructure(config))
