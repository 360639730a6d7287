"""Hand-written autograd kernels behind ``FlowTransformer``'s blocks.

Each computes the same numbers as the plain PyTorch expression in its docstring (tested
against it in ``tests/core/test_model.py``) and exists because the step benchmark measured
it faster on CPU; the gains quoted are Self-Flow step time, single-thread CPU time, from
``benchmarks/RESULTS.md`` ("what was optimised, what it gained"). What is still left is
memory-bound elementwise work that eager PyTorch cannot fuse on CPU (same file).

Shapes: tokens ``(B, N, D)``; attention heads ``(B, H, N, Dh)``; RoPE tables ``(B, N, 1, Dh)``
from ``model.MultiAxisRope``; adaLN level rows ``(B, K, M)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- RoPE


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Reference rotation of ``x (B, N, H, Dh)`` with ``MultiAxisRope`` tables (the blocks use
    the fused ``rotate_qkv``, which computes the same numbers)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """``out = x cos + swap_halves(x) sin`` in three passes and no temporaries."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])


class _RotateQKV(torch.autograd.Function):
    """RoPE on the q and k parts of a ``(B, N, 3, H, Dh)`` qkv tensor, in that layout.

    Rotating in the projection's own layout (instead of permuting to ``(B, H, N, Dh)``,
    rotating q and k separately and concatenating halves) saves the copies around attention:
    the CPU flash kernel reads ``(B, N, H, Dh)`` memory directly and writes its output the
    same way; ``v`` is returned as a view of the input, never copied. The backward is the
    inverse rotation (``sin -> -sin``) and writes the whole qkv gradient into one tensor.

    Measured: -1.0% Self-Flow step together with the level gather's bmm backward, the shared
    adaLN SiLU and the folded ``1 + scale``; the fewer-copies backward is part of ``muladd``'s
    -1.7%.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # (B, N, 1, 1, Dh); float32 tables: a bf16 qkv is rotated in float32 and rounded once
        cos, sin = cos[:, :, None], sin[:, :, None]
        b, n, _, h, dh = qkv.shape
        qk = torch.empty((b, n, 2, h, dh), dtype=qkv.dtype, device=qkv.device)
        _rotate_into(qk, qkv[:, :, :2], cos, sin)
        ctx.save_for_backward(cos, sin)
        return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        cos, sin = cos[:, :, 0], -sin[:, :, 0]  # (B, N, 1, Dh): the inverse rotation
        b, h, n, dh = grad_v.shape
        out = torch.empty((b, n, 3, h, dh), dtype=grad_v.dtype, device=grad_v.device)
        _rotate_into(out[:, :, 0], grad_q.transpose(1, 2), cos, sin)
        _rotate_into(out[:, :, 1], grad_k.transpose(1, 2), cos, sin)
        out[:, :, 2].copy_(grad_v.transpose(1, 2))
        return out, None, None


def rotate_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv (B, N, 3, H, Dh)`` -> rotated ``q, k`` and ``v``, each ``(B, H, N, Dh)`` views of
    ``(B, N, H, Dh)`` memory (the layout attention reads without a copy)."""
    return _RotateQKV.apply(qkv, cos, sin)


# ----------------------------------------------------------------------------- modulation


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


