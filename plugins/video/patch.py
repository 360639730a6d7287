"""``video/patch``: non-overlapping spatiotemporal pixel patches as tokens (exact round trip).

A video ``(B, C, T, H, W)`` in [-1, 1] is cut into ``pt x ph x pw`` patches (``frames_per_patch``
frames, ``patch`` x ``patch`` pixels): ``N = (T / pt) (H / ph) (W / pw)`` tokens of
``C pt ph pw`` channels, ordered time-major, then rows, then columns. Token counts at the
defaults (``pt = 1``, ``patch = 4``, gray): a 17 x 32 x 32 clip is 17 * 8 * 8 = 1,088 tokens of
16 channels; ``patch = 8`` gives 272 tokens of 64 channels. An image ``(B, C, H, W)`` is a
one-frame video (``pt`` must then be 1) and decodes as ``(B, C, 1, H, W)``.

Positions ``(t, h, w)``: ``t = time_ticks(k * pt, fps)``, the tick of the patch's first frame
on the shared time axis (``core.types``: seconds x ``TIME_RATE``), so the tokenizer needs the
clip frame rate ``fps`` (the dataset's: moving digits are 10 fps); ``h, w`` are the patch's
grid row and column.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment, time_ticks


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"video/patch {attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class VideoPatchConfig:
    """``patch``: patch side in pixels (ph = pw); ``frames_per_patch``: frames per patch
    (pt); ``video_channels``: 1 (gray) or 3 (RGB); ``fps``: the clips' frame rate, for the
    time positions."""

    patch: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    frames_per_patch: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    video_channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))
    fps: float = attrs.field(default=10.0, converter=float, validator=_positive)


def check_fps(dataset, fps: float, who: str) -> None:
    """A dataset that states one frame rate (``dataset.fps > 0``) must match the tokenizer's."""
    rate = float(getattr(dataset, "fps", 0) or 0)
    if rate > 0 and abs(rate - fps) > 1e-6:
        raise ValueError(
            f"{who} is set to fps = {fps:g} but the dataset's clips are {rate:g} fps: set the same fps in the "
            f"tokenizer_options (fps = {rate:g}), or resample the clips with the dataset's fps option"
        )


def as_video_batch(media: object, channels: int, pt: int, p: int) -> Tensor:
    """``media`` as ``(B, C, T, H, W)`` (an image batch ``(B, C, H, W)`` gains ``T = 1``), or
    an error that says what was expected."""
    expected = f"video/patch encodes a video batch (B, {channels}, T, H, W) or an image batch (B, {channels}, H, W)"
    if not isinstance(media, Tensor):
        raise TypeError(f"{expected} float tensor in [-1, 1]; got a {type(media).__name__}")
    if media.ndim == 4:
        media = media[:, :, None]
    if media.ndim != 5:
        raise ValueError(f"{expected}; got shape {tuple(media.shape)}")
    if not media.is_floating_point():
        raise TypeError(f"{expected} of floats in [-1, 1]; got dtype {media.dtype} (uint8? pass x.float() / 127.5 - 1)")
    _, c, t, h, w = media.shape
    if c != channels:
        raise ValueError(
            f"{expected}; got {c} channels in shape {tuple(media.shape)}: set video_channels = {c} in the "
            "tokenizer options if the data has them (channels-last? permute to (B, C, T, H, W))"
        )
    if t % pt:
        raise ValueError(
            f"video/patch: {t} frames do not split into patches of frames_per_patch = {pt}; use clips of a "
            f"multiple of {pt} frames or set frames_per_patch to a divisor of {t}"
        )
    if h % p or w % p:
        raise ValueError(f"video/patch: frame size {h}x{w} is not divisible by patch = {p}; resize or crop the clips")
    return media


class VideoPatchTokenizer:
    """Video ``(B, C, T, H, W)`` in [-1, 1] <-> tokens ``(B, (T/pt)(H/p)(W/p), C pt p p)``."""

    modality = "video"
    mask_ratio = 0.10  # the paper's video mask ratio

    def __init__(self, config: VideoPatchConfig | None = None) -> None:
        self.config = config or VideoPatchConfig()

    @classmethod
    def from_config(cls, config: VideoPatchConfig | None, **context) -> VideoPatchTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        c = self.config
        return c.video_channels * c.frames_per_patch * c.patch**2

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Nothing to learn; the clips' frame rate is checked against ``fps`` (the time
        positions are computed from it, so a mismatch would put every token at the wrong time)."""
        check_fps(dataset, self.config.fps, "video/patch")

    def cache_key(self) -> str:
        c = self.config
        return f"video/patch:{c.patch}:{c.frames_per_patch}:{c.video_channels}:{c.fps!r}"

    def positions(self, gt: int, gh: int, gw: int, *, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """``(batch, gt * gh * gw, 3)`` long: ``(time_ticks(k * pt, fps), row, column)``,
        time-major like the tokens."""
        t = time_ticks(torch.arange(gt) * self.config.frames_per_patch, self.config.fps)
        grid = torch.stack(torch.meshgrid(t, torch.arange(gh), torch.arange(gw), indexing="ij"), dim=-1).reshape(-1, 3)
        return grid.to(device=device, dtype=torch.long)[None].expand(batch, -1, -1).contiguous()

    def encode(self, media: Tensor) -> Segment:
        c = self.config
        p, pt, ch = c.patch, c.frames_per_patch, c.video_channels
        x = as_video_batch(media, ch, pt, p)
        b, _, t, h, w = x.shape
        gt, gh, gw = t // pt, h // p, w // p
        tokens = (
            x.reshape(b, ch, gt, pt, gh, p, gw, p)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gt, gh, gw, C, pt, p, p)
            .reshape(b, gt * gh * gw, ch * pt * p * p)
        )
        pos = self.positions(gt, gh, gw, batch=b, device=x.device)
        return Segment(modality=self.modality, tokens=tokens.contiguous(), positions=pos)

    def decode(self, segment: Segment) -> Tensor:
        """Tokens back to ``(B, C, T, H, W)``; the grid is read from the positions."""
        c = self.config
        p, pt, ch = c.patch, c.frames_per_patch, c.video_channels
        b, n, width = segment.tokens.shape
        if width != self.channels:
            raise ValueError(f"video/patch decodes {self.channels}-channel tokens, got {width}")
        pos = segment.positions[0]
        gh, gw = int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1
        gt = n // (gh * gw)
        if gt * gh * gw != n:
            raise ValueError(f"video/patch: {n} tokens do not form a grid of {gh}x{gw} patches per frame")
        x = segment.tokens.reshape(b, gt, gh, gw, ch, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, ch, gt * pt, gh * p, gw * p)
