"""``video/folder`` on real files made by imageio-ffmpeg's ffmpeg (not by selfflow)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

pytest.importorskip("decord", reason="reading videos needs decord: pip install 'selfflow[video]'")
pytest.importorskip("av", reason="PyAV is the fallback reader: pip install 'selfflow[video]'")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

from selfflow.plugins.protocols import Dataset  # noqa: E402
from selfflow.plugins.video.decode import VideoReadError  # noqa: E402
from selfflow.plugins.video.folder import (  # noqa: E402
    UnreadableVideoWarning,
    VideoFolderConfig,
    clip_indices,
    video_folder,
)


def numbered(path, n: int, fps: float, *, size=(32, 40), codec="libx264") -> None:
    """A gray clip whose frame k is flat 16 + 12 k (k < 19), encoded by ffmpeg into ``path``."""
    h, w = size
    frames = np.broadcast_to((16 + 12 * np.arange(n) % 240).astype(np.uint8)[:, None, None], (n, h, w)).copy()
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray"]
    cmd += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", codec, "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)


def frame_ids(x) -> list[int]:
    """Which numbered source frame each clip frame is (from its grey level)."""
    return np.round(((x[0, :, 4, 4].numpy() + 1) * 127.5 - 16) / 12).astype(int).tolist()


def cfg(path, **kw) -> VideoFolderConfig:
    return VideoFolderConfig(path=str(path), **{"size": 16, "channels": 1, "eval_fraction": 0.3, **kw})


def test_clip_rule_by_fps_and_stride():
    c = VideoFolderConfig(path="x", frames=4, fps=10)
    assert clip_indices(100, 30.0, c, None) == ([0, 3, 6, 9], 4)
    assert clip_indices(100, 25.0, c, None) == ([0, 3, 5, 8], 4)  # 2.5 -> 3, 7.5 -> 8: halves round up
    assert clip_indices(100, 5.0, c, None) == ([0, 1, 1, 2], 4)  # 0, 0.5, 1, 1.5: a slow file repeats frames
    s = VideoFolderConfig(path="x", frames=3, stride=2)
    assert clip_indices(10, 30.0, s, None) == ([0, 2, 4], 3)
    # short files: loop wraps, pad repeats the last frame and says how many are real, skip drops
    assert clip_indices(3, 30.0, VideoFolderConfig(path="x", frames=5, short="loop"), None) == ([0, 1, 2, 0, 1], 5)
    assert clip_indices(3, 30.0, VideoFolderConfig(path="x", frames=5, short="pad"), None) == ([0, 1, 2, 2, 2], 3)
    assert clip_indices(3, 30.0, VideoFolderConfig(path="x", frames=5, short="skip"), None) is None


def test_random_start_keeps_the_clip_inside_and_is_seeded():
    c = VideoFolderConfig(path="x", frames=4, stride=3, start="random")
    starts = {clip_indices(20, 30.0, c, np.random.default_rng((0, 0, i)))[0][0] for i in range(200)}
    assert starts == set(range(0, 20 - 9))  # last index start + 9 <= 19
    a = clip_indices(20, 30.0, c, np.random.default_rng((0, 0, 7)))
    assert a == clip_indices(20, 30.0, c, np.random.default_rng((0, 0, 7)))


def test_labelled_folder_of_containers_resampled_to_a_target_fps(tmp_path):
    for cls, items in {
        "a": [("x.mp4", 30, "libx264"), ("y.avi", 20, "mpeg4")],
        "b": [("z.webm", 10, "libvpx"), ("w.mkv", 30, "libx264"), ("v.mov", 20, "mpeg4")],
    }.items():
        (tmp_path / cls).mkdir()
        for name, fps, codec in items:
            numbered(tmp_path / cls / name, 19, fps, codec=codec)
    (tmp_path / "b" / "notes.txt").write_text("not a video")
    with pytest.warns(UnreadableVideoWarning, match="notes.txt"):
        train = video_folder(cfg(tmp_path, frames=3, fps=10), split="train", seed=0)
    with pytest.warns(UnreadableVideoWarning, match="notes.txt"):
        ev = video_folder(cfg(tmp_path, frames=3, fps=10), split="eval", seed=0)
    assert isinstance(train, Dataset) and train.class_names == ("a", "b") and train.num_classes == 2
    assert len(train) + len(ev) == 5 and not set(train.files) & set(ev.files)
    for ds in (train, ev):
        for i, f in enumerate(ds.files):
            ex = ds[i]
            assert ex.media["video"].shape == (1, 3, 16, 16) and ex.label == ("ab".index(f.parent.name))
            step = {".mp4": 3, ".avi": 2, ".webm": 1, ".mkv": 3, ".mov": 2}[f.suffix]  # src_fps / 10
            assert frame_ids(ex.media["video"]) == [0, step, 2 * step], f.name


def test_short_videos_loop_pad_or_skip(tmp_path):
    numbered(tmp_path / "long.mp4", 12, 10)
    numbered(tmp_path / "short.mp4", 4, 10)
    numbered(tmp_path / "other.mp4", 12, 10)
    loop = video_folder(cfg(tmp_path, frames=6, eval_fraction=0.1), split="train", seed=3)
    names = [f.name for f in loop.files]
    if "short.mp4" not in names:  # the seeded split put it in eval
        loop = video_folder(cfg(tmp_path, frames=6, eval_fraction=0.1), split="eval", seed=3)
        names = [f.name for f in loop.files]
    i = names.index("short.mp4")
    assert frame_ids(loop[i].media["video"]) == [0, 1, 2, 3, 0, 1] and loop.valid_frames(i) == 6
    split = loop.split
    pad = video_folder(cfg(tmp_path, frames=6, eval_fraction=0.1, short="pad"), split=split, seed=3)
    assert frame_ids(pad[i].media["video"]) == [0, 1, 2, 3, 3, 3] and pad.valid_frames(i) == 4
    if len(pad) > 1:
        with pytest.warns(UnreadableVideoWarning, match=r"short\.mp4: 4 frames, shorter than a clip"):
            skip = video_folder(cfg(tmp_path, frames=6, eval_fraction=0.1, short="skip"), split=split, seed=3)
        assert "short.mp4" not in [f.name for f in skip.files] and len(skip.skipped) == 1


def test_unreadable_files_are_named_skipped_and_counted(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        numbered(tmp_path / name, 6, 10)
    data = (tmp_path / "a.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello")
    with pytest.warns(UnreadableVideoWarning) as record:
        both = [video_folder(cfg(tmp_path, frames=4), split=s, seed=0) for s in ("train", "eval")]
    skipped = {p.name: why for ds in both for p, why in ds.skipped}
    assert set(skipped) == {"cut.mp4", "empty.mp4", "text.mp4"}
    assert skipped["empty.mp4"] == "empty file (0 bytes)" and skipped["text.mp4"].startswith("a text file")
    assert "damaged, truncated or not a video" in skipped["cut.mp4"]
    text = "\n".join(str(w.message) for w in record)
    assert all(name in text for name in skipped) and "skipped" in text
    assert sum(len(ds) for ds in both) == 3


def test_on_error_raise_names_the_path(tmp_path):
    numbered(tmp_path / "a.mp4", 6, 10)
    (tmp_path / "b.mp4").write_text("hello")
    (tmp_path / "c.mp4").write_bytes(b"")
    for split in ("train", "eval"):
        try:
            video_folder(cfg(tmp_path, frames=4, on_error="raise"), split=split, seed=0)
        except VideoReadError as err:
            assert str(tmp_path) in str(err) and 'on_error = "skip"' in str(err)
            break
    else:
        pytest.fail("an unreadable file did not raise")


def test_nothing_readable_and_bad_folders(tmp_path):
    (tmp_path / "a.mp4").write_text("x")
    (tmp_path / "b.mp4").write_bytes(b"")
    (tmp_path / "c.mp4").write_text("y")
    with pytest.warns(UnreadableVideoWarning), pytest.raises(ValueError, match="could be used"):
        video_folder(cfg(tmp_path, frames=4), split="train", seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video_folder(cfg(tmp_path / "nope"), split="train", seed=0)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "r.txt").write_text("z")
    with pytest.raises(ValueError, match="no files ending in"):
        video_folder(cfg(tmp_path / "docs"), split="train", seed=0)
    with pytest.raises(ValueError, match="needs options"):
        video_folder(None, split="train")
    with pytest.raises(ValueError, match="either fps"):
        VideoFolderConfig(path="x", fps=10, stride=2)


def test_rgb_crop_and_fingerprint_follow_the_files(tmp_path):
    numbered(tmp_path / "a.mp4", 6, 10, size=(24, 48))
    numbered(tmp_path / "b.mp4", 6, 10, size=(24, 48))
    c = VideoFolderConfig(path=str(tmp_path), frames=4, size=16, channels=3)
    ds = video_folder(c, split="train", seed=0)
    x = ds[0].media["video"]
    assert x.shape == (3, 4, 16, 16) and ds[0].label is None and ds.num_classes == 0
    fp = ds.fingerprint()
    assert video_folder(c, split="train", seed=0).fingerprint() == fp
    numbered(tmp_path / "b.mp4", 7, 10, size=(24, 48))  # a changed file changes it
    assert video_folder(c, split="train", seed=0).fingerprint() != fp