class _MulAdd(torch.autograd.Function):
    """``base + a * b`` (``torch.addcmul``) with a backward that skips the ``* value``
    passes autograd's generic addcmul formula spends on ``value = 1``.

    Measured: -1.7% Self-Flow step (with the fewer-copies RoPE backward).
    """

    @staticmethod
    def forward(ctx, base: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.shapes = (base.shape, a.shape, b.shape)
        return torch.addcmul(base, a, b)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        base_shape, a_shape, b_shape = ctx.shapes
        need_base, need_a, need_b = ctx.needs_input_grad
        return (
            _sum_to(grad, base_shape) if need_base else None,
            _sum_to(grad * b, a_shape) if need_a else None,
            _sum_to(grad * a, b_shape) if need_b else None,
        )


def muladd(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``base + a * b``: adaLN's ``shift + norm(x) * (1 + scale)`` and ``x + gate * y``."""
    if torch.is_grad_enabled() and (base.requires_grad or a.requires_grad or b.requires_grad):
        return _MulAdd.apply(base, a, b)
    return torch.addcmul(base, a, b)


class _GatherLevels(torch.autograd.Function):
    """``rows (B, K, M)`` -> ``(B, N, M)`` by level index; the backward sums each level's
    token gradients with one batched matmul against the one-hot ``(B, K, N)`` assignment
    (a small-K reduction, cheaper than a scatter-add into the rows).

    Measured: part of the -1.0% Self-Flow step listed with the fused RoPE.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, flat_index: Tensor, assign: Tensor) -> Tensor:
        b, k, m = rows.shape
        ctx.save_for_backward(assign)
        return rows.reshape(b * k, m).index_select(0, flat_index).view(b, -1, m)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (assign,) = ctx.saved_tensors
        return torch.bmm(assign.to(grad.dtype), grad), None, None


def gather_levels(rows: Tensor, flat_index: Tensor, assign: Tensor) -> Tensor:
    """``rows (B, K, M)`` -> ``(B, N, M)``: token i of sample b takes row ``flat_index[b N + i]``
    of ``rows.reshape(B K, M)``; ``assign (B, K, N)`` is the matching one-hot (float32)."""
    return _GatherLevels.apply(rows, flat_index, assign)


# ----------------------------------------------------------------------------- GELU


_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 (1 + tanh(z)) = sigmoid(2 z)
_GELU_B = _GELU_A * 0.044715


class _GeluTanh(torch.autograd.Function):
    """``F.gelu(x, approximate="tanh")`` written as ``x sigmoid(x (a + b x^2))``.

    The same function (``0.5 (1 + tanh z) = sigmoid(2 z)``); on CPU the vectorised sigmoid
    costs about a third of the tanh, and the hand-written derivative
    ``s + x s (1 - s) (a + 3 b x^2)`` avoids a second tanh in the backward. Agrees with
    ``F.gelu`` to float32 rounding (tested).

    Measured: -2.9% Self-Flow step.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        a = torch.tensor(_GELU_A, dtype=x.dtype, device=x.device)
        s = torch.addcmul(a, x, x, value=_GELU_B).mul_(x).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        a = torch.tensor(_GELU_A, dtype=x.dtype, device=x.device)
        d = torch.addcmul(a, x, x, value=3.0 * _GELU_B).mul_(x).mul_(torch.addcmul(s, s, s, value=-1.0))
        return d.add_(s).mul_(grad)


def gelu_tanh(x: Tensor) -> Tensor:
    """DiT's tanh-approximated GELU: the sigmoid form (``_GeluTanh``) for float32 CPU tensors,
    where it is faster; ``F.gelu`` elsewhere (one fused kernel on GPUs, float32 internal
    arithmetic for half-precision inputs)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.gelu(x, approximate="tanh")
    if not torch.is_grad_enabled() or not x.requires_grad:
        s = torch.addcmul(torch.tensor(_GELU_A, dtype=x.dtype, device=x.device), x, x, value=_GELU_B)
        return s.mul_(x).sigmoid_().mul_(x)
    return _GeluTanh.apply(x)


# ----------------------------------------------------------------------------- packed sequences


class PackedLayout:
    """Variable-length samples packed into one sequence, for attention kernels that take
    cumulative sequence lengths (xformers' ``BlockDiagonalMask``, flash-attention's varlen)
    instead of a padded batch and a mask: no work on padding, no ``(B, H, N, N)`` bias.

    Built once per forward from ``valid (B, N)`` (``True`` = a real token; the real tokens of
    a sample need not be a prefix): ``index (T,)`` are the flat positions ``b N + i`` of the
    ``T`` real tokens in order, ``seqlens`` their count per sample (a list of ints, read back
    once), ``cu_seqlens (B + 1,)`` int32 their running sum. ``pack`` gathers ``(B, N, ...)``
    into ``(T, ...)``; ``unpack`` scatters back, zeros at padding; both are differentiable
    and exact (index copies, no arithmetic).
    """

    def __init__(self, valid: Tensor) -> None:
        if valid.dim() != 2 or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a (B, N) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
        self.batch, self.tokens = valid.shape
        self.valid = valid
        self.index = valid.reshape(-1).nonzero().squeeze(1)
        counts = valid.sum(1)
        self.seqlens: list[int] = [int(c) for c in counts.tolist()]
        self.cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        self.max_seqlen = max(self.seqlens, default=0)
        self._bias = None

    @property
    def total(self) -> int:
        """``T``, the real tokens of the batch."""
        return int(self.index.numel())

    def pack(self, x: Tensor) -> Tensor:
        """``(B, N, ...)`` -> ``(T, ...)``, the real tokens sample after sample."""
        return x.reshape(self.batch * self.tokens, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, y: Tensor) -> Tensor:
        """``(T, ...)`` -> ``(B, N, ...)`` with zeros at padding (the inverse of ``pack`` on real tokens)."""
        out = y.new_zeros((self.batch * self.tokens, *y.shape[1:]))
        return out.index_copy(0, self.index, y).view(self.batch, self.tokens, *y.shape[1:])

    def sample_ids(self) -> Tensor:
        """``(T,)`` the sample each packed token belongs to."""
        return torch.div(self.index, self.tokens, rounding_mode="floor")

    def block_mask(self) -> Tensor:
        """The materialised ``(T, T)`` bool block-diagonal mask (``True`` = may attend): for
        tests and the CPU reference only -- the kernels never build it."""
        ids = self.sample_ids()
        return ids[:, None] == ids[None, :]

    def key_padding_mask(self) -> Tensor:
        """``(B, 1, 1, N)``: the SDPA form of the same attention on the padded batch."""
        return self.valid[:, None, None, :]
