"""Audio file I/O with the real libraries: WAV/FLAC/OGG through soundfile, MP3 and AAC through
PyAV, mono mixdown, soxr resampling, and unreadable files reported by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile", reason="the audio extra (soundfile) is not installed")
av = pytest.importorskip("av", reason="the audio extra (PyAV) is not installed")
pytest.importorskip("soxr", reason="the audio extra (soxr) is not installed")

from selfflow.plugins.audio.io import AudioReadError, _read_av, read_audio, write_wav  # noqa: E402
from selfflow.plugins.audio.resample import resample  # noqa: E402


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def write_av(path: Path, x: np.ndarray, rate: int, codec: str, fmt: str | None = None) -> Path:
    """``x`` (2, samples) stereo through PyAV's encoder ``codec``."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def test_wav_round_trip_is_16_bit_exact(tmp_path: Path) -> None:
    x = tone(440, 16000)
    path = write_wav(tmp_path / "a.wav", x, 16000)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
    y, rate = read_audio(path)
    assert rate == 16000 and y.dtype == np.float32 and y.shape == (16000,)
    assert np.abs(y - x).max() <= 1 / 32768 + 1e-7  # one 16-bit step
    write_wav(tmp_path / "loud.wav", np.array([2.0, -3.0, np.nan, 0.25]), 8000)  # clipped, NaN -> 0
    y, _ = read_audio(tmp_path / "loud.wav")
    assert np.allclose(y, [32767 / 32768, -1.0, 0.0, 0.25], atol=1e-4)


@pytest.mark.parametrize("suffix", ["flac", "ogg"])
def test_flac_and_ogg_through_soundfile(tmp_path: Path, suffix: str) -> None:
    x = tone(1000, 22050)
    sf.write(str(tmp_path / f"a.{suffix}"), x, 22050)
    y, rate = read_audio(tmp_path / f"a.{suffix}")
    assert rate == 22050 and len(y) == len(x)
    assert abs(peak_hz(y, rate) - 1000) < 3
    if suffix == "flac":  # lossless
        assert np.abs(y - x).max() < 1e-4


def test_stereo_44k_to_16k_mono_keeps_length_and_frequency(tmp_path: Path) -> None:
    left, right = tone(1000, 44100, amp=0.6), tone(1000, 44100, amp=0.2)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], 1), 44100, subtype="FLOAT")
    y, rate = read_audio(tmp_path / "s.wav", sample_rate=16000)
    assert rate == 16000 and len(y) == 16000  # 1 s
    assert abs(peak_hz(y, rate) - 1000) < 2
    mid = y[2000:14000]  # mean of channels: amplitude (0.6 + 0.2) / 2, away from the resampler's edges
    assert abs(np.abs(mid).max() - 0.4) < 0.01


def test_mp3_and_aac_through_pyav(tmp_path: Path) -> None:
    x = np.stack([tone(1000, 44100), tone(1000, 44100)])
    mp3 = write_av(tmp_path / "a.mp3", x, 44100, "libmp3lame")
    y, rate = _read_av(mp3)  # PyAV's decoder directly (soundfile reads MP3 too where libsndfile >= 1.1)
    assert rate == 44100 and abs(len(y) - 44100) < 2 * 1152  # encoder padding at most a couple of frames
    assert abs(peak_hz(y, rate) - 1000) < 3
    y, rate = read_audio(mp3, sample_rate=16000)
    assert rate == 16000 and abs(len(y) - 16000) < 1000 and abs(peak_hz(y, rate) - 1000) < 3
    m4a = write_av(tmp_path / "a.m4a", x, 44100, "aac", "mp4")  # soundfile cannot read AAC: PyAV does
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(m4a))
    y, rate = read_audio(m4a)
    assert rate == 44100 and abs(len(y) - 44100) < 2048 and abs(peak_hz(y, rate) - 1000) < 3


def _broken(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    write_wav(tmp_path / "good.wav", tone(440, 8000), 8000)
    data = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])  # libsndfile would read half silently
    (tmp_path / "header.wav").write_bytes(data[:30])
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("these are notes, not audio\n")
    sf.write(str(tmp_path / "good.flac"), tone(440, 8000), 8000)
    flac = (tmp_path / "good.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    return {
        "cut.wav": (tmp_path / "cut.wav", "truncated WAV"),
        "header.wav": (tmp_path / "header.wav", "truncated WAV"),
        "empty.wav": (tmp_path / "empty.wav", "empty file"),
        "text.wav": (tmp_path / "text.wav", "a text file, not audio"),
        "cut.flac": (tmp_path / "cut.flac", "truncated"),
        "missing.wav": (tmp_path / "missing.wav", "no such file"),
    }


def test_unreadable_files_are_named_with_the_reason(tmp_path: Path) -> None:
    for name, (path, reason) in _broken(tmp_path).items():
        with pytest.raises(AudioReadError) as info:
            read_audio(path)
        assert str(path) in str(info.value) and reason in str(info.value), name
        assert info.value.path == path
    assert isinstance(AudioReadError(tmp_path, "x"), ValueError)


def test_resample_validates_and_keeps_channels() -> None:
    x = np.stack([tone(500, 48000), tone(2000, 48000)])
    y = resample(x, 48000, 16000)
    assert y.shape == (2, 16000) and y.dtype == np.float32
    assert abs(peak_hz(y[0], 16000) - 500) < 2 and abs(peak_hz(y[1], 16000) - 2000) < 2
    assert resample(x[0], 16000, 16000) is not None and resample(x[0], 16000, 16000).shape == (48000,)
    with pytest.raises(ValueError, match="sample rates must be positive"):
        resample(x[0], 0, 16000)
    with pytest.raises(ValueError, match="quality"):
        resample(x[0], 48000, 16000, quality="best")
