"""The ``selfflow`` command (also ``python -m selfflow``).

    selfflow train [RUN | --config FILE] [--set key=value ...] [--resume DIR] [--out DIR] [--overwrite]
    selfflow sample CHECKPOINT [--steps N --cfg S --sampler NAME --n N --labels 0,1,2 --out DIR]
    selfflow encode RUN [--set key=value ...] --out DIR [--stream NAME --per-shard N --overwrite]
    selfflow runs list
    selfflow plugins list
    selfflow registry show NAME
    selfflow eval CHECKPOINT [--metric NAME ... --samples N --cfg S --sampler NAME --steps N
                              --real|--reconstructions --out DIR]
    selfflow bench step|methods|image-methods|contention|video-data|video-vae-speed [...]
    selfflow checkpoint export CHECKPOINT --out DIR

Errors print one line and a hint; ``--debug`` shows the traceback. Every argument is checked
before any work; ``sample`` and ``eval`` never modify a run's training outputs.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A command-line argument that cannot work; ``hint`` (optional) says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfflow", description="Self-Flow generators on images, video and audio.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a run (default: image/mnist-selfflow)")
    t.add_argument("run", nargs="?", help="a registered run name or a TOML file")
    t.add_argument("--config", help="a run config TOML file")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set objective.gamma=0.5 (repeatable)",
    )
    t.add_argument(
        "--resume", help="continue from a run directory or checkpoint (in place; with another --out: a branch)"
    )
    t.add_argument(
        "--out", help="run directory (default: from run.output_dir, numbered afresh); with --resume: a branch"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its config, log, checkpoints, samples); with --resume from an older "
        "checkpoint: delete the later ones and cut the log",
    )
    t.add_argument("--device", help="torch device (default: run.device)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint's EMA model")
    s.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    s.add_argument("--device", help="torch device (default: run.device)")
    s.add_argument("--steps", type=int, help="sampler steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    s.add_argument("--sampler", help="a registered sampler, e.g. ode/heun")
    s.add_argument("--n", type=int, default=8, help="samples per label (or in all, unconditional)")
    s.add_argument("--labels", help="comma-separated class ids (default: every class)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stream", help="sample only this stream (default: every stream)")
    s.add_argument("--out", help="output directory for the writers' files and samples.html (default: RUN/samples-cli/)")

    e = sub.add_parser("eval", help="compute a run's metrics from a checkpoint's EMA model")
    e.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    e.add_argument("--device", help="torch device (default: run.device)")
    e.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME",
        help="a registered metric or probe, NAME or NAME@MODALITY (repeatable; default: the run's [eval] metrics, "
        "else fd, kid, class-accuracy, linear-probe of every generated modality)",
    )
    e.add_argument("--samples", type=int, help="number of samples (default: eval.num_samples)")
    e.add_argument("--seed", type=int, help="sampling seed (default: eval.seed)")
    e.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    e.add_argument("--sampler", help="a registered sampler, e.g. sde/euler-maruyama")
    e.add_argument("--steps", type=int, help="sampler steps")
    e.add_argument(
        "--real",
        action="store_true",
        help="score real held-out items instead of samples (the metrics' ceiling; writes eval/eval_real_data*)",
    )
    e.add_argument(
        "--reconstructions",
        action="store_true",
        help="score real held-out items passed through the tokenizer, decode(encode(x)) (the tokenizer's floor; "
        "writes eval/eval_reconstructions*)",
    )
    e.add_argument("--out", help="directory for the reports (default: RUN/eval/)")

    en = sub.add_parser("encode", help="encode a run's streams once into WebDataset shards (streams[i].shards)")
    en.add_argument("run", help="a registered run name or a TOML file")
    en.add_argument("--out", required=True, help="shard directory (a run of several streams: one folder per stream)")
    en.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    en.add_argument("--stream", help="encode only this stream (default: every stream)")
    en.add_argument("--per-shard", type=int, default=1000, help="items per tar shard (default 1000)")
    en.add_argument("--overwrite", action="store_true", help="replace shards of another encoding in --out")

    ck = sub.add_parser("checkpoint", help="export a sharded (FSDP) checkpoint as single-file safetensors")
    ck.add_argument("action", choices=["export"])
    ck.add_argument("checkpoint", help="a checkpoint, a checkpoints/ folder or a run directory (its latest)")
    ck.add_argument("--out", required=True, help="a new directory: the checkpoint goes to OUT/checkpoints/step_N")
    r = sub.add_parser("runs", help="registered runs")
    r.add_argument("action", choices=["list"])

    pl = sub.add_parser("plugins", help="loaded plugins")
    pl.add_argument("action", choices=["list"])

    rg = sub.add_parser("registry", help="registry entries")
    rg.add_argument("action", choices=["show", "list"])
    rg.add_argument("name", nargs="?")

    b = sub.add_parser("bench", help="benchmarks (see benchmarks/)")
    b.add_argument("suite", help="which benchmark: " + ", ".join(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help)")
    return p


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from selfflow.core import loop
    from selfflow.core.train_step import BadStepError
    from selfflow.registry.compose import build_run, resolve_config, resume_config, write_summary

    _check_device(args.device)
    if args.overwrite and not (args.out or args.resume):
        raise UsageError(
            "--overwrite replaces the run in --out DIR: give the directory (without --out a fresh run gets a new, "
            "numbered directory and overwrites nothing)"
        )
    named = args.run or args.config
    if args.resume:  # the run's own config; only resumable keys may change (config.RESUMABLE)
        given = resolve_config(args.run, config_file=args.config, overrides=args.overrides) if named else None
        cfg = resume_config(args.resume, args.overrides, config=given)
    else:
        cfg = resolve_config(args.run, config_file=args.config, overrides=args.overrides)
    run = build_run(cfg, device=args.device, resume=args.resume, out_dir=args.out, overwrite=args.overwrite)
    print(f"run directory: {run.out_dir}")  # stdout: stderr is for errors and hints
    try:
        run.train()
    except loop.TrainingInterrupted as err:
        return _report_interrupt(err, args.device)
    except BadStepError as err:  # the guard stopped the run: the exact command that resumes it, slower
        err.hint = _bad_step_hint(err, cfg.optimizer.lr, args.device)  # type: ignore[attr-defined]
        raise
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = write_summary(run, {"peak_rss_mb": round(peak_mb, 1)})
    print(f"done: {run.state.step} steps in {run.wall_time:.1f} s, peak memory {peak_mb:.0f} MB -> {summary.parent}")
    for name in ("samples.png", "loss.png", "metrics.jsonl", "config.toml"):
        if (run.out_dir / name).exists():
            print(f"  {run.out_dir / name}")
    return 0


def _report_interrupt(err: Any, device: str | None) -> int:
    """Ctrl-C during training: the loop wrote a checkpoint; say where and how to go on."""
    if err.checkpoint is None:
        print(f"interrupted at step {err.step}; no checkpoint was written (nothing was trained)", file=sys.stderr)
        print("hint: start the run again (with --overwrite if it used --out)", file=sys.stderr)
    else:
        command = f"selfflow train --resume {shlex.quote(str(err.checkpoint))}"
        command += f" --device {shlex.quote(device)}" if device else ""
        print(f"interrupted at step {err.step}; checkpoint {err.checkpoint}", file=sys.stderr)
        print(f"hint: continue with: {command}", file=sys.stderr)
    return 130


def _bad_step_hint(err: Any, lr: float, device: str | None) -> str:
    """The command that resumes a run the guard stopped from its last sane checkpoint with a
    tenth of the learning rate (``--overwrite`` when later checkpoints would be replaced)."""
    from selfflow.core.checkpoint import list_checkpoints

    if err.checkpoint is None and err.step == 0:  # not one update was applied: the rate cannot be the cause
        return "the loss was not finite before any update: check the data and the model's inputs for NaN or inf"
    if err.checkpoint is None:
        return f"no checkpoint of this run had sane losses: start it again with a lower optimizer.lr (now {lr:g})"
    checkpoint = Path(err.checkpoint)
    command = f"selfflow train --resume {shlex.quote(str(checkpoint))} --set optimizer.lr={lr / 10:g}"
    command += f" --device {shlex.quote(device)}" if device else ""
    if not any(c.name > checkpoint.name for c in list_checkpoints(checkpoint.parent)):
        return f"resume with a lower learning rate: {command}"
    return (
        f"resume with a lower learning rate: {command} --overwrite; --overwrite deletes the later checkpoints "
        "(--out NEW branches instead)"
    )


def _check_device(device: str | None) -> None:
    from selfflow.registry.setup import device_problem

    problem = None if device is None else device_problem(device)
    if problem:
        raise UsageError(f"--device {problem}")


def _at_least(flag: str, value: int | float | None, low: int | float, what: str, example: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number ({what}), got {value}; e.g. {flag} {example}")
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low} ({what}), got {value}; e.g. {flag} {example}")


def _sampling_args(args: argparse.Namespace) -> None:
    """``--steps``, ``--cfg``, ``--sampler`` of ``sample`` and ``eval``, before any work."""
    from selfflow.registry.compose import default_registries

    _at_least("--steps", args.steps, 1, "sampler steps", "25")
    _at_least("--cfg", args.cfg, 0, "the classifier-free guidance scale; 1 is none", "1.5")
    if args.sampler is not None:
        default_registries().samplers.get(args.sampler)  # an unknown name: the closest ones


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--labels expects comma-separated class ids, e.g. --labels 3,7; got {text!r}")
    return [int(p) for p in parts]


def _output_place(out: str | None, run_dir: Path, default: str) -> Path:
    """Where a read-only command writes: ``--out``, else ``default`` inside the run
    directory; an error before any work when that place cannot be written."""
    from selfflow.registry.run import writable

    place = Path(out) if out else run_dir / default
    if writable(place):
        return place
    if out:
        raise UsageError(f"--out {place} is not writable; choose a directory you can write")
    raise UsageError(
        f"run directory {run_dir} is read-only, so {place} cannot be written; write elsewhere with --out DIR",
        hint="sample and eval never modify a run's training outputs; --out DIR puts what they write elsewhere",
    )


def _checkpoint_config(args: argparse.Namespace) -> tuple[Path, Any, dict[str, Any]]:
    """The checkpoint, the config it recorded with the sampling overrides, and its state."""
    from selfflow.core.checkpoint import read_state, resolve
    from selfflow.registry.compose import recorded_config

    checkpoint = resolve(args.checkpoint)
    overrides = ["output.progress=false"]
    if args.sampler is not None:
        overrides.append(f'sampler.name="{args.sampler}"')
    if args.steps is not None:
        overrides.append(f"sampler.options.steps={args.steps}")
    return checkpoint, recorded_config(checkpoint, overrides), read_state(checkpoint, full=False)


def cmd_sample(args: argparse.Namespace) -> int:
    from selfflow.plugins.gallery import Gallery
    from selfflow.registry.compose import build_run
    from selfflow.registry.run import run_dir_of
    from selfflow.registry.sampling import class_rows, write_samples

    if args.n < 1:
        raise UsageError(f"--n must be at least 1 (samples per label, or in all), got {args.n}; e.g. --n 8")
    _sampling_args(args)
    _check_device(args.device)
    ids = _parse_labels(args.labels)
    checkpoint, cfg, state = _checkpoint_config(args)
    names = [st.label for st in cfg.streams]
    if args.stream is not None and args.stream not in names:
        raise UsageError(f"--stream {args.stream!r} is not a stream of the run; its streams are {names}")
    classes = int(state.get("extra", {}).get("model", {}).get("num_classes", 0))
    bad = [i for i in ids or [] if classes and i >= classes]
    if bad:
        raise UsageError(f"--labels {bad} are outside 0..{classes - 1} (the model's {classes} classes)")
    out = _output_place(args.out, run_dir_of(checkpoint), "samples-cli")
    run = build_run(cfg, device=args.device, resume=checkpoint, read_only=True)
    streams = [args.stream] if args.stream else list(run.streams)
    labels_of = {name: class_rows(run, run.streams[name], args.n, ids) for name in streams}
    if ids is not None and any(v is None for v in labels_of.values()):
        raise UsageError("--labels: this run's samples have no classes (unconditional); drop --labels")
    gallery = Gallery(out, title=f"{cfg.run.name}: samples at step {run.state.step}")
    files = []
    for name in streams:
        files += write_samples(
            run,
            out,
            stem=f"step_{run.state.step:07d}",
            labels=labels_of[name],
            n=args.n,
            seed=args.seed,
            gallery=gallery,
            step=run.state.step,
            cfg_scale=args.cfg,
            streams=[name],
        )
    for f in files:
        print(f.path)
    print(out / "samples.html")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from selfflow.registry.compose import build_run, default_registries
    from selfflow.registry.config import MetricSpec
    from selfflow.registry.evaluate import check_metrics, default_metrics, evaluate, write_report
    from selfflow.registry.run import run_dir_of

    _at_least("--samples", args.samples, 1, "samples drawn for the metrics", "500")
    _sampling_args(args)
    _check_device(args.device)
    specs = []
    for m in args.metric:  # NAME or NAME@MODALITY
        name, at, modality = m.partition("@")
        if not name or (at and not modality):
            raise UsageError(f"--metric {m!r}: expected NAME or NAME@MODALITY, e.g. --metric fd@image")
        specs.append(MetricSpec(name=name, modality=modality or None))
    if args.real and args.reconstructions:
        raise UsageError("--real and --reconstructions exclude each other: run selfflow eval once for each")
    checkpoint, cfg, _ = _checkpoint_config(args)
    specs = specs or list(cfg.eval.metrics)
    media_only = args.real or args.reconstructions
    check_metrics(default_registries(), cfg, specs, real_data=media_only)  # every name, before anything is sampled
    out = _output_place(args.out, run_dir_of(checkpoint), "eval")
    run = build_run(cfg, device=args.device, resume=checkpoint, read_only=True)
    report = evaluate(
        run,
        metrics=specs or default_metrics(run, real_data=media_only),
        num_samples=args.samples,
        seed=args.seed,
        cfg_scale=args.cfg,
        real_data=args.real,
        reconstructions=args.reconstructions,
    )
    path = write_report(report, out)
    print(report.markdown())
    print(path)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from selfflow.registry.compose import default_registries

    for e in default_registries().runs:
        print(f"{e.name:32s} {e.doc}  [{e.plugin}]")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from selfflow.registry.compose import load_registries

    _, host = load_registries()
    for info in host.plugins.values():
        kind = "built-in" if info.builtin else "external"
        print(f"{info.name} {info.version} ({kind}, {info.module})")
        for k, names in info.registered.items():
            print(f"    {k}: {', '.join(names)}")
        if info.error:
            print(f"    ERROR: {info.error}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    import attrs

    from selfflow.registry.compose import default_registries
    from selfflow.registry.registry import RegistryError

    regs = default_registries()
    if args.action == "list" or not args.name:
        for kind, reg in regs.kinds().items():
            print(f"{kind}: {', '.join(reg.names())}")
        return 0
    found = [(kind, reg.get(args.name)) for kind, reg in regs.kinds().items() if args.name in reg]
    if not found:
        everything = [n for reg in regs.kinds().values() for n in reg.names()]
        from selfflow.registry.registry import closest

        near = closest(args.name, everything)
        hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
        raise RegistryError(f"no registry entry named {args.name!r}{hint}")
    for kind, e in found:
        print(f"{e.name} ({kind[:-1]}, from plugin {e.plugin!r})")
        if e.doc:
            print(f"  {e.doc}")
        if e.config_cls is not None:
            print("  options:")
            for f in attrs.fields(e.config_cls):
                default = (
                    "required"
                    if f.default is attrs.NOTHING
                    else (
                        f"default {f.default.factory()!r}"
                        if isinstance(f.default, attrs.Factory)
                        else f"default {f.default!r}"
                    )
                )
                print(f"    {f.name}: {getattr(f.type, '__name__', f.type)} ({default})")
        if kind == "runs":
            print()
            print(e.factory(None))
    return 0


BENCHMARKS = {  # selfflow bench NAME -> the module whose main(argv) runs it (benchmarks/)
    "step": "selfflow.benchmarks.step",
    "methods": "selfflow.benchmarks.methods",
    "image-methods": "selfflow.benchmarks.image_methods",
    "contention": "selfflow.benchmarks.contention",
    "video-data": "selfflow.benchmarks.video_data",
    "video-vae-speed": "selfflow.benchmarks.video_vae_speed",
}


def cmd_encode(args: argparse.Namespace) -> int:
    from selfflow.plugins.shards import shard_bytes
    from selfflow.registry.compose import resolve_config
    from selfflow.registry.encode import encode_run

    if args.per_shard < 1:
        raise UsageError(f"--per-shard must be at least 1, got {args.per_shard}")
    cfg = resolve_config(args.run, overrides=args.overrides)
    done = encode_run(
        cfg,
        args.out,
        stream=args.stream,
        per_shard=args.per_shard,
        overwrite=args.overwrite,
        progress=cfg.output.progress,
    )
    for e in done:
        idx = e.index
        print(
            f"{e.name}: {idx['items']} items in {len(idx['shards'])} shards ({shard_bytes(idx) / 2**20:.1f} MiB) "
            f"at {e.directory}"
        )
    print("train on them with: " + " ".join(e.setting for e in done))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """``selfflow checkpoint export CKPT --out DIR``: a sharded checkpoint (``run.parallel =
    'fsdp'``, any number of ranks) as a format-1 one (whole tensors, one file per part) for
    sampling, evaluation or a DDP/one-process resume on one machine; docs/distributed.md."""
    from selfflow.core.checkpoint import export_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; export writes a new directory")
    final = export_checkpoint(args.checkpoint, out)
    print(f"exported {final} (sample with: selfflow sample {out})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    if args.suite not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.suite!r}; choose one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[args.suite]).main(args.args)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "encode": cmd_encode,
    "runs": cmd_runs,
    "plugins": cmd_plugins,
    "registry": cmd_registry,
    "bench": cmd_bench,
    "checkpoint": cmd_checkpoint,
}

HINTS = {
    "UsageError": "selfflow COMMAND --help lists the arguments",
    "RunDirectoryError": "one directory holds one run: --resume continues it, a new --out starts or branches another",
    "ConfigError": "check the key in your TOML or --set (selfflow registry show RUN prints a run's config)",
    "RegistryError": "selfflow registry list shows every registered name",
    "CheckpointError": "point at a run directory or a checkpoints/step_* directory written by selfflow",
    "PluginLoadError": "unset SELFFLOW_STRICT_PLUGINS, or block the plugin with SELFFLOW_BLOCK_PLUGINS=NAME",
    "NonFiniteLossError": "resume from the last checkpoint whose losses were sane with a lower learning rate: "
    "selfflow train --resume CHECKPOINT --set optimizer.lr=... (an older checkpoint than the run's last also needs "
    "--overwrite, or --out NEW to branch)",
    "ShardError": "selfflow encode RUN --out DIR writes a shard directory; --overwrite replaces another encoding",
    "ImportError": "install the extra named above",
    "ModuleNotFoundError": "install the extra named above",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        rc = COMMANDS[args.command](args)
        if rc == 0 and "torch.distributed" in sys.modules:  # under torchrun: all ranks done before any leaves
            from selfflow.core import distributed

            distributed.shutdown()
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        name = type(err).__name__
        print(f"error: {err}", file=sys.stderr)
        hint = getattr(err, "hint", None) or HINTS.get(name, "run again with --debug for the traceback")
        print(f"hint: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
