"""``audio/tones``: deterministic synthetic notes whose pitch class is the label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.plugins.audio.tones import PITCH_CLASSES, TonesConfig, adsr, tones
from selfflow.plugins.protocols import Dataset


def test_deterministic_by_seed_and_split() -> None:
    c = TonesConfig(train_per_class=3, eval_per_class=2)
    a, b = tones(c, split="train", seed=0), tones(c, split="train", seed=0)
    assert isinstance(a, Dataset) and len(a) == 36 and a.class_names == PITCH_CLASSES and a.num_classes == 12
    assert a.fingerprint() == b.fingerprint() and torch.equal(a[5].media["audio"], b[5].media["audio"])
    other, evaluation = tones(c, split="train", seed=1), tones(c, split="eval", seed=0)
    assert other.fingerprint() != a.fingerprint() and len(evaluation) == 24
    assert not torch.equal(other[5].media["audio"], a[5].media["audio"])
    assert not torch.equal(evaluation[0].media["audio"], a[0].media["audio"])


def test_the_label_is_the_pitch_class_of_the_fundamental() -> None:
    c = TonesConfig(train_per_class=4, eval_per_class=1, harmonics=1, sample_rate=16000)
    ds = tones(c, split="train", seed=0)
    for i in range(len(ds)):
        ex = ds[i]
        x = ex.media["audio"][0].numpy()
        assert ex.media["audio"].shape == (1, 16000) and 0.2 - 1e-6 <= np.abs(x).max() <= 0.8 + 1e-6
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=4 * len(x)))
        f0 = np.fft.rfftfreq(4 * len(x), 1 / 16000)[spectrum.argmax()]
        midi = 69 + 12 * np.log2(f0 / 440.0)
        assert abs(midi - round(midi)) < 0.2 and round(midi) % 12 == ex.label


def test_adsr_shape() -> None:
    env = adsr(1000, 1000, attack=0.1, decay=0.1, sustain=0.5, release=0.2, length=0.6)
    assert env[0] == 0 and abs(env[100] - 1.0) < 1e-9 and abs(env[300] - 0.5) < 1e-9
    assert abs(env[700] - 0.25) < 1e-9 and env[850] == 0.0 and env.min() >= 0 and env.max() <= 1


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="0.45 x sample_rate"):
        TonesConfig(octaves=(7,), sample_rate=8000)
    with pytest.raises(ValueError, match="duration"):
        TonesConfig(duration=(0.5, 0.2))
    with pytest.raises(ValueError, match="loudness"):
        TonesConfig(loudness=(0.5, 1.5))
