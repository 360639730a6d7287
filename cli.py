"""The ``selfflow`` command (also ``python -m selfflow``).

    selfflow train [RUN | --config FILE] [--set key=value ...] [--resume DIR]
    selfflow sample CHECKPOINT [--steps N --cfg S --sampler NAME --n N --labels 0,1,2]
    selfflow runs list
    selfflow plugins list
    selfflow registry show NAME
    selfflow eval CHECKPOINT [--metric NAME ... --samples N --cfg S --sampler NAME --steps N --real]
    selfflow bench step|image-methods [...]

Errors print one line and a hint; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    pass


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
    t.add_argument("--resume", help="continue from a run directory or checkpoint")
    t.add_argument("--out", help="run directory (default: from run.output_dir)")
    t.add_argument("--device", help="torch device (default: run.device)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint's EMA model")
    s.add_argument("checkpoint", help="a run directory or a checkpoint directory")
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
        help="score real held-out items instead of samples (the metrics' ceiling; writes eval/eval_real_data.*)",
    )

    r = sub.add_parser("runs", help="registered runs")
    r.add_argument("action", choices=["list"])

    pl = sub.add_parser("plugins", help="loaded plugins")
    pl.add_argument("action", choices=["list"])

    rg = sub.add_parser("registry", help="registry entries")
    rg.add_argument("action", choices=["show", "list"])
    rg.add_argument("name", nargs="?")

    b = sub.add_parser("bench", help="benchmarks (see benchmarks/)")
    b.add_argument("suite", choices=["step", "image-methods"], help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help)")
    return p


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from selfflow.registry.compose import build_run, recorded_config, resolve_config, write_summary

    if args.resume and not (args.run or args.config):
        cfg = recorded_config(args.resume, args.overrides)  # the run's own config, with any new overrides
    else:
        cfg = resolve_config(args.run, config_file=args.config, overrides=args.overrides)
    run = build_run(cfg, device=args.device, resume=args.resume, out_dir=args.out)
    print(f"run directory: {run.out_dir}", file=sys.stderr)
    run.train()
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = write_summary(run, {"peak_rss_mb": round(peak_mb, 1)})
    print(f"done: {run.state.step} steps in {run.wall_time:.1f} s, peak memory {peak_mb:.0f} MB -> {summary.parent}")
    for name in ("samples.png", "loss.png", "metrics.jsonl", "config.toml"):
        if (run.out_dir / name).exists():
            print(f"  {run.out_dir / name}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from selfflow.plugins.gallery import Gallery
    from selfflow.registry.sampling import class_rows, write_samples

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    run, cfg = _run_from_checkpoint(args.checkpoint, args.sampler, args.steps)
    streams = [args.stream] if args.stream else list(run.streams)
    unknown = [s for s in streams if s not in run.streams]
    if unknown:
        raise UsageError(f"--stream {unknown[0]!r}: the run's streams are {list(run.streams)}")
    ids = [int(x) for x in args.labels.split(",")] if args.labels else None
    out = Path(args.out) if args.out else run.out_dir / "samples-cli"
    gallery = Gallery(out, title=f"{cfg.run.name}: samples at step {run.state.step}")
    files = []
    for name in streams:
        labels = class_rows(run, run.streams[name], args.n, ids)
        if ids is not None and labels is None:
            raise UsageError("--labels: this run's samples have no classes (unconditional)")
        files += write_samples(
            run,
            out,
            stem=f"step_{run.state.step:07d}",
            labels=labels,
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


def _run_from_checkpoint(path: str, sampler: str | None, steps: int | None):
    from selfflow.core.checkpoint import resolve
    from selfflow.registry.compose import build_run, recorded_config

    ckpt = resolve(path)
    overrides = ["output.progress=false"]
    if sampler:
        overrides.append(f'sampler.name="{sampler}"')
    if steps:
        overrides.append(f"sampler.options.steps={steps}")
    cfg = recorded_config(ckpt, overrides)
    return build_run(cfg, resume=ckpt, record=False), cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from selfflow.registry.config import MetricSpec
    from selfflow.registry.evaluate import default_metrics, evaluate, write_report

    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    run, cfg = _run_from_checkpoint(args.checkpoint, args.sampler, args.steps)
    if args.metric:  # NAME or NAME@MODALITY
        specs = [MetricSpec(name=m.split("@")[0], modality=m.split("@")[1] if "@" in m else None) for m in args.metric]
    elif cfg.eval.metrics:
        specs = list(cfg.eval.metrics)
    else:
        specs = default_metrics(run, real_data=args.real)
    report = evaluate(
        run, metrics=specs, num_samples=args.samples, seed=args.seed, cfg_scale=args.cfg, real_data=args.real
    )
    path = write_report(report, run.out_dir / "eval", stem="eval_real_data" if args.real else None)
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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "step":
        from selfflow.benchmarks.step import main as step_main

        return step_main(args.args)
    if args.suite == "image-methods":
        from selfflow.benchmarks.image_methods import main as methods_main

        return methods_main(args.args)
    raise UsageError(f"unknown benchmark {args.suite!r}")


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "runs": cmd_runs,
    "plugins": cmd_plugins,
    "registry": cmd_registry,
    "bench": cmd_bench,
}

HINTS = {
    "ConfigError": "check the key in your TOML or --set (selfflow registry show RUN prints a run's config)",
    "RegistryError": "selfflow registry list shows every registered name",
    "CheckpointError": "point at a run directory or a checkpoints/step_* directory written by selfflow",
    "PluginLoadError": "unset SELFFLOW_STRICT_PLUGINS, or block the plugin with SELFFLOW_BLOCK_PLUGINS=NAME",
    "NonFiniteLossError": "resume from the last checkpoint with a lower optimizer.lr "
    "(--resume RUN --set optimizer.lr=...)",
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
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        name = type(err).__name__
        print(f"error: {err}", file=sys.stderr)
        hint = HINTS.get(name, "run again with --debug for the traceback")
        print(f"hint: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
