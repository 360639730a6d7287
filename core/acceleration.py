"""GPU speed settings: bf16 autocast (``run.precision``) and ``torch.compile`` (``run.compile``).

**Precision.** ``bf16`` runs the objective's forward passes (student, teacher, projector) under
``torch.autocast(dtype=bfloat16)``: matmuls and attention in bf16, while parameters, their
gradients, AdamW's moments and the EMA teacher stay float32 (the master weights: autocast
casts a weight's copy per op, it never changes the parameter). The losses -- the flow MSE,
the representation loss's cosine normalisation -- are computed in float32 with autocast off
(``full_precision``): a bf16 ``1 - cos`` of near-parallel vectors loses all its digits, and
norms of bf16 activations overflow sooner (a known source of NaNs in REPA-style training).
The backward runs outside autocast, as PyTorch recommends. ``auto`` is bf16 on CUDA devices
that support it and fp32 elsewhere: on CPUs without AVX-512 bf16 is about 10x slower
(DESIGN.md), so CPU runs stay fp32 unless told otherwise.

**Compile.** ``compile_blocks`` compiles each transformer block of a ``FlowTransformer`` in
place (``nn.Module.compile``): the model's Python forward (segments, truncation, taps) stays
eager, each block is one graph, the same code object for every block (one compilation reused
depth times), and ``state_dict`` keys are unchanged -- no ``_orig_mod.`` prefix ever reaches a
checkpoint. Student and teacher are compiled *separately*, after the teacher is copied (each
module holds its own compiled call; the tests check that the compiled teacher computes with
its EMA weights, truncated or whole). Blocks are also FSDP2's sharding unit, so compiling per
block composes with ``fully_shard`` per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(spec: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``run.precision`` on ``device`` (``None``: plain float32)."""
    device = torch.device(device)
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    if spec == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else None
    raise ValueError(f"run.precision must be one of {PRECISIONS}, got {spec!r}")


def resolve_compile(spec: str | bool, device: torch.device | str) -> bool:
    """Whether ``run.compile`` compiles on ``device``: ``auto`` is on for CUDA, off on CPU."""
    if isinstance(spec, bool):
        return spec
    if spec == "auto":
        return torch.device(device).type == "cuda"
    raise ValueError(f"run.compile must be 'auto', true or false, got {spec!r}")


def autocast(dtype: torch.dtype | None, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``'s type; nothing when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off (for losses and normalisations): inputs must be cast to float32 by the caller."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """Compile every block of ``model.blocks`` (and ``model.final``) in place with
    ``torch.compile(**options)``; returns how many modules were compiled. ``state_dict`` keys
    do not change. ``options``: e.g. ``backend="inductor"`` (the default), ``mode``,
    ``dynamic``; tests use ``backend="eager"``."""
    compiled = 0
    for blk in getattr(model, "blocks", ()):
        blk.compile(**options)
        compiled += 1
    final = getattr(model, "final", None)
    if final is not None:
        final.compile(**options)
        compiled += 1
    if not compiled:
        raise ValueError(f"{type(model).__name__} has no .blocks to compile")
    return compiled


def is_compiled(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
