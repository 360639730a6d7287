"""The ``audio`` writer: one WAV and one log-mel spectrogram PNG per sample, in samples.html."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

sf = pytest.importorskip("soundfile", reason="the audio extra (soundfile) is not installed")

from selfflow.plugins.audio import selfflow_register_writers  # noqa: E402
from selfflow.plugins.audio.writer import AudioWriter, AudioWriterConfig  # noqa: E402
from selfflow.plugins.gallery import Gallery, GalleryEntry  # noqa: E402
from selfflow.plugins.protocols import MediaWriter  # noqa: E402


def _tones(freqs, rate=16000, seconds=0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * rate)) / rate
    return torch.stack([0.5 * torch.sin(2 * torch.pi * f * t) for f in freqs])[:, None]


def test_one_wav_and_one_spectrogram_per_sample(tmp_path) -> None:
    writer = AudioWriter.from_config()
    assert isinstance(writer, MediaWriter) and writer.modality == "audio"
    x = _tones([440, 880, 1760])
    files = writer.write(x, tmp_path, stem="step_0000100", labels=["A4", "A5", "A6"], title="run")
    assert [f.path.name for f in files] == [f"step_0000100_{i:03d}.{ext}" for i in range(3) for ext in ("wav", "png")]
    assert [f.element for f in files] == ["audio", "img"] * 3
    assert [f.items for f in files] == [(0,), (0,), (1,), (1,), (2,), (2,)]
    assert files[2].caption == "A5 (0.50 s)" and files[3].caption == "A5: log-mel spectrogram"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.path.name for f in files)  # no temporaries
    for i, f in enumerate(files[::2]):
        y, rate = sf.read(str(f.path), dtype="float32")
        assert rate == 16000 and sf.info(str(f.path)).subtype == "PCM_16"
        assert np.abs(y - x[i, 0].numpy()).max() <= 1 / 32768 + 1e-7
    with Image.open(files[1].path) as im:
        assert im.format == "PNG" and im.size == (480, 260)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.std() > 20  # a drawn spectrogram, not a blank page


def test_the_tone_is_drawn_at_its_frequency(tmp_path) -> None:
    """The spectrogram's brightest row moves up with the tone (a mel-spaced frequency axis)."""
    writer = AudioWriter(AudioWriterConfig(dpi=60))
    files = writer.write(_tones([300, 3000]), tmp_path, stem="s", labels=None, title="")
    rows = []
    for f in files[1::2]:
        with Image.open(f.path) as im:
            lum = np.asarray(im.convert("L")).astype(float)
        column = lum[:, int(lum.shape[1] * 0.4)]  # a column through the plot (the tone spans the clip)
        top = int(np.flatnonzero(column < 255)[0])  # the page around the axes is white
        bottom = top + int(np.flatnonzero(column[top:] == 255)[0])  # the axes end at the next white row
        rows.append(top + int(column[top:bottom].argmax()))
    assert rows[1] < rows[0]  # higher frequency, higher on the page (smaller row index)
    assert files[0].caption == "sample 0 (0.50 s)"


def test_clipping_nan_ragged_lists_and_limits(tmp_path) -> None:
    x = _tones([440, 440])
    x[0, 0, :10] = 3.0
    x[1, 0, 5] = float("nan")
    files = AudioWriter(AudioWriterConfig(spectrograms=False)).write(x, tmp_path, stem="s", labels=["a", "b"], title="")
    assert [f.element for f in files] == ["audio", "audio"]
    assert "10 samples clipped" in files[0].caption and "1 non-finite samples written as silence" in files[1].caption
    y, _ = sf.read(str(files[1].path), dtype="float32")
    assert y[5] == 0.0 and np.isfinite(y).all()
    ragged = [torch.zeros(1, 800), torch.zeros(1, 1600)]
    files = AudioWriter(AudioWriterConfig(spectrograms=False, sample_rate=8000)).write(
        ragged, tmp_path, stem="r", labels=None, title=""
    )
    assert [sf.info(str(f.path)).frames for f in files] == [800, 1600]
    limited = AudioWriter(AudioWriterConfig(max_samples=1, spectrograms=False)).write(
        x, tmp_path / "m", stem="m", labels=None, title=""
    )
    assert len(limited) == 1


def test_the_rate_comes_from_the_tokenizer(tmp_path) -> None:
    """The writer only gets the tensor: the audio tokenizers tag what they decode with their rate."""
    from selfflow.plugins.audio.frames import FramesConfig, FramesTokenizer

    tok = FramesTokenizer(FramesConfig(sample_rate=24000, frame=480))
    decoded = tok.decode(tok.encode(_tones([440], rate=24000)))
    [wav] = AudioWriter(AudioWriterConfig(spectrograms=False)).write(decoded, tmp_path, stem="t", labels=None, title="")
    assert sf.info(str(wav.path)).samplerate == 24000 and wav.caption == "sample 0 (0.50 s)"
    plain = AudioWriter(AudioWriterConfig(spectrograms=False, sample_rate=8000))
    [wav] = plain.write(decoded.clone(), tmp_path, stem="u", labels=None, title="")  # a copy loses the tag
    assert sf.info(str(wav.path)).samplerate == 8000


def test_labels_and_stems_are_checked(tmp_path) -> None:
    writer = AudioWriter.from_config()
    x = _tones([440, 880])
    with pytest.raises(ValueError, match="2 samples"):
        writer.write(x, tmp_path, stem="s", labels=["a"], title="")
    with pytest.raises(TypeError, match="class_names"):
        writer.write(x, tmp_path, stem="s", labels=[1, 2], title="")
    with pytest.raises(ValueError, match="stem"):
        writer.write(x, tmp_path, stem="../s", labels=None, title="")
    with pytest.raises(ValueError, match="mix down to mono"):
        writer.write(torch.zeros(2, 2, 100), tmp_path, stem="s", labels=None, title="")


def test_registered_and_shown_in_samples_html(tmp_path) -> None:
    added = []

    class Register:
        def add(self, name, factory, config_cls=None, doc=""):
            added.append((name, factory, config_cls))

    selfflow_register_writers(register=Register())
    assert [(n, c) for n, _, c in added] == [("audio", AudioWriterConfig)]
    writer = added[0][1](AudioWriterConfig(dpi=50))
    samples = tmp_path / "samples"
    files = writer.write(_tones([440, 660]), samples, stem="step_0000001", labels=["one", "two"], title="t")
    gallery = Gallery(tmp_path, title="audio run")
    page = gallery.add(GalleryEntry(step=1, stream="s", modality="audio", files=files, labels=["one", "two"]))
    html = page.read_text()
    assert html.count("<audio") == 2 and 'src="samples/step_0000001_000.wav"' in html
    assert 'src="samples/step_0000001_001.png"' in html
