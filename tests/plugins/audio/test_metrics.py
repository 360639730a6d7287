"""Audio metrics: RMS level and spectral flatness against analytic answers, ``audio/sanity``
and ``audio/reconstruction`` with a stub reference network and stub tokenizers (identity and
silence round trips), and their registration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfflow.core.types import Segment
from selfflow.plugins.audio.metrics import (
    AudioReconstruction,
    AudioSanity,
    ReconstructionConfig,
    reconstruction_ceiling,
    rms_dbfs,
    spectral_flatness,
)
from selfflow.plugins.protocols import Example, FeatureNetwork

pytestmark = pytest.mark.usefixtures("one_thread_module")

RATE = 8000


def _sine(freq: float, amp: float = 1.0, n: int = RATE) -> torch.Tensor:
    return (amp * torch.sin(2 * math.pi * freq * torch.arange(n) / RATE))[None, None]


def _noise(b: int = 4, n: int = RATE, seed: int = 0, amp: float = 0.2) -> torch.Tensor:
    return (amp * torch.randn(b, 1, n, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


class _ChunkRMS(nn.Module):
    num_features = 8

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return audio[:, 0].reshape(len(audio), 8, -1).square().mean(-1).sqrt().double()


class StubReference:
    """A FeatureNetwork whose logits favour class 0 by ``margin`` (known softmax) unless the
    clip is louder than 0.3 RMS (then class 1), and whose features are 8 chunk RMS values."""

    name = "stub"
    accuracy = 1.0
    num_features = 8
    num_classes = 4
    token_feature_dim = 1
    device = torch.device("cpu")

    def __init__(self, margin: float = 2.0) -> None:
        self.margin = margin

    def features(self, audio):
        return _ChunkRMS()(audio).float()

    def logits(self, audio):
        loud = audio.square().mean((1, 2)).sqrt() > 0.3
        out = torch.zeros(len(audio), 4)
        out[:, 0] = torch.where(loud, 0.0, self.margin)
        out[:, 1] = torch.where(loud, self.margin, 0.0)
        return out

    def feature_module(self):
        return _ChunkRMS()

    def token_features(self, audio, segment):
        return torch.zeros(len(audio), segment.num_tokens, 1)

    def describe(self):
        return {"reference": self.name, "reference_accuracy": self.accuracy}


class Identity:
    modality, mask_ratio, channels = "audio", 0.5, 1

    def encode(self, media):
        b, _, s = media.shape
        return Segment(modality="audio", tokens=media.transpose(1, 2), positions=torch.zeros(b, s, 3).long())

    def decode(self, segment):
        return segment.tokens.transpose(1, 2)


class Silence(Identity):
    def decode(self, segment):
        return torch.zeros_like(segment.tokens.transpose(1, 2))


def test_rms_dbfs_of_sines():
    assert float(rms_dbfs(_sine(440.0))) == pytest.approx(-3.0103, abs=1e-3)
    assert float(rms_dbfs(_sine(440.0, 0.1))) == pytest.approx(-23.0103, abs=1e-3)
    assert float(rms_dbfs(torch.zeros(1, 1, 100))) == pytest.approx(-200.0)


def test_spectral_flatness_separates_noise_tones_and_silence():
    noise = spectral_flatness(_noise())
    assert (noise > 0.9).all()
    assert float(spectral_flatness(_sine(440.0))) < 0.01
    assert float(spectral_flatness(torch.zeros(1, 1, RATE))) == 0.0
    # silence around a burst of noise does not count: only active frames are averaged
    burst = torch.zeros(1, 1, RATE)
    burst[..., 3000:5000] = _noise(1, 2000)
    assert float(spectral_flatness(burst)) > 0.85
    # a low-passed (smoothed) noise is less flat than white noise
    smooth = torch.nn.functional.avg_pool1d(_noise(), 8, 1, 4)[..., :RATE]
    assert (spectral_flatness(smooth) < noise - 0.3).all()


def test_sanity_reports_confidence_flatness_level_and_fractions():
    metric = AudioSanity(StubReference(margin=2.0))
    tone = _sine(440.0, 0.1).repeat(2, 1, 1)
    metric.update(fake=torch.cat([tone, torch.zeros(2, 1, RATE)]), real=_noise(3, amp=0.5))
    results = {r.name: r for r in metric.compute()}
    p0 = math.exp(2) / (math.exp(2) + 3)  # the stub's softmax on quiet clips
    assert results["confidence"].value == pytest.approx(p0, rel=1e-5)
    assert results["silent_fraction"].value == 0.5 and results["noise_fraction"].value == 0.0
    assert results["spectral_flatness"].value < 0.01
    assert results["rms_dbfs"].value == pytest.approx((2 * -23.0103 + 2 * -200.0) / 4, abs=1e-2)
    d = results["confidence"].details
    assert d["clips"] == 4 and d["real_clips"] == 3 and d["real_noise_fraction"] == 1.0
    assert d["reference_accuracy"] == 1.0
    metric.reset()
    with pytest.raises(ValueError, match="no clips"):
        metric.compute()
    with pytest.raises(ValueError, match=r"\(B, channels, samples\)"):
        metric.update(fake=torch.zeros(3, 100))


def test_sanity_builds_the_reference_lazily():
    built = []

    def make():
        built.append(1)
        return StubReference()

    metric = AudioSanity(make)
    assert not built
    metric.update(fake=_noise(2))
    assert built == [1] and isinstance(metric.reference, FeatureNetwork)


def test_reconstruction_of_an_exact_and_a_silent_tokenizer():
    real, fake = _noise(16, seed=1), _noise(16, seed=2)
    labels = torch.zeros(16, dtype=torch.long)
    exact = AudioReconstruction(Identity(), StubReference(), ReconstructionConfig(batch_size=5))
    exact.update(real=real, fake=fake, labels=labels)
    r = {m.name: m for m in exact.compute()}
    assert r["reconstruction_snr_db"].value >= 150  # exact round trip (SNR clipped by the 1e-20 floor)
    assert r["reconstruction_fd"].value == pytest.approx(r["reconstruction_fd"].details["input_fd"], abs=1e-6)
    assert (
        r["reconstruction_class_accuracy"].value == r["reconstruction_class_accuracy"].details["input_class_accuracy"]
    )

    silent = AudioReconstruction(Silence(), StubReference())
    silent.update(real=real, fake=fake, labels=labels)
    r = {m.name: m for m in silent.compute()}
    assert r["reconstruction_snr_db"].value == pytest.approx(0.0, abs=1e-9)  # error = signal
    assert r["reconstruction_fd"].value > r["reconstruction_fd"].details["input_fd"]


class Clips:
    modalities, num_classes, class_names, sample_rate = ("audio",), 4, ("a", "b", "c", "d"), RATE

    def __init__(self, n: int = 6) -> None:
        self.x = _noise(n, seed=3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"audio": self.x[i]}, label=0)

    def fingerprint(self) -> str:
        return "clips"


def test_reconstruction_ceiling_in_one_call():
    out = {m.name: m.value for m in reconstruction_ceiling(Identity(), Clips(), StubReference(), num_samples=4)}
    assert set(out) == {"reconstruction_snr_db", "reconstruction_fd", "reconstruction_class_accuracy"}
    assert out["reconstruction_class_accuracy"] == 1.0  # quiet noise: the stub says class 0, the label


def test_metrics_are_registered():
    from selfflow.registry.compose import load_registries

    regs, _ = load_registries()
    assert {"audio/sanity", "audio/reconstruction"} <= set(regs.metrics.names())
    assert "audio" in regs.references.names() and "audio/encodec" in regs.tokenizers.names()
