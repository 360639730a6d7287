"""``build_run(config)``: the one place where names become objects.

Everything below ``core/`` receives objects (models, objectives, samplers, batch sources,
callbacks); the registry entries of the loaded plugins are looked up here only, and every
modality-specific piece (tokenizers, datasets, writers, reference networks) arrives through
a plugin's hook. ``builders`` maps config choices to core objects, ``setup`` prepares the
process, ``sampling`` draws and writes samples, ``callbacks`` hold what a run does besides
training.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.core import checkpoint as ckpt
from selfflow.core import distributed
from selfflow.core.acceleration import compile_blocks, resolve_compile, resolve_precision
from selfflow.core.conditioning import ConditionRule
from selfflow.core.distill import EMATeacher
from selfflow.core.loop import Loop, LoopConfig
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.train_step import TrainState
from selfflow.plugins.batching import EncodedData, MixedSource, TokenSource, encode_dataset
from selfflow.plugins.manager import PluginHost
from selfflow.plugins.protocols import Dataset, MediaWriter, Tokenizer
from selfflow.plugins.shards import ShardData, ShardError, ShardSource
from selfflow.registry import builders
from selfflow.registry.callbacks import EvalCallback, PlotCallback, SampleCallback
from selfflow.registry.config import (
    ConfigError,
    RunConfig,
    StreamConfig,
    check_resume,
    load_config,
    load_config_file,
    to_toml,
)
from selfflow.registry.registry import Register, Registries, RegistryError
from selfflow.registry.run import Run, RunDirectory, Stream, plan_directory, run_dir_of
from selfflow.registry.setup import cache_dir as default_cache_dir
from selfflow.registry.setup import device_problem, setup_process

DEFAULT_RUN = "image/mnist-selfflow"


# ----------------------------------------------------------------------------- registries


def load_registries(*, strict: bool | None = None) -> tuple[Registries, PluginHost]:
    """Load all plugins and collect what they register (fresh each call)."""
    host = PluginHost(strict=strict).load_default()
    regs = Registries()
    host.call_register_hooks({kind: functools.partial(Register, reg) for kind, reg in regs.kinds().items()})
    return regs, host


@functools.cache
def default_registries() -> Registries:
    return load_registries()[0]


def resolve_config(
    run: str | None,
    *,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    registries: Registries | None = None,
) -> RunConfig:
    """A run name (``image/mnist-selfflow``) or a TOML file, plus ``--set`` overrides."""
    if config_file is not None:
        return load_config_file(config_file, overrides)
    regs = registries or default_registries()
    name = run or DEFAULT_RUN
    if name.endswith(".toml") and Path(name).is_file():
        return load_config_file(name, overrides)
    text = regs.runs.build(name)
    return load_config(text, overrides, source=f"run {name!r}")


def check_names(regs: Registries, cfg: RunConfig) -> None:
    """Every registry name ``cfg`` gives (tokenizers, datasets, reference networks, the
    sampler, ``[[eval.metrics]]``), before any work: an unknown one is one line naming its
    key and the closest registered names."""
    from selfflow.registry.evaluate import spec_modality

    def known(registry: Any, name: str, key: str) -> None:
        try:
            registry.get(name)
        except RegistryError as err:
            raise RegistryError(f"config key '{key}': {err}") from None

    for m, mc in cfg.modalities.items():
        known(regs.tokenizers, mc.tokenizer, f"modalities.{m}.tokenizer")
        if mc.reference is not None:
            known(regs.references, mc.reference, f"modalities.{m}.reference")
    for i, sc in enumerate(cfg.streams):
        known(regs.datasets, sc.dataset, f"streams[{i}].dataset")
    known(regs.samplers, cfg.sampler.name, "sampler.name")
    for i, spec in enumerate(cfg.eval.metrics):
        try:
            regs.measure(spec.name)
        except RegistryError as err:
            raise RegistryError(f"config key 'eval.metrics[{i}].name': {err}") from None
        spec_modality(cfg, spec)


def output_dir(cfg: RunConfig, *, fresh: bool) -> Path:
    base = Path(cfg.run.output_dir.format(name=cfg.run_dir_name))
    if not fresh or not base.exists() or not any(base.iterdir()):
        return base
    for i in range(1, 10_000):
        cand = base.with_name(f"{base.name}-{i}")
        if not cand.exists():
            return cand
    raise RuntimeError(f"too many runs named {base}")


# ----------------------------------------------------------------------------- the run


def build_tokenizers(regs: Registries, cfg: RunConfig) -> dict[str, Tokenizer]:
    """One tokenizer per ``[modalities.NAME]`` table (not yet fitted)."""
    tokenizers: dict[str, Tokenizer] = {}
    for name, mc in cfg.modalities.items():
        tok = regs.tokenizers.build(mc.tokenizer, mc.tokenizer_options)
        if tok.modality != name:
            raise ConfigError(
                f"config table 'modalities.{name}': tokenizer {mc.tokenizer!r} makes {tok.modality!r} tokens; "
                f"name the table [modalities.{tok.modality}]"
            )
        tokenizers[name] = tok
    return tokenizers


def stream_datasets(
    regs: Registries, cfg: RunConfig, tokenizers: dict[str, Tokenizer], cache: Path
) -> Iterator[tuple[int, StreamConfig, Dataset, Dataset]]:
    """Each stream's index, config, train and eval datasets (checked to have the stream's
    modalities), in order; each tokenizer is fitted on the first stream that has its modality
    (``build_run`` and ``selfflow encode`` alike)."""
    fitted: set[str] = set()
    for i, sc in enumerate(cfg.streams):
        train = regs.datasets.build(sc.dataset, sc.dataset_options, split="train", seed=cfg.run.seed)
        evals = regs.datasets.build(sc.dataset, sc.dataset_options, split="eval", seed=cfg.run.seed)
        have = tuple(getattr(train, "modalities", ()))
        missing = [m for m in sc.modalities if m not in have]
        if missing:
            raise ConfigError(
                f"config key 'streams[{i}]': dataset {sc.dataset!r} has modalities {list(have)}, not {missing}"
            )
        for m in sc.modalities:
            if m not in fitted:
                tokenizers[m].fit(train, cache_dir=str(cache), generator=torch.Generator().manual_seed(cfg.run.seed))
                fitted.add(m)
        yield i, sc, train, evals


def _label_space(streams: dict[str, Stream], class_conditional: bool) -> tuple[str, ...]:
    """The class names every labelled stream shares (a class-conditional model has one
    label embedding); a clear error when they disagree."""
    spaces = {n: tuple(str(c) for c in st.train.class_names) for n, st in streams.items() if st.train.num_classes > 0}
    distinct = set(spaces.values())
    if len(distinct) > 1 and class_conditional:
        shown = "; ".join(f"stream {n!r}: {list(v)[:12]}" for n, v in spaces.items())
        raise ConfigError(
            f"the streams' class names disagree ({shown}); a class-conditional model has one label space: "
            "use streams that share their classes, or set model.class_conditional = false"
        )
    return next(iter(spaces.values())) if len(distinct) == 1 else ()


def build_run(
    config: RunConfig,
    *,
    registries: Registries | None = None,
    device: str | None = None,
    resume: str | Path | None = None,
    out_dir: str | Path | None = None,
    read_only: bool = False,
    overwrite: bool = False,
) -> Run:
    """Compose tokenizers, streams (datasets, encoded tokens, condition rules), model, EMA
    teacher, objective, optimiser, data source, sampler, writers and callbacks from
    ``config``; ``resume`` restores a checkpoint into them.

    A training run's directory follows ``run.plan_directory``: a fresh run refuses an
    ``out_dir`` that holds a run (``overwrite``: its run outputs are cleared), resuming in
    place refuses to replace later checkpoints (``overwrite``: they are removed and the log
    cut), resuming into another ``out_dir`` is a branch that leaves the source run as it
    was. Every refusal comes before any work, every write after the run is composed.

    ``read_only`` (sampling, evaluation): the
    checkpoint is restored without touching a file, no directory is checked or written,
    and ``config.toml`` is not rewritten, so their overrides (another sampler, say) never
    change what the run recorded."""
    regs = registries or default_registries()
    cfg = config
    check_names(regs, cfg)
    problem = None if device is not None else device_problem(cfg.run.device)
    if problem:
        raise ConfigError(f"config key 'run.device': {problem}")
    checkpoint = ckpt.resolve(resume) if resume is not None else None
    if read_only:
        plan = RunDirectory(path=Path(out_dir) if out_dir else run_dir_of(checkpoint) if checkpoint else Path("."))
    else:
        if checkpoint is not None:
            check_resumable(checkpoint, cfg)
        fresh = output_dir(cfg, fresh=True) if checkpoint is None and out_dir is None else Path()
        plan = plan_directory(fresh, out=out_dir, checkpoint=checkpoint, overwrite=overwrite)
    run_dir = plan.path
    shard, dev = setup_process(cfg.run, device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    cache = default_cache_dir()
    progress = cfg.output.progress and shard.is_main

    # what the model knows: one tokenizer per modality
    tokenizers = build_tokenizers(regs, cfg)

    # what a mini-batch is: streams; each tokenizer is fitted on the first stream that has its modality
    streams: dict[str, Stream] = {}
    for i, sc, train, evals in stream_datasets(regs, cfg, tokenizers, cache):
        stream_tokenizers = {m: tokenizers[m] for m in sc.modalities}
        encoded: EncodedData | ShardData
        if sc.shards is None:
            encoded = encode_dataset(
                train,
                stream_tokenizers,
                labels=train.num_classes > 0,
                progress=progress,
                cache_dir=cache,
                name=sc.dataset,
            )
        else:  # `selfflow encode`'s shards of this very data and these tokenizers, streamed (docs/scale.md)
            try:
                encoded = ShardData.open(sc.shards, key=f"streams[{i}].shards")
                encoded.check(train, stream_tokenizers, labels=train.num_classes > 0, key=f"streams[{i}].shards")
            except ShardError as err:
                raise ConfigError(str(err)) from None
        try:
            rule = ConditionRule(always=sc.condition, probability=sc.condition_probability)
        except ValueError as err:
            raise ConfigError(f"config table 'streams[{i}]': {err}") from err
        streams[sc.label] = Stream(
            name=sc.label, index=i, config=sc, train=train, eval=evals, encoded=encoded, rule=rule
        )
    class_names = _label_space(streams, cfg.model.class_conditional)
    num_classes = max((int(st.train.num_classes) for st in streams.values()), default=0)

    # model, EMA teacher, objective, optimiser
    channels = {name: tok.channels for name, tok in tokenizers.items()}
    model = FlowTransformer(builders.model_config(cfg, channels, num_classes)).to(dev)
    if checkpoint is not None:  # another width or modalities: one line, before any tensor is read
        # a setting a checkpoint predates ran with its default
        defaults = {f.name: f.default for f in attrs.fields(ModelConfig) if f.default is not attrs.NOTHING}
        ckpt.check_model(checkpoint, attrs.asdict(model.cfg), defaults)
    teacher = EMATeacher(model, cfg.ema)
    if resolve_compile(cfg.run.compile, dev):  # per block, student and teacher apart (core.acceleration)
        compile_blocks(model)
        compile_blocks(teacher.model)
    sampler = regs.samplers.build(cfg.sampler.name, cfg.sampler.options)
    writers = _writers(regs, cfg)
    run_ref: list[Run] = []
    out = cfg.output
    callbacks: list[Any] = [SampleCallback(run_ref, out.sample_every)] if out.samples else []
    callbacks.append(PlotCallback())
    if cfg.eval.at_end:
        if not cfg.eval.metrics:
            raise ConfigError(
                "config key 'eval.at_end': true but [[eval.metrics]] is empty; add metrics or set it false"
            )
        callbacks.append(EvalCallback(run_ref))

    run = Run(
        config=cfg,
        state=None,
        loop=None,
        tokenizers=tokenizers,
        streams=streams,
        writers=writers,  # type: ignore[arg-type]
        class_names=class_names,
        sampler=sampler,
        device=dev,
        out_dir=run_dir,
        generator=generator,
        registries=regs,
        cache_dir=cache,
    )
    encoder = None
    if cfg.objective.name in builders.NEEDS_ENCODER:
        refs = {m: run.reference(m) for m in cfg.generated()}
        encoder = builders.alignment_encoder(refs, tokenizers, cache_mb=cfg.objective.alignment_cache_mb)
    objective = builders.build_objective(cfg, model, builders.mask_ratios(cfg, tokenizers), encoder).to(dev)
    wrapped = distributed.wrap_model(model, dev, cfg.run.parallel)
    fsdp = cfg.run.parallel == "fsdp"
    if fsdp and shard.world > 1:  # the teacher and the heads with the student's plan (docs/distributed.md)
        distributed.shard_teacher(teacher, dev)
        distributed.shard_heads(objective, dev)
    optimizer, schedule = builders.build_optimizer(cfg, list(model.parameters()) + list(objective.parameters()))
    run.state = TrainState(
        model=wrapped,
        teacher=teacher,
        objective=objective,
        optimizer=optimizer,
        lr_schedule=schedule,
        grad_clip=cfg.optimizer.grad_clip,
        precision=resolve_precision(cfg.run.precision, dev),
        sharded=fsdp,
    )

    sources = {n: _source(st, cfg, dev) for n, st in streams.items()}
    source = (
        next(iter(sources.values()))
        if len(sources) == 1
        else MixedSource(sources, {n: st.config.probability for n, st in streams.items()}, seed=cfg.run.seed)
    )
    run.loop = Loop(
        state=run.state,
        source=source,
        generator=generator,
        out_dir=run_dir,
        config=LoopConfig(steps=cfg.run.steps, grad_accum=cfg.run.grad_accum, output=out, guard=cfg.guard),
        callbacks=callbacks,
        checkpoint_extra={"config_toml": to_toml(cfg), "model": attrs.asdict(model.cfg)},
    )
    run_ref.append(run)
    if checkpoint is not None:  # in place, the log is cut at the checkpoint; read-only, nothing is touched
        run.loop.resume(checkpoint, read_only=read_only)
    if read_only:
        return run
    if checkpoint is not None:
        apply_resumed_settings(run.state, cfg)
    if shard.is_main:  # the run is composed and its checkpoint loaded: now clear, drop, copy, record
        rows = plan.prepare(None if checkpoint is None else run.state.step)
        if rows is not None:  # a branch: its log is the source's up to the checkpoint
            run.loop.history = rows
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))  # the settings the run uses from here on
    return run


def _source(st: Stream, cfg: RunConfig, dev: torch.device) -> TokenSource | ShardSource:
    """A stream's batches: from its tokens in memory, or read from its shards by
    ``run.data_workers`` DataLoader workers; the same batches and data position either way."""
    kwargs: dict[str, Any] = {
        "batch_size": cfg.batch_size(st.config) // cfg.run.grad_accum,
        "seed": cfg.run.seed,
        "device": dev,
        "rule": st.rule,
        "rule_stream": st.index,
    }
    if isinstance(st.encoded, ShardData):
        return ShardSource(st.encoded, workers=cfg.run.data_workers, window=st.config.shard_window, **kwargs)
    return TokenSource(st.encoded, **kwargs)


def apply_resumed_settings(state: TrainState, cfg: RunConfig) -> None:
    """After a checkpoint is loaded its optimiser's hyper-parameters win; make the config's
    resumable ones (``config.RESUMABLE``) take effect: the peak ``optimizer.lr`` becomes the
    schedule's base, and the rate of the next step follows the schedule (warmup, decay,
    ``run.steps``) that this config builds, from the step the checkpoint reached."""
    schedule = state.lr_schedule
    if schedule is None:
        return
    peak = cfg.optimizer.lr
    schedule.base_lrs = [peak for _ in state.optimizer.param_groups]
    rates = [peak * f(schedule.last_epoch) for f in schedule.lr_lambdas]  # type: ignore[attr-defined]
    for group, rate in zip(state.optimizer.param_groups, rates, strict=True):
        group["initial_lr"] = peak
        group["lr"] = rate
    schedule._last_lr = rates  # what get_last_lr() reports
    state.grad_clip = cfg.optimizer.grad_clip


def _writers(regs: Registries, cfg: RunConfig) -> dict[str, MediaWriter]:
    """A writer for every modality the model knows that has one; a generated modality
    without one is an error while sampling is on (``output.samples``)."""
    writers = {}
    for name in cfg.modalities:
        if name in regs.writers:
            try:
                writers[name] = regs.writers.build(name, cfg.modalities[name].writer_options or None)
            except ConfigError:  # an option's own key-naming message
                raise
            except ValueError as err:  # e.g. a writer that takes no options
                raise ConfigError(f"config key 'modalities.{name}.writer_options': {err}") from err
        elif cfg.output.samples and name in cfg.generated():
            raise ConfigError(
                f"modality {name!r} is generated but no plugin registers a writer for it (hook "
                f"selfflow_register_writers, name {name!r}); add one, or set output.samples = false"
            )
    return writers


def recorded_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The config a checkpoint recorded (verified against its manifest), with ``overrides``
    (``KEY=VALUE``) on top: how sampling and evaluation rebuild a run."""
    state = ckpt.read_state(checkpoint, full=False)  # loading the tensors verifies the rest
    return load_config(state["extra"]["config_toml"], list(overrides), source=f"checkpoint {checkpoint}")


