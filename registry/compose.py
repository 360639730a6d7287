"""``build_run(config)``: the one place where names become objects.

Everything below ``core/`` receives objects (models, objectives, samplers, batch sources,
callbacks); the registry entries of the loaded plugins are looked up here only.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.core import distributed
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.loop import Loop, LoopConfig, warmup_schedule
from selfflow.core.model import PRESETS, FlowTransformer, ModelConfig
from selfflow.core.objectives import ExternalAlignment, FlowMatching, SelfFlow, SelfFlowConfig
from selfflow.core.runtime import tune_cpu_allocator
from selfflow.core.timesteps import (
    DualTimestepScheduler,
    GapTeacher,
    LogitNormalTime,
    MinTeacher,
    ShiftedTime,
    TimeSampler,
    UniformTime,
)
from selfflow.core.train_step import TrainState
from selfflow.core.types import TokenBatch
from selfflow.plugins.image.latents import grid_of
from selfflow.plugins.batching import EncodedData, MixedSource, TokenSource, encode_dataset
from selfflow.plugins.manager import PluginHost
from selfflow.plugins.samplers import Guidance, model_velocity
from selfflow.registry.config import ConfigError, RunConfig, load_config, load_config_file, to_toml
from selfflow.registry.registry import Register, Registries

DEFAULT_RUN = "image/mnist-selfflow"


# ----------------------------------------------------------------------------- registries


def load_registries(*, strict: bool | None = None) -> tuple[Registries, PluginHost]:
    """Load all plugins and collect what they register (fresh each call)."""
    host = PluginHost(strict=strict).load_default()
    regs = Registries()
    host.call_register_hooks(
        {kind: functools.partial(Register, reg) for kind, reg in regs.kinds().items()}
    )
    return regs, host


@functools.cache
def default_registries() -> Registries:
    return load_registries()[0]


def resolve_config(run: str | None, *, config_file: str | None = None, overrides: list[str] | None = None,
                   registries: Registries | None = None) -> RunConfig:
    """A run name (``image/mnist-selfflow``) or a TOML file, plus ``--set`` overrides."""
    if config_file is not None:
        return load_config_file(config_file, overrides)
    regs = registries or default_registries()
    name = run or DEFAULT_RUN
    if name.endswith(".toml") and Path(name).is_file():
        return load_config_file(name, overrides)
    text = regs.runs.build(name)
    return load_config(text, overrides, source=f"run {name!r}")


# ----------------------------------------------------------------------------- pieces


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def time_sampler(cfg: RunConfig) -> TimeSampler:
    o = cfg.objective
    base: TimeSampler = LogitNormalTime(mean=o.time_mean, std=o.time_std) if o.time == "logit-normal" else UniformTime()
    return ShiftedTime(base=base, shift=o.time_shift) if o.time_shift != 1.0 else base


def model_config(cfg: RunConfig, channels: dict[str, int], num_classes: int) -> ModelConfig:
    m = cfg.model
    if m.preset is not None and m.preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset': unknown preset {m.preset!r}; choose one of {list(PRESETS)}")
    width, depth, heads = PRESETS[m.preset] if m.preset else (None, None, None)
    width, depth, heads = m.width or width, m.depth or depth, m.heads or heads
    if None in (width, depth, heads):
        raise ConfigError("config table 'model': give a preset or all of width, depth and heads")
    try:
        return ModelConfig(
            channels=channels, width=width, depth=depth, heads=heads, mlp_ratio=m.mlp_ratio,
            num_classes=num_classes if m.class_conditional else 0, modulation=m.modulation,
            attention_backend=m.attention_backend,
        )
    except ValueError as err:
        raise ConfigError(f"config table 'model': {err}") from err


def build_objective(cfg: RunConfig, model: FlowTransformer, encoder: tuple[Any, int] | None = None) -> torch.nn.Module:
    """The objective of ``cfg``; ``encoder = (fn, dim)`` is REPA's frozen encoder."""
    o = cfg.objective
    weights = {name: mod.loss_weight for name, mod in cfg.modalities.items()}
    if o.name == "flow-matching":
        return FlowMatching(time=time_sampler(cfg), label_dropout=o.label_dropout, loss_weights=weights)
    if o.name == "external-alignment":
        if encoder is None:
            raise ConfigError("objective.name = 'external-alignment' needs the modality's reference network as encoder")
        fn, dim = encoder
        return ExternalAlignment(
            width=model.width, depth=model.depth, encoder=fn, encoder_dim=dim, gamma=o.gamma,
            student_layer=o.student_layer, time=time_sampler(cfg), label_dropout=o.label_dropout, loss_weights=weights,
        )
    scheduler = DualTimestepScheduler(
        time=time_sampler(cfg),
        mask_ratio={name: mod.mask_ratio for name, mod in cfg.modalities.items()},
        teacher_rule=MinTeacher() if o.teacher_rule == "min" else GapTeacher(gap=o.teacher_gap),
        dual=o.dual_timesteps,
        min_gap=o.min_gap,
        max_gap=o.max_gap,
    )
    sf = SelfFlowConfig(
        gamma=o.gamma, representation=o.representation, student_layer=o.student_layer, teacher_layer=o.teacher_layer,
        representation_tokens=o.representation_tokens, attention_separation=o.attention_separation,
        label_dropout=o.label_dropout,
    )
    try:
        return SelfFlow.for_model(model, scheduler=scheduler, config=sf, loss_weights=weights)
    except ValueError as err:
        raise ConfigError(str(err)) from err


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


