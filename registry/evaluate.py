"""``selfflow eval``: sample from a run's EMA model and compute its metrics, writing the full
evaluation protocol (sampler, steps, guidance, samples, seeds, reference network) next to
every number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.plugins.batching import stack_media
from selfflow.registry.compose import Run
from selfflow.registry.config import MetricSpec


@attrs.frozen(kw_only=True)
class EvalReport:
    step: int
    results: dict[str, float]
    protocol: dict[str, Any]
    details: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "results": self.results, "protocol": self.protocol, "details": self.details}

    def markdown(self) -> str:
        lines = [f"# evaluation at step {self.step}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.results.items()]
        lines += ["", "Protocol:", ""]
        lines += [f"- {k}: {v}" for k, v in self.protocol.items()]
        for name, d in self.details.items():
            lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in d.items()))
        return "\n".join(lines) + "\n"


def balanced_labels(num_classes: int, n: int) -> torch.Tensor:
    """``n`` labels cycling through the classes (equal counts when ``n`` is a multiple)."""
    return torch.arange(n) % num_classes


def conditioning_classes(run: Run, modality: str) -> int:
    """How many classes evaluation balances its samples over: the model's classes when it is
    class-conditional; for a condition segment (e.g. text) on labelled data, the data's
    classes (sample ``i`` then gets the condition of a real item of class ``labels[i]``, so
    class accuracy and legibility know what each sample should show); else 0."""
    if run.teacher.cfg.num_classes:
        return run.teacher.cfg.num_classes
    mod = run.modalities[modality]
    if mod.condition is not None and mod.encoded.labels is not None and len(mod.encoded.labels):
        return int(mod.encoded.labels.max()) + 1
    return 0


def _real_media(dataset, n: int) -> Any:
    return stack_media([dataset[i].media for i in range(min(n, len(dataset)))])


def reference_for(run: Run, modality: str) -> Any:
    """The modality's reference feature network (``<modality>/reference``), trained on the
    run's training data, scored on its eval data, cached on disk."""
    mod = run.modalities[modality]
    name = f"{modality}/reference"
    if name not in run.registries.metrics:
        raise ValueError(f"no reference network registered for modality {modality!r} (expected a metric entry {name!r})")
    return run.registries.metrics.build(
        name, {}, dataset=mod.eval, train_dataset=mod.train, cache_dir=str(run.cache_dir),
        device=run.device, progress=run.config.output.progress,
    )


def evaluate(
    run: Run,
    *,
    metrics: list[MetricSpec] | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    cfg_scale: float | None = None,
    reference: Any = None,
    chunk: int = 250,
    real_data: bool = False,
) -> EvalReport:
    """Sample ``num_samples`` (class-balanced when the model is class-conditional) from the
    EMA model and run ``metrics`` (default: the run's ``[eval] metrics``).

    ``real_data``: score ``num_samples`` held-out real items in place of samples, with their
    own labels, and compare them with as many *training* items for FD/KID: the ceiling the
    samples are measured against (e.g. tesseract's legibility of real renders, the
    reference classifier's held-out accuracy, the FD between two real sets of this size)."""
    cfg = run.config
    specs = list(metrics if metrics is not None else cfg.eval.metrics)
    if not specs:
        raise ValueError("no metrics to compute: add [[eval.metrics]] tables (e.g. name = \"fd\") or pass --metric")
    n = num_samples or cfg.eval.num_samples
    seed = cfg.eval.seed if seed is None else seed
    modality = next(iter(run.modalities))
    mod = run.modalities[modality]
    k = conditioning_classes(run, modality)

    t0 = time.perf_counter()
    fakes, labels = [], None
    if real_data:
        n = min(n, len(mod.eval))
        items = [mod.eval[i] for i in range(n)]
        fakes.append(stack_media([it.media for it in items]))
        if k > 0:
            labels = torch.tensor([int(it.label) for it in items])
    elif k > 0:
        labels = balanced_labels(k, n)
        for i, start in enumerate(range(0, n, chunk)):
            fakes.append(run.sample(labels[start:start + chunk], seed=seed + i, cfg_scale=cfg_scale).cpu())
    else:
        for i, start in enumerate(range(0, n, chunk)):
            fakes.append(run.sample(None, n=min(chunk, n - start), seed=seed + i, cfg_scale=cfg_scale).cpu())
    fake = torch.cat(fakes)
    sample_time = time.perf_counter() - t0
    real = _real_media(mod.train if real_data else mod.eval, n)

    built: list[Any] = [reference]

    def reference_fn() -> Any:  # built on first use, once: only metrics that compare media need it
        if built[0] is None:
            built[0] = reference_for(run, modality)
        return built[0]

    results: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    for spec in specs:
        metric = run.registries.metrics.build(
            spec.name, spec.options, dataset=mod.eval, train_dataset=mod.train, tokenizer=mod.tokenizer,
            device=run.device, cache_dir=str(run.cache_dir), reference_fn=reference_fn,
        )
        if hasattr(metric, "update"):
            metric.update(real=real, fake=fake, labels=labels)
            out = metric.compute()
        elif real_data:
            raise ValueError(f"metric {spec.name!r} measures the model, not media: it has no real-data ceiling (drop it with --real)")
        else:  # needs the model itself (linear probe)
            out = metric(run.teacher, tokenizer=mod.tokenizer, train_dataset=mod.train, eval_dataset=mod.eval)
        for r in out:
            results[r.name] = float(r.value)
            details[r.name] = dict(r.details)

    s = cfg.sampler
    if real_data:
        protocol: dict[str, Any] = {
            "model": "none: real held-out items scored in place of samples (the metrics' ceiling)",
            "num_samples": n,
            "labels": "the items' own" if labels is not None else "none",
            "real_samples": f"{len(real)} training items (what FD/KID compare the held-out items with)",
        }
    else:
        protocol = {
            "model": "EMA (teacher) weights",
            "sampler": s.name,
            "sampler_options": dict(s.options) or "defaults",
            "cfg_scale": s.cfg_scale if cfg_scale is None else cfg_scale,
            "guidance_interval": [s.cfg_low, s.cfg_high],
            "num_samples": n,
            "labels": ("unconditional" if k == 0 else "balanced over classes" if run.teacher.cfg.num_classes
                       else f"balanced over the {k} classes, each sample conditioned on the text of a real item of its class"),
            "sample_seeds": f"{seed}..{seed + (n - 1) // chunk}",
            "real_samples": len(real),
            "sampling_seconds": round(sample_time, 1),
        }
    if built[0] is not None and hasattr(built[0], "describe"):
        protocol["reference_network"] = built[0].describe()
    return EvalReport(step=run.state.step, results=results, protocol=protocol, details=details)


def write_report(report: EvalReport, directory: str | Path, *, stem: str | None = None) -> Path:
    """``<directory>/<stem>.{json,md}``, by default ``eval_step_<step>``; returns the ``.md``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or f"eval_step_{report.step:07d}"
    (directory / f"{stem}.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    path = directory / f"{stem}.md"
    path.write_text(report.markdown())
    return path