def resume_config(
    checkpoint: str | Path, overrides: Sequence[str] = (), *, config: RunConfig | None = None
) -> RunConfig:
    """The config a resumed run uses: the checkpoint's own with ``overrides`` on top (or
    ``config``, when ``train RUN --resume`` names one), checked by ``check_resumable``."""
    path = ckpt.resolve(checkpoint)
    text = ckpt.read_state(path, full=False)["extra"]["config_toml"]
    new = config if config is not None else load_config(text, list(overrides), source=f"checkpoint {path}")
    check_resumable(path, new)
    return new


def check_resumable(checkpoint: Path, cfg: RunConfig) -> None:
    """Only ``config.RESUMABLE`` keys of ``cfg`` may differ from what ``checkpoint``
    recorded (``ConfigError`` names any other), and ``run.steps`` may not be below its step."""
    state = ckpt.read_state(checkpoint, full=False)
    source = f"checkpoint {checkpoint}"
    check_resume(load_config(state["extra"]["config_toml"], source=source), cfg, source=source)
    step = int(state["step"])
    if cfg.run.steps < step:
        raise ConfigError(
            f"config key 'run.steps': {cfg.run.steps} is below the step {step} of {checkpoint}; "
            f"set run.steps to at least {step} (the total, not the steps still to train)"
        )


