"""Audio files in and out: soundfile for WAV/FLAC/OGG (and MP3 where libsndfile has it),
PyAV for whatever soundfile cannot read (MP3 on older libsndfile, AAC/M4A, Opus, WebM, ...).

Both libraries are imported here and only here, lazily, so the plugin registers without them.

- ``read_audio(path, sample_rate=None)`` -> ``(samples,)`` float32 mono and its rate. Several
  channels are **mixed down by their mean** (a stereo file of ``L`` and ``R`` becomes
  ``(L + R) / 2``, so a full-scale signal stays in [-1, 1]); with ``sample_rate`` the result is
  resampled by soxr (``resample.py``). A file that cannot be read in full (empty, not audio,
  truncated, corrupt, no audio stream) raises ``AudioReadError`` naming the path and why.
- ``write_wav(path, audio, sample_rate)``: a ``(samples,)`` or ``(channels, samples)`` float
  array in [-1, 1] as 16-bit PCM WAV (values outside [-1, 1] are clipped, NaN written as 0).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

_EXTRA = "pip install 'selfflow[audio]'"


class AudioReadError(ValueError):
    """An audio file that cannot be read in full; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read audio file {str(path)!r}: {reason}")


def soundfile():
    """The ``soundfile`` module, or an ImportError naming the extra."""
    try:
        import soundfile as sf
    except ImportError as err:  # also OSError-free: soundfile ships libsndfile in its wheel
        raise ImportError(f"reading and writing WAV/FLAC/OGG needs the 'soundfile' package: {_EXTRA}") from err
    return sf


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError(f"reading MP3/AAC/Opus audio needs PyAV (the 'av' package): {_EXTRA}") from err
    return av


# ----------------------------------------------------------------------------- reading

# file signatures of things that are not audio a user may have renamed
_NOT_AUDIO = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
)
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000)  # streaming writers leave these placeholders


def _sniff(path: Path) -> str | None:
    """A reason ``path`` is not audio at all, judged from its first bytes, or ``None``."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty file (0 bytes)"
    for magic, kind in _NOT_AUDIO:
        if head.startswith(magic):
            return f"{kind}, not audio"
    if head[:4] != b"RIFF" and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return f"a text file, not audio (it starts with {text[:24]!r})"
    return None


def _wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file is shorter than its header says, or ``None``.

    libsndfile reads a cut WAV without complaint (it returns the frames that are there), so
    the ``data`` chunk's declared size is checked against the bytes the file holds.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return "truncated WAV: the file ends before its 'data' chunk"
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                if length in _UNKNOWN_SIZES:
                    return None
                have = size - f.tell()
                if have < length:
                    return f"truncated WAV: its header declares {length} bytes of samples, the file holds {have}"
                return None
            f.seek(length + (length & 1), os.SEEK_CUR)


def _mixdown(x: np.ndarray) -> np.ndarray:
    """``(samples,)`` or ``(samples, channels)`` -> ``(samples,)`` float32: mean of channels."""
    return (x.mean(axis=1) if x.ndim == 2 else x).astype(np.float32, copy=False)


class _Truncated(Exception):
    """Decoding stopped early or found nothing: the file is damaged (no other reader is tried)."""


class _Unknown(Exception):
    """soundfile does not know the format: PyAV is tried next."""


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    sf = soundfile()
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _Unknown(str(err)) from err
    with f:
        rate, declared = f.samplerate, f.frames
        try:
            x = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:  # opened, then the stream broke: damaged
            raise _Truncated(f"damaged or truncated {f.format} data ({err})") from err
    if 0 < declared < (1 << 62) and len(x) < declared:
        raise _Truncated(f"truncated: the header declares {declared} frames, {len(x)} could be decoded")
    return _mixdown(x), rate


def _read_av(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV; planar or packed, any sample format, to float32 mono."""
    av = _av()
    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise _Truncated("the file has no audio stream")
        stream = streams[0]
        rate = stream.rate or stream.codec_context.sample_rate
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        chunks = []
        for frame in container.decode(stream):
            a = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
            if not frame.format.is_planar:
                a = a.reshape(-1, len(frame.layout.channels)).T
            if a.dtype.kind == "i":
                a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
            elif a.dtype.kind == "u":  # 8-bit unsigned PCM
                a = (a.astype(np.float32) - 128.0) / 128.0
            chunks.append(a.astype(np.float32, copy=False).mean(axis=0))
    if not chunks:
        raise _Truncated("the audio stream holds no decodable samples")
    x = np.concatenate(chunks)
    if duration and len(x) < 0.9 * duration * rate:  # the container says it is longer
        raise _Truncated(f"truncated: the container declares {duration:.2f} s, {len(x) / rate:.2f} s could be decoded")
    return x, int(rate)


def read_audio(path: str | os.PathLike, *, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """``(samples,)`` float32 mono (mean of channels) and its sample rate; resampled by soxr
    to ``sample_rate`` when given (then the rate returned is ``sample_rate``).

    soundfile first; PyAV when soundfile does not know the format. ``AudioReadError`` (a
    ``ValueError``) names the path for a missing, empty, non-audio, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(path, "no such file" if not path.exists() else "not a file")
    reason = _sniff(path)
    if reason is not None:
        raise AudioReadError(path, reason)
    reason = _wav_truncation(path)
    if reason is not None:
        raise AudioReadError(path, reason)
    try:
        x, rate = _read_soundfile(path)
    except _Truncated as err:
        raise AudioReadError(path, str(err)) from None
    except _Unknown as sf_err:
        try:
            x, rate = _read_av(path)
        except ImportError:
            raise AudioReadError(
                path, f"soundfile cannot read it ({sf_err}); PyAV reads more formats: {_EXTRA}"
            ) from None
        except _Truncated as err:
            raise AudioReadError(path, str(err)) from None
        except Exception as av_err:  # PyAV raises its own error types per container and codec
            raise AudioReadError(
                path, f"neither soundfile ({sf_err}) nor PyAV ({type(av_err).__name__}: {av_err}) can decode it"
            ) from av_err
    if len(x) == 0:
        raise AudioReadError(path, "the file holds no samples")
    if not np.isfinite(x).all():
        raise AudioReadError(path, "the file holds non-finite samples (NaN or infinity)")
    if sample_rate is not None and sample_rate != rate:
        from selfflow.plugins.audio.resample import resample

        x, rate = resample(x, rate, sample_rate), sample_rate
    return x, rate


# ----------------------------------------------------------------------------- writing


def write_wav(path: str | os.PathLike, audio, sample_rate: int) -> Path:
    """``audio`` ``(samples,)`` or ``(channels, samples)`` in [-1, 1] -> 16-bit PCM WAV at
    ``path`` (clipped to [-1, 1]; NaN written as silence). Returns the path."""
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"write_wav takes (samples,) or (channels, samples) audio, got shape {x.shape}")
    if sample_rate <= 0:
        raise ValueError(f"write_wav: sample_rate must be positive, got {sample_rate}")
    x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    path = Path(path)
    soundfile().write(str(path), x.T if x.ndim == 2 else x, int(sample_rate), subtype="PCM_16", format="WAV")
    return path
