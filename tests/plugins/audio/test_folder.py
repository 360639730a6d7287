"""``audio/folder``: any format, rate and channel count -> mono clips at one rate; labels from
sub-folders; crops and padding with valid lengths; unreadable files skipped or fatal."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile", reason="the audio extra (soundfile) is not installed")
pytest.importorskip("soxr", reason="the audio extra (soxr) is not installed")

from selfflow.plugins.audio.folder import AudioFolderConfig, UnreadableAudioWarning, folder  # noqa: E402
from selfflow.plugins.audio.frames import FramesTokenizer  # noqa: E402
from selfflow.plugins.audio.io import AudioReadError  # noqa: E402
from selfflow.plugins.protocols import Dataset  # noqa: E402


def _tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    x = (0.5 * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    """low/: 4 tones at 300 Hz, high/: 4 at 3 kHz; WAV/FLAC/OGG/MP3, 8-48 kHz, mono and stereo, 0.5-2 s."""
    kinds = [("wav", 44100, 2, 2.0), ("flac", 22050, 1, 0.5), ("ogg", 48000, 2, 1.5), ("mp3", 16000, 1, 1.2)]
    for folder_name, freq in (("low", 300), ("high", 3000)):
        (tmp_path / folder_name).mkdir()
        for i, (ext, rate, ch, sec) in enumerate(kinds):
            sf.write(str(tmp_path / folder_name / f"{i}.{ext}"), _tone(freq, rate, sec, ch), rate)
    (tmp_path / "low" / "notes.txt").write_text("not audio")  # no audio extension: listed, left out
    (tmp_path / ".cache").mkdir()
    sf.write(str(tmp_path / ".cache" / "x.wav"), _tone(100, 8000, 0.1), 8000)  # hidden: ignored
    return tmp_path


def _both(root: Path, **options):
    cfg = AudioFolderConfig(path=str(root), eval_fraction=0.25, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableAudioWarning)
        return folder(cfg, split="train", seed=0), folder(cfg, split="eval", seed=0)


def _band(x: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.numpy()))
    return float(np.fft.rfftfreq(x.numel(), 1 / rate)[spectrum.argmax()])


def test_any_format_rate_and_channels_become_labelled_mono_clips(classes: Path) -> None:
    train, evaluation = _both(classes)
    assert isinstance(train, Dataset) and train.modalities == ("audio",) and train.sample_rate == 16000
    assert train.class_names == ("high", "low") and train.num_classes == 2
    assert len(train) == 6 and len(evaluation) == 2  # round(0.25 * 8)
    assert not set(train.files) & set(evaluation.files)
    for ds in (train, evaluation):
        for i in range(len(ds)):
            ex = ds[i]
            clip = ex.media["audio"]
            assert clip.shape == (1, 16000) and clip.dtype == torch.float32  # 1 s at 16 kHz
            assert ex.label == ("high", "low").index(ds.files[i].parent.name)
            n = int(ds.valid_samples[i])
            assert n == min(16000, round(sf.info(str(ds.files[i])).duration * 16000)) or ds.files[i].suffix == ".mp3"
            assert abs(_band(clip[0, : min(n, 8000)], 16000) - (3000 if ex.label == 0 else 300)) < 10
            assert float(clip[0, n:].abs().sum()) == 0.0  # zero padding past the valid length


def test_shorter_files_padded_or_kept_and_tokenized_with_valid_masks(classes: Path) -> None:
    train, _ = _both(classes, pad="none")
    lengths = sorted({ex.media["audio"].shape[1] for ex in (train[i] for i in range(len(train)))})
    assert lengths[0] == 8000 and lengths[-1] == 16000  # the 0.5 s FLAC kept at its own length
    batch = [train[i].media["audio"] for i in range(len(train))]
    seg = FramesTokenizer().encode(batch)
    assert seg.tokens.shape == (len(train), 50, 320) and seg.valid is not None
    for i, clip in enumerate(batch):
        assert int(seg.valid[i].sum()) == -(-clip.shape[1] // 320)


def test_crop_start_fixed_offset_and_random(tmp_path: Path) -> None:
    rate = 8000
    ramp = np.linspace(-1, 1, 3 * rate, dtype=np.float32)  # 3 s: the sample value says where the crop starts
    for i in range(3):
        sf.write(str(tmp_path / f"{i}.wav"), ramp, rate, subtype="FLOAT")
    base = dict(path=str(tmp_path), sample_rate=rate, eval_fraction=0.34)
    fixed = folder(AudioFolderConfig(**base, offset=1.0), split="train", seed=0)
    assert np.isclose(float(fixed[0].media["audio"][0, 0]), float(ramp[rate]), atol=1e-4)
    starts = []
    for seed in (0, 1):
        ds = folder(AudioFolderConfig(**base, start="random"), split="train", seed=seed)
        again = folder(AudioFolderConfig(**base, start="random"), split="train", seed=seed)
        assert torch.equal(ds[0].media["audio"], again[0].media["audio"])  # deterministic by seed
        starts += [float(ds[i].media["audio"][0, 0]) for i in range(len(ds))]
    assert len({round(s, 3) for s in starts}) > 1
    whole = folder(AudioFolderConfig(**base, seconds=0), split="train", seed=0)
    assert whole[0].media["audio"].shape == (1, 3 * rate)


def test_fingerprint_follows_content_not_timestamps(classes: Path) -> None:
    train, evaluation = _both(classes)
    again, _ = _both(classes)
    assert train.fingerprint() == again.fingerprint() != evaluation.fingerprint()
    target = classes / "low" / "0.wav"
    data = target.read_bytes()
    target.write_bytes(data)  # same bytes, new mtime
    assert _both(classes)[0].fingerprint() == train.fingerprint()
    sf.write(str(target), _tone(350, 44100, 2.0, 2), 44100)
    changed, changed_eval = _both(classes)
    assert changed.fingerprint() != train.fingerprint() and changed_eval.fingerprint() != evaluation.fingerprint()
    assert _both(classes, sample_rate=8000)[0].fingerprint() != train.fingerprint()


def _with_bad_files(root: Path) -> list[Path]:
    sf.write(str(root / "low" / "cut.wav"), _tone(300, 16000, 1.0), 16000)
    data = (root / "low" / "cut.wav").read_bytes()
    (root / "low" / "cut.wav").write_bytes(data[: len(data) // 3])
    (root / "high" / "empty.wav").write_bytes(b"")
    (root / "high" / "text.wav").write_text("a note, renamed\n")
    return [root / "low" / "cut.wav", root / "high" / "empty.wav", root / "high" / "text.wav"]


def test_unreadable_files_are_listed_and_skipped(classes: Path) -> None:
    bad = _with_bad_files(classes)
    cfg = AudioFolderConfig(path=str(classes), eval_fraction=0.25)
    with pytest.warns(UnreadableAudioWarning) as record:
        train, evaluation = folder(cfg, split="train", seed=0), folder(cfg, split="eval", seed=0)
    text = "\n".join(str(w.message) for w in record)
    skipped = [p for p, _ in train.skipped + evaluation.skipped]
    assert sorted(skipped) == sorted(bad) and len(train) + len(evaluation) == 8
    for path in bad:
        assert str(path) in text
    assert "truncated WAV" in text and "empty file" in text and "text file" in text
    assert "notes.txt" in text  # no audio extension
    assert any("left out" in str(w.message) and "could not be read" in str(w.message) for w in record)


def test_on_error_raise_names_the_path(classes: Path) -> None:
    bad = _with_bad_files(classes)
    cfg = AudioFolderConfig(path=str(classes), eval_fraction=0.25, on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableAudioWarning)
        with pytest.raises(AudioReadError) as info:
            folder(cfg, split="train", seed=0)
            folder(cfg, split="eval", seed=0)
    assert info.value.path in bad and str(info.value.path) in str(info.value)
    assert 'on_error = "skip"' in str(info.value)


def test_layout_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder(AudioFolderConfig(path=str(tmp_path / "nope")))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no files ending in .wav"):
        folder(AudioFolderConfig(path=str(tmp_path)))
    sf.write(str(tmp_path / "top.wav"), _tone(300, 8000, 0.2), 8000)
    (tmp_path / "cls").mkdir()
    sf.write(str(tmp_path / "cls" / "x.wav"), _tone(300, 8000, 0.2), 8000)
    with pytest.raises(ValueError, match="mixes files at the top level"):
        folder(AudioFolderConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="needs options"):
        folder(None)
    with pytest.raises(ValueError, match="start"):
        AudioFolderConfig(path=str(tmp_path), start="middle")
