"""The network of ``video/vae``: a causal 3-D convolutional KL autoencoder.

Shapes: video ``(B, C, T, H, W)`` with ``T = 1 + 4k``; latents ``(B, L, 1 + k, H/f, W/f)``.
It follows the causal video VAEs of Wan, CogVideoX and LTX:

- **Causal in time.** Every temporal convolution pads only the past (``kt - 1`` zero frames
  before the first), so output frame ``i`` reads input frames ``<= i``.
- **First frame on its own, then chunks.** A time-downsampling step maps ``1 + 2m`` frames
  to ``1 + m``: it prepends a copy of frame 0 and merges consecutive pairs
  ``(0, 0), (1, 2), (3, 4), ...`` with a learned pointwise map. Two of them (temporal
  compression 4) make frame 0 latent frame 0 and frames ``4j-3 .. 4j`` (chunk ``j``) latent
  frame ``j``; with the causal convolutions, latent frame ``j`` depends on frames ``<= 4j``
  only. The decoder mirrors it (``TimeUpsample`` splits each latent frame into a pair and
  drops the first output), so decoded frame ``f`` depends on latent frames ``<= ceil(f/4)``.
- **Per-frame normalisation.** ``FrameNorm`` is a GroupNorm over ``(C, H, W)`` of each frame
  separately; an ordinary GroupNorm over ``(C, T, H, W)`` pools statistics over time, so
  the future would change the past.
- No attention: the receptive field is local, and nothing pools over time.

The causality is *exact* (``torch.equal``), not approximate: no operation ever reads a later
frame, and the kernels compute each output from its own inputs in the same order whatever
the later frames hold (``tests/plugins/video/test_vae.py`` checks it in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIME_DOWN = 4  # temporal compression: 1 + 4k frames -> 1 + k latent frames
_TIME_LEVELS = 2  # log2(TIME_DOWN): the last two resolution levels also halve time


class FrameNorm(nn.GroupNorm):
    """GroupNorm over ``(C, H, W)`` of every frame on its own: ``(B, C, T, H, W)`` in and out."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def _norm(ch: int) -> FrameNorm:
    return FrameNorm(8, ch, eps=1e-6)


class CausalConv3d(nn.Conv3d):
    """3-D convolution, ``kt x k x k`` (stride 1), zero-padded ``kt - 1`` frames in the past and
    ``k // 2`` pixels on every side: output frame ``i`` reads input frames ``i - kt + 1 .. i``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_kernel: int | None = None) -> None:
        kt = kernel if time_kernel is None else time_kernel
        super().__init__(cin, cout, (kt, kernel, kernel), padding=0)
        self._pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kt - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self._pad))


class FactorisedCausalConv3d(nn.Module):
    """A ``k x k`` per-frame convolution then a causal ``kt x 1 x 1`` one in time (R(2+1)D):
    the receptive field of ``CausalConv3d`` at ``(k*k*cin + kt*cout) / (kt*k*k*cin)`` of
    its multiply-adds (0.44 for ``k = kt = 3``, ``cin = cout``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.space = CausalConv3d(cin, cout, kernel, time_kernel=1)
        self.time = CausalConv3d(cout, cout, 1, time_kernel=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.time(self.space(x))


CONVS = ("3d", "2+1d")


def _conv(cin: int, cout: int, kind: str) -> nn.Module:
    if kind not in CONVS:
        raise ValueError(f"video/vae conv must be one of {CONVS}, got {kind!r}")
    return CausalConv3d(cin, cout) if kind == "3d" else FactorisedCausalConv3d(cin, cout)


class ResBlock3d(nn.Module):
    """FrameNorm -> SiLU -> causal conv, twice, plus a (pointwise) skip; ``conv`` picks a full
    ``3x3x3`` kernel (``"3d"``) or a factorised one (``"2+1d"``)."""

    def __init__(self, cin: int, cout: int, conv: str = "3d") -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout, conv)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout, conv)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Downsample(nn.Module):
    """Halve H and W with a strided per-frame 3x3 conv (``space``; otherwise a per-frame 3x3
    conv at stride 1); with ``time``, then map ``1 + 2m`` frames to ``1 + m``: frame 0 paired
    with itself, then pairs ``(2i - 1, 2i)``, each pair's channels concatenated and mixed by a
    pointwise linear map."""

    def __init__(self, cin: int, cout: int, *, time: bool, space: bool = True) -> None:
        super().__init__()
        stride = (1, 2, 2) if space else (1, 1, 1)
        self.conv = nn.Conv3d(cin, cout, (1, 3, 3), stride=stride, padding=(0, 1, 1))
        self.time = nn.Conv3d(2 * cout, cout, 1) if time else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.time is None:
            return x
        b, c, t, h, w = x.shape
        x = torch.cat([x[:, :, :1], x], dim=2)  # (B, C, 2 + 2m, H, W)
        pairs = x.reshape(b, c, (t + 1) // 2, 2, h, w).transpose(2, 3).reshape(b, 2 * c, (t + 1) // 2, h, w)
        return self.time(pairs)


class Upsample(nn.Module):
    """The mirror of ``Downsample``: with ``time``, a pointwise map splits each frame into a
    pair and the first output frame is dropped (``1 + m`` -> ``1 + 2m``); then (``space``)
    nearest 2x in H and W, and a causal 3x3x3 conv."""

    def __init__(self, cin: int, cout: int, *, time: bool, space: bool = True, conv: str = "3d") -> None:
        super().__init__()
        self.time = nn.Conv3d(cin, 2 * cin, 1) if time else None
        self.space = space
        self.conv = _conv(cin, cout, conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.time is not None:
            b, c, t, h, w = x.shape
            x = self.time(x).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)[:, :, 1:]
        if self.space:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x)


