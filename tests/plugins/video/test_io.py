"""Video I/O with the real libraries: PyAV writes H.264 MP4s, decord reads them (PyAV where
decord cannot), and unreadable files are named with what they are."""

from __future__ import annotations

import re
import subprocess
import warnings

import numpy as np
import pytest

pytest.importorskip("decord", reason="reading videos needs decord: pip install 'selfflow[video]'")
av = pytest.importorskip("av", reason="writing videos needs PyAV: pip install 'selfflow[video]'")

from selfflow.plugins.video import pyav  # noqa: E402
from selfflow.plugins.video.decode import VideoReadError, probe_video, read_video, why_unreadable  # noqa: E402
from selfflow.plugins.video.pyav import even_rgb, read_video_pyav, write_video  # noqa: E402


def ramp(t: int, h: int, w: int) -> np.ndarray:
    """``(t, h, w, 1)`` uint8: frame k is flat grey 16 + 12 k (easy to identify after H.264)."""
    return np.broadcast_to((16 + 12 * np.arange(t, dtype=np.uint8))[:, None, None, None], (t, h, w, 1)).copy()


def ffmpeg_video(path, frames: np.ndarray, fps: float, codec: str) -> None:
    """Encode gray ``frames (T, H, W)`` with imageio-ffmpeg's ffmpeg binary (not selfflow)."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    _, h, w = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray"]
    cmd += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", codec, "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)


def test_written_mp4_is_h264_yuv420p_and_decord_reads_it_back(tmp_path):
    frames = ramp(9, 16, 32)  # decord 0.6.0 mis-reads some widths (24, 48): see test_decord_stride_bug
    path = write_video(tmp_path / "a.mp4", frames, fps=10)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height) == ("h264", "yuv420p", 32, 16)
        assert float(s.average_rate) == 10.0
    video = read_video(path)
    assert video.reader == "decord" and video.num_frames == 9 and video.fps == 10.0
    assert video.frames.shape == (9, 16, 32, 3) and video.frames.dtype == np.uint8
    assert np.abs(video.frames.astype(int) - frames.astype(int)).max() <= 2  # flat grey survives H.264
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width, info.reader) == (9, 16, 32, "decord")


def test_indices_pick_frames_with_repeats_and_pyav_agrees(tmp_path):
    path = write_video(tmp_path / "a.mp4", ramp(8, 8, 8), fps=25)
    picked = read_video(path, [5, 0, 0, 7])
    assert np.round((picked.frames[:, 0, 0, 0].astype(float) - 16) / 12).tolist() == [5, 0, 0, 7]
    frames, fps, n = read_video_pyav(path, [5, 0, 0, 7])
    assert (fps, n) == (25.0, 8) and np.abs(frames.astype(int) - picked.frames.astype(int)).max() <= 1
    assert read_video(path, reader="pyav").reader == "pyav"
    with pytest.raises(VideoReadError, match="frame 8 requested"):
        read_video(path, [8])


def test_odd_sizes_are_padded_even_and_gray_becomes_rgb():
    x = np.zeros((2, 5, 7, 1), np.uint8)
    x[:, -1, :, 0], x[:, :, -1, 0] = 100, 200
    y = even_rgb(x)
    assert y.shape == (2, 6, 8, 3) and (y[:, 5, :6] == 100).all() and (y[:, :, 7] == 200).all()
    with pytest.raises(ValueError, match=r"\(T, H, W, C\) uint8"):
        even_rgb(np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="zero frames"):
        even_rgb(np.zeros((0, 4, 4, 3), np.uint8))


def test_odd_size_file_reads_back_padded(tmp_path):
    video = read_video(write_video(tmp_path / "odd.mp4", ramp(3, 7, 9), fps=10))
    assert video.frames.shape == (3, 8, 10, 3)


@pytest.mark.parametrize(
    ("ext", "codec", "fps"),
    [("avi", "mpeg4", 12), ("webm", "libvpx", 25), ("mkv", "libx264", 30), ("mov", "mpeg4", 15)],
)
def test_videos_selfflow_did_not_write_are_read(tmp_path, ext, codec, fps):
    frames = ramp(10, 24, 32)[..., 0]
    path = tmp_path / f"clip.{ext}"
    ffmpeg_video(path, frames, fps, codec)
    video = read_video(path)
    assert video.frames.shape == (10, 24, 32, 3) and video.num_frames == 10
    assert video.fps == pytest.approx(fps)
    levels = np.round((video.frames[:, 12, 16, 0].astype(float) - 16) / 12)
    assert levels.tolist() == list(range(10))


@pytest.mark.parametrize("width", [16, 48])
def test_decord_stride_bug_falls_back_to_pyav(tmp_path, width):
    # decord 0.6.0 returns (H, W, 6) / (H, W, 4) frames for these widths, or raises in get_batch
    path = write_video(tmp_path / "w.mp4", ramp(6, 16, width), fps=10)
    video = read_video(path)
    assert video.frames.shape == (6, 16, width, 3)
    assert np.round((video.frames[:, 8, 8, 0].astype(float) - 16) / 12).tolist() == list(range(6))
    assert video.reader in ("decord", "pyav")  # pyav with decord 0.6.0; decord once it is fixed
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (6, 16, width)


def _noise_mp4(path, faststart: bool) -> bytes:
    """A clip that does not compress to nothing, so cutting it loses frames."""
    frames = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    if faststart:
        write_video(path, frames, fps=10, crf=30)
    else:
        ffmpeg_video(path, frames[..., 0], 10, "libx264")  # index at the end (ffmpeg's default)
    return path.read_bytes()


@pytest.mark.parametrize("faststart", [True, False])
def test_truncated_mp4_is_named(tmp_path, faststart):
    data = _noise_mp4(tmp_path / "full.mp4", faststart)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match=r"cut\.mp4.*damaged, truncated or not a video") as err:
        probe_video(cut)
    assert err.value.path == cut
    with pytest.raises(VideoReadError, match=r"cut\.mp4"):
        read_video(cut)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, I am not a video\n", "a text file, not a video"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image, not a video"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64), "a WAV audio file, not a video"),
    ],
)
def test_non_videos_are_named_with_what_they_are(tmp_path, content, reason):
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    assert why_unreadable(path) == reason or why_unreadable(path).startswith(reason)
    for fn in (probe_video, read_video):
        with pytest.raises(VideoReadError, match=re.escape(reason)) as err:
            fn(path)
        assert str(path) in str(err.value) and "ffmpeg -i" in str(err.value)  # the path and a fix


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "nope.mp4")


def test_without_libx264_mpeg4_is_written_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(pyav, "has_encoder", lambda name: False)
    pyav.video_codec.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no libx264"):
            path = write_video(tmp_path / "m.mp4", ramp(4, 16, 16), fps=10)
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.name == "mpeg4"
        assert read_video(path).frames.shape == (4, 16, 16, 3)
    finally:
        pyav.video_codec.cache_clear()


def test_this_environment_writes_h264_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pyav.video_codec() == "libx264"


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="fps must be positive"):
        write_video(tmp_path / "x.mp4", ramp(2, 4, 4), fps=0)
    with pytest.raises(ValueError, match="crf"):
        write_video(tmp_path / "x.mp4", ramp(2, 4, 4), fps=10, crf=60)
