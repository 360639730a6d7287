"""From datasets to ``TokenBatch``es: encode once, then draw deterministic, resumable batches.

A stream's dataset is encoded once with the (fitted, deterministic) tokenizers of its
modalities, in chunks, and its tokens are kept in memory (and cached on disk, keyed by the
dataset's fingerprint and each tokenizer's ``cache_key()``). Items may encode to different
token counts (variable-length media): segments are padded to the longest item with
``valid`` masks. Batches are slices of a seeded permutation per epoch; a source's position
is the number of samples drawn so far, which is all a checkpoint needs for an exact resume.
Under ``torchrun`` every rank walks the same global batches and keeps its own rows, and
every rank draws the same stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from selfflow.core.conditioning import ConditionRule
from selfflow.core.distributed import Shard, shard
from selfflow.core.types import Segment, TokenBatch
from selfflow.plugins.protocols import Dataset, Tokenizer

_CACHE_FORMAT = 1  # bump when the layout of a cached encoding changes: old entries are ignored


def stack_media(items: Sequence[Any]) -> Any:
    """A batch of one modality's media: a stacked tensor when every item is a tensor of one
    shape, else the list (text, or media of different sizes)."""
    if items and all(isinstance(m, Tensor) for m in items) and len({tuple(m.shape) for m in items}) == 1:
        return torch.stack(list(items))
    return list(items)


def media_of(dataset: Dataset, modality: str, indices: Sequence[int]) -> Any:
    """The ``modality`` media of ``dataset[i]`` for ``i`` in ``indices``, as a batch."""
    return stack_media([_medium(dataset[i].media, modality, dataset) for i in indices])


def _medium(media: Mapping[str, Any], modality: str, dataset: Any) -> Any:
    try:
        return media[modality]
    except KeyError:
        raise KeyError(
            f"dataset {type(dataset).__name__} items carry {sorted(media)}, not {modality!r}; "
            "a stream can only generate or condition on its dataset's modalities"
        ) from None


def pad_segments(parts: Sequence[Segment]) -> Segment:
    """Concatenate segments of one modality along the batch, padding each to the longest
    token count with zero tokens, zero positions and ``valid = False``."""
    n = max(p.num_tokens for p in parts)
    if all(p.num_tokens == n for p in parts):
        valid = None if all(p.valid is None for p in parts) else torch.cat([p.valid_mask() for p in parts])
        return attrs.evolve(
            parts[0],
            tokens=torch.cat([p.tokens for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
            valid=valid,
        )

    def pad(x: Tensor, value: float | bool) -> Tensor:
        extra = list(x.shape)
        extra[1] = n - x.shape[1]
        return torch.cat([x, torch.full(extra, value, dtype=x.dtype, device=x.device)], dim=1)

    return attrs.evolve(
        parts[0],
        tokens=torch.cat([pad(p.tokens, 0.0) for p in parts]),
        positions=torch.cat([pad(p.positions, 0) for p in parts]),
        valid=torch.cat([pad(p.valid_mask(), False) for p in parts]),
    )


@attrs.define
class EncodedData:
    """A stream's tokens: one segment per modality, in the stream's batch order, all with
    the default role (a ``ConditionRule`` sets roles per batch), and the labels."""

    segments: list[Segment]
    labels: Tensor | None

    def __len__(self) -> int:
        return self.segments[0].batch_size

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(s.modality for s in self.segments)

    def take(self, idx: Tensor) -> TokenBatch:
        segs = [
            attrs.evolve(
                s,
                tokens=s.tokens[idx],
                positions=s.positions[idx],
                valid=None if s.valid is None else s.valid[idx],
            )
            for s in self.segments
        ]
        return TokenBatch(segments=segs, labels=None if self.labels is None else self.labels[idx])

    # -- the on-disk cache (safetensors tensors + JSON meta, written atomically)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in self.segments:
            out[f"{s.modality}.tokens"] = s.tokens.contiguous()
            out[f"{s.modality}.positions"] = s.positions.contiguous()
            if s.valid is not None:
                out[f"{s.modality}.valid"] = s.valid.contiguous()
        if self.labels is not None:
            out["labels"] = self.labels.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], modalities: Sequence[str]) -> EncodedData:
        segs = [
            Segment(
                modality=m,
                tokens=tensors[f"{m}.tokens"],
                positions=tensors[f"{m}.positions"],
                valid=tensors.get(f"{m}.valid"),
            )
            for m in modalities
        ]
        return cls(segments=segs, labels=tensors.get("labels"))


def encoding_key(dataset: Dataset, tokenizers: Mapping[str, Tokenizer], *, labels: bool) -> str | None:
    """The cache key of ``dataset`` encoded by ``tokenizers`` (``None``: some tokenizer does
    not allow caching its encodings)."""
    from selfflow.core.files import content_key

    keys = {}
    for name, tok in tokenizers.items():
        key = tok.cache_key()
        if key is None:
            return None
        keys[name] = key
    return content_key("encoded", _CACHE_FORMAT, dataset.fingerprint(), keys, list(tokenizers), labels)


def encode_dataset(
    dataset: Dataset,
    tokenizers: Mapping[str, Tokenizer],
    *,
    labels: bool = True,
    chunk: int = 256,
    progress: bool = False,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> EncodedData:
    """Encode every item's ``media[m]`` with ``tokenizers[m]`` (in the mapping's order).

    Items of one chunk whose media differ in shape are encoded in groups of equal shape;
    segments are padded to the longest item (``valid`` marks real tokens). With
    ``cache_dir``, the encoding is read from / written to
    ``cache_dir/encoded/<key>`` (``encoding_key``). Non-finite tokens are an error that names
    the dataset (``name``, default its class name) and the item."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {type(dataset).__name__} is empty")
    entry = None
    if cache_dir is not None:
        key = encoding_key(dataset, tokenizers, labels=labels)
        if key is not None:
            from selfflow.core.files import CacheEntry

            entry = CacheEntry(Path(cache_dir), "encoded", key)
            if entry.exists():
                return EncodedData.from_tensors(entry.load_tensors("tokens.safetensors"), list(tokenizers))

    parts: dict[str, list[Segment]] = {m: [] for m in tokenizers}
    ys: list[int] = []
    starts: Any = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encode", unit="chunk", leave=False)
    with torch.no_grad():
        for start in starts:
            items = [dataset[i] for i in range(start, min(n, start + chunk))]
            for m, tok in tokenizers.items():
                media = [_medium(it.media, m, dataset) for it in items]
                for group in _same_shape_runs(media):
                    batch = stack_media([media[i] for i in group])
                    if isinstance(batch, Tensor):
                        batch = batch.to(device)
                    seg = tok.encode(batch)
                    if seg.modality != m:
                        raise ValueError(
                            f"tokenizer {type(tok).__name__} made {seg.modality!r} tokens for modality {m!r}"
                        )
                    parts[m].append(seg.to("cpu"))
            if labels:
                ys.extend(-1 if it.label is None else int(it.label) for it in items)

    segments = [pad_segments(parts[m]) for m in tokenizers]
    for seg in segments:
        _check_finite(seg, name or type(dataset).__name__)
    label_t = torch.tensor(ys, dtype=torch.long) if labels and ys and min(ys) >= 0 else None
    data = EncodedData(segments=segments, labels=label_t)
    if entry is not None:
        with entry.write() as w:
            w.save_tensors("tokens.safetensors", data.tensors())
            w.set_meta({"dataset": type(dataset).__name__, "items": n, "modalities": list(tokenizers)})
    return data


