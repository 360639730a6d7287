"""Contention benchmark: milliseconds per training step when other processes share the CPU.

It times the same real training step (``core.train_step.train_step``, Self-Flow, the default
recipe's model: width 128, depth 6, 16 tokens of 16 channels, batch 64) in fresh processes,
side by side in one run, for

- ``one-thread``: 1 thread;
- ``old-default``: torch's thread count with libgomp's default wait (a waiting thread spins
  300,000 times before it sleeps): torch imported before selfflow, which is what every run
  did before ``core.runtime.shorten_spin_wait``;
- ``passive``: torch's thread count with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep);
- ``short-spin``: torch's thread count with selfflow's spin count (``GOMP_SPINCOUNT=10000``):
  what the new default does when the other work starts after the run chose its threads;
- ``new-default``: what ``run.threads = 0`` does now: the short spin, and the thread count
  lowered to the cores other processes leave free (``registry.setup.setup_process``),

each on a quiet machine and next to one competing busy process (a Python ``while True``
loop), in rounds that rotate the cells' order; medians over rounds, and each ratio as the
median of its per-round ratios (cells of one round ran within seconds of each other, so a
drifting background load cancels). Each cell also reports the CPU time per step (spinning
shows as CPU time above the 1-thread cell's) and how many cores other processes used while
it ran (the busy loop counts: ~1.0 when nothing else runs). libgomp's own report
(``OMP_DISPLAY_ENV``) gives the spin count in effect.

    python -m selfflow.benchmarks.contention            # 4 rounds of 10 timed steps per cell
    python -m selfflow.benchmarks.contention --quick    # seconds: checks the pipeline
    selfflow bench contention [--steps ... --repeats ...]

Writes ``contention.json`` and ``contention.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

# the environment a cell starts from: these are what the cells vary or what would override them
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TOLERANCE = 1.05  # "not slower": within the run-to-run spread of this machine


@attrs.frozen(kw_only=True)
class Variant:
    name: str
    label: str
    torch_first: bool = False  # import torch before selfflow: libgomp keeps its default (300,000 spins)
    threads: int = 0  # 0: torch's count
    auto: bool = False  # let setup_process choose the thread count (run.threads = 0)
    env: dict[str, str] = attrs.field(factory=dict)  # a user's own settings


VARIANTS = (
    Variant(name="one-thread", label="1 thread", threads=1),
    Variant(name="old-default", label="torch's threads, 300,000 spins (old default)", torch_first=True),
    Variant(name="passive", label="torch's threads, passive wait", env={"OMP_WAIT_POLICY": "PASSIVE"}),
    Variant(name="short-spin", label="torch's threads, 10,000 spins"),
    Variant(name="new-default", label="new default: 10,000 spins, threads from the load", auto=True),
)
LOADS = ("quiet", "busy")


@attrs.frozen(kw_only=True)
class Shape:
    width: int = 128
    depth: int = 6
    heads: int = 4
    tokens: int = 16
    channels: int = 16
    batch: int = 64


# ----------------------------------------------------------------------------- one cell, in its own process


def child() -> None:
    """Run one cell (``sys.argv[1]``: JSON of shape, threads, steps) and print one JSON line."""
    spec = json.loads(sys.argv[1])
    import torch

    from selfflow.benchmarks.step import METHODS, Setup, build_state, make_batch, model_config
    from selfflow.core.model import FlowTransformer
    from selfflow.core.runtime import cpu_mark, other_cores, tune_cpu_allocator
    from selfflow.core.train_step import train_step

    if spec["auto"]:
        from selfflow.registry.config import RunSection
        from selfflow.registry.setup import setup_process

        setup_process(RunSection(device="cpu"))
    elif spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tune_cpu_allocator()
    setup = Setup(**spec["shape"], classes=10)
    method = next(m for m in METHODS if m.name == "selfflow")
    torch.manual_seed(0)
    state = build_state(setup, method, FlowTransformer(model_config(setup, "factored")).state_dict(), "fused")
    batch, gen = make_batch(setup), torch.Generator().manual_seed(0)
    for _ in range(spec["warmup"]):
        train_step(state, batch, generator=gen)
    start, times = cpu_mark(), []
    began = time.perf_counter()
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        train_step(state, batch, generator=gen)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - began > spec["max_seconds"] and len(times) >= 2:
            break  # a cell that crawls reports the steps it finished
    end = cpu_mark()
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "times": times,
                "cpu_per_step": None if start is None or end is None else (end.own - start.own) / len(times),
                "other_cores": None if start is None or end is None else other_cores(start, end),
            }
        )
    )


def run_cell(variant: Variant, shape: Shape, *, steps: int, warmup: int, max_seconds: float) -> dict[str, Any]:
    """One fresh process for ``variant``; its result plus libgomp's spin count."""
    spec = {
        "shape": attrs.asdict(shape),
        "threads": variant.threads,
        "auto": variant.auto,
        "steps": steps,
        "warmup": warmup,
        "max_seconds": max_seconds,
    }
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(variant.env)
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints the policy it really uses, on stderr
    code = ("import torch; " if variant.torch_first else "") + (
        "from selfflow.benchmarks.contention import child; child()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=max_seconds * 4 + 120,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"contention cell {variant.name!r} failed (exit {proc.returncode}): {tail[0]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    out["spin_count"] = int(spin.group(1)) if spin else None
    out["median"] = statistics.median(out["times"])
    return out


class Busy:
    """One competing busy process (``while True: pass``), killed on exit."""

    def __enter__(self) -> Busy:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # running before the cell starts (and measures the load)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def run(
    variants: Sequence[Variant],
    loads: Sequence[str],
    shape: Shape,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    max_seconds: float,
    progress: bool = True,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``cells[load][variant]``: one result per round; rounds rotate the variants' order."""
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {ld: {v.name: [] for v in variants} for ld in loads}
    for r in range(repeats):
        order = list(variants[r % len(variants) :]) + list(variants[: r % len(variants)])
        for load in loads:
            with Busy() if load == "busy" else _Quiet():
                for v in order:
                    res = run_cell(v, shape, steps=steps, warmup=warmup, max_seconds=max_seconds)
                    cells[load][v.name].append(res)
                    if progress:
                        other = _cores(res["other_cores"])
                        print(
                            f"round {r + 1}/{repeats} {load:5s} {v.name:12s} {1000 * res['median']:8.1f} ms/step "
                            f"({res['threads']} threads, spin {res['spin_count']}, other processes {other})",
                            file=sys.stderr,
                            flush=True,
                        )
    return cells


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} cores"


class _Quiet:
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------- report


def summarise(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for load, by_variant in cells.items():
        out[load] = {}
        for name, rounds in by_variant.items():
            ms = [1000 * r["median"] for r in rounds]
            cpu = [1000 * r["cpu_per_step"] for r in rounds if r["cpu_per_step"] is not None]
            other = [r["other_cores"] for r in rounds if r["other_cores"] is not None]
            out[load][name] = {
                "ms": statistics.median(ms),
                "ms_min": min(ms),
                "ms_max": max(ms),
                "cpu_ms": statistics.median(cpu) if cpu else None,
                "other_cores": statistics.median(other) if other else None,
                "threads": sorted({r["threads"] for r in rounds}),
                "spin_count": sorted({r["spin_count"] for r in rounds if r["spin_count"] is not None}),
            }
    return out


# (load, numerator, denominator, what it shows, checked against TOLERANCE)
RATIOS = (
    ("busy", "old-default", "one-thread", "the problem", False),
    ("busy", "new-default", "one-thread", "the acceptance check", True),
    ("busy", "old-default", "new-default", "the speed-up", False),
    ("busy", "short-spin", "one-thread", "other work that starts after the run chose its threads", False),
    ("busy", "passive", "one-thread", "the same, with a passive wait", False),
    ("busy", "old-default", "short-spin", "what the shorter spin alone saves", False),
    ("quiet", "new-default", "old-default", "the acceptance check", True),
    ("quiet", "short-spin", "old-default", "the shorter spin alone", False),
    ("quiet", "passive", "old-default", "why the wait is not passive", False),
    ("quiet", "one-thread", "new-default", "what the second thread is worth", False),
)


def ratios(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each of ``RATIOS`` present in ``cells``: the median (and range) of per-round ratios."""
    out = []
    for load, a, b, what, check in RATIOS:
        if a not in cells.get(load, {}) or b not in cells.get(load, {}):
            continue
        per_round = [x["median"] / y["median"] for x, y in zip(cells[load][a], cells[load][b], strict=True)]
        out.append(
            {
                "load": load,
                "a": a,
                "b": b,
                "what": what,
                "check": check,
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
            }
        )
    return out


def verdicts(found: list[dict[str, Any]]) -> list[str]:
    """One line per ratio; the acceptance checks say pass or FAIL (``TOLERANCE``)."""
    lines = []
    for r in found:
        verdict = (
            (f" (must be <= {TOLERANCE}) — " + ("pass" if r["median"] <= TOLERANCE else "FAIL")) if r["check"] else ""
        )
        lines.append(
            f"- {r['load']}: {r['a']} / {r['b']} = **{r['median']:.2f}x** (rounds {r['min']:.2f}–{r['max']:.2f}), "
            f"{r['what']}{verdict}"
        )
    return lines


def format_table(summary: dict[str, Any], variants: Sequence[Variant]) -> str:
    loads = list(summary)
    head = "| cell | " + " | ".join(f"{ld}: ms/step (min–max) | {ld}: CPU ms/step | {ld}: threads" for ld in loads)
    head += " | spin count |"
    sep = "|---|" + "---:|---:|---:|" * len(loads) + "---:|"
    rows = [head, sep]
    for v in variants:
        cols = []
        spins: set[int] = set()
        for ld in loads:
            c = summary[ld].get(v.name)
            if c is None:
                cols += ["–", "–", "–"]
                continue
            spins.update(c["spin_count"])
            cols.append(f"{c['ms']:.0f} ({c['ms_min']:.0f}–{c['ms_max']:.0f})")
            cols.append("–" if c["cpu_ms"] is None else f"{c['cpu_ms']:.0f}")
            cols.append("/".join(str(t) for t in c["threads"]))
        rows.append(f"| {v.label} | " + " | ".join(cols) + f" | {'/'.join(f'{s:,}' for s in sorted(spins)) or '?'} |")
    return "\n".join(rows)


def results_markdown(report: dict[str, Any], variants: Sequence[Variant]) -> str:
    summary, env = report["summary"], report["environment"]
    other = ", ".join(
        f"{ld}: {statistics.median(o):.2f}"
        for ld in summary
        if (o := [c["other_cores"] for c in summary[ld].values() if c["other_cores"] is not None])
    )
    s = report["shape"]
    return "\n".join(
        [
            "# Contention benchmark",
            "",
            "Produced by (from the repository root):",
            "",
            "```bash",
            report["command"],
            "```",
            "",
            f"{report['date']} · {env['cpu']} · {env['cpus']} usable CPUs · torch {env['torch']} · "
            f"load average before the run {env['loadavg_before']} · cores used by other processes while the cells "
            f"ran (median; the busy loop counts) — {other}",
            "",
            f"One Self-Flow training step (`core.train_step.train_step`): width {s['width']}, depth {s['depth']}, "
            f"{s['heads']} heads, {s['tokens']} tokens of {s['channels']} channels, batch {s['batch']}; each cell a "
            f"fresh process, warm-up steps: {report['warmup']}, then timed steps: {report['steps']} (median); "
            f"rounds: {report['repeats']} in rotating order (median, min–max over rounds); busy = one competing "
            "`python -c 'while True: pass'`. Ratios: the median of per-round ratios.",
            "",
            format_table(summary, variants),
            "",
            *verdicts(report["ratios"]),
            "",
            "CPU ms/step above the 1-thread cell's is threads spinning while they wait. The spin count is "
            "libgomp's own report (`OMP_DISPLAY_ENV=VERBOSE`): 300,000 is its default, 0 is "
            "`OMP_WAIT_POLICY=PASSIVE`, 10,000 selfflow's. Raw rounds: `contention.json`.",
            "",
        ]
    )


def _cpu_name() -> str:
    from selfflow.benchmarks.step import cpu_name

    return cpu_name()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="selfflow bench contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 step, 1 round, quiet only: checks the pipeline")
    p.add_argument("--steps", type=int, help="timed steps per cell (default 10; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per cell first (default 2; quick 1)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 4; quick 1)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop a cell's timed steps after this (default 30)")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], help="subset of cells")
    p.add_argument("--loads", nargs="+", choices=LOADS, help="quiet, busy or both (default both; quick quiet)")
    p.add_argument("--out", help="directory for contention.json and .md (default benchmarks/results)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    shape = Shape(width=32, depth=2, heads=2, tokens=4, channels=4, batch=4) if args.quick else Shape()
    steps = args.steps if args.steps is not None else (1 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 4)
    if steps < 1 or warmup < 0 or repeats < 1 or args.max_seconds <= 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0, --max-seconds > 0")
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    loads = [ld for ld in LOADS if ld in (args.loads or (["quiet"] if args.quick else LOADS))]
    loadavg = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"

    cells = run(
        variants,
        loads,
        shape,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        max_seconds=args.max_seconds,
        progress=not args.no_progress,
    )
    import torch

    from selfflow.core.runtime import usable_cpus

    report = {
        "command": "python -m selfflow.benchmarks.contention" + ("" if not argv else " " + shlex.join(argv)),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "shape": attrs.asdict(shape),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "environment": {
            "cpu": _cpu_name(),
            "cpus": len(usable_cpus()),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": loadavg,
        },
        "variants": [attrs.asdict(v) for v in variants],
        "summary": summarise(cells),
        "ratios": ratios(cells),
        "cells": cells,
    }
    md = results_markdown(report, variants)
    print()
    print(md)
    out_dir = Path(args.out or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "contention.json").write_text(json.dumps(report, indent=1))
    (out_dir / "contention.md").write_text(md)
    print(f"wrote {out_dir / 'contention.json'}, {out_dir / 'contention.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
