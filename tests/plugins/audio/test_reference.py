"""The audio reference network: the log-mel front end against analytic answers, accuracy on
synthetic tones, the cache, gain invariance, the views metrics and REPA use, errors.
One thread (the machine's two cores are shared); a small network on 0.5 s clips at 8 kHz."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow.core.types import TIME_RATE, Segment, time_ticks
from selfflow.plugins.audio.reference import (
    AudioReference,
    AudioReferenceConfig,
    augment,
    log_mel,
    mel_filterbank,
)
from selfflow.plugins.metrics import FrechetDistance
from selfflow.plugins.protocols import Example, FeatureNetwork, ReferenceContext

pytestmark = pytest.mark.usefixtures("one_thread_module")

RATE = 8000
FREQS = (220.0, 440.0, 880.0, 1760.0)
# measured 1.00 held-out accuracy (seed 0, 80 eval clips) in ~4 s on one thread; the bound leaves room
SMALL = AudioReferenceConfig(widths=(8, 16), features=32, epochs=4, batch_size=32, n_mels=40)
ACCURACY_BOUND = 0.9


class Notes:
    """Four classes of decaying sine notes (220/440/880/1760 Hz, +-3 %) at random onsets,
    levels and noise: ``per_class`` clips of 0.5 s at 8 kHz."""

    modalities = ("audio",)
    class_names = tuple(f"{int(f)} Hz" for f in FREQS)
    num_classes = 4
    sample_rate = RATE

    def __init__(self, per_class: int = 40, seed: int = 0, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        n = 4 * per_class
        t = torch.arange(RATE // 2) / RATE
        self.labels = torch.arange(n) % 4
        f = torch.tensor(FREQS)[self.labels] * (1 + 0.06 * (torch.rand(n, generator=g) - 0.5))
        onset = 0.2 * torch.rand(n, 1, generator=g)
        env = torch.where(t >= onset, torch.exp(-4.0 * (t - onset).clamp_min(0)), torch.zeros(()))
        level = 0.1 + 0.7 * torch.rand(n, 1, generator=g)
        x = level * env * torch.sin(2 * math.pi * f[:, None] * t) + 0.003 * torch.randn(n, t.numel(), generator=g)
        self.clips = x.clamp(-1, 1)[:, None]
        self.labelled = labelled
        self.tag = f"notes-{per_class}-{seed}-{labelled}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"audio": self.clips[i]}, label=int(self.labels[i]) if self.labelled else None)

    def fingerprint(self) -> str:
        return self.tag


@pytest.fixture(scope="module")
def data():
    return Notes(40, seed=0), Notes(20, seed=1)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("audio-reference")
    return AudioReference.fit(data[0], SMALL, eval_dataset=data[1], cache_dir=cache, progress=False), cache


def test_mel_filterbank_is_triangular_on_the_htk_scale():
    fb = mel_filterbank(16000, 512, 64)
    assert fb.shape == (64, 257) and float(fb.max()) <= 1.0 + 1e-6 and (fb.sum(1) > 0).all()
    # filter k peaks at its centre frequency: mel(centre) is k+1 equal steps from 0 to mel(8000)
    mel_max = 2595 * math.log10(1 + 8000 / 700)
    freqs = torch.linspace(0, 8000, 257)
    for k in (5, 30, 60):
        centre = 700 * (10 ** ((k + 1) * mel_max / 65 / 2595) - 1)
        assert abs(float(freqs[fb[k].argmax()]) - centre) <= 8000 / 256


def test_log_mel_of_a_tone_peaks_at_its_frequency():
    t = torch.arange(16000) / 16000
    spec = log_mel(torch.sin(2 * math.pi * 1000 * t)[None], 16000, n_mels=64)
    assert spec.shape == (1, 64, 101)  # 10 ms hop, centred frames
    fb = mel_filterbank(16000, 512, 64)
    expected = int(fb[:, round(1000 / (8000 / 256))].argmax())
    assert abs(int(spec[0, :, 50].argmax()) - expected) <= 1


def test_reaches_stated_accuracy_and_describes_itself(reference, data):
    ref, _ = reference
    assert isinstance(ref, FeatureNetwork) and ref.num_classes == 4 and ref.sample_rate == RATE
    assert ref.accuracy >= ACCURACY_BOUND
    eval_clips = data[1].clips
    assert (ref.predict(eval_clips) == data[1].labels).double().mean().item() == pytest.approx(ref.accuracy)
    d = ref.describe()
    assert d["reference_accuracy"] == ref.accuracy and d["reference_eval_samples"] == 80
    assert "FAD-style" in d["fd_kind"] and "not comparable" in d["fd_kind"]


def test_trains_once_then_hits_the_cache(reference, data):
    ref, cache = reference
    again = AudioReference.fit(data[0], SMALL, eval_dataset=data[1], cache_dir=cache, progress=False)
    assert again.from_cache and again.meta["key"] == ref.meta["key"]
    assert torch.equal(again.features(data[1].clips[:8]), ref.features(data[1].clips[:8]))


def test_registry_factory_uses_the_context(reference, data):
    ref, cache = reference
    ctx = ReferenceContext(
        modality="audio", train_dataset=data[0], eval_dataset=data[1], cache_dir=cache, device=torch.device("cpu")
    )
    built = AudioReference.from_config(SMALL, context=ctx)
    assert built.from_cache and built.accuracy == ref.accuracy


def test_features_are_rms_normalised_and_gain_invariant(reference, data):
    ref, _ = reference
    train = data[0].clips
    feats = ref.features(train)
    assert feats.shape == (160, 32)
    assert float(feats.square().mean().sqrt()) == pytest.approx(1.0, rel=1e-4)
    # per-clip normalisation of the log-mel: a gain is a constant in log space, removed exactly
    assert torch.allclose(ref.logits(0.25 * train[:16]), ref.logits(train[:16]), atol=1e-3)


def test_feature_module_for_torchmetrics_and_fd(reference, data):
    ref, _ = reference
    module = ref.feature_module()
    assert module.num_features == 32 and not module.train().training
    fd = FrechetDistance(ref)
    fd.update(real=data[0].clips, fake=data[0].clips)
    assert fd.compute()[0].value == pytest.approx(0.0, abs=1e-3)
    fd.reset()
    fd.update(fake=torch.randn(64, 1, RATE // 2).clamp(-1, 1) * 0.3)  # white noise is far from notes
    far = fd.compute()[0]
    assert far.value > 1.0 and far.details["reference_accuracy"] == ref.accuracy


def test_token_features_follow_token_times(reference, data):
    ref, _ = reference
    clips = data[1].clips[:3]
    # tokens at the map's own frame centres read its columns exactly: map frame j is centred at
    # spectrogram frame 2j + 0.5 (two stages: stride 2), i.e. (2j + 0.5) * 10 ms
    net = ref.net
    with torch.no_grad():
        cols = net.feature_map(clips).mean(2).transpose(1, 2)  # (3, frames', 16)
    n = cols.shape[1]
    ticks = torch.round((2 * torch.arange(n) + 0.5) * 0.010 * TIME_RATE).long()
    pos = torch.zeros(3, n, 3, dtype=torch.long)
    pos[..., 0] = ticks
    seg = Segment(modality="audio", tokens=torch.zeros(3, n, 4), positions=pos)
    got = ref.token_features(clips, seg)
    assert got.shape == (3, n, ref.token_feature_dim) == (3, n, 16)
    assert torch.allclose(got, cols, atol=1e-4)
    # coarser tokens (62.5 Hz, audio/mel's rate) get one vector each, at any count
    m = 31
    pos = torch.zeros(3, m, 3, dtype=torch.long)
    pos[..., 0] = time_ticks(torch.arange(m), 62.5)
    assert ref.token_features(clips, Segment(modality="audio", tokens=torch.zeros(3, m, 4), positions=pos)).shape == (
        3,
        m,
        16,
    )


def test_augmentation_shifts_scales_and_adds_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, 800)
    x[..., 400] = 0.5
    out = augment(x, AudioReferenceConfig(shift_ms=10.0, gain_db=0.0, noise_probability=0.0), RATE, g)
    peaks = out[:, 0].abs().argmax(-1)
    assert ((peaks - 400).abs() <= 80).all() and torch.allclose(out.abs().amax(-1), torch.full((4, 1), 0.5))
    noisy = augment(x, AudioReferenceConfig(shift_ms=0.0, gain_db=0.0, noise_probability=1.0), RATE, g)
    assert (noisy != x).sum() > 700 * 4


def test_bad_inputs_name_the_fix(reference, tmp_path):
    ref, _ = reference
    with pytest.raises(ValueError, match=r"mono clips \(B, 1, samples\)"):
        ref.features(torch.zeros(2, 2, 4000))
    with pytest.raises(ValueError, match="labelled"):
        AudioReference.fit(Notes(2, labelled=False), SMALL, progress=False)

    class NoRate(Notes):
        sample_rate = None

    with pytest.raises(ValueError, match=r"reference_options = \{sample_rate = \.\.\.\}"):
        AudioReference.fit(NoRate(2), SMALL, progress=False)
    with pytest.raises(ValueError, match="widths"):
        AudioReferenceConfig(widths=())
