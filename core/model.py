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
- The blocks' hand-written autograd kernels (fused RoPE, multiply-add, level gather, GELU)
  live in ``core/kernels.py``, each with the step-time gain it was kept for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.attention import attend, layout_bias, packing_wanted, padding_mask
from selfflow.core.kernels import PackedLayout, gather_levels, gelu_tanh, muladd, rotate_qkv
from selfflow.core.types import ROPE_TIME_TICKS, Timesteps, TokenBatch

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
    rope_axes: tuple[int, int, int] | None = attrs.field(
        default=None, converter=attrs.converters.optional(lambda v: tuple(int(x) for x in v))
    )
    abs_pos: str = attrs.field(default="none", validator=attrs.validators.in_(("none", "sincos")))

    def __attrs_post_init__(self) -> None:
        if not self.channels:
            raise ValueError("model.channels is empty: give each modality's token width, e.g. {'image': 16}")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} is not divisible by model.heads={self.heads}")
        head_dim = self.width // self.heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head dimension {head_dim} must be even and >= 6 for 3-axis RoPE")
        axes = self.rope_axes
        if axes is not None and (len(axes) != 3 or min(axes) < 0 or sum(axes) != head_dim // 2):
            raise ValueError(
                f"model.rope_axes={list(axes)} must be 3 non-negative pair counts (t, h, w) "
                f"summing to head_dim / 2 = {head_dim // 2}; e.g. [{head_dim // 2}, 0, 0] for audio only"
            )

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
        dtype = cast(nn.Linear, self.mlp[0]).weight.dtype
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


class MultiAxisRope(nn.Module):
    """Rotary embedding over (t, h, w): each head's ``Dh / 2`` frequency pairs are split
    between the axes (t gets the remainder; ``split`` gives the counts instead, e.g.
    ``(Dh / 2, 0, 0)`` for audio, whose ``h, w`` are always 0 and would waste their pairs),
    each axis with its own geometric frequencies.

    ``t`` is in ticks of the shared time axis (``core.types.TIME_RATE`` per second) and is
    read in rotary steps of ``ROPE_TIME_TICKS`` ticks (1/25 s): its frequencies are divided
    by that, so a 25 fps frame and a 75 Hz audio latent frame are 1 and 1/3 of a step apart
    whatever their tokenizers. ``h, w`` are grid units. Media at ``t = 0`` (images) see the
    same angles as without the time axis.

    Pairs follow the rotate-half convention: dimension ``i`` pairs with ``i + Dh / 2``.
    """

    inv_freq: Tensor  # (Dh/2,) buffers, declared for the type checker
    axis: Tensor

    def __init__(self, head_dim: int, theta: float, split: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        if split is None:
            pairs = head_dim // 2
            hw = pairs // 3
            split = (pairs - 2 * hw, hw, hw)
        inv = [theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)) for n in split]
        inv[0] = inv[0] / ROPE_TIME_TICKS  # the time axis counts ticks: one rotary step per ROPE_TIME_TICKS
        axis = torch.cat([torch.full((n,), a, dtype=torch.long) for a, n in enumerate(split)])
        self.register_buffer("inv_freq", torch.cat(inv).float(), persistent=False)
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions (B, N, 3)`` -> ``cos, sin`` of shape ``(B, N, 1, Dh)``.

        ``sin`` carries the rotation's sign, ``[-sin, +sin]`` over the two halves, so that
        ``rope(x) = x cos + swap_halves(x) sin`` (``kernels.apply_rope``) needs no negation.
        """
        angles = positions[..., self.axis].float() * self.inv_freq  # (B, N, Dh/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1)[:, :, None], torch.cat([-sin, sin], dim=-1)[:, :, None]


def sincos_positions(positions: Tensor, width: int) -> Tensor:
    """Absolute sin-cos features of ``(t, h, w)`` (DiT's fixed 2-D embedding, with a time
    axis): ``positions (B, N, 3)`` -> ``(B, N, width)``.

    Each axis gets ``2 * (width // 6)`` dimensions (``cos, sin`` of ``x * 10000^(-k / F)``,
    ``F = width // 6``; the rest are 0); ``t`` is read in rotary steps (``ROPE_TIME_TICKS``
    ticks, 1/25 s), ``h, w`` in grid units. RoPE alone is relative: a bidirectional model
    learns where a token sits in its clip only from the edges, which left 1 s audio clips
    with words at any offset and repeating every ~0.25 s (docs/audio.md). Images (``t = 0``)
    see a constant on the time slice.
    """
    f = width // 6
    omega = 10000.0 ** (-torch.arange(f, dtype=torch.float32, device=positions.device) / max(f, 1))
    coords = positions.float()
    coords = torch.stack([coords[..., 0] / ROPE_TIME_TICKS, coords[..., 1], coords[..., 2]], dim=-1)
    args = coords[..., None] * omega  # (B, N, 3, F)
    feats = torch.cat([args.cos(), args.sin()], dim=-1).flatten(-2)  # (B, N, 6F)
    return F.pad(feats, (0, width - feats.shape[-1]))


# ----------------------------------------------------------------------------- modulation


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
        if self.flat_index is None or self.assign is None:  # one level per sample, or already per token
            return rows
        return gather_levels(rows, self.flat_index, self.assign)

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

    scale_offset: Tensor  # (parts D,) buffer, declared for the type checker

    def __init__(self, width: int, parts: int, scales: Sequence[int]) -> None:
        super().__init__(nn.SiLU(), nn.Linear(width, parts * width))
        self.parts = parts
        self.register_buffer("scale_offset", _scale_offset(width, parts, scales), persistent=False)

    @property
    def linear(self) -> nn.Linear:
        return cast(nn.Linear, self[1])

    def rows(self, cond_act: Tensor) -> Tensor:
        lin = self.linear
        return F.linear(cond_act, lin.weight, lin.bias + self.scale_offset)


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

    def forward(
        self,
        x: Tensor,
        cond_act: Tensor,
        mod: Modulation,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | PackedLayout | None,
    ) -> Tensor:
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
        self.rope = MultiAxisRope(cfg.head_dim, cfg.rope_theta, cfg.rope_axes)
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
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, AdaLN):  # every block's and the final layer's
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        for m in self.final.out.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

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
                    f"the model has no projection for modality {seg.modality!r}; it was built for {sorted(self.inp)}"
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
        positions = (
            torch.cat([seg.positions for seg in batch.segments], dim=1)
            if len(batch.segments) > 1
            else batch.segments[0].positions
        )
        rope = self.rope(positions)
        if self.cfg.abs_pos == "sincos":
            x = x + sincos_positions(positions, self.cfg.width).to(x.dtype)
        mask: Tensor | PackedLayout | None = attn_mask
        if mask is None:  # padding only: a key-padding mask, or packed sequences under xformers (one layout)
            valid = batch.valid_mask()
            if valid is not None and packing_wanted(x.device, self.cfg.attention_backend):
                mask = PackedLayout(valid)
                layout_bias(mask)  # built here, eagerly, once for every (possibly compiled) block
            else:
                mask = padding_mask(valid)

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
