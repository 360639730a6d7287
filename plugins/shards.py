"""Encoded latents beyond one machine's memory: WebDataset tar shards, streamed with DataLoader
workers, split across ranks and workers, resumed exactly.

Layout of a shard directory (``selfflow encode RUN --out DIR`` writes it; ``write_shards``)::

    DIR/shard-000000.tar   one sample per item: KEY.safetensors (its tensors) and KEY.json
    DIR/shard-000001.tar   (its index and label); KEY is the item's index, 9 digits
    DIR/offsets.npy        (items, 3) int64: shard, byte offset and size of each item's .safetensors
    DIR/labels.npy         (items,) int64 class labels (absent for unlabelled data)
    DIR/index.json         written last: shards (names, counts), keys, cache keys, token shapes

Per item and modality ``m`` the ``.safetensors`` member holds ``m.tokens (N_i, C)``,
``m.positions (N_i, 3)`` and, where the tokenizer padded, ``m.valid (N_i,)`` exactly as the
tokenizer returned them. Everything is safetensors, numpy (``allow_pickle=False``) or JSON:
nothing is ever unpickled.

**Order and position.** A shard dataset walks the same global order as the in-memory path
(``batching.TokenSource``): epoch ``e`` is the seeded permutation
``numpy.random.default_rng([seed, e]).permutation(items)`` of item ids, and a stream's position
is one integer, the number of samples drawn so far (``cursor``). Global batch ``d`` is
positions ``d B .. (d + 1) B - 1``; rank ``r`` of ``W`` keeps rows ``r B/W .. (r + 1) B/W - 1``
of it, and DataLoader worker ``w`` of ``K`` reads the draws ``d = w mod K`` (the DataLoader
returns them in order). So every item is read once per epoch across all ranks and workers,
the batches are *identical* to the in-memory path's, and a checkpoint's ``cursor`` continues
on any world size that divides the batch (or on the in-memory path, and back). Items are read
by random access: the index gives each one's byte range in its tar. This replaces the
usual seeded shuffle *buffer* (which cannot resume exactly across world sizes); the cost is
random reads, fine on local or network disks with page cache, slow on object stores.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from selfflow.core.conditioning import ConditionRule
from selfflow.core.distributed import Shard, shard
from selfflow.core.types import Segment, TokenBatch
from selfflow.plugins.batching import _medium, _same_shape_runs, encoding_key, stack_media
from selfflow.plugins.protocols import Dataset, Tokenizer

FORMAT = 1  # bump when the layout changes; old directories are refused with the fix
INDEX = "index.json"
OFFSETS = "offsets.npy"
LABELS = "labels.npy"
KIND = "selfflow-shards"


class ShardError(ValueError):
    """A shard directory that cannot be used; the message names the path and the fix."""


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError as err:  # optional extra
        raise ImportError("writing latent shards needs the webdataset library: pip install 'selfflow[shards]'") from err
    return webdataset


def key_of(item: int) -> str:
    """The WebDataset ``__key__`` of item ``item``."""
    return f"{item:09d}"


# ----------------------------------------------------------------------------- writing


def write_shards(
    dataset: Dataset,
    tokenizers: Mapping[str, Tokenizer],
    out: str | os.PathLike,
    *,
    labels: bool = True,
    chunk: int = 256,
    per_shard: int = 1000,
    name: str | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every item of ``dataset`` with ``tokenizers`` (in the mapping's order, as
    ``batching.encode_dataset`` does, chunk by chunk, so memory holds one chunk) and write the
    shard directory ``out``; returns the index.

    ``per_shard``: items per tar. An ``out`` that holds shards of this same encoding (same
    dataset fingerprint and tokenizer cache keys) is left as it is; one that holds another
    encoding is refused unless ``overwrite``. Non-finite tokens are an error naming the item."""
    wds = _webdataset()
    out = Path(out)
    label = name or type(dataset).__name__
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {label!r} is empty: nothing to encode")
    if per_shard < 1 or chunk < 1:
        raise ValueError(f"per_shard ({per_shard}) and chunk ({chunk}) must be >= 1")
    key = encoding_key(dataset, tokenizers, labels=labels)
    if key is None:
        bad = [m for m, t in tokenizers.items() if t.cache_key() is None]
        raise ValueError(
            f"the {bad} tokenizer(s) do not allow caching their encodings (cache_key() is None), so they cannot be "
            "written to shards; use the in-memory path (no streams[i].shards) or a deterministic tokenizer"
        )
    old = out / INDEX
    if old.is_file():
        try:
            held = json.loads(old.read_text())
        except (OSError, ValueError):
            held = {}
        if held.get("encoding_key") == key and held.get("format") == FORMAT and not overwrite:
            return held
        if not overwrite:
            raise ShardError(
                f"{out} already holds shards of another encoding ({held.get('dataset')!r}, key "
                f"{str(held.get('encoding_key'))[:12]}); choose another --out or pass --overwrite"
            )
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*.tar"):
        stale.unlink()

    offsets = np.zeros((n, 3), dtype=np.int64)
    ys = np.full(n, -1, dtype=np.int64)
    shapes: dict[str, dict[str, Any]] = {m: {"tokens": 0, "channels": None, "padded": False} for m in tokenizers}
    shards: list[dict[str, Any]] = []
    tensor_keys: set[str] = set()
    writer: Any = None

    def close() -> None:
        nonlocal writer
        if writer is None:
            return
        writer.close()
        entry = shards[-1]
        with tarfile.open(out / entry["name"]) as tar:  # where each member's bytes ended up
            for member in tar:
                item, ext = member.name.split(".", 1)
                if ext == "safetensors":
                    offsets[int(item)] = (len(shards) - 1, member.offset_data, member.size)
        entry["bytes"] = (out / entry["name"]).stat().st_size
        writer = None

    starts: Any = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encode shards", unit="chunk", leave=False)
    with torch.no_grad():
        for start in starts:
            items = [dataset[i] for i in range(start, min(n, start + chunk))]
            rows: list[dict[str, Tensor]] = [{} for _ in items]
            for m, tok in tokenizers.items():
                media = [_medium(it.media, m, dataset) for it in items]
                for group in _same_shape_runs(media):
                    batch = stack_media([media[i] for i in group])
                    if isinstance(batch, Tensor):
                        batch = batch.to(device)
                    seg = tok.encode(batch).to("cpu")
                    if seg.modality != m:
                        raise ValueError(
                            f"tokenizer {type(tok).__name__} made {seg.modality!r} tokens for modality {m!r}"
                        )
                    _check_finite(seg, label, [start + i for i in group])
                    info = shapes[m]
                    info["channels"] = info["channels"] or seg.channels
                    info["dtype"] = str(seg.tokens.dtype).removeprefix("torch.")
                    if (info["tokens"] and info["tokens"] != seg.num_tokens) or seg.valid is not None:
                        info["padded"] = True
                    info["tokens"] = max(info["tokens"], seg.num_tokens)
                    for j, i in enumerate(group):
                        rows[i][f"{m}.tokens"] = seg.tokens[j].contiguous()
                        rows[i][f"{m}.positions"] = seg.positions[j].contiguous()
                        if seg.valid is not None:
                            rows[i][f"{m}.valid"] = seg.valid[j].contiguous()
            for i, (it, tensors) in enumerate(zip(items, rows)):
                item = start + i
                tensor_keys.update(tensors)
                if item % per_shard == 0:
                    close()
                    shards.append({"name": f"shard-{len(shards):06d}.tar", "count": 0, "first": item})
                    writer = wds.TarWriter(str(out / shards[-1]["name"]), encoder=False, mtime=0)
                y = -1 if it.label is None else int(it.label)
                ys[item] = y
                meta = {"item": item, "label": y}
                writer.write(
                    {
                        "__key__": key_of(item),
                        "safetensors": st_save(tensors, metadata={"item": str(item)}),
                        "json": json.dumps(meta).encode(),
                    }
                )
                shards[-1]["count"] += 1
    close()

    np.save(out / OFFSETS, offsets, allow_pickle=False)
    has_labels = labels and bool((ys >= 0).all())
    if has_labels:
        np.save(out / LABELS, ys, allow_pickle=False)
    elif (out / LABELS).exists():
        (out / LABELS).unlink()
    index = {
        "kind": KIND,
        "format": FORMAT,
        "dataset": label,
        "fingerprint": dataset.fingerprint(),
        "items": n,
        "encoding_key": key,
        "tokenizers": {m: tok.cache_key() for m, tok in tokenizers.items()},
        "modalities": list(tokenizers),
        "segments": shapes,
        "labels": has_labels,
        "tensor_keys": sorted(tensor_keys),
        "sample_key": "{item:09d}",
        "per_shard": per_shard,
        "shards": shards,
        "offsets": OFFSETS,
    }
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)  # the index is written last: a directory without it is unfinished
    return index


