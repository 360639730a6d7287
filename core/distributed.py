"""Distributed training under ``torchrun``: process group, DDP wrapping, data shards, rank-0 I/O.

Randomness is drawn for the *global* batch and sliced per rank (``batch_rand``), so a run on
W processes with per-rank batch B draws exactly the numbers a 1-process run with batch W B
draws: the two runs produce the same parameters (up to float reduction order).
"""

from __future__ import annotations

import datetime
import os
from typing import TypeVar

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn


@attrs.frozen
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SHARD = Shard()


def shard() -> Shard:
    """This process's place in the data-parallel group (``Shard(0, 1)`` when not distributed)."""
    return _SHARD


def init_distributed(device: str | None = None) -> tuple[Shard, torch.device]:
    """Initialise from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Without torchrun this is a no-op returning ``Shard(0, 1)``. Backend: nccl on CUDA, gloo
    on CPU. Returns the shard and the device this rank should use.
    """
    global _SHARD
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world == 1:
        _SHARD = Shard()
        return _SHARD, torch.device(device or ("cuda" if want_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    _SHARD = Shard(rank=rank, world=world)
    return _SHARD, dev


def shutdown() -> None:
    global _SHARD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _SHARD = Shard()


def batch_rand(
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str,
    *,
    normal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform (or normal) numbers for this rank's slice of the global batch.

    ``shape[0]`` is the local batch size; all ranks advance the same generator by the same
    amount and keep their own rows.
    """
    sh = _SHARD
    full = (shape[0] * sh.world, *shape[1:])
    draw = torch.randn if normal else torch.rand
    x = draw(full, generator=generator, device=generator.device, dtype=dtype)
    if sh.world > 1:
        x = x[sh.rank * shape[0] : (sh.rank + 1) * shape[0]]
    return x.to(device)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP when distributed (no unused parameters: every block runs in the student), else as is."""
    if _SHARD.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


_M = TypeVar("_M", bound=nn.Module)


def unwrap(model: _M) -> _M:
    """The module inside a DDP wrapper, or ``model`` itself. Typed as the identity: callers
    annotate a possibly wrapped model as the module it wraps (``model: FlowTransformer``)."""
    return getattr(model, "module", model)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks (for trainable modules outside DDP, e.g. the projector)."""
    if _SHARD.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= _SHARD.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if _SHARD.world > 1:
        dist.barrier()