def _check_finite(seg: Segment, dataset: str) -> None:
    """Tokens must be finite: a NaN or inf in the data would only surface as a NaN loss at
    step 0, far from its cause. Names the dataset, the modality and the first bad item."""
    bad = ~torch.isfinite(seg.tokens) & seg.valid_mask()[..., None]
    if bool(bad.any()):
        item = int(bad.flatten(1).any(1).nonzero()[0])
        kind = "NaN" if bool(torch.isnan(seg.tokens[item]).any()) else "an infinite value (inf)"
        raise ValueError(
            f"dataset {dataset!r}: item {item} holds {kind} in its {seg.modality!r} media (non-finite tokens); "
            "fix or drop that item"
        )


def _same_shape_runs(media: Sequence[Any]) -> list[list[int]]:
    """Indices of consecutive items whose media share a shape (all of them for non-tensors
    such as strings, which their tokenizer pads itself)."""
    runs: list[list[int]] = []
    last = object()
    for i, m in enumerate(media):
        shape = tuple(m.shape) if isinstance(m, Tensor) else None
        if runs and shape == last:
            runs[-1].append(i)
        else:
            runs.append([i])
            last = shape
    return runs


class TokenSource:
    """Deterministic, shardable, resumable batches of one stream's ``EncodedData``, with the
    stream's ``ConditionRule`` applied to each.

    ``batch_size`` is the *global* batch of one micro-step; this rank gets
    ``batch_size / world`` rows of it. The rule's draws come from a generator seeded by
    (``seed``, ``rule_stream``, the draw's index), so every rank and every resume sees the
    same roles.
    """

    def __init__(
        self,
        data: EncodedData,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        shard_: Shard | None = None,
        rule: ConditionRule | None = None,
        rule_stream: int = 0,
    ) -> None:
        sh = shard_ or shard()
        if batch_size % sh.world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {sh.world} processes")
        self.data = data
        self.batch_size = batch_size
        self.local = batch_size // sh.world
        self.shard = sh
        self.seed = seed
        self.device = torch.device(device)
        self.rule = rule or ConditionRule()
        self.rule_stream = rule_stream
        self.cursor = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch or self._perm is None:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> np.ndarray:
        n = len(self.data)
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            k = start + j
            out[j] = self._permutation(k // n)[k % n]
        return out

    def next_batch(self) -> TokenBatch:
        draw = self.cursor // self.batch_size
        idx = self.global_indices(self.cursor, self.batch_size)
        self.cursor += self.batch_size
        mine = idx[self.shard.rank * self.local : (self.shard.rank + 1) * self.local]
        batch = self.data.take(torch.from_numpy(mine))
        gen = None
        if self.rule.is_random:
            gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, 104_729, self.rule_stream, draw]).generate_state(1)[0])
            )
        return self.rule(batch, generator=gen).to(self.device)

    def position(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed, "size": len(self.data)}

    def restore(self, position: dict[str, Any]) -> None:
        if position.get("size", len(self.data)) != len(self.data):
            raise ValueError(
                f"the checkpoint was taken on a dataset of {position['size']} items, this one has {len(self.data)}; "
                "resume with the same data"
            )
        self.cursor = int(position.get("cursor", 0))


