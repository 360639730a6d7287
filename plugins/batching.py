"""From datasets to ``TokenBatch``es: encode once, then draw deterministic, resumable batches.

A ``TokenSource`` encodes its whole dataset with the (fitted, deterministic) tokenizer once,
in chunks, and keeps the tokens in memory; batches are then slices of a seeded permutation
per epoch. Its position is the number of samples drawn so far, which is all a checkpoint
needs for an exact resume. Under ``torchrun`` every rank walks the same global batches and
keeps its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from selfflow.core.distributed import Shard, shard
from selfflow.core.types import Role, Segment, TokenBatch
from selfflow.plugins.protocols import Dataset, Tokenizer


def stack_media(items: Sequence[Any]) -> Any:
    if all(isinstance(m, Tensor) for m in items):
        return torch.stack(list(items))
    return list(items)


@attrs.define
class EncodedData:
    """A dataset's tokens: one entry per segment (the modality, then the condition, if any)."""

    segments: list[Segment]
    labels: Tensor | None

    def __len__(self) -> int:
        return self.segments[0].batch_size

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


def encode_dataset(
    dataset: Dataset,
    tokenizer: Tokenizer,
    *,
    condition: Tokenizer | None = None,
    labels: bool = True,
    chunk: int = 256,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> EncodedData:
    """Encode every item (``media`` with ``tokenizer``, ``text`` with ``condition``)."""
    parts: list[list[Segment]] = []
    ys: list[int] = []
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {type(dataset).__name__} is empty")
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encode", unit="chunk", leave=False)
    with torch.no_grad():
        for start in starts:
            items = [dataset[i] for i in range(start, min(n, start + chunk))]
            media = stack_media([it.media for it in items])
            if isinstance(media, Tensor):
                media = media.to(device)
            segs = [tokenizer.encode(media)]
            if condition is not None:
                texts = [it.text for it in items]
                if any(t is None for t in texts):
                    raise ValueError("the run has a condition tokenizer but the dataset's items carry no text")
                cond = condition.encode(texts)
                segs.append(attrs.evolve(cond, role=Role.CONDITION))
            parts.append([s.to("cpu") for s in segs])
            if labels:
                ys.extend(-1 if it.label is None else int(it.label) for it in items)

    def cat(k: int) -> Segment:
        ss = [p[k] for p in parts]
        valid = None if all(s.valid is None for s in ss) else torch.cat([s.valid_mask() for s in ss])
        return attrs.evolve(ss[0], tokens=torch.cat([s.tokens for s in ss]), positions=torch.cat([s.positions for s in ss]), valid=valid)

    segments = [cat(k) for k in range(len(parts[0]))]
    label_t = torch.tensor(ys, dtype=torch.long) if labels and ys and min(ys) >= 0 else None
    return EncodedData(segments=segments, labels=label_t)


class TokenSource:
    """Deterministic, shardable, resumable batches from ``EncodedData``.

    ``batch_size`` is the *global* batch of one micro-step; this rank gets
    ``batch_size / world`` rows of it.
    """

    def __init__(self, data: EncodedData, *, batch_size: int, seed: int, device: torch.device | str = "cpu", shard_: Shard | None = None) -> None:
        sh = shard_ or shard()
        if batch_size % sh.world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {sh.world} processes")
        self.data = data
        self.batch_size = batch_size
        self.local = batch_size // sh.world
        self.shard = sh
        self.seed = seed
        self.device = torch.device(device)
        self.cursor = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
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
        idx = self.global_indices(self.cursor, self.batch_size)
        self.cursor += self.batch_size
        mine = idx[self.shard.rank * self.local : (self.shard.rank + 1) * self.local]
        return self.data.take(torch.from_numpy(mine)).to(self.device)

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
    """One modality per mini-batch, chosen with the given probabilities from a generator that
    every rank shares (so all ranks pick the same modality)."""

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
        self.draws = int(position["draws"])
        for n, pos in position["sources"].items():
            self.sources[n].restore(pos)
