"""``audio/spoken-digits``: espeak-ng renders once to a WAV cache; disjoint, deterministic splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

pytest.importorskip("soundfile", reason="the audio extra (soundfile) is not installed")
pytest.importorskip("soxr", reason="the audio extra (soxr) is not installed")

from selfflow.plugins.audio import spoken_digits as sd
from selfflow.plugins.protocols import Dataset

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (Debian: apt-get install espeak-ng)"
)


def _config(tmp_path: Path, **options) -> sd.SpokenDigitsConfig:
    small = dict(train_per_class=3, eval_per_class=2, voices=("en-us", "en-gb"), variants=("", "f2", "m3"))
    return sd.SpokenDigitsConfig(cache_dir=str(tmp_path / "cache"), **(small | options))


@needs_espeak
def test_renders_ten_labelled_words_once(tmp_path: Path, monkeypatch) -> None:
    c = _config(tmp_path)
    train = sd.spoken_digits(c, split="train", seed=0)
    assert isinstance(train, Dataset) and train.modalities == ("audio",)
    assert train.class_names == sd.WORDS and train.num_classes == 10 and len(train) == 30
    assert sorted(int(train[i].label) for i in range(30)) == sorted(list(range(10)) * 3)
    for i in range(len(train)):
        clip = train[i].media["audio"]
        assert clip.shape == (1, 16000) and clip.dtype == torch.float32
        assert abs(float(clip.abs().max()) - 0.7) < 1e-3  # peak-normalised
        energy = clip[0].square()
        assert float(energy[:800].sum() + energy[-800:].sum()) < 1e-3 * float(energy.sum())  # centred, silent edges
    assert train.cropped == 0
    entries = list((tmp_path / "cache" / "spoken-digits").iterdir())
    assert len(entries) == 1 and len(list(entries[0].glob("*.wav"))) == 50  # both splits rendered together

    def no_espeak(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(sd, "_render_one", no_espeak)  # the second split and a rebuild read the cache
    evaluation = sd.spoken_digits(c, split="eval", seed=0)
    again = sd.spoken_digits(c, split="train", seed=0)
    assert len(evaluation) == 20 and again.fingerprint() == train.fingerprint() != evaluation.fingerprint()
    assert torch.equal(again[7].media["audio"], train[7].media["audio"])


@needs_espeak
def test_splits_share_no_rendering_setting_and_follow_the_seed(tmp_path: Path) -> None:
    c = _config(tmp_path)
    train, evaluation = sd.spoken_digits(c, split="train", seed=0), sd.spoken_digits(c, split="eval", seed=0)

    def key(s):
        return (s["digit"], s["voice"], s["speed"], s["pitch"])

    assert not {key(s) for s in train.settings} & {key(s) for s in evaluation.settings}
    other = sd.spoken_digits(c, split="train", seed=1)
    assert [key(s) for s in other.settings] != [key(s) for s in train.settings]
    assert other.fingerprint() != train.fingerprint()
    slow = sd.spoken_digits(attrs.evolve(c, sample_rate=8000, seconds=1.5), split="train", seed=0)
    assert slow[0].media["audio"].shape == (1, 12000) and slow.sample_rate == 8000


def test_settings_are_deterministic_and_distinct_without_espeak() -> None:
    c = sd.SpokenDigitsConfig(train_per_class=20, eval_per_class=5)
    a, b = sd.settings(c, 3), sd.settings(c, 3)
    assert a == b and len(a) == 250
    for digit in range(10):
        mine = [(s["voice"], s["speed"], s["pitch"]) for s in a if s["digit"] == digit]
        assert len(set(mine)) == 25  # drawn without replacement
    assert sum(s["split"] == "eval" for s in a) == 50


def test_missing_espeak_names_the_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(sd.EspeakMissingError, match="apt-get install espeak-ng"):
        sd.spoken_digits(_config(tmp_path), split="train", seed=0)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="distinct settings per digit"):
        sd.SpokenDigitsConfig(voices=("en-us",), variants=("",), speeds=(150,), pitches=(50,))
    with pytest.raises(ValueError, match="variants"):
        sd.SpokenDigitsConfig(variants=("m1", "+evil; rm"))
    with pytest.raises(ValueError, match="align"):
        sd.SpokenDigitsConfig(align="end")


def test_trim_keeps_a_margin() -> None:
    x = np.zeros(1000, np.float32)
    x[400:500] = 0.5
    y = sd.trim(x, 1000, margin=0.01)
    assert len(y) == 100 + 2 * 10 and float(np.abs(y).max()) == 0.5