def pixel_unshuffle(x: Tensor, p: int) -> Tensor:
    """``(B, C, T, H, W)`` -> ``(B, C p p, T, H/p, W/p)``: every frame's ``p x p`` pixel blocks
    folded into channels (LTX-Video's patchify) by ``F.pixel_unshuffle`` on each frame (channel
    ``c p p + i p + j`` holds pixel ``(i, j)`` of channel ``c``'s block); per frame, so it keeps
    the network causal."""
    return x if p == 1 else F.pixel_unshuffle(x.transpose(1, 2), p).transpose(1, 2)


def pixel_shuffle(x: Tensor, p: int) -> Tensor:
    """The inverse of ``pixel_unshuffle`` (``F.pixel_shuffle`` on each frame)."""
    return x if p == 1 else F.pixel_shuffle(x.transpose(1, 2), p).transpose(1, 2)


def level_widths(base_channels: int, downsample: int) -> list[int]:
    """Channels of each resolution level: ``base * min(2**i, 4)`` for ``i = 0 .. log2(f)``."""
    levels = int(math.log2(downsample))
    return [base_channels * min(2**i, 4) for i in range(levels + 1)]


def down_steps(downsample: int, pixel_patch: int = 1) -> list[tuple[bool, bool]]:
    """``(space, time)`` of each down step: ``log2(f / p)`` spatial halvings (the patchify does
    the rest) and the two time halvings on the last two steps; with fewer than two spatial
    steps, time-only steps at the bottom make up the two."""
    spatial = int(math.log2(downsample // pixel_patch))
    n = max(spatial, _TIME_LEVELS)
    return [(k < spatial, k >= n - _TIME_LEVELS) for k in range(n)]


class CausalVideoAutoencoder(nn.Module):
    """Encoder to a diagonal Gaussian posterior ``(mean, logvar)``, each ``(B, L, 1 + k, H/f,
    W/f)``, and a decoder back to ``(B, C, 1 + 4k, H, W)`` (unclamped).

    ``downsample`` f in {4, 8} spatially; ``pixel_patch`` p folds p x p pixels into channels
    before the first convolution (and the decoder unfolds them after the last), so the
    convolutions start at ``H/p``; then ``log2(f/p)`` spatial down steps; time is always
    compressed 4x, on the last two steps (``down_steps``); ``blocks`` resblocks per level,
    ``mid_blocks`` at the bottom; ``conv`` the kernel of every 3x3 convolution inside
    (``"3d"`` or factorised ``"2+1d"``; the stem and the output convolution stay ``3x3x3``).
    """

    def __init__(
        self,
        *,
        video_channels: int,
        base_channels: int,
        downsample: int,
        latent_channels: int,
        blocks: int = 1,
        mid_blocks: int = 2,
        conv: str = "3d",
        pixel_patch: int = 1,
    ) -> None:
        super().__init__()
        if pixel_patch not in (1, 2, 4) or pixel_patch > downsample:
            raise ValueError(f"video/vae pixel_patch must be 1, 2 or 4 and at most downsample, got {pixel_patch}")
        self.pixel_patch = pixel_patch
        steps = down_steps(downsample, pixel_patch)
        chs = level_widths(base_channels, downsample // pixel_patch)
        ch = [chs[min(k, len(chs) - 1)] for k in range(len(steps) + 1)]  # width after k steps
        cin = video_channels * pixel_patch**2
        enc: list[nn.Module] = [CausalConv3d(cin, ch[0])]
        for k, (space, time) in enumerate(steps):
            enc += [ResBlock3d(ch[k], ch[k], conv) for _ in range(blocks)]
            enc.append(Downsample(ch[k], ch[k + 1], time=time, space=space))
        enc += [ResBlock3d(ch[-1], ch[-1], conv) for _ in range(mid_blocks)]
        enc += [_norm(ch[-1]), nn.SiLU(), CausalConv3d(ch[-1], 2 * latent_channels)]
        dec: list[nn.Module] = [CausalConv3d(latent_channels, ch[-1])]
        dec += [ResBlock3d(ch[-1], ch[-1], conv) for _ in range(mid_blocks)]
        for k in reversed(range(len(steps))):
            space, time = steps[k]
            dec.append(Upsample(ch[k + 1], ch[k], time=time, space=space, conv=conv))
            dec += [ResBlock3d(ch[k], ch[k], conv) for _ in range(blocks)]
        dec += [_norm(ch[0]), nn.SiLU(), CausalConv3d(ch[0], cin)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.encoder(pixel_unshuffle(x, self.pixel_patch)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return pixel_shuffle(self.decoder(z), self.pixel_patch)


def latent_frames(frames: int) -> int:
    """``1 + 4k`` frames -> ``1 + k`` latent frames."""
    return 1 + (frames - 1) // TIME_DOWN


def frame_of_latent(j: Tensor | int) -> Tensor | int:
    """The video frame latent frame ``j`` stands for: ``4j``, the last frame of its chunk
    (latent frame 0 is frame 0), i.e. the first moment everything it encodes has been seen."""
    return j * TIME_DOWN
