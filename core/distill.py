"""Teacher-student self-distillation: the EMA teacher, the projector, the representation loss."""

from __future__ import annotations

import copy

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.distributed import local


@attrs.frozen(kw_only=True)
class EMAConfig:
    """``decay``: the paper's long runs use 0.9999; runs under ~200k steps need less (0.999 or
    lower). ``warmup``: use ``min(decay, (1 + n) / (10 + n))`` at update n, so a short run's
    teacher is not mostly its random initialisation (a 0.999 EMA without warmup still holds
    about half the initial weights after 750 steps)."""

    decay: float = attrs.field(default=0.9999, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    warmup: bool = True


class EMATeacher(nn.Module):
    """An exponential moving average of a model, used as the Self-Flow teacher and as the
    evaluation model. Never requires grad; starts as an exact copy.

    Under FSDP2 (``run.parallel = "fsdp"``) the teacher is a sharded model in its own right
    (``distributed.shard_teacher``): the same per-block plan as the student, so each rank's
    teacher shard and student shard cover the same elements and ``update`` lerps local
    shards with no collective; its forward (the Self-Flow truncated one included) gathers
    each block it runs and frees it again."""

    num_updates: Tensor  # () long buffer, declared for the type checker

    def __init__(self, model: nn.Module, config: EMAConfig | None = None) -> None:
        super().__init__()
        self.config = config or EMAConfig()
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMATeacher:  # the teacher never trains
        super().train(False)
        return self

    def current_decay(self) -> float:
        n = int(self.num_updates)
        if self.config.warmup:
            return min(self.config.decay, (1 + n) / (10 + n))
        return self.config.decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """``theta' <- d theta' + (1 - d) theta``; buffers are copied. Returns the decay used."""
        d = self.current_decay()
        reshard = getattr(self.model, "reshard", None)
        if reshard is not None:  # FSDP: the parameters are the shards again (a no-op after a forward)
            reshard()
        ema: list[Tensor] = [local(p) for p in self.model.parameters()]
        cur = [local(p.detach()) for p in student.parameters()]
        if len(ema) != len(cur):
            raise RuntimeError("EMA teacher and student have different parameter lists")
        for a, b in zip(ema, cur):
            if a.shape != b.shape:
                raise RuntimeError(
                    f"EMA teacher and student shards differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}): "
                    "shard the teacher with the student's plan (distributed.shard_teacher)"
                )
        pairs = [(a, b) for a, b in zip(ema, cur) if a.numel()]  # an uneven FSDP split leaves empty shards
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), student.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
        return d

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)


class Projector(nn.Sequential):
    """The student's head on the representation: ``Linear(D, 2D) -> SiLU -> Linear(2D, out)``."""

    def __init__(self, width: int, out: int | None = None) -> None:
        super().__init__(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, out or width))


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` over the last dimension: ``(..., D) -> (...)``."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-6)


def representation_loss(student: Tensor, teacher: Tensor, tokens: Tensor) -> Tensor:
    """``mean(1 - cos(student, teacher))`` over the tokens selected by ``tokens (B, N)`` bool.

    ``teacher`` is detached here as well: no gradient ever reaches the teacher.
    """
    dist = cosine_distance(student, teacher.detach())
    w = tokens.to(dist.dtype)
    return (dist * w).sum() / w.sum().clamp_min(1.0)