@attrs.define(kw_only=True, eq=False)
class Modality:
    name: str
    train: Any
    eval: Any
    tokenizer: Any
    condition: Any | None
    encoded: EncodedData


@attrs.define(kw_only=True, eq=False)
class Run:
    """A composed run: call ``train()``; ``sample()`` draws from the EMA model."""

    config: RunConfig
    state: TrainState
    loop: Loop
    modalities: dict[str, Modality]
    sampler: Any
    device: torch.device
    out_dir: Path
    generator: torch.Generator
    registries: Registries
    cache_dir: Path
    wall_time: float = 0.0

    @property
    def teacher(self) -> FlowTransformer:
        return self.state.teacher.model

    def train(self, *, until: int | None = None) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        history = self.loop.run(until=until)
        self.wall_time = time.perf_counter() - t0
        return history

    @staticmethod
    def _items(mod: Modality, labels: torch.Tensor | None, count: int) -> torch.Tensor:
        """Item indices: the j-th item of each requested class (cycling), else the first ``count``."""
        n = len(mod.encoded)
        if labels is None or mod.encoded.labels is None:
            return torch.arange(count) % n
        out, seen = [], {}
        for y in labels.tolist():
            pool = (mod.encoded.labels == y).nonzero().flatten()
            if len(pool) == 0:
                raise ValueError(f"no item of class {y} in the training data")
            j = seen.get(y, 0)
            seen[y] = j + 1
            out.append(int(pool[j % len(pool)]))
        return torch.tensor(out, dtype=torch.long)

    def sample(self, labels: torch.Tensor | None = None, *, n: int | None = None, modality: str | None = None,
               seed: int = 0, cfg_scale: float | None = None, sampler: Any = None) -> torch.Tensor:
        """Decoded media from the EMA model for ``labels`` (or ``n`` unconditional samples)."""
        mod = self.modalities[modality or next(iter(self.modalities))]
        if labels is None and self.teacher.cfg.num_classes > 0 and n is None:
            raise ValueError("give labels (class-conditional model) or n")
        count = len(labels) if labels is not None else n
        # real items give the template its shapes and, for text-conditioned runs, the condition
        template = mod.encoded.take(self._items(mod, labels, count)).to(self.device)
        if not self.teacher.cfg.num_classes:
            template = template.with_labels(None)
        elif labels is not None:
            template = template.with_labels(labels.to(self.device))
        else:
            template = template.with_labels(torch.full((count,), self.teacher.null_label, device=self.device))
        s = self.config.sampler
        guidance = Guidance(scale=s.cfg_scale if cfg_scale is None else cfg_scale, low=s.cfg_low, high=s.cfg_high)
        gen = torch.Generator().manual_seed(seed)
        out = (sampler or self.sampler)(model_velocity(self.teacher, guidance), template, generator=gen)
        seg = next(i for i, sg in enumerate(out.segments) if sg.generated)
        with torch.no_grad():
            return mod.tokenizer.decode(out.segments[seg])


class SampleCallback:
    """Writes ``samples/step_XXXXXXX.png`` (and ``samples.png`` at the end): a grid with one
    row per class, from the EMA model."""

    def __init__(self, run_ref: list[Run], every: int) -> None:
        self.run_ref, self.every = run_ref, every

    def write(self, step: int, final: bool) -> None:
        run = self.run_ref[0]
        if not distributed.shard().is_main:
            return
        from selfflow.plugins.image.media import save_grid

        mod = next(iter(run.modalities.values()))
        if mod.tokenizer.modality != "image":
            return
        out = run.config.output
        names = list(getattr(mod.train, "class_names", []))
        if run.teacher.cfg.num_classes > 0 or (mod.condition is not None and mod.encoded.labels is not None):
            k = min(len(names) or 10, 10) if run.teacher.cfg.num_classes == 0 else run.teacher.cfg.num_classes
            labels = torch.arange(k).repeat_interleave(out.samples_per_class)
            images = run.sample(labels, seed=run.config.run.seed + 1)
            rows, row_labels = k, names[:k] or [str(i) for i in range(k)]
        else:
            images = run.sample(None, n=out.num_samples, seed=run.config.run.seed + 1)
            rows, row_labels = None, None
        title = f"{run.config.run.name} step {step} (EMA, {run.config.sampler.name}, cfg {run.config.sampler.cfg_scale})"
        save_grid(images, run.out_dir / "samples" / f"step_{step:07d}.png", rows=rows, row_labels=row_labels, title=title)
        if final:
            save_grid(images, run.out_dir / "samples.png", rows=rows, row_labels=row_labels, title=title)

    def on_step(self, loop: Loop, result) -> None:
        if self.every and loop.state.step % self.every == 0 and loop.state.step < loop.config.steps:
            self.write(loop.state.step, final=False)

    def on_end(self, loop: Loop) -> None:
        self.write(loop.state.step, final=True)


