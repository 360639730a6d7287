"""Attention backends and masks.

``attend`` uses PyTorch's ``scaled_dot_product_attention`` everywhere; when the optional
``xformers`` package is installed and the tensors live on CUDA it uses xformers'
memory-efficient kernel instead (xformers raises on CPU tensors, so it is never tried there).

Masks are boolean, ``True`` = may attend, shaped ``(B, 1, N, N)`` or ``(B, 1, 1, N)``, or a
``kernels.PackedLayout`` (a padded batch given by its real tokens). With xformers, a padded
batch is attended **packed**: the real tokens of all samples in one sequence with a
block-diagonal mask (``BlockDiagonalMask``), so no work is spent on padding and no
``(B, H, N, N)`` bias is ever built; SDPA gets the layout's key-padding mask ``(B, 1, 1, N)``.
A general mask (attention separation) always runs in SDPA, broadcast over heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.core.kernels import PackedLayout


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops  # optional extra: pip install selfflow[xformers]
    except Exception:  # noqa: BLE001 - a broken install must not break attention
        return None
    return xops


def xformers_available() -> bool:
    return torch.cuda.is_available() and _xformers_ops() is not None


def _use_xformers(q: Tensor, backend: str) -> bool:
    return backend == "xformers" or (backend == "auto" and q.is_cuda and _xformers_ops() is not None)


def packing_wanted(device: torch.device, backend: str) -> bool:
    """Whether a padded batch on ``device`` is attended packed (xformers on CUDA): then the
    model builds one ``PackedLayout`` per forward for all its blocks."""
    return backend != "sdpa" and device.type == "cuda" and _xformers_ops() is not None


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | PackedLayout | None = None, *, backend: str = "auto"
) -> Tensor:
    """Multi-head attention on ``(B, H, N, Dh)`` tensors; returns ``(B, H, N, Dh)``.

    ``backend``: ``"auto"`` (xformers on CUDA when installed, else SDPA), ``"sdpa"`` or
    ``"xformers"`` (raises where it cannot run). ``mask``: see the module docstring; with a
    ``PackedLayout`` the outputs at padding are zeros under xformers (nothing reads them).
    """
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto', 'sdpa' or 'xformers'")
    layout = mask if isinstance(mask, PackedLayout) else None
    dense: Tensor | None = None if isinstance(mask, PackedLayout) else mask
    if dense is None and _use_xformers(q, backend):
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise RuntimeError("the xformers backend needs `pip install selfflow[xformers]` and CUDA tensors")
        if layout is not None:
            return packed_attention(q, k, v, layout, kernel=_xformers_packed)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if layout is not None:
        dense = layout.key_padding_mask()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, *, kernel: Callable[..., Tensor]) -> Tensor:
    """``q, k, v (B, H, N, Dh)`` -> ``(B, H, N, Dh)``: the real tokens packed into
    ``(1, T, H, Dh)``, attended by ``kernel(q, k, v, layout)`` within each sample, scattered
    back (zeros at padding)."""
    pq, pk, pv = (layout.pack(t.transpose(1, 2))[None] for t in (q, k, v))
    return layout.unpack(kernel(pq, pk, pv, layout)[0]).transpose(1, 2)


@torch.compiler.disable  # a fused kernel already; keeps compiled blocks from guarding on the bias's lengths
def _xformers_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    return _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=layout_bias(layout))


def reference_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """The packed kernel's CPU reference: SDPA over the packed ``(1, T, H, Dh)`` sequence with
    the materialised ``(T, T)`` block-diagonal mask (tests only: it is quadratic in T)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=layout.block_mask()
    )
    return out.transpose(1, 2)


def block_diagonal_mask(seqlens: list[int]):  # -> xformers.ops.fmha.attn_bias.BlockDiagonalMask
    """xformers' block-diagonal attention bias for packed samples of ``seqlens`` tokens
    (constructible on CPU; samples without real tokens are dropped from it)."""
    if _xformers_ops() is None:
        raise ImportError("packed attention needs xformers: pip install 'selfflow[xformers]'")
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    return BlockDiagonalMask.from_seqlens([n for n in seqlens if n > 0])


def layout_bias(layout: PackedLayout):  # -> xformers.ops.fmha.attn_bias.BlockDiagonalMask
    """xformers' block-diagonal mask for ``layout``'s lengths, built once per layout (on first
    use; the model builds it eagerly so compiled blocks share it) and kept on the layout."""
    if layout._bias is None:
        layout._bias = block_diagonal_mask(layout.seqlens)
    return layout._bias


def padding_mask(valid: Tensor | None) -> Tensor | None:
    """Key-padding mask from ``valid (B, N)``: no token attends to padding."""
    if valid is None:
        return None
    return valid[:, None, None, :]


def separation_mask(groups: Tensor, valid: Tensor | None = None) -> Tensor:
    """Block attention between noise groups.

    ``groups (B, N)``: 0 for clean condition tokens, 1, 2, ... for noise groups. A token of
    group g attends to its own group and to condition tokens; condition tokens attend only
    to condition tokens, so no information crosses between noise groups through them.
    """
    g_q = groups[:, :, None]
    g_k = groups[:, None, :]
    mask = (g_q == g_k) | (g_k == 0)
    if valid is not None:
        mask = mask & valid[:, None, :]
        # a padded query row must still see one key or SDPA returns NaN for it
        mask = mask | torch.eye(groups.shape[1], dtype=torch.bool, device=groups.device)
    return mask[:, None]
