"""Modality-agnostic sampling from a composed run's EMA model, and writing what it drew.

``sample(run, ...)`` returns decoded media for every generated segment of a stream, keyed
by modality; ``condition={modality: media}`` gives segments clean (text -> image, or any
modality the model knows). ``write_samples`` sends each generated modality through its
writer and records the files in the run's ``samples.html``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from selfflow.core.types import Role, TokenBatch
from selfflow.plugins.gallery import Gallery, GalleryEntry
from selfflow.plugins.protocols import MediaFile
from selfflow.plugins.samplers import Guidance, model_velocity

if TYPE_CHECKING:
    from selfflow.registry.run import Run, Stream


def _items(stream: Stream, labels: torch.Tensor | None, count: int) -> torch.Tensor:
    """Item indices: the j-th item of each requested class (cycling), else the first ``count``."""
    n = len(stream.encoded)
    if labels is None or stream.encoded.labels is None:
        return torch.arange(count) % n
    out, seen = [], {}
    for y in labels.tolist():
        pool = (stream.encoded.labels == y).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError(f"no item of class {y} in stream {stream.name!r}'s training data")
        j = seen.get(y, 0)
        seen[y] = j + 1
        out.append(int(pool[j % len(pool)]))
    return torch.tensor(out, dtype=torch.long)


def template(
    run: Run, stream: Stream, labels: torch.Tensor | None, count: int, condition: Mapping[str, Any] | None = None
) -> TokenBatch:
    """The batch a sampler starts from: real items of ``stream`` (of the requested classes)
    give every generated segment its shape and every condition segment its clean tokens;
    ``condition`` replaces or adds segments encoded from the given media (role condition)."""
    batch = stream.encoded.take(_items(stream, labels, count))
    roles = {m: Role.CONDITION for m in stream.condition}
    segments = {seg.modality: seg for seg in batch.segments}
    for modality, media in (condition or {}).items():
        if modality not in run.tokenizers:
            raise ValueError(f"condition on {modality!r}: the model knows {sorted(run.tokenizers)}")
        with torch.no_grad():
            seg = run.tokenizers[modality].encode(media.to(run.device) if isinstance(media, torch.Tensor) else media)
        if seg.batch_size != count:
            raise ValueError(f"condition {modality!r} has {seg.batch_size} items for {count} samples")
        segments[modality] = seg.to("cpu")
        roles[modality] = Role.CONDITION
    segs = [attrs.evolve(seg, role=roles.get(m, Role.GENERATE)) for m, seg in segments.items()]
    if not any(s.generated for s in segs):
        raise ValueError(f"every segment of stream {stream.name!r} is given as a condition: nothing to sample")
    out = TokenBatch(segments=segs, labels=batch.labels).to(run.device)
    if not run.teacher.cfg.num_classes:
        return out.with_labels(None)
    if labels is not None:
        return out.with_labels(labels.to(run.device))
    return out.with_labels(torch.full((count,), run.teacher.null_label, device=run.device))


@torch.no_grad()
def sample(
    run: Run,
    labels: torch.Tensor | None = None,
    *,
    n: int | None = None,
    stream: str | None = None,
    condition: Mapping[str, Any] | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    sampler: Any = None,
) -> dict[str, Any]:
    """Decoded media from the EMA model, ``{modality: media}`` for every generated segment:
    for ``labels`` (class ids), or ``n`` samples. ``stream``: whose shapes and conditions
    (default: the first stream)."""
    st = run.streams[stream] if stream is not None else next(iter(run.streams.values()))
    if labels is None and run.teacher.cfg.num_classes > 0 and n is None:
        raise ValueError("give labels (class-conditional model) or n")
    count = len(labels) if labels is not None else int(n or 0)
    if count < 1:
        raise ValueError(f"the number of samples must be at least 1, got {count}")
    start = template(run, st, labels, count, condition)
    s = run.config.sampler
    guidance = Guidance(scale=s.cfg_scale if cfg_scale is None else cfg_scale, low=s.cfg_low, high=s.cfg_high)
    gen = torch.Generator().manual_seed(seed)
    out = (sampler or run.sampler)(model_velocity(run.teacher, guidance), start, generator=gen)
    return {seg.modality: run.tokenizers[seg.modality].decode(seg) for seg in out.segments if seg.generated}


def protocol(
    run: Run, *, cfg_scale: float | None = None, seed: int | None = None, sampler_name: str | None = None
) -> dict[str, Any]:
    """How samples were drawn, written next to them."""
    s = run.config.sampler
    out: dict[str, Any] = {
        "weights": "EMA (teacher)",
        "sampler": sampler_name or s.name,
        "sampler_options": dict(s.options) or "defaults",
        "cfg_scale": s.cfg_scale if cfg_scale is None else cfg_scale,
        "guidance_interval": [s.cfg_low, s.cfg_high],
    }
    if seed is not None:
        out["seed"] = seed
    return out


def class_rows(run: Run, stream: Stream, per_class: int, ids: Sequence[int] | None = None) -> torch.Tensor | None:
    """Labels for a grid with one row per class: the model's classes when it is
    class-conditional; the data's classes when a stream conditions on real items' media
    (e.g. text) and is labelled (at most 10 rows); else ``None`` (unconditional)."""
    if run.teacher.cfg.num_classes > 0:
        k = run.teacher.cfg.num_classes
    elif stream.condition and stream.encoded.labels is not None:
        k = min(len(run.class_names) or 10, 10)
    else:
        return None
    chosen = list(range(k)) if ids is None else list(ids)
    bad = [i for i in chosen if not 0 <= i < k]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{k - 1}")
    return torch.tensor(chosen).repeat_interleave(per_class)


def describe_conditions(
    run: Run, stream: Stream, labels: torch.Tensor | None, count: int
) -> dict[str, tuple[str, ...]]:
    """Per condition modality of ``stream``, a per-sample description: decoded text, or
    ``"<modality> of item i"`` for media."""
    if not stream.condition:
        return {}
    batch = stream.encoded.take(_items(stream, labels, count))
    out: dict[str, tuple[str, ...]] = {}
    for seg in batch.segments:
        if seg.modality in stream.condition:
            decoded = run.tokenizers[seg.modality].decode(seg)
            if isinstance(decoded, list) and all(isinstance(x, str) for x in decoded):
                out[seg.modality] = tuple(decoded)
            else:
                out[seg.modality] = tuple(f"{seg.modality} of a real item" for _ in range(count))
    return out


def write_samples(
    run: Run,
    directory: Path,
    *,
    stem: str,
    labels: torch.Tensor | None,
    n: int | None,
    seed: int,
    gallery: Gallery | None,
    step: int | None,
    cfg_scale: float | None = None,
    sampler: Any = None,
    sampler_name: str | None = None,
    streams: Sequence[str] | None = None,
) -> list[MediaFile]:
    """Sample every stream (or ``streams``) and write each generated modality through its
    writer into ``directory``; files are ``stem`` plus the stream's and modality's names
    when a run has several. Each stream's labels are ``labels``, else ``class_rows``."""
    files: list[MediaFile] = []
    names = list(streams or run.streams)
    for name in names:
        st = run.streams[name]
        ys = labels if labels is not None else class_rows(run, st, run.config.output.samples_per_class)
        count = len(ys) if ys is not None else int(n or run.config.output.num_samples)
        media = sample(run, ys, n=count, stream=name, seed=seed, cfg_scale=cfg_scale, sampler=sampler)
        row_labels = (
            None if ys is None else tuple(str(run.class_names[int(y)]) if run.class_names else str(int(y)) for y in ys)
        )
        conditions = describe_conditions(run, st, ys, count)
        proto = protocol(run, cfg_scale=cfg_scale, seed=seed, sampler_name=sampler_name)
        for modality, batch in media.items():
            part = (
                stem
                + (f"-{name.replace('/', '-')}" if len(run.streams) > 1 else "")
                + (f"-{modality}" if len(media) > 1 else "")
            )
            title = (
                f"{run.config.run.name} step {run.state.step} {modality} (EMA, {proto['sampler']}, "
                f"cfg {proto['cfg_scale']})"
            )
            written = run.writers[modality].write(batch, directory, stem=part, labels=row_labels, title=title)
            files.extend(written)
            if gallery is not None:
                gallery.add(
                    GalleryEntry(
                        step=step,
                        stream=name,
                        modality=modality,
                        files=tuple(written),
                        labels=row_labels or tuple("" for _ in range(count)),
                        conditions=conditions,
                        protocol=proto,
                        title=title,
                    )
                )
    return files