class PlotCallback:
    """``loss.png`` from ``metrics.jsonl`` at the end (rank 0)."""

    def on_step(self, loop: Loop, result) -> None:
        pass

    def on_end(self, loop: Loop) -> None:
        if distributed.shard().is_main and loop.history:
            from selfflow.plugins.plots import plot_losses

            plot_losses(loop.history, loop.out_dir / "loss.png")


def alignment_encoder(regs: Registries, modalities: dict[str, Modality], *, cache_dir: Path, device: torch.device,
                      progress: bool) -> tuple[Any, int]:
    """REPA's frozen encoder: the modality's reference network (``<modality>/reference``,
    trained on the run's data, since no pretrained encoder can be downloaded), giving one
    feature vector per generated token from the *decoded* clean tokens."""
    (name, mod), = list(modalities.items())[:1]
    entry = f"{name}/reference"
    if entry not in regs.metrics:
        raise ConfigError(f"objective.name = 'external-alignment': no reference network {entry!r} is registered")
    ref = regs.metrics.build(entry, {}, dataset=mod.eval, train_dataset=mod.train, cache_dir=str(cache_dir),
                             device=device, progress=progress)

    def encode(batch: TokenBatch) -> torch.Tensor:
        seg = next(s for s in batch.segments if s.generated)
        return ref.token_features(mod.tokenizer.decode(seg), grid_of(seg)).to(seg.tokens.device)

    return encode, ref.token_feature_dim


