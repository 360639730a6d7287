"""Step benchmark: milliseconds per training step, and how much of the machine they use.

In one run, on the same batch and the same initial weights, it times one full training step
(``core.train_step.train_step``: objective forward, backward, clip, AdamW, EMA update) of

- vanilla flow matching (``FlowMatching``),
- Self-Flow (``SelfFlow``: dual timesteps, student + truncated no-grad teacher, projector)
  with the factored adaLN (embed and modulate per noise level, gather per token),
- the same Self-Flow step with ``modulation="dense"``: the authors' per-token adaLN, a
  ``(B N, D) x (D, 6 D)`` matmul per block,

interleaved (warm-up steps first, then rounds that alternate the methods; the median is
reported), together with this machine's fp32 matmul peak (large square ``torch.mm``),
measured in the same rounds. Utilisation is the FLOPs the step really performs divided by
its time and by that peak; ``step_flops`` counts them (see its docstring).

    python -m selfflow.benchmarks.step            # width 384, depth 12, 6 heads, 64 tokens x 16 ch, batch 32
    python -m selfflow.benchmarks.step --quick    # seconds: checks the pipeline
    selfflow bench step [--width ... --depth ... --repeats ...]
    python -m selfflow.benchmarks.step --device cuda --precision fp32 bf16 --compile off on   # GPU columns

On CUDA every row also reports its peak allocated memory (``torch.cuda.max_memory_allocated``
over its timed steps) and utilisation is MFU: matmul FLOPs per second over the device's dense
bf16 peak from its spec sheet (``BF16_PEAK_TFLOPS``, or ``--peak-tflops``); the measured bf16
``torch.mm`` rate is reported beside it. On CPU the peak stays the measured fp32 matmul rate
and the memory column is empty: the process's peak RSS covers every method at once, so it is
shown once, in the environment line.

Writes ``step.json`` and ``step.png`` into ``--out`` (default ``benchmarks/results/step``)
and, for full runs, ``benchmarks/RESULTS.md`` (the table and the command that made it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.core.acceleration import compile_blocks, resolve_precision
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import FlowMatching, SelfFlow
from selfflow.core.runtime import tune_cpu_allocator
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import TrainState, train_step
from selfflow.core.types import Segment, TokenBatch, grid_positions

TARGETS = {"factored_speedup": 1.4, "selfflow_over_vanilla": 1.3, "utilisation": 0.80}

# dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s, matched
# against torch.cuda.get_device_name() (first match wins: more specific names first)
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
)
NOTES_MARKER = "<!-- notes below this line are kept when the benchmark rewrites this file -->"


@attrs.frozen(kw_only=True)
class Method:
    name: str
    label: str
    modulation: str
    objective: str  # "flow-matching" | "self-flow"


METHODS = (
    Method(name="vanilla", label="flow matching (factored adaLN)", modulation="factored", objective="flow-matching"),
    Method(name="selfflow", label="Self-Flow (factored adaLN)", modulation="factored", objective="self-flow"),
    Method(name="selfflow-dense", label="Self-Flow (dense per-token adaLN)", modulation="dense", objective="self-flow"),
)


@attrs.frozen(kw_only=True)
class Variant:
    """How a method's step runs: ``precision`` ``fp32`` or ``bf16`` (autocast, fp32 master
    weights; ``core.acceleration``) and ``compile`` (each block, ``torch.compile``)."""

    precision: str = "fp32"
    compile: bool = False
    backend: str = "inductor"  # torch.compile's backend when compiling

    @property
    def tag(self) -> str:
        return f"{self.precision}{'+compile' if self.compile else ''}"


@attrs.frozen(kw_only=True)
class Setup:
    width: int = 384
    depth: int = 12
    heads: int = 6
    tokens: int = 64
    channels: int = 16
    batch: int = 32
    classes: int = 10
    mlp_ratio: float = 4.0
    seed: int = 0


# ----------------------------------------------------------------------------- FLOPs


def _linear(rows: int, fan_in: int, fan_out: int, *, grad_input: bool, grad_weight: bool, backward: bool) -> int:
    fwd = 2 * rows * fan_in * fan_out
    if not backward:
        return fwd
    return fwd * (1 + int(grad_input) + int(grad_weight))


def step_flops(
    setup: Setup, method: Method, *, student_layer: int, teacher_layer: int, student_levels: int, teacher_levels: int
) -> dict[str, int]:
    """Matmul FLOPs one training step performs, by part (multiply-add = 2 FLOPs).

    Forward: every linear layer, adaLN on ``B K`` rows (K noise levels per sample, factored)
    or on ``B N`` rows (dense, per token), attention ``QK^T`` and ``PV``. Backward where a
    gradient flows: ``dW`` for every trained linear, ``dX`` except where the input needs no
    gradient (token input projection, the timestep MLP's sinusoidal input), attention twice
    its forward (the CPU flash kernel's recomputation of ``QK^T`` is not counted), and the
    factored gather's level reductions (``(B, K, N) x (B, N, D)`` per modulation part). The
    teacher runs blocks 1..k forward only. Elementwise work (norms, GELU, RoPE, the
    optimiser, the EMA) is not counted: utilisation is matmul FLOPs per second.
    ``tests/core/test_model.py`` checks the non-attention part against what
    ``torch.utils.flop_counter`` sees the step execute.
    """
    b, n, c, d = setup.batch, setup.tokens, setup.channels, setup.width
    hidden = int(d * setup.mlp_ratio)
    t = b * n

    def model(levels: int, blocks: int, *, backward: bool, final: bool) -> dict[str, int]:
        rows = t if method.modulation == "dense" else b * levels
        reduce = method.modulation == "factored" and levels > 1 and backward
        lin = lambda r, i, o, gi=True: _linear(r, i, o, grad_input=gi, grad_weight=True, backward=backward)  # noqa: E731
        attention = 4 * b * n * n * d * (3 if backward else 1)
        parts = {
            "input projection": lin(t, c, d, gi=False),
            "timestep embedding": lin(rows, 256, d, gi=False) + lin(rows, d, d),
            "adaLN": blocks * lin(rows, d, 6 * d) + (lin(rows, d, 2 * d) if final else 0),
            "level gather (backward)": (blocks * 6 + (2 if final else 0)) * 2 * b * levels * n * d if reduce else 0,
            "qkv + proj": blocks * (lin(t, d, 3 * d) + lin(t, d, d)),
            "attention": blocks * attention,
            "mlp": blocks * (lin(t, d, hidden) + lin(t, hidden, d)),
            "output projection": lin(t, d, c) if final else 0,
        }
        return parts

    student = model(student_levels, setup.depth, backward=True, final=True)
    out = {f"student {k}": v for k, v in student.items()}
    if method.objective == "self-flow":
        out["projector"] = _linear(t, d, 2 * d, grad_input=True, grad_weight=True, backward=True) + _linear(
            t, 2 * d, d, grad_input=True, grad_weight=True, backward=True
        )
        teacher = model(teacher_levels, teacher_layer, backward=False, final=False)
        out.update({f"teacher {k}": v for k, v in teacher.items()})
    return {k: v for k, v in out.items() if v}


# ----------------------------------------------------------------------------- environment


class OtherLoad:
    """CPU time used by *other* processes (in cores) between ``mark()`` calls, from
    ``/proc/stat`` minus this process's own CPU time; ``None`` where that is unavailable.
    Shared machines make timings noisy: the report says how busy the machine was."""

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.samples: list[float] = []
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / self._hz
        own = sum(os.times()[:2])
        return busy, own, time.perf_counter()

    def mark(self) -> None:
        now = self._read()
        if now is not None and self._last is not None and now[2] > self._last[2]:
            other = (now[0] - self._last[0]) - (now[1] - self._last[1])
            self.samples.append(max(0.0, other / (now[2] - self._last[2])))
        self._last = now

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(n: int, repeats: int = 3) -> float:
    """fp32 GFLOP/s of an ``n x n @ n x n`` ``torch.mm`` (best of ``repeats``, after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------- the runs


def make_batch(setup: Setup, device: torch.device | str = "cpu") -> TokenBatch:
    g = torch.Generator().manual_seed(setup.seed)
    h = math.isqrt(setup.tokens)
    while setup.tokens % h:
        h -= 1
    positions = grid_positions(1, h, setup.tokens // h, batch=setup.batch).contiguous()
    tokens = torch.randn(setup.batch, setup.tokens, setup.channels, generator=g)
    labels = torch.randint(0, setup.classes, (setup.batch,), generator=g) if setup.classes else None
    batch = TokenBatch(segments=(Segment(modality="image", tokens=tokens, positions=positions),), labels=labels)
    return batch.to(device)


def model_config(setup: Setup, modulation: str) -> ModelConfig:
    return ModelConfig(
        channels={"image": setup.channels},
        width=setup.width,
        depth=setup.depth,
        heads=setup.heads,
        mlp_ratio=setup.mlp_ratio,
        num_classes=setup.classes,
        modulation=modulation,
    )


def build_state(
    setup: Setup,
    method: Method,
    weights: dict[str, torch.Tensor],
    optimizer: str,
    *,
    variant: Variant = Variant(),
    device: torch.device | str = "cpu",
) -> TrainState:
    model = FlowTransformer(model_config(setup, method.modulation))
    model.load_state_dict(weights)  # every method starts from the same weights
    model.to(device)
    if method.objective == "self-flow":
        torch.manual_seed(setup.seed + 1)
        objective: torch.nn.Module = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    else:
        objective = FlowMatching()
    objective.to(device)
    teacher = EMATeacher(model, EMAConfig(decay=0.999))
    if variant.compile:  # as a run compiles: each block, student and teacher apart
        compile_blocks(model, backend=variant.backend)
        compile_blocks(teacher.model, backend=variant.backend)
    params = list(model.parameters()) + list(objective.parameters())
    kwargs = {"fused": True} if optimizer == "fused" else {"foreach": optimizer == "foreach"}
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kwargs)
    return TrainState(
        model=model,
        teacher=teacher,
        objective=objective,
        optimizer=opt,
        precision=resolve_precision(variant.precision, device),
    )


def levels_used(state: TrainState, batch: TokenBatch, seed: int) -> tuple[int, int]:
    """adaLN rows per sample that student and teacher compute: the ``K`` of the model's
    ``conditioning`` (which collapses a level table whose levels coincide for every token,
    e.g. the teacher's ``min(t, s)``); dense models compute per token, counted elsewhere."""
    from selfflow.core.types import Timesteps

    obj, model = state.objective, state.module
    g = torch.Generator().manual_seed(seed)
    if isinstance(obj, SelfFlow):
        steps = obj.scheduler(batch, generator=g)
        student, teacher = steps.student, steps.teacher
    else:
        student = teacher = Timesteps.uniform(torch.rand(batch.batch_size, generator=g).to(batch.device), batch)
    if model.cfg.modulation == "dense":
        return student.num_levels, teacher.num_levels
    with torch.no_grad():
        return model.conditioning(student, batch.labels)[0].shape[1], model.conditioning(teacher, batch.labels)[
            0
        ].shape[1]


@attrs.frozen(kw_only=True)
class Result:
    method: Method
    variant: Variant
    times: list[float]
    flops: dict[str, int]
    student_layer: int | None
    teacher_layer: int | None
    last_loss: float
    peak_memory: int | None = None  # bytes allocated at most during a timed step (CUDA), None on CPU

    @property
    def key(self) -> str:
        return f"{self.method.name} {self.variant.tag}"

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate_on(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of an ``n x n`` ``torch.mm`` in ``dtype`` on ``device`` (best of ``repeats``)."""
    if device.type == "cpu" and dtype == torch.float32:
        return matmul_rate(n, repeats)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.mm(a, b)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def spec_peak(device: torch.device) -> tuple[str, float] | None:
    """(device name, dense bf16 peak in GFLOP/s) from ``BF16_PEAK_TFLOPS``, if the device is listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return name, 1e3 * tflops
    return None


def run(
    setup: Setup,
    methods: Sequence[Method],
    *,
    warmup: int,
    repeats: int,
    peak_sizes: Sequence[int],
    optimizer: str,
    progress: bool = True,
    variants: Sequence[Variant] = (Variant(),),
    device: torch.device | str = "cpu",
    peak_gflops: float | None = None,
) -> dict[str, Any]:
    """Time every (method, variant) case interleaved; returns results, peaks and load.

    ``peak_gflops``: the utilisation denominator (default: on CUDA the spec-sheet bf16 peak,
    else the best measured bf16 ``torch.mm``; on CPU the best measured fp32 ``torch.mm``)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    batch = make_batch(setup, device)
    torch.manual_seed(setup.seed)
    weights = FlowTransformer(model_config(setup, "factored")).state_dict()
    cases = [(m, v) for m in methods for v in variants]
    key = lambda m, v: f"{m.name} {v.tag}"  # noqa: E731
    states = {key(m, v): build_state(setup, m, weights, optimizer, variant=v, device=device) for m, v in cases}
    gens = {k: torch.Generator().manual_seed(setup.seed) for k in states}
    times: dict[str, list[float]] = {k: [] for k in states}
    memory: dict[str, int] = dict.fromkeys(states, 0)
    losses: dict[str, float] = {}
    peaks: list[tuple[int, float]] = []
    load = OtherLoad()
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def one(k: str, *, timed: bool) -> float:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        res = train_step(states[k], batch, generator=gens[k])
        _sync(device)
        dt = time.perf_counter() - t0
        losses[k] = float(res.losses.total.detach())
        if timed and device.type == "cuda":
            memory[k] = max(memory[k], torch.cuda.max_memory_allocated(device))
        return dt

    bar = tqdm(total=(warmup + repeats) * len(cases), desc="step benchmark", unit="step", disable=not progress)
    for m, v in cases:
        for _ in range(warmup):  # compiled variants compile here
            bar.set_postfix_str(f"warm-up {key(m, v)}")
            one(key(m, v), timed=False)
            bar.update()
    load.mark()
    for r in range(repeats):
        for n in peak_sizes:
            peaks.append((n, matmul_rate_on(device, n, peak_dtype)))
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # alternate who goes first
        for m, v in order:
            bar.set_postfix_str(f"round {r + 1}/{repeats} {key(m, v)}")
            times[key(m, v)].append(one(key(m, v), timed=True))
            bar.update()
        load.mark()
    bar.close()

    results = []
    for m, v in cases:
        k = key(m, v)
        st = states[k]
        obj = st.objective
        student_layer = getattr(obj, "student_layer", None)
        teacher_layer = getattr(obj, "teacher_layer", None)
        s_levels, t_levels = levels_used(st, batch, setup.seed)
        flops = step_flops(
            setup,
            m,
            student_layer=student_layer or 0,
            teacher_layer=teacher_layer or 0,
            student_levels=s_levels,
            teacher_levels=t_levels,
        )
        results.append(
            Result(
                method=m,
                variant=v,
                times=times[k],
                flops=flops,
                student_layer=student_layer,
                teacher_layer=teacher_layer,
                last_loss=losses[k],
                peak_memory=memory[k] if device.type == "cuda" else None,
            )
        )
    measured = max(rate for _, rate in peaks)
    spec = spec_peak(device)
    if peak_gflops is not None:
        peak, source = peak_gflops, "given (--peak-tflops)"
    elif spec is not None:
        peak, source = spec[1], f"{spec[0]} spec-sheet dense bf16"
    else:
        peak, source = measured, f"measured {'bf16' if device.type == 'cuda' else 'fp32'} torch.mm"
    return {
        "results": results,
        "peaks": peaks,
        "peak": peak,
        "peak_source": source,
        "measured_peak": measured,
        "other_load": load.mean,
        "parameters": next(iter(states.values())).module.num_parameters(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "peak_rss_mib": _peak_rss_mib(),
    }


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (all methods together), MiB; ``None`` off Linux."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


# ----------------------------------------------------------------------------- reporting


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    """Rows per (method, variant); the method ratios and targets are read on the first variant
    (the baseline, fp32 eager unless not measured); each other variant gets its speed-up over it."""
    base = out["results"][0].variant
    by = {r.method.name: r for r in out["results"] if r.variant == base}
    peak = out["peak"]
    rows = []
    for r in out["results"]:
        rate = r.total_flops / r.median / 1e9
        rows.append(
            {
                "method": r.method.name,
                "label": r.method.label,
                "variant": r.variant.tag,
                "precision": r.variant.precision,
                "compile": r.variant.compile,
                "peak_memory_mib": None if r.peak_memory is None else r.peak_memory / 2**20,
                "ms_median": 1e3 * r.median,
                "ms_min": 1e3 * min(r.times),
                "ms_max": 1e3 * max(r.times),
                "gflop": r.total_flops / 1e9,
                "gflops_per_s": rate,
                "utilisation": rate / peak,
                "times_ms": [1e3 * t for t in r.times],
                "flops": r.flops,
                "student_layer": r.student_layer,
                "teacher_layer": r.teacher_layer,
                "last_loss": r.last_loss,
            }
        )
    ratios: dict[str, float] = {}
    for r in out["results"]:
        if r.variant != base and r.method.name in by:
            ratios[f"{r.method.name} {r.variant.tag} speedup"] = by[r.method.name].median / r.median
    if "selfflow" in by and "selfflow-dense" in by:
        ratios["factored_speedup"] = by["selfflow-dense"].median / by["selfflow"].median
    if "selfflow" in by and "vanilla" in by:
        ratios["selfflow_over_vanilla"] = by["selfflow"].median / by["vanilla"].median
    util = {row["method"]: row["utilisation"] for row in rows if row["variant"] == base.tag}
    checks = {}
    if "factored_speedup" in ratios:
        checks["factored_speedup"] = ratios["factored_speedup"] >= TARGETS["factored_speedup"]
    if "selfflow_over_vanilla" in ratios:
        checks["selfflow_over_vanilla"] = ratios["selfflow_over_vanilla"] <= TARGETS["selfflow_over_vanilla"]
    for name in ("vanilla", "selfflow"):
        if name in util:
            checks[f"utilisation {name}"] = util[name] >= TARGETS["utilisation"]
    return {"rows": rows, "ratios": ratios, "checks": checks}


def format_table(summary: dict[str, Any], peak: float) -> str:
    """The table; ``peak memory``: peak allocated during a timed step (CUDA), "—" on CPU (see the
    environment line for the process's peak RSS)."""
    head = (
        f"| method | precision | compile | ms/step (median) | min – max | GFLOP/step | GFLOP/s | "
        f"of peak ({peak:.0f} GFLOP/s) | peak memory |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        mem = "—" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f} MiB"
        fmt = ".1f" if row["ms_median"] < 10 else ".0f"
        lines.append(
            f"| {row['label']} | {row['precision']} | {'on' if row['compile'] else 'off'} | "
            f"{row['ms_median']:{fmt}} | {row['ms_min']:{fmt}} – {row['ms_max']:{fmt}} | "
            f"{row['gflop']:.1f} | {row['gflops_per_s']:.1f} | {100 * row['utilisation']:.1f}% | {mem} |"
        )
    return "\n".join(lines)


def format_ratios(summary: dict[str, Any]) -> str:
    r, c = summary["ratios"], summary["checks"]
    mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = []
    if "factored_speedup" in r:
        lines.append(
            f"- factored vs dense adaLN (Self-Flow step): **{r['factored_speedup']:.2f}x** faster "
            f"(target >= {TARGETS['factored_speedup']}x: {mark(c['factored_speedup'])})"
        )
    if "selfflow_over_vanilla" in r:
        lines.append(
            f"- Self-Flow / vanilla step time: **{r['selfflow_over_vanilla']:.2f}x** "
            f"(target <= {TARGETS['selfflow_over_vanilla']}x: {mark(c['selfflow_over_vanilla'])})"
        )
    for name, value in r.items():
        if name.endswith(" speedup"):
            lines.append(f"- {name.removesuffix(' speedup')} over the baseline variant: **{value:.2f}x**")
    for row in summary["rows"]:
        key = f"utilisation {row['method']}"
        if key in c and row is next(x for x in summary["rows"] if x["method"] == row["method"]):
            lines.append(
                f"- matmul utilisation, {row['label']}: **{100 * row['utilisation']:.1f}%** of the measured "
                f"peak (target >= {100 * TARGETS['utilisation']:.0f}%: {mark(c[key])})"
            )
    return "\n".join(lines)


def plot(summary: dict[str, Any], peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [
        row["label"].replace(" (", "\n(") + ("" if row["variant"] == "fp32" else f"\n{row['variant']}") for row in rows
    ]
    palette = {"vanilla": "#888888", "selfflow": "#1f77b4", "selfflow-dense": "#d62728"}
    colors = [palette.get(row["method"], "#2ca02c") for row in rows]  # one colour per method, any variant
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(11, 1.9 * len(rows)), 4))
    bars = ax1.bar(labels, [row["ms_median"] for row in rows], color=colors)
    ax1.errorbar(
        range(len(rows)),
        [row["ms_median"] for row in rows],
        yerr=[[row["ms_median"] - row["ms_min"] for row in rows], [row["ms_max"] - row["ms_median"] for row in rows]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax1.bar_label(bars, fmt="%.0f ms")
    ax1.set_ylabel("ms per training step (median, min-max)")
    ax1.set_title("step time")
    bars = ax2.bar(
        labels,
        [row["gflops_per_s"] for row in rows],
        color=colors,
    )
    ax2.bar_label(bars, labels=[f"{100 * row['utilisation']:.0f}%" for row in rows])
    ax2.axhline(peak, color="black", linestyle="--", label=f"peak {peak:.0f} GFLOP/s")
    ax2.axhline(TARGETS["utilisation"] * peak, color="gray", linestyle=":", label="80% of peak")
    ax2.set_ylabel("matmul GFLOP/s achieved")
    ax2.set_title("matmul utilisation")
    ax2.legend(loc="lower right", fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(report: dict[str, Any], summary: dict[str, Any], notes: str) -> str:
    s, env = report["setup"], report["environment"]
    load = env["other_load_cores"]
    load_txt = "not measured" if load is None else f"{load:.2f} cores on average"
    lines = [
        "# Step benchmark",
        "",
        "Produced by (from the repository root):",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"{report['date']} · {env['device']} · {env['cpu']} · {env['threads']} threads · torch {env['torch']} · "
        f"{', '.join(report['variants'])} · peak RSS {env['peak_rss_mib'] or 0:.0f} MiB · "
        f"optimizer AdamW ({report['optimizer']}) · allocator tuning {'on' if env['allocator_tuned'] else 'off'} · "
        f"other processes during the timed rounds: {load_txt}",
        "",
        f"Config: width {s['width']}, depth {s['depth']}, {s['heads']} heads, {s['tokens']} tokens of {s['channels']} "
        f"channels, batch {s['batch']}, {s['classes']} classes ({report['parameters'] / 1e6:.1f}M parameters); "
        f"{report['warmup']} warm-up steps per method, then {report['repeats']} interleaved rounds; "
        f"Self-Flow student layer l = {report['layers']['student']}, teacher layer k = {report['layers']['teacher']}.",
        "",
        format_table(summary, report["peak_gflops"]),
        "",
        format_ratios(summary),
        "",
        f"Peak: {report['peak_source']}, {report['peak_gflops']:.0f} GFLOP/s; best `torch.mm` rate over square "
        f"sizes {sorted({n for n, _ in report['peaks']})} measured in every round "
        f"({', '.join(f'{n}: {g:.0f}' for n, g in report['peaks'])} GFLOP/s).",
        "",
        "A step is `core.train_step.train_step`: objective forward (Self-Flow: student, then the EMA teacher "
        "without grad, stopped at block k), backward, gradient clipping, AdamW, EMA update. GFLOP/step counts "
        "the matmuls the step performs (`benchmarks/step.py: step_flops`): forward linears and attention, "
        "`dW` and `dX` where gradients flow, the teacher forward only, adaLN on B·K level rows (factored) "
        "or B·N token rows (dense). Raw samples: `benchmarks/results/step/step.json`; chart: `step.png`.",
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + ("\n" + notes.strip("\n") + "\n" if notes.strip() else "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="selfflow bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config and few steps: checks the pipeline in seconds")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--tokens", type=int, help="tokens per sample (laid out on a 2-D grid)")
    p.add_argument("--channels", type=int, help="channels per token")
    p.add_argument("--batch", type=int)
    p.add_argument("--classes", type=int, help="class labels (0: unconditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, help="untimed steps per method first (default 2; quick 1)")
    p.add_argument("--repeats", type=int, help="timed interleaved rounds (default 7; quick 2)")
    p.add_argument("--peak-sizes", type=int, nargs="+", help="square matmul sizes for the peak (default 2048 4096)")
    p.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], help="subset of methods")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        help="one row per precision (bf16: autocast, fp32 master weights); default fp32 on CPU, fp32 bf16 on CUDA",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        choices=["off", "on"],
        help="one row per setting (on: torch.compile of each block); default off on CPU, off on on CUDA",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile on")
    p.add_argument("--peak-tflops", type=float, help="the utilisation denominator (default: the device's bf16 peak)")
    p.add_argument(
        "--optimizer",
        choices=["fused", "foreach", "for-loop"],
        default="fused",
        help="AdamW implementation (default fused: one kernel per tensor)",
    )
    p.add_argument(
        "--no-allocator-tuning", action="store_true", help="leave glibc malloc as it is (see tune_cpu_allocator)"
    )
    p.add_argument("--out", help="directory for step.json and step.png (default benchmarks/results/step)")
    p.add_argument(
        "--results-md",
        help="where to write the markdown report (default benchmarks/RESULTS.md; quick runs write none unless given)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    base = Setup(width=64, depth=2, heads=2, tokens=16, channels=4, batch=4, classes=10) if args.quick else Setup()
    setup = attrs.evolve(
        base,
        **{
            k: v
            for k, v in {
                "width": args.width,
                "depth": args.depth,
                "heads": args.heads,
                "tokens": args.tokens,
                "channels": args.channels,
                "batch": args.batch,
                "classes": args.classes,
                "seed": args.seed,
            }.items()
            if v is not None
        },
    )
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    peak_sizes = args.peak_sizes or ([256] if args.quick else [2048, 4096])
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    if repeats < 1 or warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine (or torch build) has no CUDA device")
    cuda = device.type == "cuda"
    precisions = args.precision or (["fp32", "bf16"] if cuda else ["fp32"])
    compiles = args.compile or (["off", "on"] if cuda else ["off"])
    variants = [
        Variant(precision=pr, compile=c == "on", backend=args.compile_backend) for pr in precisions for c in compiles
    ]
    if any(v.compile for v in variants) and warmup < 1:
        p.error("--compile on needs --warmup >= 1 (the first step compiles)")
    tuned = False if args.no_allocator_tuning else tune_cpu_allocator()

    out = run(
        setup,
        methods,
        warmup=warmup,
        repeats=repeats,
        peak_sizes=peak_sizes,
        optimizer=args.optimizer,
        progress=not args.no_progress,
        variants=variants,
        device=device,
        peak_gflops=None if args.peak_tflops is None else 1e3 * args.peak_tflops,
    )
    summary = summarise(out)
    command = "python -m selfflow.benchmarks.step" + ("" if not argv else " " + shlex.join(argv))
    sf = next((r for r in out["results"] if r.method.objective == "self-flow"), None)
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "setup": attrs.asdict(setup),
        "warmup": warmup,
        "repeats": repeats,
        "optimizer": args.optimizer,
        "variants": [v.tag for v in variants],
        "parameters": out["parameters"],
        "layers": {"student": sf.student_layer if sf else None, "teacher": sf.teacher_layer if sf else None},
        "environment": {
            "device": out["device"],
            "peak_rss_mib": out["peak_rss_mib"],
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "allocator_tuned": tuned,
            "other_load_cores": out["other_load"],
        },
        "peaks": out["peaks"],
        "peak_gflops": out["peak"],
        "peak_source": out["peak_source"],
        "measured_peak_gflops": out["measured_peak"],
        "targets": TARGETS,
        **summary,
    }

    print()
    print(format_table(summary, out["peak"]))
    print()
    print(format_ratios(summary))
    if out["other_load"] is not None and out["other_load"] > 0.1:
        print(
            f"\nwarning: other processes used {out['other_load']:.2f} cores during the timed rounds; "
            "timings on a shared machine are pessimistic"
        )

    out_dir = Path(args.out or "benchmarks/results/step")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step.json").write_text(json.dumps(report, indent=1, default=str))
    plot(summary, out["peak"], out_dir / "step.png")
    written = [out_dir / "step.json", out_dir / "step.png"]
    md_path = Path(args.results_md) if args.results_md else (None if args.quick else Path("benchmarks/RESULTS.md"))
    if md_path is not None:
        notes = ""
        if md_path.exists():
            old = md_path.read_text()
            notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else ""
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(results_markdown(report, summary, notes))
        written.append(md_path)
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
