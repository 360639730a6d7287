"""Reading videos: decord first, PyAV where decord cannot open or decode a file.

The one module that imports ``decord`` (lazily). ``read_video(path, indices)`` returns
``Video(frames (T, H, W, 3) uint8 RGB, fps, num_frames, reader)``; ``probe_video(path)``
reads what a dataset needs to plan clips (frame count, fps, size) and decodes the last
frame, so a truncated file is found when the dataset is built, not mid-encoding.

decord's ``VideoReader`` is used with its native NDArray and ``.asnumpy()`` rather than
``decord.bridge.set_bridge("torch")``: the bridge is process-global state, and the
callers convert to torch themselves (``torch.from_numpy``, no copy). decord decodes with one
thread by default (``threads``): the training loop never decodes video (latents are cached),
and the data benchmark measures both readers on one thread.

decord 0.6.0 returns mis-strided frames for some widths (16, 24, 48 px among them; 32, 40,
64 and 128 are fine): ``read_video`` checks the shape and reads such files with PyAV.

Every failure is a ``VideoReadError`` naming the path and, where the bytes say so, what the
file is instead (empty, text, an image, audio), with both readers' reasons otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np
import torch


class VideoReadError(ValueError):
    """A file that neither decord nor PyAV can read as a video; the message names it,
    ``path`` and ``reason`` hold the parts."""

    def __init__(self, message: str, *, path: Path | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason or message


@attrs.frozen(kw_only=True)
class Video:
    """Decoded frames ``(T, H, W, 3)`` uint8 RGB; ``fps``: the file's frame rate;
    ``num_frames``: frames in the file (not only those decoded); ``reader``: ``"decord"``
    or ``"pyav"``."""

    frames: np.ndarray
    fps: float
    num_frames: int
    reader: str


@attrs.frozen(kw_only=True)
class VideoInfo:
    """What ``probe_video`` found: frame count, fps, size, and which reader succeeded."""

    num_frames: int
    fps: float
    height: int
    width: int
    reader: str


def _decord():
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "reading videos needs 'decord' (PyAV is the fallback): pip install 'selfflow[video]'"
        ) from err
    return decord


# signatures of files that are not videos (a user's folder may hold a renamed file)
_NOT_VIDEOS = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (8, b"WAVE", "a WAV audio file"),
    (0, b"fLaC", "a FLAC audio file"),
    (0, b"ID3", "an MP3 audio file"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
)


def why_unreadable(path: Path) -> str | None:
    """What ``path`` is instead of a video, from its first bytes (``None``: it looks like
    one, or nothing is known)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    if size == 0:
        return "empty file (0 bytes)"
    for at, magic, kind in _NOT_VIDEOS:
        if head[at : at + len(magic)] == magic:
            return f"{kind}, not a video"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"a text file, not a video (it starts with {text[:24]!r})"
    return None


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    # decord's messages start with a C++ source location; keep the end, which says what failed
    return f"{type(err).__name__}: {text[-200:]}" if text else type(err).__name__


def _fail(path: Path, errors: list[str]) -> VideoReadError:
    what = why_unreadable(path)
    reason = what if what else "damaged, truncated or not a video (" + "; ".join(errors) + ")"
    return VideoReadError(
        f"cannot read video {str(path)!r}: {reason}. Replace or re-encode it "
        "(e.g. ffmpeg -i in.ext -c:v libx264 -pix_fmt yuv420p out.mp4), or delete it",
        path=path,
        reason=reason,
    )


def _checked(frames: np.ndarray) -> np.ndarray:
    """decord 0.6.0 mis-strides frames of some widths (16, 24, 48 px, ...): a single frame
    comes back with 4 or 6 "channels", a batch raises. Either way PyAV reads the file."""
    if frames.shape[-1] != 3:
        raise ValueError(f"decord returned frames of shape {frames.shape} (a row-stride bug): reading with PyAV")
    return frames


def _open_decord(path: Path, threads: int):
    decord = _decord()
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)


def probe_video(path: str | os.PathLike, *, threads: int = 1) -> VideoInfo:
    """Frame count, fps and size of ``path``, after decoding its last frame (so a truncated
    file fails here). ``VideoReadError`` when neither reader can."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"cannot read video {str(path)!r}: no such file", path=path, reason="no such file")
    errors = []
    if why_unreadable(path) is None:
        try:
            vr = _open_decord(path, threads)
            n = len(vr)
            if n == 0:
                raise ValueError("no frames")
            last = _checked(vr[n - 1].asnumpy())
            return VideoInfo(
                num_frames=n, fps=float(vr.get_avg_fps()), height=last.shape[0], width=last.shape[1], reader="decord"
            )
        except Exception as err:  # noqa: BLE001 - decord raises DECORDError, RuntimeError, ...: try PyAV
            errors.append(f"decord: {_reason(err)}")
        try:
            from selfflow.plugins.video.pyav import read_video_pyav

            frames, fps, n = read_video_pyav(path)
            return VideoInfo(num_frames=n, fps=fps, height=frames.shape[1], width=frames.shape[2], reader="pyav")
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - PyAV's errors vary by format: reported with the path
            errors.append(f"PyAV: {_reason(err)}")
    raise _fail(path, errors)


def read_video(
    path: str | os.PathLike, indices: list[int] | None = None, *, reader: str = "auto", threads: int = 1
) -> Video:
    """Frames ``indices`` (``None``: all, in order; repeats allowed) of ``path``.

    ``reader``: ``"auto"`` (decord, then PyAV if decord fails), ``"decord"`` or ``"pyav"``
    (only that one: what the data benchmark times). Indices must lie in
    ``0 .. num_frames - 1``. ``VideoReadError`` names the path and every reader's reason.
    """
    path = Path(path)
    if reader not in ("auto", "decord", "pyav"):
        raise ValueError(f"reader must be 'auto', 'decord' or 'pyav', got {reader!r}")
    if not path.is_file():
        raise VideoReadError(f"cannot read video {str(path)!r}: no such file", path=path, reason="no such file")
    errors = []
    if reader in ("auto", "decord"):
        try:
            vr = _open_decord(path, threads)
            n = len(vr)
            if n == 0:
                raise ValueError("no frames")
            want = list(range(n)) if indices is None else [int(i) for i in indices]
            bad = [i for i in want if not 0 <= i < n]
            if bad:
                raise IndexError(f"frame {bad[0]} requested but the video has {n} frames")
            frames = _checked(vr.get_batch(want).asnumpy())
            return Video(frames=frames, fps=float(vr.get_avg_fps()), num_frames=n, reader="decord")
        except ImportError:
            if reader == "decord":
                raise
            errors.append("decord: not installed")
        except Exception as err:  # noqa: BLE001 - any decord failure: try PyAV
            errors.append(f"decord: {_reason(err)}")
    if reader in ("auto", "pyav"):
        try:
            from selfflow.plugins.video.pyav import read_video_pyav

            frames, fps, n = read_video_pyav(path, None if indices is None else [int(i) for i in indices])
            return Video(frames=frames, fps=fps, num_frames=n, reader="pyav")
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - PyAV's errors vary by format: reported with the path
            errors.append(f"PyAV: {_reason(err)}")
    raise _fail(path, errors)


def to_media(frames: np.ndarray, channels: int) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 RGB -> ``(channels, T, H, W)`` float in [-1, 1]; one channel is
    the BT.601 luma ``0.299 R + 0.587 G + 0.114 B``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    if channels == 1:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)
