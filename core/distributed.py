"""Distributed training under ``torchrun``: process group, DDP or FSDP2 wrapping, data shards, rank-0 I/O.

Randomness is drawn for the *global* batch and sliced per rank (``batch_rand``), so a run on
W processes with per-rank batch B draws exactly the numbers a 1-process run with batch W B
draws: the two runs produce the same parameters (up to float reduction order).

Two ways to spread the model (``run.parallel``):

- ``"ddp"``: every rank holds the whole model, optimiser state and teacher; gradients are
  all-reduced (``DistributedDataParallel``).
- ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``). The student is sharded per
  transformer block plus the root (embeddings, final layer); the EMA teacher is sharded the
  same way (every parameter's dim-0 shard on the same rank as the student's), so its update
  is a ``torch._foreach_lerp_`` over local shards with no collective
  (``EMATeacher.update``), and its truncated forward all-gathers only the blocks it runs.
  The objective's trainable heads (the projector) are sharded too, each head as one FSDP
  unit, so every trainable parameter is a ``DTensor`` on one mesh (one AdamW, one gradient
  norm); frozen modules (REPA's reference encoder) stay replicated. Gradients are
  reduce-scattered: a parameter's gradient exists only as its rank's shard.

With one process both are the plain model.
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
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


def shutdown(sync: bool = True) -> None:
    """Leave the process group: wait for every rank (``sync``), then destroy it.

    Call it when the work succeeded on this rank. The barrier keeps a rank that finished first
    from tearing down its gloo connections (and exiting) while a peer still runs rank-0 I/O or
    a last collective; a gloo rank torn down early can abort at exit ("terminate called
    without an active exception"). After an error pass ``sync=False`` or do not call it:
    a barrier, or even the destroy, can wait on a peer that is stuck in a collective
    (torchrun stops the other ranks when one fails).
    """
    global _SHARD
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        # free what still holds the backend (FSDP state, meshes) in module reference cycles now,
        # while the interpreter is whole, not in its finalisation: after a 2-rank FSDP test run
        # had returned, this collected 4,156 objects, one of the 3 DeviceMeshes still alive among them
        gc.collect()
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


PARALLEL = ("ddp", "fsdp")


def wrap_model(model: nn.Module, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """DDP (no unused parameters: every block runs in the student) or, with ``parallel="fsdp"``,
    the model sharded in place by ``shard_model`` (then it is returned itself, now an
    ``FSDPModule``); as is with one process."""
    if parallel not in PARALLEL:
        raise ValueError(f"run.parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if _SHARD.world == 1:
        return model
    if parallel == "fsdp":
        return shard_model(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (_SHARD.world,))


def shard_model(model: nn.Module, device: torch.device, *, reshard_root: bool | None = None) -> nn.Module:
    """FSDP2 in place: each of ``model.blocks`` one unit, then the root (the rest). Parameters
    become ``DTensor`` s sharded on dim 0 over all ranks (uneven sizes are padded by FSDP).

    ``reshard_root``: free the root's gathered parameters after forward. ``None`` (FSDP's
    default) keeps them for the backward, as a student wants; a model that never runs
    backward (the teacher) passes ``True``, so its parameters are shards again after every
    forward and ``EMATeacher.update`` can lerp them in place."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_root)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root)
    return model


def shard_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Shard an ``EMATeacher``'s model with the student's plan (``shard_model``), resharding
    after every forward (it has no backward to keep gathered parameters for)."""
    shard_model(teacher.model, device, reshard_root=True)  # type: ignore[arg-type]
    return teacher


def shard_heads(objective: nn.Module, device: torch.device) -> list[str]:
    """FSDP2 on each direct child of ``objective`` that has trainable parameters (the
    projector); frozen children stay replicated. Returns the names sharded. A trainable
    parameter held by the objective itself (not in a child) is refused: it would mix plain
    tensors with DTensors in one optimiser."""
    from torch.distributed.fsdp import fully_shard

    own = [n for n, p in objective.named_parameters(recurse=False) if p.requires_grad]
    if own:
        raise ValueError(
            f"run.parallel = 'fsdp' shards the objective's trainable heads per child module; "
            f"{type(objective).__name__}.{own[0]} is a parameter of the objective itself: put it in a submodule"
        )
    # a Linear on (B, N, D) returns a view; the losses read the heads' outputs out of place only
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mesh = _mesh(device)
    done = []
    for name, child in objective.named_children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
            done.append(name)
    return done


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (an FSDP2-sharded module)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` parameter (its storage: in-place ops on it change the
    parameter), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def full_tensor(t: Tensor) -> Tensor:
    """A ``DTensor`` gathered whole on every rank (a collective: call on every rank), or ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``params`` to a total 2-norm of ``max_norm``; returns the norm
    before clipping (NaN or inf when a gradient is). Sharded (``DTensor``) gradients count
    their local shards, summed over ranks with one all-reduce; plain gradients count once.
    Equals ``torch.nn.utils.clip_grad_norm_`` on the unsharded gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    from torch.distributed.tensor import DTensor

    sharded = [local(g) for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    dev = sharded[0].device
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in sharded:
        if g.numel():
            sq = sq + g.detach().float().pow(2).sum()
    if _SHARD.world > 1:
        dist.all_reduce(sq)
    for g in plain:
        sq = sq + g.detach().float().pow(2).sum().to(dev)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([g for g in [*sharded, *plain] if g.numel()], coef)
    return float(norm)


_M = TypeVar("_M", bound=nn.Module)


def unwrap(model: _M) -> _M:
    """The module inside a DDP wrapper, or ``model`` itself. Typed as the identity: callers
    annotate a possibly wrapped model as the module it wraps (``model: FlowTransformer``)."""
    return getattr(model, "module", model)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks (for trainable modules outside DDP, e.g. the projector)."""
    if _SHARD.world == 1:
        return
    from torch.distributed.tensor import DTensor

    # sharded (FSDP) gradients were reduce-scattered already
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
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
