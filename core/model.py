"""``FlowTransformer``: a DiT over a token sequence with per-token noise levels.

- Each modality has its own input projection ``Linear(C_m, D)`` and output projection
  ``Linear(D, C_m)``; segments of different widths share one sequence and one trunk.
- Positions are (t, h, w) integers; multi-axis RoPE rotates queries and keys, one slice of
  each head's dimension per axis.
- Blocks use adaLN-Zero conditioned on ``c_i = temb(tau_i) + label_emb``. With factored
  timesteps (``Timesteps.levels (B, K)``, ``index (B, N)``) the embedding and the modulation
  matmul run once per *level* and are gathered per token: the same numbers as the authors'
  per-token model (``modulation="dense"`` here), without a ``(B N, D) x (D, 6D)`` matmul per
  block.
- Blocks are numbered from 1: ``return_hidden=(l,)`` returns the hidden state after block l,
  ``stop_after=k`` runs blocks 1..k only (the teacher's truncated forward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.attention import attend, padding_mask
from selfflow.core.types import Timesteps, TokenBatch

# name -> (width, depth, heads); parameter counts are in the README and tested
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 2),
    "XS": (192, 6, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"model.{attribute.name} must be positive, got {value}")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Shape of a ``FlowTransformer``.

    ``channels`` maps each modality name to its token width; ``num_classes = 0`` makes the
    model unconditional (otherwise id ``num_classes`` is the null label for CFG).
    """

    channels: Mapping[str, int] = attrs.field(converter=lambda m: dict(sorted(dict(m).items())))
    width: int = attrs.field(default=384, validator=_positive)
    depth: int = attrs.field(default=12, validator=_positive)
    heads: int = attrs.field(default=6, validator=_positive)
    mlp_ratio: float = 4.0
    num_classes: int = 0
    rope_theta: float = 10000.0
    modulation: str = attrs.field(default="factored", validator=attrs.validators.in_(("factored", "dense")))
    attention_backend: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "sdpa", "xformers")))

    def __attrs_post_init__(self) -> None:
        if not self.channels:
            raise ValueError("model.channels is empty: give each modality's token width, e.g. {'image': 16}")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} is not divisible by model.heads={self.heads}")
        head_dim = self.width // self.heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head dimension {head_dim} must be even and >= 6 for 3-axis RoPE")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        width, depth, heads = PRESETS[name]
        return cls(**{"width": width, "depth": depth, "heads": heads, **overrides})

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@attrs.frozen(kw_only=True)
class ModelOutput:
    """``velocity``: one ``(B, N_m, C_m)`` tensor per segment (``None`` for condition segments,
    and for all when the forward stopped early); ``hidden``: block number -> ``(B, N_total, D)``."""

    velocity: tuple[Tensor | None, ...]
    hidden: dict[int, Tensor]


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``1000 t`` (DiT's scale), ``t (...)`` -> ``(..., dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MultiAxisRope(nn.Module):
    """Rotary embedding over (t, h, w): each head's ``Dh / 2`` frequency pairs are split
    between the axes (t gets the remainder), each axis with its own geometric frequencies.

    Pairs follow the rotate-half convention: dimension ``i`` pairs with ``i + Dh / 2``.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        pairs = head_dim // 2
        hw = pairs // 3
        split = (pairs - 2 * hw, hw, hw)
        inv = [theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)) for n in split]
        axis = torch.cat([torch.full((n,), a, dtype=torch.long) for a, n in enumerate(split)])
        self.register_buffer("inv_freq", torch.cat(inv).float(), persistent=False)
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions (B, N, 3)`` -> ``cos, sin`` of shape ``(B, N, 1, Dh)``.

        ``sin`` carries the rotation's sign, ``[-sin, +sin]`` over the two halves, so that
        ``rope(x) = x cos + swap_halves(x) sin`` (``apply_rope``) needs no negation.
        """
        angles = positions[..., self.axis].float() * self.inv_freq  # (B, N, Dh/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1)[:, :, None], torch.cat([-sin, sin], dim=-1)[:, :, None]


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
    passes autograd's generic addcmul formula spends on ``value = 1``."""

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
    (a small-K reduction, cheaper than a scatter-add into the rows)."""

    @staticmethod
    def forward(ctx, rows: Tensor, flat_index: Tensor, assign: Tensor) -> Tensor:
        b, k, m = rows.shape
        ctx.save_for_backward(assign)
        return rows.reshape(b * k, m).index_select(0, flat_index).view(b, -1, m)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (assign,) = ctx.saved_tensors
        return torch.bmm(assign.to(grad.dtype), grad), None, None


class Modulation:
    """Carries adaLN rows to tokens.

    Factored: rows are per level, ``(B, K, M)``, and token i of sample b takes row
    ``index[b, i]``; with one level per sample the rows broadcast instead of being gathered.
    Dense (``index=None``): rows are already per token, ``(B, N, M)``.
    """

    def __init__(self, index: Tensor | None, num_levels: int) -> None:
        self.index = index
        self.num_levels = num_levels
        self.flat_index: Tensor | None = None
        self.assign: Tensor | None = None
        if index is not None and num_levels > 1:
            b = index.shape[0]
            offsets = torch.arange(b, device=index.device)[:, None] * num_levels
            self.flat_index = (index + offsets).reshape(-1)
            self.assign = F.one_hot(index, num_levels).transpose(1, 2).float()  # (B, K, N)

    def per_token(self, rows: Tensor) -> Tensor:
        """``rows (B, K, M)`` -> ``(B, N, M)`` (or ``(B, 1, M)`` when they broadcast)."""
        if self.flat_index is None:  # one level per sample, or already per token
            return rows
        return _GatherLevels.apply(rows, self.flat_index, self.assign)

    def split(self, rows: Tensor, parts: int) -> tuple[Tensor, ...]:
        """``rows (B, K, parts M)`` -> ``parts`` per-token tensors ``(B, N, M)``, each gathered
        on its own so that its gradient reduces to levels without a concatenation."""
        return tuple(self.per_token(r) for r in rows.chunk(parts, dim=-1))


def _scale_offset(width: int, parts: int, scales: Sequence[int]) -> Tensor:
    """A bias offset of 1 on the ``scale`` parts: adaLN then yields ``1 + scale`` directly."""
    offset = torch.zeros(parts, width)
    offset[list(scales)] = 1.0
    return offset.reshape(-1)


class AdaLN(nn.Sequential):
    """``SiLU -> Linear(D, parts D)``, zero-initialised (adaLN-Zero).

    The SiLU is shared by every block, so ``FlowTransformer`` applies it once per forward
    and calls ``rows`` on the activated conditioning. ``rows`` returns the parts in order
    with ``1 + scale`` in place of ``scale`` (the 1 is folded into the bias).
    """

    def __init__(self, width: int, parts: int, scales: Sequence[int]) -> None:
        super().__init__(nn.SiLU(), nn.Linear(width, parts * width))
        self.parts = parts
        self.register_buffer("scale_offset", _scale_offset(width, parts, scales), persistent=False)

    def rows(self, cond_act: Tensor) -> Tensor:
        lin = self[1]
        return F.linear(cond_act, lin.weight, lin.bias + self.scale_offset)


# ----------------------------------------------------------------------------- GELU


_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 (1 + tanh(z)) = sigmoid(2 z)
_GELU_B = _GELU_A * 0.044715


class _GeluTanh(torch.autograd.Function):
    """``F.gelu(x, approximate="tanh")`` written as ``x sigmoid(x (a + b x^2))``.

    The same function (``0.5 (1 + tanh z) = sigmoid(2 z)``); on CPU the vectorised sigmoid
    costs about a third of the tanh, and the hand-written derivative
    ``s + x s (1 - s) (a + 3 b x^2)`` avoids a second tanh in the backward. Agrees with
    ``F.gelu`` to float32 rounding (tested).
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


# ----------------------------------------------------------------------------- blocks


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.heads = cfg.heads
        self.backend = cfg.attention_backend
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        # shift1, scale1, gate1, shift2, scale2, gate2
        self.adaLN = AdaLN(d, 6, scales=(1, 4))

    def forward(self, x: Tensor, cond_act: Tensor, mod: Modulation, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.split(self.adaLN.rows(cond_act), 6)

        h = muladd(shift1, self.norm1(x), scale1)  # scale1 is 1 + scale
        q, k, v = rotate_qkv(self.qkv(h).view(b, n, 3, self.heads, d // self.heads), *rope)
        attn = attend(q, k, v, mask, backend=self.backend)  # (B, H, N, Dh) over (B, N, H, Dh) memory
        x = muladd(x, gate1, self.proj(attn.transpose(1, 2).reshape(b, n, d)))

        h = muladd(shift2, self.norm2(x), scale2)
        h = self.fc2(gelu_tanh(self.fc1(h)))
        return muladd(x, gate2, h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.width
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN = AdaLN(d, 2, scales=(1,))  # shift, scale
        self.out = nn.ModuleDict({name: nn.Linear(d, c) for name, c in cfg.channels.items()})

    def forward(self, x: Tensor, cond_act: Tensor, mod: Modulation) -> Tensor:
        shift, scale = mod.split(self.adaLN.rows(cond_act), 2)
        return muladd(shift, self.norm(x), scale)


# ----------------------------------------------------------------------------- the model


def _distinct_levels(timesteps: Timesteps) -> tuple[Tensor, Tensor | None]:
    """The level table the model needs: when every token of each sample sits at the same
    level after all (the teacher's ``min(t, s)`` with no condition tokens, a sampling step
    stored with a spare level) one row per sample, which broadcasts instead of being
    gathered per token; the same numbers either way. Checked on CPU only, where the gathers
    are a measurable part of a step (the check reads a value back, a sync on an accelerator)."""
    levels, index = timesteps.levels, timesteps.index
    if levels.shape[1] == 1:
        return levels, None
    if index.device.type == "cpu":
        tau = timesteps.per_token()
        if bool((tau == tau[:, :1]).all()):
            return tau[:, :1], None
    return levels, index


class FlowTransformer(nn.Module):
    """Predicts the velocity ``eps - x0`` of every generated token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.inp = nn.ModuleDict({name: nn.Linear(c, d) for name, c in cfg.channels.items()})
        self.t_embed = TimestepEmbedder(d)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes > 0 else None
        self.rope = MultiAxisRope(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FlowTransformer:
        return cls(cfg)

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        for lin in self.final.out.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- pieces, public so that tests and objectives can reuse them

    def conditioning(self, timesteps: Timesteps, labels: Tensor | None) -> tuple[Tensor, Modulation]:
        """``c = temb(tau) + label_emb``: ``(B, K, D)`` per level (factored) or ``(B, N, D)``
        per token (dense), and the matching gather."""
        if self.cfg.modulation == "dense":
            cond = self.t_embed(timesteps.per_token())
            mod = Modulation(None, 1)
        else:
            levels, index = _distinct_levels(timesteps)
            cond = self.t_embed(levels)
            mod = Modulation(index, levels.shape[1])
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((cond.shape[0],), self.null_label, dtype=torch.long, device=cond.device)
            cond = cond + self.label_embed(labels)[:, None, :]
        return cond, mod

    def embed(self, batch: TokenBatch) -> Tensor:
        xs = []
        for seg in batch.segments:
            if seg.modality not in self.inp:
                raise KeyError(
                    f"the model has no projection for modality {seg.modality!r}; "
                    f"it was built for {sorted(self.inp)}"
                )
            xs.append(self.inp[seg.modality](seg.tokens))
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)

    def forward(
        self,
        batch: TokenBatch,
        timesteps: Timesteps,
        *,
        return_hidden: Sequence[int] = (),
        stop_after: int | None = None,
        attn_mask: Tensor | None = None,
    ) -> ModelOutput:
        """``batch`` holds the *noised* tokens; ``timesteps`` their levels.

        ``attn_mask (B, 1, N, N)`` bool replaces the padding mask (see
        ``attention.separation_mask``, which already folds padding in).
        """
        last = self.depth if stop_after is None else stop_after
        if not 1 <= last <= self.depth:
            raise ValueError(f"stop_after={stop_after} is outside blocks 1..{self.depth}")
        for l in return_hidden:
            if not 1 <= l <= last:
                raise ValueError(f"return_hidden={l} is outside the blocks run (1..{last}); blocks are 1-indexed")
        if timesteps.index.shape != (batch.batch_size, batch.num_tokens):
            raise ValueError(
                f"timesteps.index has shape {tuple(timesteps.index.shape)}, the batch has "
                f"({batch.batch_size}, {batch.num_tokens}) tokens"
            )

        x = self.embed(batch)
        cond, mod = self.conditioning(timesteps, batch.labels)
        positions = torch.cat([seg.positions for seg in batch.segments], dim=1) if len(batch.segments) > 1 else batch.segments[0].positions
        rope = self.rope(positions)
        mask = attn_mask if attn_mask is not None else padding_mask(batch.valid_mask())

        cond_act = F.silu(cond)  # the adaLN SiLU, shared by all blocks

        hidden: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[:last], start=1):
            x = blk(x, cond_act, mod, rope, mask)
            if i in return_hidden:
                hidden[i] = x
        if stop_after is not None:
            return ModelOutput(velocity=tuple(None for _ in batch.segments), hidden=hidden)

        h = self.final(x, cond_act, mod)
        velocity: list[Tensor | None] = []
        for seg, part in zip(batch.segments, h.split([s.num_tokens for s in batch.segments], dim=1)):
            velocity.append(self.final.out[seg.modality](part) if seg.generated else None)
        return ModelOutput(velocity=tuple(velocity), hidden=hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