def _check_finite(seg: Segment, dataset: str, items: Sequence[int]) -> None:
    bad = ~torch.isfinite(seg.tokens) & seg.valid_mask()[..., None]
    if bool(bad.any()):
        j = int(bad.flatten(1).any(1).nonzero()[0])
        kind = "NaN" if bool(torch.isnan(seg.tokens[j]).any()) else "an infinite value (inf)"
        raise ValueError(
            f"dataset {dataset!r}: item {items[j]} holds {kind} in its {seg.modality!r} media (non-finite tokens); "
            "fix or drop that item"
        )


# ----------------------------------------------------------------------------- reading


class ShardData:
    """Random access to a shard directory: ``len``, ``labels``, ``modalities`` and
    ``take(idx) -> TokenBatch`` like ``batching.EncodedData`` (sampling and evaluation use
    it as they use the in-memory tokens). Segments are padded to the longest item of the whole
    dataset (``index.json`` ``segments.M.tokens``), as the in-memory path pads, so every batch
    has the same shapes (what ``torch.compile`` wants) and the same numbers."""

    def __init__(self, directory: Path, index: dict[str, Any], offsets: np.ndarray, labels: Tensor | None) -> None:
        self.directory = directory
        self.index = index
        self.offsets = offsets
        self.labels = labels
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, directory: str | os.PathLike, *, key: str = "shards") -> ShardData:
        """Open and check ``directory``; ``key`` names the config key in errors."""
        d = Path(directory)
        path = d / INDEX
        fix = f"write it with `selfflow encode RUN --out {d}`"
        if not path.is_file():
            raise ShardError(f"config key '{key}': {d} holds no {INDEX} (not a finished shard directory); {fix}")
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ShardError(f"config key '{key}': {path} is not readable JSON ({err}); {fix}") from None
        if index.get("kind") != KIND or index.get("format") != FORMAT:
            raise ShardError(
                f"config key '{key}': {path} is not a selfflow shard index of format {FORMAT} "
                f"(kind {index.get('kind')!r}, format {index.get('format')!r}); {fix}"
            )
        missing = [s["name"] for s in index["shards"] if not (d / s["name"]).is_file()]
        if missing:
            raise ShardError(f"config key '{key}': {d} lacks {missing[:3]} named by its index; {fix}")
        offsets = np.load(d / index["offsets"], allow_pickle=False, mmap_mode="r")
        if offsets.shape != (index["items"], 3):
            raise ShardError(f"config key '{key}': {d / index['offsets']} does not match its index; {fix}")
        labels = None
        if index["labels"]:
            labels = torch.from_numpy(np.load(d / LABELS, allow_pickle=False).astype(np.int64))
        return cls(d, index, offsets, labels)

    def __len__(self) -> int:
        return int(self.index["items"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.index["modalities"])

    def check(self, dataset: Dataset, tokenizers: Mapping[str, Tokenizer], *, labels: bool, key: str) -> None:
        """The shards must be ``dataset`` encoded by ``tokenizers`` (same fingerprint and
        cache keys): else a ``ShardError`` naming ``key`` and how to re-encode."""
        want = encoding_key(dataset, tokenizers, labels=labels)
        if want == self.index["encoding_key"]:
            return
        if list(tokenizers) != list(self.modalities):
            why = f"its modalities are {list(self.modalities)}, the stream's {list(tokenizers)}"
        elif dataset.fingerprint() != self.index["fingerprint"]:
            why = "the dataset changed (another fingerprint)"
        else:
            diff = [m for m, t in tokenizers.items() if t.cache_key() != self.index["tokenizers"].get(m)]
            why = f"the {diff or list(tokenizers)} tokenizer(s) differ (other cache keys)" if diff else "labels differ"
        raise ShardError(
            f"config key '{key}': {self.directory} holds another encoding of this stream ({why}); "
            f"re-encode with `selfflow encode RUN --out {self.directory} --overwrite`"
        )

    def _file(self, shard_id: int) -> Any:
        if self._pid != os.getpid():  # a DataLoader worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard_id)
        if f is None:
            f = self._files[shard_id] = open(self.directory / self.index["shards"][shard_id]["name"], "rb")  # noqa: SIM115
        return f

    def read(self, item: int) -> dict[str, Tensor]:
        """Item ``item``'s tensors, as the tokenizer returned them (unpadded)."""
        sid, offset, size = (int(v) for v in self.offsets[item])
        f = self._file(sid)
        f.seek(offset)
        blob = f.read(size)
        if len(blob) != size:
            raise ShardError(f"{self.directory / self.index['shards'][sid]['name']} is truncated at item {item}")
        return st_load(blob)

    def take(self, idx: Tensor | np.ndarray | Sequence[int]) -> TokenBatch:
        """The items ``idx`` as one ``TokenBatch`` (segments in the index's modality order,
        default roles, padded to the dataset's longest item with zero tokens and
        ``valid = False``)."""
        ids = [int(i) for i in (idx.tolist() if isinstance(idx, (Tensor, np.ndarray)) else idx)]
        rows = [self.read(i) for i in ids]
        segs = []
        for m in self.modalities:
            info = self.index["segments"][m]
            n = int(info["tokens"])
            tok = [r[f"{m}.tokens"] for r in rows]
            pos = [r[f"{m}.positions"] for r in rows]
            tokens = torch.zeros((len(ids), n, tok[0].shape[-1]), dtype=tok[0].dtype)
            positions = torch.zeros((len(ids), n, pos[0].shape[-1]), dtype=pos[0].dtype)
            valid = torch.zeros((len(ids), n), dtype=torch.bool) if info["padded"] else None
            for j, r in enumerate(rows):
                k = tok[j].shape[0]
                tokens[j, :k] = tok[j]
                positions[j, :k] = pos[j]
                if valid is not None:
                    valid[j, :k] = r.get(f"{m}.valid", torch.ones(k, dtype=torch.bool))
            segs.append(Segment(modality=m, tokens=tokens, positions=positions, valid=valid))
        labels = None if self.labels is None else self.labels[torch.tensor(ids, dtype=torch.long)]
        return TokenBatch(segments=segs, labels=labels)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no open files across processes
        return {**self.__dict__, "_files": {}}


# ----------------------------------------------------------------------------- the global order


def epoch_order(seed: int, epoch: int, shards: Sequence[int], window: int = 0) -> np.ndarray:
    """The item ids of epoch ``epoch`` in the order they are drawn.

    ``window = 0``: ``numpy.random.default_rng([seed, epoch]).permutation(items)``, the
    in-memory path's order. ``window = W``: the shards in a seeded order, taken ``W`` at a time,
    each window's items in a seeded order of their own -- a shuffle buffer of ``W`` shards whose
    reads stay inside ``W`` tar files at a time (for storage where random reads across the whole
    set are slow), still one deterministic order per epoch, so the position stays one integer.
    ``shards``: the items per shard (``index.json``), in shard order."""
    size = int(sum(shards))
    if window <= 0:
        return np.random.default_rng([seed, epoch]).permutation(size)
    starts = np.concatenate([[0], np.cumsum(shards)]).astype(np.int64)
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(shards))
    parts = []
    for j in range(0, len(order), window):
        items = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order[j : j + window]])
        parts.append(np.random.default_rng([seed, epoch, 2, j]).permutation(items))
    return np.concatenate(parts)