def write_summary(run: Run, extra: dict[str, Any] | None = None) -> Path:
    """``summary.md``: what ran, how long, the last losses and where the files are (the
    sample files are whatever each modality's writer wrote)."""
    cfg = run.config
    teacher = run.state.teacher.model  # (sharded under FSDP: its config and global sizes are all this reads)
    last = run.loop.history[-1] if run.loop.history else {}
    streams = ", ".join(
        f"{n} (generate {list(st.generate)}" + (f", condition {list(st.condition)}" if st.condition else "") + ")"
        for n, st in run.streams.items()
    )
    lines = [
        f"# {cfg.run.name}",
        "",
        f"- steps: {run.state.step}, global batch {cfg.run.batch_size}, seed {cfg.run.seed}",
        f"- streams: {streams}",
        f"- model: width {teacher.cfg.width}, depth {teacher.cfg.depth}, heads {teacher.cfg.heads}, "
        f"{teacher.num_parameters():,} parameters",
        f"- objective: {cfg.objective.name}; EMA decay {cfg.ema.decay} (warmup {cfg.ema.warmup})",
        f"- device: {run.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
    ]
    if run.wall_time:
        lines.append(f"- wall time: {run.wall_time:.1f} s")
    if last:
        lines.append("- last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    samples = [f for cb in run.loop.callbacks if isinstance(cb, SampleCallback) for f in cb.final_files]
    files = ["config.toml", "metrics.jsonl", "loss.png"]
    files += [str(f.path.relative_to(run.out_dir)) for f in samples]
    if samples:
        files += ["samples.html", "samples/"]
    files.append("checkpoints/")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + ".", ""]
    path = run.out_dir / "summary.md"
    path.write_text("\n".join(lines))
    (run.out_dir / "summary.json").write_text(
        json.dumps({"steps": run.state.step, **(extra or {}), **last}, indent=1, default=str)
    )
    return path
