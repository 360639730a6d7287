"""One per-process setup for every command that builds a run: distributed init, device,
threads, allocator, seeds, and where caches live."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from selfflow.core import distributed
from selfflow.core.distributed import Shard
from selfflow.core.runtime import default_threads, tune_cpu_allocator
from selfflow.registry.config import RunSection


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def device_problem(spec: str) -> str | None:
    """What is wrong with a device string here (``None``: nothing): not a torch device, or a
    CUDA device this machine does not have."""
    if spec == "auto":
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        return f"{spec!r} is not a torch device; use cpu, cuda, cuda:N (or run.device = 'auto')"
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return f"{spec!r} is not available: this machine (or torch build) has no CUDA device; use cpu or 'auto'"
        if (dev.index or 0) >= n:
            return f"{spec!r} is not available: this machine has cuda:0..cuda:{n - 1}"
    return None


def setup_process(run: RunSection, device: str | None = None) -> tuple[Shard, torch.device]:
    """Join the torchrun group (if any), pick the device (``device`` overrides
    ``run.device``), set torch's threads and the CPU allocator tuning, seed torch's global
    RNG from ``run.seed`` (the model's initialisation draws from it).

    ``run.threads = 0`` keeps torch's count, lowered to the cores other processes leave
    free (``core.runtime.default_threads``: measured once per process, never raised);
    torchrun's ranks keep what torchrun gave them."""
    shard, dev = distributed.init_distributed(device or (None if run.device == "auto" else run.device))
    if device is None and run.device == "auto":
        dev = pick_device("auto") if shard.world == 1 else dev
    threads = run.threads or (default_threads(torch.get_num_threads()) if shard.world == 1 else 0)
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if run.tune_allocator and dev.type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(run.seed)
    return shard, dev


def cache_dir() -> Path:
    """``$SELFFLOW_CACHE``, default ``~/.cache/selfflow``: fitted tokenizers, encoded latents,
    reference networks."""
    return Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))