def global_order(seed: int, size: int, start: int, count: int) -> np.ndarray:
    """Item ids at global positions ``start .. start + count - 1``: position ``k`` is item
    ``permutation(seed, k // size)[k % size]``, the order ``batching.TokenSource`` walks."""
    out = np.empty(count, dtype=np.int64)
    k = start
    while k < start + count:
        epoch, offset = divmod(k, size)
        take = min(size - offset, start + count - k)
        out[k - start : k - start + take] = np.random.default_rng([seed, epoch]).permutation(size)[
            offset : offset + take
        ]
        k += take
    return out


class _Draws(torch.utils.data.IterableDataset):
    """This rank's rows of global batches ``first, first + 1, ...``; worker ``w`` of ``K``
    reads the draws congruent to ``first + w`` modulo ``K`` (the DataLoader interleaves its
    workers in order, so they arrive as ``first, first + 1, ...``)."""

    def __init__(
        self, data: ShardData, *, seed: int, batch_size: int, local: int, rank: int, first: int, window: int = 0
    ) -> None:
        self.data, self.seed, self.batch_size, self.local, self.rank, self.first = (
            data,
            seed,
            batch_size,
            local,
            rank,
            first,
        )
        self.window = window
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, draw: int) -> np.ndarray:
        n = len(self.data)
        lo = draw * self.batch_size + self.rank * self.local
        out = np.empty(self.local, dtype=np.int64)
        for j in range(self.local):  # one permutation per epoch, kept while the epoch lasts
            epoch, offset = divmod(lo + j, n)
            if self._perm is None or self._perm[0] != epoch:
                counts = [int(sh["count"]) for sh in self.data.index["shards"]]
                self._perm = (epoch, epoch_order(self.seed, epoch, counts, self.window))
            out[j] = self._perm[1][offset]
        return out

    def __iter__(self) -> Iterator[tuple[int, TokenBatch]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        draw = self.first + worker
        while True:
            yield draw, self.data.take(self.rows(draw))
            draw += workers


class ShardSource:
    """A stream's batches read from shards: the ``batching.TokenSource`` interface and the
    same batches, rule draws and position (``{"cursor", "seed", "size"}``), read ahead by
    ``workers`` DataLoader processes (0: in this process).

    ``batch_size`` is the global batch of one micro-step; this rank gets
    ``batch_size / world`` rows. ``restore`` (a resume, or the loop undoing an interrupted
    step) drops what the workers read ahead and restarts them at the restored position.
    ``window``: 0 walks the in-memory path's order; ``W > 0`` the shard-local order of
    ``epoch_order`` (other batches than the in-memory path's, the same guarantees); it is part
    of the position, so a resume with another window is refused."""

    def __init__(
        self,
        data: ShardData,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        shard_: Shard | None = None,
        rule: ConditionRule | None = None,
        rule_stream: int = 0,
        workers: int = 2,
        prefetch: int = 2,
        window: int = 0,
    ) -> None:
        sh = shard_ or shard()
        if batch_size % sh.world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {sh.world} processes")
        if window < 0:
            raise ValueError(f"window must be >= 0 shards, got {window}")
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers ({workers}) must be >= 0 and prefetch ({prefetch}) >= 1")
        self.data = data
        self.batch_size = batch_size
        self.local = batch_size // sh.world
        self.shard = sh
        self.seed = seed
        self.device = torch.device(device)
        self.rule = rule or ConditionRule()
        self.rule_stream = rule_stream
        self.workers = workers
        self.prefetch = prefetch
        self.window = window
        self.cursor = 0
        self._it: Iterator[tuple[int, TokenBatch]] | None = None

    def _iterator(self) -> Iterator[tuple[int, TokenBatch]]:
        ds = _Draws(
            self.data,
            seed=self.seed,
            batch_size=self.batch_size,
            local=self.local,
            rank=self.shard.rank,
            first=self.cursor // self.batch_size,
            window=self.window,
        )
        if self.workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def next_batch(self) -> TokenBatch:
        draw = self.cursor // self.batch_size
        if self._it is None:
            self._it = self._iterator()
        got, batch = next(self._it)
        assert got == draw, f"shard reader returned draw {got}, expected {draw}"
        self.cursor += self.batch_size
        gen = None
        if self.rule.is_random:  # the same draws as batching.TokenSource
            gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, 104_729, self.rule_stream, draw]).generate_state(1)[0])
            )
        return self.rule(batch, generator=gen).to(self.device)

    def position(self) -> dict[str, Any]:
        pos = {"cursor": self.cursor, "seed": self.seed, "size": len(self.data)}
        return {**pos, "window": self.window} if self.window else pos  # window 0: the in-memory path's format

    def restore(self, position: dict[str, Any]) -> None:
        if position.get("size", len(self.data)) != len(self.data):
            raise ValueError(
                f"the checkpoint was taken on a dataset of {position['size']} items, this one has {len(self.data)}; "
                "resume with the same data"
            )
        if int(position.get("window", 0)) != self.window:
            raise ValueError(
                f"the checkpoint's data order used a shuffle window of {position.get('window', 0)} shards, this run "
                f"{self.window} (streams[i].shard_window); resume with the same window"
            )
        cursor = int(position.get("cursor", 0))
        if cursor % self.batch_size:
            raise ValueError(
                f"the checkpoint's data position {cursor} is not a whole number of batches of {self.batch_size}; "
                "resume with the batch size it was trained with"
            )
        if cursor != self.cursor or self._it is not None:
            self.close()
        self.cursor = cursor

    def close(self) -> None:
        """Stop the workers (they are restarted on the next batch)."""
        self._it = None

    def __del__(self) -> None:
        self._it = None


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """``directory/index.json`` as a dict (for reports)."""
    return json.loads((Path(directory) / INDEX).read_text())


def shard_bytes(index: Mapping[str, Any]) -> int:
    return sum(int(s.get("bytes", 0)) for s in index["shards"])


__all__ = [
    "ShardData",
    "ShardError",
    "ShardSource",
    "global_order",
    "key_of",
    "read_index",
    "shard_bytes",
    "write_shards",
]
