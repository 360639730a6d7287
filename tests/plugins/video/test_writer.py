"""The ``video`` writer: one playable MP4 per sample and a labelled PNG strip of frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av", reason="writing videos needs PyAV: pip install 'selfflow[video]'")
pytest.importorskip("decord", reason="reading videos needs decord: pip install 'selfflow[video]'")

from selfflow.plugins.protocols import MediaWriter  # noqa: E402
from selfflow.plugins.video.decode import read_video  # noqa: E402
from selfflow.plugins.video.writer import HEADER, PAD, TOP, VideoWriter, VideoWriterConfig  # noqa: E402


def clips(b: int, t: int, h: int = 8, w: int = 8, c: int = 1) -> torch.Tensor:
    """Sample i, frame k is flat (i * t + k) / (b * t) * 2 - 1: every tile is identifiable."""
    v = (torch.arange(b * t, dtype=torch.float32) / (b * t)) * 2 - 1
    return v.view(b, 1, t, 1, 1).expand(b, c, t, h, w).clone()


def test_files_elements_and_captions(tmp_path):
    writer = VideoWriter.from_config()
    assert isinstance(writer, MediaWriter) and writer.modality == "video"
    files = writer.write(clips(3, 5), tmp_path, stem="step_0000100", labels=["7 ↘", "7 ↘", "2 ↖"], title="t")
    assert [f.path.name for f in files] == [
        "step_0000100_frames.png",
        "step_0000100_000.mp4",
        "step_0000100_001.mp4",
        "step_0000100_002.mp4",
    ]
    assert files[0].element == "img" and files[0].items == (0, 1, 2) and "3 samples x 5 frames" in files[0].caption
    assert [(f.element, f.items, f.caption) for f in files[1:]] == [
        ("video", (0,), "7 ↘"),
        ("video", (1,), "7 ↘"),
        ("video", (2,), "2 ↖"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.path.name for f in files)  # no temporaries


def test_mp4_is_browser_h264_enlarged_and_holds_the_frames(tmp_path):
    x = clips(2, 5)
    files = VideoWriter(VideoWriterConfig(fps=12.5)).write(x, tmp_path, stem="s", labels=None, title="")
    with av.open(str(files[2].path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (s.width, s.height) == (128, 128) and float(s.average_rate) == 12.5  # 8 px x 16
    video = read_video(files[2].path)
    assert video.frames.shape == (5, 128, 128, 3)
    expected = ((x[1, 0, :, 0, 0] + 1) * 127.5).round().numpy()
    assert np.abs(video.frames[:, 64, 64, 0] - expected).max() <= 3
    assert files[1].caption == "sample 0"


def test_strip_rows_are_samples_and_columns_frames(tmp_path):
    x = clips(2, 3, 8, 8)
    [strip, *_] = VideoWriter(VideoWriterConfig(strip_scale=2)).write(
        x, tmp_path, stem="s", labels=["a", "b"], title="T"
    )
    with Image.open(strip.path) as im:
        img = np.asarray(im.convert("L"))
    tile = 16
    assert img.shape[0] == TOP + HEADER + 2 * (tile + PAD) + PAD
    left = img.shape[1] - (3 * (tile + PAD) + PAD)
    assert left > 8  # a label column
    for i in range(2):
        for k in range(3):
            y = TOP + HEADER + PAD + i * (tile + PAD) + tile // 2
            xx = left + PAD + k * (tile + PAD) + tile // 2
            assert abs(int(img[y, xx]) - round((x[i, 0, k, 0, 0].item() + 1) * 127.5)) <= 1


def test_odd_sizes_rgb_max_videos_and_non_finite(tmp_path):
    x = clips(3, 2, 5, 7, c=3)
    x[1, 0, 0, 0, 0] = float("nan")
    files = VideoWriter(VideoWriterConfig(scale=1, max_videos=2)).write(x, tmp_path, stem="o", labels=None, title="")
    assert len(files) == 3 and "1 with non-finite values" in files[0].caption
    assert "non-finite" in files[2].caption
    assert read_video(files[1].path).frames.shape == (2, 6, 8, 3)  # padded to even


def test_bad_input_names_the_fix(tmp_path):
    w = VideoWriter.from_config()
    with pytest.raises(ValueError, match="image batch"):
        w.write(torch.zeros(2, 1, 8, 8), tmp_path, stem="s", labels=None, title="")
    with pytest.raises(ValueError, match=r"permute\(0, 2, 1, 3, 4\)"):
        w.write(torch.zeros(2, 5, 1, 8, 8), tmp_path, stem="s", labels=None, title="")
    with pytest.raises(TypeError, match="uint8"):
        w.write(torch.zeros(2, 1, 2, 8, 8, dtype=torch.uint8), tmp_path, stem="s", labels=None, title="")
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        w.write(clips(3, 2), tmp_path, stem="s", labels=["a", "b"], title="")
    with pytest.raises(TypeError, match="class_names"):
        w.write(clips(2, 2), tmp_path, stem="s", labels=[1, 2], title="")
    with pytest.raises(ValueError, match="stem"):
        w.write(clips(2, 2), tmp_path, stem="../x", labels=None, title="")
