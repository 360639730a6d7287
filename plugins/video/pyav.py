"""PyAV, the one module that imports ``av``: MP4 writing (H.264, yuv420p) and the fallback
reader for files decord cannot open or decode.

Frames are ``(T, H, W, C)`` uint8 with ``C`` = 1 (gray) or 3 (RGB) on the way in, and
``(T, H, W, 3)`` uint8 on the way out.

Writing: H.264 (``libx264``) in an MP4 container, pixel format ``yuv420p`` and the
``+faststart`` flag (the index first), which every browser plays. yuv420p stores colour at
half resolution, so H.264 needs even sizes: an odd width or height is padded by repeating
the last column/row (the reader gets the padded size back). Gray frames are written as RGB
(R = G = B). Where this PyAV build has no libx264, ``mpeg4`` is used with a warning (it
plays in VLC/ffmpeg, not in browsers).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

H264, FALLBACK = "libx264", "mpeg4"


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError("writing and reading videos with PyAV needs 'av': pip install 'selfflow[video]'") from err
    return av


@functools.cache
def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with codec ``name`` (e.g. ``"libx264"``)."""
    av = _av()
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - av raises UnknownCodecError (a ValueError) or FFmpegError by version
        return False
    return True


@functools.cache
def video_codec() -> str:
    """``"libx264"`` when available, else ``"mpeg4"`` (warned once: browsers will not play it)."""
    if has_encoder(H264):
        return H264
    warnings.warn(
        "this PyAV build has no libx264 encoder: writing MP4s with mpeg4, which browsers do not play; "
        "install a PyAV wheel with libx264 (the PyPI wheels have it) for playable samples",
        RuntimeWarning,
        stacklevel=2,
    )
    return FALLBACK


def even_rgb(frames: np.ndarray) -> np.ndarray:
    """``(T, H, W, C)`` uint8, ``C`` in {1, 3} -> ``(T, H', W', 3)`` with ``H'``, ``W'`` even
    (an odd side is padded by repeating its last row/column)."""
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8:
        raise ValueError(
            f"video frames must be a (T, H, W, C) uint8 array with C = 1 or 3, got {frames.dtype} {frames.shape}"
        )
    if frames.shape[0] == 0:
        raise ValueError("cannot write a video with zero frames")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: float, crf: int = 18) -> Path:
    """Write ``frames (T, H, W, C)`` uint8 to ``path`` as H.264 yuv420p MP4 at ``fps``.

    ``crf``: x264's constant rate factor (0-51, lower is closer to the input; 18 is visually
    lossless). Sizes are made even (``even_rgb``). The file is written in place: callers
    that need atomic replacement write to a temporary name and rename it.
    """
    av = _av()
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    frames = even_rgb(np.asarray(frames))
    _, h, w, _ = frames.shape
    codec = video_codec()
    rate = _rate(fps)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == H264:
            # one thread: the house runs on shared cores; baseline-free defaults play everywhere
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        else:
            stream.bit_rate = max(200_000, w * h * round(fps) * 2)
        stream.codec_context.time_base = 1 / rate
        for k, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = k, 1 / rate  # explicit timestamps: frame k at k / fps seconds
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def _rate(fps: float):
    """``fps`` as a ``Fraction`` (PyAV wants a rational frame rate)."""
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def read_video_pyav(path: str | os.PathLike, indices: list[int] | None = None) -> tuple[np.ndarray, float, int]:
    """Decode ``path`` with PyAV: ``(frames (T, H, W, 3) uint8, fps, frames in the file)``.

    Decodes sequentially from the start (PyAV's seeking is by timestamp, unreliable on
    short clips) and keeps frames ``indices`` (``None``: all). Raises ``ValueError`` for a
    file without a video stream, with no frames, or truncated (fewer frames than its header
    declares, or an index past the last decoded frame); PyAV's own errors pass through.
    """
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        declared = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        wanted = None if indices is None else sorted(set(indices))
        last = None if wanted is None else wanted[-1]
        kept: dict[int, np.ndarray] = {}
        count = 0
        for frame in container.decode(stream):
            if wanted is None or count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if last is not None and count > last and declared == 0:
                break  # nothing more is needed and there is no declared count to check
    if count == 0:
        raise ValueError("the video stream has no frames")
    if declared and count < declared:
        raise ValueError(f"truncated: the header declares {declared} frames but only {count} decode")
    if indices is None:
        return np.stack([kept[i] for i in range(count)]), fps, count
    missing = [i for i in indices if i not in kept]
    if missing:
        raise ValueError(f"frame {missing[0]} requested but the video has {count} frames")
    return np.stack([kept[i] for i in indices]), fps, max(count, declared)
