"""``selfflow encode RUN_OR_CONFIG --out DIR``: a run's streams encoded once through their
tokenizers into WebDataset shards (``plugins.shards``), for training on data that does not
fit in memory (``streams[i].shards = DIR``; docs/scale.md).

The tokenizers are built and fitted exactly as ``build_run`` does (``compose.stream_datasets``:
each on the first stream that has its modality, cached), so a run that names the shards finds
the same cache keys and accepts them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch

from selfflow.plugins.shards import write_shards
from selfflow.registry.compose import build_tokenizers, check_names, default_registries, stream_datasets
from selfflow.registry.config import ConfigError, RunConfig
from selfflow.registry.registry import Registries
from selfflow.registry.setup import cache_dir as default_cache_dir


@attrs.frozen(kw_only=True)
class Encoded:
    """One stream's shards: its index in ``streams``, its name, where they are, the index."""

    stream: int
    name: str
    directory: Path
    index: dict[str, Any]

    short: str | None = None  # the modality of a run in the short form (dataset in its modality's table)

    @property
    def setting(self) -> str:
        """The ``--set`` that makes a run read these shards."""
        setting = f"--set streams[{self.stream}].shards={self.directory}"
        if self.short is not None:  # the config may give its dataset in the modality's table
            setting += f" (a run in the short form: --set modalities.{self.short}.shards={self.directory})"
        return setting


def short_form(cfg: RunConfig) -> str | None:
    """The modality whose table would hold ``shards`` if ``cfg`` came in the short form (one
    stream generating one modality, nothing else set on the stream), else ``None``."""
    if len(cfg.streams) != 1:
        return None
    sc = cfg.streams[0]
    plain = not (sc.condition or sc.condition_probability or sc.batch_size or sc.name) and sc.probability == 1.0
    return sc.generate[0] if plain and len(sc.generate) == 1 else None


def stream_dir(out: Path, cfg: RunConfig, label: str) -> Path:
    """Where a stream's shards go: ``out`` itself for a one-stream run, else ``out/<name>``."""
    return out if len(cfg.streams) == 1 else out / label.replace("/", "-")


def encode_run(
    cfg: RunConfig,
    out: str | os.PathLike,
    *,
    stream: str | None = None,
    per_shard: int = 1000,
    overwrite: bool = False,
    registries: Registries | None = None,
    progress: bool = False,
) -> list[Encoded]:
    """Write shards of every stream of ``cfg`` (or only the one named ``stream``) under ``out``."""
    regs = registries or default_registries()
    check_names(regs, cfg)
    labels = [sc.label for sc in cfg.streams]
    if stream is not None and stream not in labels:
        raise ConfigError(f"--stream {stream!r}: the run's streams are {labels}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("selfflow encode runs in one process (not under torchrun); every rank then reads the shards")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    cache = default_cache_dir()
    tokenizers = build_tokenizers(regs, cfg)
    done = []
    short = short_form(cfg)
    for i, sc, train, _evals in stream_datasets(regs, cfg, tokenizers, cache):
        if stream is not None and sc.label != stream:
            continue
        directory = stream_dir(Path(out).absolute(), cfg, sc.label)  # absolute: a run records it
        index = write_shards(
            train,
            {m: tokenizers[m] for m in sc.modalities},
            directory,
            labels=train.num_classes > 0,
            per_shard=per_shard,
            name=sc.dataset,
            overwrite=overwrite,
            progress=progress,
        )
        done.append(Encoded(stream=i, name=sc.label, directory=directory, index=index, short=short))
    return done