class MixedSource:
    """One stream per mini-batch, chosen with the given probabilities from draws that every
    rank shares (so all ranks pick the same stream) and that a resume repeats (the draw
    count is part of the position)."""

    def __init__(self, sources: dict[str, TokenSource], probabilities: dict[str, float], *, seed: int) -> None:
        self.sources = sources
        names = list(sources)
        p = np.array([probabilities[n] for n in names], dtype=np.float64)
        self.names, self.p = names, p / p.sum()
        self.seed = seed
        self.draws = 0

    def next_batch(self) -> TokenBatch:
        u = np.random.default_rng([self.seed, 7919, self.draws]).random()
        self.draws += 1
        name = self.names[int(np.searchsorted(np.cumsum(self.p), u, side="right").clip(0, len(self.names) - 1))]
        return self.sources[name].next_batch()

    def position(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": {n: s.position() for n, s in self.sources.items()}}

    def restore(self, position: dict[str, Any]) -> None:
        if sorted(position.get("sources", {})) != sorted(self.sources):
            raise ValueError(
                f"the checkpoint's streams are {sorted(position.get('sources', {}))}, this run's are "
                f"{sorted(self.sources)}; resume with the same streams"
            )
        self.draws = int(position["draws"])
        for n, pos in position["sources"].items():
            self.sources[n].restore(pos)
