"""The ``video`` writer: a batch of generated clips -> one MP4 per sample + a labelled PNG strip.

- ``{stem}_{i:03d}.mp4``: sample ``i`` as H.264, yuv420p, even sizes (``pyav.write_video``),
  enlarged with nearest-neighbour pixels (``scale``; automatic: about 128 pixels) so a 32 x 32
  clip is visible, at ``fps``. Shown as ``<video>`` in ``samples.html``, captioned with its
  label. Only the first ``max_videos`` samples get a file (the strip shows every sample).
- ``{stem}_frames.png``: every sample as a row of its frames (left to right, frame numbers
  on top), labelled on its left, titled; shown as ``<img>``.

Both are written under a hidden name and renamed into place (``gallery.replacing``), so the
page never links half a file. Non-finite values are drawn grey and said in the captions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from selfflow.plugins.gallery import check_labels, check_stem, replacing
from selfflow.plugins.protocols import MediaFile

MAX_LABEL_WIDTH = 160  # pixels; the strip's label column never grows past this
FONT_SIZE = 11
PAD, TOP, HEADER = 2, 18, 14  # gap between tiles; title band; frame-number band


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"video writer {attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class VideoWriterConfig:
    """``fps``: frame rate of the MP4s (the clips' own: moving digits are 10 fps); ``scale``:
    each pixel becomes ``scale`` x ``scale`` in the MP4s (0: automatic, about 128 px);
    ``strip_scale``: the same for the PNG strip (0: automatic, about 64 px per frame);
    ``crf``: H.264 quality (0-51, lower is better; 18 is visually lossless); ``max_videos``:
    MP4 files per batch (the first samples; the strip shows all)."""

    fps: float = attrs.field(default=10.0, converter=float, validator=_positive)
    scale: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    strip_scale: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    crf: int = attrs.field(default=18, validator=[attrs.validators.ge(0), attrs.validators.le(51)])
    max_videos: int = attrs.field(default=64, validator=attrs.validators.ge(0))


def check_videos(media: object) -> Tensor:
    """``media`` as a ``(B, C, T, H, W)`` float tensor, or an error that says what was expected."""
    expected = "the video writer takes a (B, C, T, H, W) float tensor in [-1, 1] with C = 1 (gray) or 3 (RGB)"
    if not isinstance(media, Tensor):
        raise TypeError(f"{expected}; got a {type(media).__name__}")
    if media.ndim != 5:
        hints = {
            4: " (B, C, H, W): an image batch? write it with the image writer, or add T: x[:, :, None]",
            3: " (B, channels, samples): an audio batch? use the audio writer",
        }
        raise ValueError(f"{expected}; got shape {tuple(media.shape)}{hints.get(media.ndim, '')}")
    if not media.is_floating_point():
        raise TypeError(f"{expected}; got dtype {media.dtype} (uint8 pixels? pass x.float() / 127.5 - 1)")
    if media.shape[1] not in (1, 3):
        raise ValueError(
            f"{expected}; got {media.shape[1]} channels in shape {tuple(media.shape)} "
            "((B, T, C, H, W)? pass x.permute(0, 2, 1, 3, 4))"
        )
    if media.shape[0] == 0 or media.shape[2] == 0:
        raise ValueError(f"{expected}; got an empty batch or zero frames, shape {tuple(media.shape)}")
    return media


def to_frames(videos: Tensor) -> np.ndarray:
    """``(B, C, T, H, W)`` in [-1, 1] -> ``(B, T, H, W, C)`` uint8 (NaN -> grey)."""
    x = torch.nan_to_num(videos.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's fonts (it has the arrows of moving-digits labels)."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def save_strip(
    frames: np.ndarray, path: Path, *, labels: Sequence[str] | None, scale: int = 0, title: str | None = None
) -> Path:
    """``frames (B, T, H, W, C)`` uint8 as a PNG: one row per sample, its frames left to
    right (numbered on top), ``labels[b]`` left of row ``b``, ``title`` above."""
    b, t, h, w, c = frames.shape
    scale = scale or max(1, 64 // max(h, w))
    hs, ws = h * scale, w * scale
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    shown = [_fit(measure, label, font, MAX_LABEL_WIDTH) for label in labels] if labels and any(labels) else []
    left = 8 + int(max(measure.textlength(label, font=font) for label in shown)) if shown else 0
    top = (TOP if title else 0) + HEADER
    width = max(left + t * (ws + PAD) + PAD, 8 + int(measure.textlength(title, font=font)) if title else 0)
    canvas = Image.new("RGB", (width, top + b * (hs + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    every = max(1, int(np.ceil(24 / (ws + PAD))))  # frame numbers at least 24 px apart
    for k in range(0, t, every):
        draw.text((left + PAD + k * (ws + PAD), top - HEADER), str(k), fill=(90, 90, 90), font=font)
    for i in range(b):
        for k in range(t):
            f = frames[i, k]
            tile = Image.fromarray(f[..., 0] if c == 1 else f, mode="L" if c == 1 else "RGB").convert("RGB")
            at = (left + PAD + k * (ws + PAD), top + PAD + i * (hs + PAD))
            canvas.paste(tile.resize((ws, hs), Image.Resampling.NEAREST), at)
    for i, label in enumerate(shown):
        draw.text((4, top + PAD + i * (hs + PAD) + hs // 2 - 6), label, fill=(0, 0, 0), font=font)
    canvas.save(path, format="PNG")
    return path


class VideoWriter:
    """Writes ``{stem}_frames.png`` (every sample) and ``{stem}_{i:03d}.mp4`` per sample."""

    modality = "video"

    def __init__(self, config: VideoWriterConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: VideoWriterConfig | None = None) -> VideoWriter:
        return cls(config if config is not None else VideoWriterConfig())

    def write(
        self, media: Tensor, directory: Path, *, stem: str, labels: Sequence[str] | None, title: str
    ) -> list[MediaFile]:
        from selfflow.plugins.video.pyav import write_video

        videos = check_videos(media)
        b, _, t, h, w = videos.shape
        labels = check_labels(labels, b, "video")
        stem = check_stem(stem)
        directory = Path(directory)
        bad = (~torch.isfinite(videos)).flatten(1).any(1).tolist()
        frames = to_frames(videos)
        cfg = self.config

        strip = directory / f"{stem}_frames.png"
        with replacing(strip) as tmp:
            save_strip(frames, tmp, labels=labels, scale=cfg.strip_scale, title=title or None)
        caption = f"{b} samples x {t} frames ({h}x{w}, {cfg.fps:g} fps), one row per sample"
        if any(bad):
            caption += f"; {sum(bad)} with non-finite values (NaN drawn grey)"
        files = [MediaFile(path=strip, element="img", items=range(b), caption=caption)]

        scale = cfg.scale or max(1, 128 // max(h, w))
        for i in range(min(b, cfg.max_videos)):
            clip = frames[i]
            if scale > 1:
                clip = clip.repeat(scale, axis=1).repeat(scale, axis=2)
            path = directory / f"{stem}_{i:03d}.mp4"
            with replacing(path) as tmp:
                write_video(tmp, clip, fps=cfg.fps, crf=cfg.crf)
            text = (labels[i] if labels and labels[i] else f"sample {i}") + (" (non-finite values)" if bad[i] else "")
            files.append(MediaFile(path=path, element="video", items=(i,), caption=text))
        return files