def build_run(
    config: RunConfig,
    *,
    registries: Registries | None = None,
    device: str | None = None,
    resume: str | Path | None = None,
    out_dir: str | Path | None = None,
    record: bool = True,
) -> Run:
    """Compose datasets, tokenizers, model, EMA teacher, objective, optimiser, data source,
    sampler and callbacks from ``config``; ``resume`` restores a checkpoint into them.
    ``record``: write ``config.toml`` into the run directory; evaluation and sampling pass
    False, so their overrides (another sampler, say) never rewrite what the run recorded."""
    regs = registries or default_registries()
    cfg = config
    shard, dev = distributed.init_distributed(device or (None if cfg.run.device == "auto" else cfg.run.device))
    if device is None and cfg.run.device == "auto":
        dev = pick_device("auto") if shard.world == 1 else dev
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.tune_allocator and dev.type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(cfg.run.seed)
    generator = torch.Generator().manual_seed(cfg.run.seed)

    if resume is not None:
        run_dir = Path(out_dir) if out_dir else _run_dir_of(Path(resume))
    else:
        run_dir = Path(out_dir) if out_dir else output_dir(cfg, fresh=True)
    cache_dir = Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))

    # data and tokenizers, per modality
    modalities: dict[str, Modality] = {}
    channels: dict[str, int] = {}
    num_classes = 0
    for name, mc in cfg.modalities.items():
        train = regs.datasets.build(mc.dataset, mc.dataset_options, split="train", seed=cfg.run.seed)
        evals = regs.datasets.build(mc.dataset, mc.dataset_options, split="eval", seed=cfg.run.seed)
        tok = regs.tokenizers.build(mc.tokenizer, mc.tokenizer_options)
        if tok.modality != name:
            raise ConfigError(
                f"config table 'modalities.{name}': tokenizer {mc.tokenizer!r} makes {tok.modality!r} tokens; "
                f"name the table [modalities.{tok.modality}]"
            )
        tok.fit(train, cache_dir=str(cache_dir), generator=torch.Generator().manual_seed(cfg.run.seed))
        cond = None
        if mc.condition is not None:
            cond = regs.tokenizers.build(mc.condition, mc.condition_options)
            cond.fit(train, cache_dir=str(cache_dir), generator=torch.Generator().manual_seed(cfg.run.seed))
            channels[cond.modality] = cond.channels
        encoded = encode_dataset(train, tok, condition=cond, labels=train.num_classes > 0,
                                 progress=cfg.output.progress and shard.is_main)
        channels[name] = tok.channels
        num_classes = max(num_classes, int(train.num_classes))
        modalities[name] = Modality(name=name, train=train, eval=evals, tokenizer=tok, condition=cond, encoded=encoded)

    # model, EMA teacher, objective, optimiser
    model = FlowTransformer(model_config(cfg, channels, num_classes)).to(dev)
    teacher = EMATeacher(model, EMAConfig(decay=cfg.ema.decay, warmup=cfg.ema.warmup))
    encoder = None
    if cfg.objective.name == "external-alignment":
        encoder = alignment_encoder(regs, modalities, cache_dir=cache_dir, device=dev, progress=cfg.output.progress)
    objective = build_objective(cfg, model, encoder).to(dev)
    wrapped = distributed.wrap_model(model, dev)
    o = cfg.optimizer
    params = [p for p in model.parameters()] + [p for p in objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps,
                                  **({"fused": True} if o.fused else {"foreach": True}))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_schedule(o.warmup_steps, cfg.run.steps, o.schedule, o.final_lr_fraction)
    )
    state = TrainState(model=wrapped, teacher=teacher, objective=objective, optimizer=optimizer,
                       lr_schedule=schedule, grad_clip=o.grad_clip)

    micro = cfg.run.batch_size // cfg.run.grad_accum
    sources = {n: TokenSource(m.encoded, batch_size=micro, seed=cfg.run.seed, device=dev) for n, m in modalities.items()}
    source = next(iter(sources.values())) if len(sources) == 1 else MixedSource(
        sources, {n: cfg.modalities[n].probability for n in sources}, seed=cfg.run.seed
    )
    sampler = regs.samplers.build(cfg.sampler.name, cfg.sampler.options)

    run_ref: list[Run] = []
    out = cfg.output
    loop = Loop(
        state=state, source=source, generator=generator, out_dir=run_dir,
        config=LoopConfig(steps=cfg.run.steps, grad_accum=cfg.run.grad_accum, log_every=out.log_every,
                          checkpoint_every=out.checkpoint_every, keep_checkpoints=out.keep_checkpoints,
                          progress=out.progress),
        callbacks=[SampleCallback(run_ref, out.sample_every), PlotCallback()],
        checkpoint_extra={"config_toml": to_toml(cfg), "model": attrs.asdict(model.cfg)},
    )
    run = Run(config=cfg, state=state, loop=loop, modalities=modalities, sampler=sampler, device=dev,
              out_dir=run_dir, generator=generator, registries=regs, cache_dir=cache_dir)
    run_ref.append(run)
    if resume is not None:
        loop.resume(resume)
    if shard.is_main and record:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    return run


def recorded_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The config a checkpoint recorded (verified against its manifest), with ``overrides``
    (``KEY=VALUE``) on top: how resuming, sampling and evaluation rebuild a run."""
    from selfflow.core.checkpoint import read_state

    state = read_state(checkpoint)
    return load_config(state["extra"]["config_toml"], list(overrides), source=f"checkpoint {checkpoint}")


def _run_dir_of(path: Path) -> Path:
    """The run directory of a checkpoint path (``run/checkpoints/step_X`` -> ``run``)."""
    path = path.resolve()
    if (path / "manifest.json").is_file():
        return path.parent.parent
    if path.name == "checkpoints":
        return path.parent
    return path


def write_summary(run: Run, extra: dict[str, Any] | None = None) -> Path:
    """``summary.md``: what ran, how long, the last losses and where the files are."""
    cfg = run.config
    last = run.loop.history[-1] if run.loop.history else {}
    lines = [
        f"# {cfg.run.name}",
        "",
        f"- steps: {run.state.step}, global batch {cfg.run.batch_size}, seed {cfg.run.seed}",
        f"- model: width {run.teacher.cfg.width}, depth {run.teacher.cfg.depth}, heads {run.teacher.cfg.heads}, "
        f"{run.teacher.num_parameters():,} parameters",
        f"- objective: {cfg.objective.name}; EMA decay {cfg.ema.decay} (warmup {cfg.ema.warmup})",
        f"- device: {run.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
    ]
    if run.wall_time:
        lines.append(f"- wall time: {run.wall_time:.1f} s")
    if last:
        lines.append("- last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "Files: `config.toml`, `metrics.jsonl`, `loss.png`, `samples.png`, `samples/`, `checkpoints/`.", ""]
    path = run.out_dir / "summary.md"
    path.write_text("\n".join(lines))
    (run.out_dir / "summary.json").write_text(json.dumps({"steps": run.state.step, **(extra or {}), **last}, indent=1, default=str))
    return path

