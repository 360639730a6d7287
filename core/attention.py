"""Attention backends and masks.

``attend`` uses PyTorch's ``scaled_dot_product_attention`` everywhere; when the optional
``xformers`` package is installed and the tensors live on CUDA it uses xformers'
memory-efficient kernel instead (xformers raises on CPU tensors, so it is never tried there).

Masks are boolean, ``True`` = may attend, shaped ``(B, 1, N, N)`` or ``(B, 1, 1, N)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops  # optional extra: pip install selfflow[xformers]
    except Exception:  # noqa: BLE001 - a broken install must not break attention
        return None
    return xops


def xformers_available() -> bool:
    return torch.cuda.is_available() and _xformers_ops() is not None


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Multi-head attention on ``(B, H, N, Dh)`` tensors; returns ``(B, H, N, Dh)``.

    ``backend``: ``"auto"`` (xformers on CUDA when installed, else SDPA), ``"sdpa"`` or
    ``"xformers"`` (raises where it cannot run).
    """
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto', 'sdpa' or 'xformers'")
    use_xf = backend == "xformers" or (backend == "auto" and q.is_cuda and _xformers_ops() is not None)
    if use_xf:
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise RuntimeError("the xformers backend needs `pip install selfflow[xformers]` and CUDA tensors")
        bias = None
        if mask is not None:
            b, h, n, _ = q.shape
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            # xformers wants a (B, H, N, N) bias whose last dim is 8-aligned in memory
            pad = (-n) % 8
            bias = F.pad(bias.expand(b, h, n, n), (0, pad))[..., :n]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
