"""The method comparison, for any modality: vanilla flow matching, dual timesteps without the
representation loss, Self-Flow, and REPA-style alignment to the frozen reference network of
the modality, trained from one recipe at equal steps and seeds, evaluated at several
checkpoints, with and without guidance, beside the metrics' ceiling (real held-out items) and
the tokenizer's floor (held-out items through the tokenizer).

    selfflow bench methods --recipe video/moving-digits-selfflow              # the recipe's steps, seeds 0 1 2
    selfflow bench methods --recipe audio/spoken-digits-selfflow --steps 800 --eval-at 400 800
    selfflow bench methods --recipe image/mnist-selfflow --profile quick      # seconds: checks the pipeline
    selfflow bench methods --recipe my_recipe.toml --seeds 0 --set run.threads=1

The recipe fixes everything but the objective: each method overrides only ``objective.*``
(``METHODS``), so the mask ratio, tokenizer, model and sampler are the recipe's. The recipe
must generate one modality; the metrics are that modality's ``class-accuracy`` (when the
model is class-conditional), ``fd`` and ``kid`` in its reference network's feature space,
plus ``--metric`` extras (defaults per modality in ``EXTRA_METRICS``).

An invocation is resumable: finished runs are read back from ``--out``/runs.json and
skipped (an interrupted run is retrained from its start). Seeds can run in parallel as
separate invocations (``--seeds 1 --out DIR1``) and be merged with ``--aggregate``;
``--from`` re-evaluates earlier checkpoints under other settings without training.

Writes ``runs.json``, ``results.json``, ``results.md`` (mean ± std over seeds) and
``metrics.png`` into ``--out`` (default ``benchmarks/results/methods-<recipe>-<profile>/``).
``selfflow bench image-methods`` is this benchmark on its own MNIST recipe
(``benchmarks/image_methods.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

METHODS: dict[str, list[str]] = {
    "flow-matching": ['objective.name="flow-matching"'],
    "dual-timesteps": ['objective.name="self-flow"', "objective.representation=false"],
    "self-flow": ['objective.name="self-flow"'],
    "repa": ['objective.name="external-alignment"', "objective.gamma=0.5"],
}

# metrics each modality's comparison adds to class accuracy, FD and KID (names of registered metrics)
EXTRA_METRICS: dict[str, tuple[str, ...]] = {
    "video": ("video/temporal",),
    "audio": ("audio/sanity",),
}

# the columns of the tables and plots, in order (any other result is kept in results.json)
MAIN_KEYS = ("class_accuracy", "fd", "kid_mean")


@attrs.frozen(kw_only=True)
class Profile:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_at: tuple[int, ...]
    eval_samples: int
    overrides: tuple[str, ...] = ()
    probe: bool = True
    bounds: bool = True  # the ceiling (--real) and the tokenizer's floor (--reconstructions) per seed
    unguided: bool = True  # also evaluate the last checkpoint without guidance (cfg 1)


@attrs.frozen(kw_only=True)
class Suite:
    """What one comparison trains: ``base`` (a run's TOML text), its ``name`` (directory and
    table titles), the one-line description of its data, its profiles and extra metrics."""

    name: str
    base: str
    data: str
    profiles: dict[str, Profile]
    extra_metrics: tuple[str, ...] = ()
    source: str = "benchmark"


def recipe_suite(recipe: str, *, steps: int | None = None, eval_at: Sequence[int] | None = None) -> Suite:
    """A suite from a registered recipe name or a TOML file: profile ``default`` trains the
    recipe's steps (or ``steps``) and evaluates at thirds (or ``eval_at``); ``quick`` is a
    tiny model for 20 steps (checks the pipeline)."""
    from selfflow.registry.compose import default_registries
    from selfflow.registry.config import load_config

    path = Path(recipe)
    if recipe.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise SystemExit(f"--recipe {recipe}: no such file")
        text = path.read_text()
    else:
        text = default_registries().runs.build(recipe)
    cfg = load_config(text, source=f"recipe {recipe}")
    generated = cfg.generated()
    if len(generated) != 1:
        raise SystemExit(f"--recipe {recipe}: it generates {generated}; the comparison scores one generated modality")
    modality = generated[0]
    n = steps or cfg.run.steps
    at = tuple(eval_at) if eval_at else tuple(sorted({max(1, round(n * k / 3)) for k in (1, 2, 3)}))
    if at[-1] != n:
        raise SystemExit(f"--eval-at {list(at)}: the last evaluation must be at the last step ({n})")
    stream = cfg.streams[0]
    data = f"{stream.dataset} {stream.dataset_options or ''} through {cfg.modalities[modality].tokenizer}".strip()
    quick = Profile(
        methods=tuple(METHODS),
        seeds=(0,),
        steps=20,
        eval_at=(10, 20),
        eval_samples=40,
        overrides=("model.width=32", "model.depth=2", "model.heads=2", "run.batch_size=8"),
        probe=False,
    )
    return Suite(
        name=recipe.removesuffix(".toml").replace("/", "-"),
        base=text,
        data=data,
        profiles={
            "default": Profile(methods=tuple(METHODS), seeds=(0, 1, 2), steps=n, eval_at=at, eval_samples=200),
            "quick": quick,
        },
        extra_metrics=EXTRA_METRICS.get(modality, ()),
        source=f"recipe {recipe}",
    )


# ----------------------------------------------------------------------------- scoring


def metric_specs(run, suite: Suite, *, probe: bool, media_only: bool = False) -> list:
    from selfflow.registry.config import MetricSpec

    names = ["fd", "kid", *suite.extra_metrics]
    if run.teacher.cfg.num_classes:
        names.insert(0, "class-accuracy")
    if probe and not media_only:
        names.append("linear-probe")
    return [MetricSpec(name=n) for n in names]


def results_of(report) -> dict[str, float]:
    """The report's ``<modality>/<metric>`` results under their metric names (one modality is
    scored; its tables and committed results use the bare names)."""
    return {k.split("/", 1)[1]: v for k, v in report.results.items()}


def score(run, suite: Suite, profile: Profile, seed: int, *, probe: bool, **kw: Any):
    """One evaluation of ``run``'s EMA model (or, with ``real_data``/``reconstructions``, of
    real items): the same metrics and sample seeds for every method."""
    from selfflow.registry.evaluate import evaluate

    media_only = bool(kw.get("real_data") or kw.get("reconstructions"))
    specs = metric_specs(run, suite, probe=probe, media_only=media_only)
    return evaluate(run, metrics=specs, num_samples=profile.eval_samples, seed=10_000 + seed, **kw)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fmt(results: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in results.items())


def _extras(run, suite: Suite, profile: Profile, seed: int, record: dict[str, Any], *, label: str) -> None:
    """The unguided evaluation of the last checkpoint and, for the first method, the seed's
    ceiling and floor rows."""
    if profile.unguided and run.config.sampler.cfg_scale != 1.0:
        report = score(run, suite, profile, seed, probe=False, cfg_scale=1.0)
        record["unguided"] = results_of(report)
        _say(f"  {label} without guidance: {_fmt(record['unguided'])}")
    if profile.bounds and record["method"] == profile.methods[0]:
        record["bounds"] = {}
        for kind in ("real_data", "reconstructions"):
            report = score(run, suite, profile, seed, probe=False, **{kind: True})
            record["bounds"][kind] = results_of(report)
            _say(f"  seed {seed} {kind}: {_fmt(record['bounds'][kind])}")


def run_one(suite: Suite, method: str, seed: int, profile: Profile, out: Path, extra: list[str]) -> dict[str, Any]:
    from selfflow.registry.compose import build_run
    from selfflow.registry.config import load_config

    overrides = [
        "output.progress=false",
        *profile.overrides,
        *METHODS[method],
        f"run.seed={seed}",
        f"run.steps={profile.steps}",
        *extra,
    ]
    cfg = load_config(suite.base, overrides, source=f"{suite.source} (methods benchmark)")
    # a directory left by an interrupted invocation is retrained from the start
    run = build_run(cfg, out_dir=out / method / f"seed{seed}", overwrite=True)
    rows = []
    train_time = 0.0
    report = None
    for step in profile.eval_at:
        t0 = time.perf_counter()
        run.train(until=step)
        train_time += time.perf_counter() - t0
        report = score(run, suite, profile, seed, probe=profile.probe and step == profile.eval_at[-1])
        rows.append({"step": step, **results_of(report)})
        _say(f"  {method} seed {seed} step {step}: {_fmt(results_of(report))}")
    record: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "rows": rows,
        "ms_per_step": 1000 * train_time / profile.steps,
        "parameters": run.teacher.num_parameters(),
        "protocol": report.protocol if report else {},
    }
    _extras(run, suite, profile, seed, record, label=f"{method} seed {seed} step {profile.eval_at[-1]}")
    return record


def reeval_one(
    suite: Suite, method: str, seed: int, profile: Profile, sources: list[Path], out: Path, extra: list[str]
) -> dict[str, Any]:
    """Evaluate the checkpoints an earlier invocation wrote (``sources``: its ``--out``
    directories) at the profile's steps, with ``extra`` overrides (e.g. sampler settings)
    on top of the config each checkpoint recorded. Trains nothing; the run (data, tokenizer,
    model) is built once and each checkpoint loaded into it."""
    from selfflow.registry.compose import build_run, recorded_config

    def checkpoint(d: Path, step: int) -> Path:
        return d / method / f"seed{seed}" / "checkpoints" / f"step_{step:07d}"

    # the first directory holding every checkpoint this run needs (an interrupted run elsewhere may hold some)
    found = [d for d in sources if all(checkpoint(d, step).is_dir() for step in profile.eval_at)]
    if not found:
        raise SystemExit(
            f"--from: no directory among {', '.join(map(str, sources))} holds the checkpoints of "
            f"{method} seed {seed} at steps {list(profile.eval_at)}"
        )
    source = found[0]
    earlier = [r for r in json.loads((source / "runs.json").read_text()) if r["method"] == method and r["seed"] == seed]
    rows, report, run = [], None, None
    for step in profile.eval_at:
        ckpt = checkpoint(source, step)
        cfg = recorded_config(ckpt, ["output.progress=false", *extra])
        if run is None or cfg != run.config:  # checkpoints of one run record one config
            run = build_run(cfg, resume=ckpt, out_dir=out / method / f"seed{seed}", read_only=True)
        else:
            run.loop.resume(ckpt, read_only=True)
        report = score(run, suite, profile, seed, probe=False)
        rows.append({"step": step, **results_of(report)})
        _say(f"  {method} seed {seed} step {step} (from {ckpt}): {_fmt(results_of(report))}")
    return {
        "method": method,
        "seed": seed,
        "rows": rows,
        "ms_per_step": earlier[0]["ms_per_step"] if earlier else float("nan"),
        "parameters": run.teacher.num_parameters() if run else 0,
        "protocol": report.protocol if report else {},
        "source": str(source),
    }


# ----------------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = sorted({k for row in rows for k in row if k != "step"})
    return {k: _mean_std([row.get(k, float("nan")) for row in rows]) for k in keys}


def aggregate(runs: list[dict[str, Any]], profile: Profile) -> dict[str, Any]:
    table: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    unguided: dict[str, dict[str, tuple[float, float]]] = {}
    for method in profile.methods:
        mine = [r for r in runs if r["method"] == method]
        table[method] = {
            step: _table([next(x for x in r["rows"] if x["step"] == step) for r in mine]) for step in profile.eval_at
        }
        if any("unguided" in r for r in mine):
            unguided[method] = _table([r["unguided"] for r in mine if "unguided" in r])
    bounds = {
        kind: _table([r["bounds"][kind] for r in runs if kind in r.get("bounds", {})])
        for kind in ("real_data", "reconstructions")
        if any(kind in r.get("bounds", {}) for r in runs)
    }
    speed = {m: _mean_std([r["ms_per_step"] for r in runs if r["method"] == m]) for m in profile.methods}
    return {"table": table, "unguided": unguided, "bounds": bounds, "ms_per_step": speed}


def _cell(value: tuple[float, float] | None) -> str:
    mean, std = value if value is not None else (float("nan"), float("nan"))
    return "–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _keys(tables: list[dict[str, tuple[float, float]]]) -> list[str]:
    present = {k for t in tables for k in t}
    main = [k for k in (*MAIN_KEYS, "linear_probe") if k in present]
    # kid_std (the spread over KID's subsets) stays in results.json
    return main + sorted(present - set(main) - {"linear_probe", "kid_std"})


def markdown(agg: dict[str, Any], profile: Profile, suite: Suite, name: str, command: str, meta: dict) -> str:
    last = profile.eval_at[-1]
    keys = _keys([agg["table"][m][last] for m in profile.methods])
    base = agg["ms_per_step"].get("flow-matching", (float("nan"), 0))[0]
    lines = [
        f"### {suite.name} methods, profile `{name}`",
        "",
        f"Command: `{command}`",
        "",
        f"{meta['data']}; {len(profile.seeds)} seed(s) {list(profile.seeds)}; {profile.steps} steps; "
        f"{meta['parameters']:,} parameters; evaluation: {profile.eval_samples} samples "
        "from the EMA model, "
        f"{meta['sampler']}; reference network held-out accuracy {meta['reference_accuracy']}. "
        f"Mean ± std over seeds. Machine: {meta['machine']}.",
        "",
        "| method | step | " + " | ".join(keys) + " | ms/step (x vanilla) |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for m in profile.methods:
        ms = agg["ms_per_step"][m][0]
        for step in profile.eval_at:
            cells = [_cell(agg["table"][m][step].get(k)) for k in keys]
            speed = "" if step != last else f"{ms:.0f}" + ("" if math.isnan(base) else f" ({ms / base:.2f}x)")
            lines.append(f"| {m} | {step} | " + " | ".join(cells) + f" | {speed} |")
    if agg.get("unguided"):
        ukeys = _keys(list(agg["unguided"].values()))
        lines += [
            "",
            f"Without guidance (cfg 1), step {last}:",
            "",
            "| method | " + " | ".join(ukeys) + " |",
            "|---|" + "---|" * len(ukeys),
        ]
        for m, t in agg["unguided"].items():
            lines.append(f"| {m} | " + " | ".join(_cell(t.get(k)) for k in ukeys) + " |")
    if agg.get("bounds"):
        bkeys = _keys(list(agg["bounds"].values()))
        titles = {
            "real_data": "ceiling: real held-out items",
            "reconstructions": "tokenizer floor: held-out items through the tokenizer",
        }
        lines += [
            "",
            "Bounds (no model; the same metrics and sample counts):",
            "",
            "| row | " + " | ".join(bkeys) + " |",
            "|---|" + "---|" * len(bkeys),
        ]
        for kind, t in agg["bounds"].items():
            lines.append(f"| {titles[kind]} | " + " | ".join(_cell(t.get(k)) for k in bkeys) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], profile: Profile, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = profile.eval_at[-1]
    keys = [k for k in MAIN_KEYS if any(k in agg["table"][m][last] for m in profile.methods)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for m in profile.methods:
            pts = [(s, *agg["table"][m][s].get(k, (float("nan"), 0.0))) for s in profile.eval_at]
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=m
            )
        for kind, style in (("real_data", ":"), ("reconstructions", "--")):
            if k in agg.get("bounds", {}).get(kind, {}):
                ax.axhline(agg["bounds"][kind][k][0], color="gray", ls=style, lw=1, label=kind.replace("_", " "))
        ax.set_title(k + (" (higher is better)" if k == "class_accuracy" else " (lower is better)"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _load_runs(dirs: Sequence[str | Path], profile: Profile) -> list[dict[str, Any]]:
    runs = []
    for d in dirs:
        f = Path(d) / "runs.json"
        if f.is_file():
            wanted = (r for r in json.loads(f.read_text()) if r["method"] in profile.methods)
            runs += [r for r in wanted if r["seed"] in profile.seeds]
    return runs


def parser(prog: str, description: str, *, recipe: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    if recipe:
        p.add_argument("--recipe", required=True, help="a registered recipe (selfflow runs list) or a TOML file")
        p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
        p.add_argument("--eval-at", dest="eval_at", nargs="+", type=int, help="evaluation steps (default: thirds)")
        p.add_argument("--samples", type=int, help="evaluation samples (default: the profile's)")
        p.add_argument(
            "--metric", dest="metrics", action="append", help="extra metric (repeatable; default: the modality's)"
        )
    p.add_argument("--profile", default="default", help="default or quick (image-methods: also size)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="subset of methods")
    p.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    p.add_argument("--out", help="output directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        metavar="DIR",
        help="train nothing: re-evaluate the checkpoints earlier invocations wrote into these --out "
        "directories, with --set overrides (e.g. sampler.cfg_scale=1) on top of their recorded configs",
    )
    p.add_argument(
        "--aggregate",
        nargs="+",
        metavar="DIR",
        help="train nothing: merge the runs.json of earlier invocations (e.g. seeds run in parallel) into --out",
    )
    p.add_argument("--restart", action="store_true", help="ignore the finished runs already in --out/runs.json")
    return p


def run_suite(
    suite: Suite,
    args: argparse.Namespace,
    command: str,
    *,
    default_out: str,
    p: argparse.ArgumentParser,
    meta_data: Callable[[list[dict[str, Any]]], str] | None = None,
) -> int:
    if args.sources and args.aggregate:
        p.error("--from and --aggregate exclude each other: re-evaluate first, then merge the --out directories")
    if args.profile not in suite.profiles:
        p.error(f"--profile {args.profile!r}: choose one of {sorted(suite.profiles)}")
    profile = suite.profiles[args.profile]
    if args.methods:
        profile = attrs.evolve(profile, methods=tuple(args.methods))
    if args.seeds:
        profile = attrs.evolve(profile, seeds=tuple(args.seeds))
    if getattr(args, "samples", None):
        profile = attrs.evolve(profile, eval_samples=args.samples)
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if args.aggregate:
        runs = _load_runs(args.aggregate, profile)
        missing = {(m, s) for m in profile.methods for s in profile.seeds} - {(r["method"], r["seed"]) for r in runs}
        if missing:
            raise SystemExit(f"--aggregate: no runs for {sorted(missing)} in {args.aggregate}")
    elif not args.sources and not args.restart:
        runs = _load_runs([out], profile)  # resumable: finished runs are kept
        if runs:
            _say(f"resuming: {len(runs)} finished run(s) read from {out / 'runs.json'} (--restart ignores them)")
    done = {(r["method"], r["seed"]) for r in runs}
    jobs = [] if args.aggregate else [(s, m) for s in profile.seeds for m in profile.methods if (m, s) not in done]
    for seed, method in tqdm(jobs, desc=f"{suite.name} methods", unit="run", disable=not jobs):
        if args.sources:
            runs.append(reeval_one(suite, method, seed, profile, [Path(d) for d in args.sources], out, args.overrides))
        else:
            runs.append(run_one(suite, method, seed, profile, out, args.overrides))
        (out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    runs.sort(key=lambda r: (r["seed"], profile.methods.index(r["method"])))
    agg = aggregate(runs, profile)
    proto = runs[-1]["protocol"]
    meta = {
        "data": meta_data(runs) if meta_data else suite.data,
        "parameters": runs[-1]["parameters"],
        "sampler": f"{proto.get('sampler')} {proto.get('sampler_options')}, "
        f"CFG {proto.get('cfg_scale')} on t in {proto.get('guidance_interval')}",
        "reference_accuracy": ", ".join(  # one reference network per seed's data split
            f"{r['protocol'].get('reference_network', {}).get('reference_accuracy', float('nan')):.3f} "
            f"(seed {r['seed']})"
            for r in runs
            if r["method"] == profile.methods[0]
        ),
        "machine": (
            f"{platform.machine()}, torch {torch.__version__}, threads as in the merged invocations"
            if args.aggregate
            else f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        ),
        "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    md = markdown(agg, profile, suite, args.profile, command, meta)
    if args.sources:
        md += (
            f"\nRe-evaluated (nothing trained) from the checkpoints in {', '.join(args.sources)}; "
            "ms/step are those of the training runs.\n"
        )
    if not args.aggregate:
        md += f"\nWall time of this invocation: {meta['wall_minutes']} min.\n"
    else:
        meta.pop("wall_minutes")
        md += f"\nMerged from {', '.join(args.aggregate)}.\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(
        json.dumps(
            {"profile": attrs.asdict(profile), "meta": meta, "command": command, "aggregate": agg, "runs": runs},
            indent=1,
            default=str,
        )
    )
    plot(agg, profile, out / "metrics.png", title=f"{suite.name}: {profile.steps} steps, seeds {list(profile.seeds)}")
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'metrics.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser("selfflow bench methods", __doc__.split("\n\n")[0], recipe=True)
    args = p.parse_args(argv)
    suite = recipe_suite(args.recipe, steps=args.steps, eval_at=args.eval_at)
    if args.metrics is not None:
        suite = attrs.evolve(suite, extra_metrics=tuple(args.metrics))
    command = "selfflow bench methods " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_suite(suite, args, command, default_out=f"benchmarks/results/methods-{suite.name}-{args.profile}", p=p)


if __name__ == "__main__":
    raise SystemExit(main())
