"""``audio/mel``: the filterbank against analytic answers, per-bin statistics from the data
(cached), and Griffin-Lim decoding whose log-mel stays close to the original's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from selfflow.plugins.audio import mel as mel_module
from selfflow.plugins.audio.mel import MelConfig, MelTokenizer, hz_to_mel, log_mel, mel_filterbank, mel_to_hz
from selfflow.plugins.audio.tones import TonesConfig, tones
from selfflow.plugins.protocols import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_slaney_scale_and_filterbank() -> None:
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0) and float(hz_to_mel(200.0)) == pytest.approx(3.0)
    f = torch.tensor([0.0, 150.0, 999.0, 1000.0, 3000.0, 7999.0])
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f.double(), atol=1e-6)
    fb = mel_filterbank(16000, 1024, 80, 0.0, 8000.0)
    assert fb.shape == (80, 513) and float(fb.min()) >= 0
    df = 16000 / 1024
    area = fb.sum(1) * df  # Slaney norm: every triangle has area 1 (in Hz), up to the bin grid
    assert torch.allclose(area[10:], torch.ones(70), atol=0.05)
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(0.0)), float(hz_to_mel(8000.0)), 82))[1:-1]
    peaks = fb.argmax(1).double() * df
    assert float((peaks - centres).abs()[10:].max()) <= df  # each filter peaks at its centre


def test_a_pure_tone_lands_in_its_bin_and_frames_sit_on_ticks() -> None:
    c = MelConfig()
    t = torch.arange(16000) / 16000
    x = 0.5 * torch.sin(2 * torch.pi * 2000 * t)[None]
    m = log_mel(x, c)
    assert m.shape == (1, 63, 80)  # ceil(16000 / 256)
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(0.0)), float(hz_to_mel(8000.0)), 82))[1:-1]
    assert int(m[0, 30].argmax()) == int((centres - 2000).abs().argmin())
    tok = MelTokenizer(MelConfig(standardize=False))
    seg = tok.encode(x[None])
    assert isinstance(tok, Tokenizer) and tok.mask_ratio == 0.5 and tok.channels == 80
    assert seg.positions[0, :4, 0].tolist() == [0, 48, 96, 144] and bool((seg.positions[..., 1:] == 0).all())
    ragged = tok.encode([x, x[:, :1000]])
    assert ragged.valid[1].sum() == 4 and ragged.valid[0].all()  # ceil(1000 / 256)


def test_fit_standardises_per_bin_and_caches(tmp_path, monkeypatch) -> None:
    data = tones(TonesConfig(train_per_class=3, eval_per_class=1))
    tok = MelTokenizer()
    assert tok.cache_key() is None
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(data[0].media["audio"][None])
    tok.fit(data, cache_dir=str(tmp_path))
    tokens = torch.cat([tok.encode(data[i].media["audio"][None]).tokens for i in range(len(data))]).reshape(-1, 80)
    assert torch.allclose(tokens.mean(0), torch.zeros(80), atol=1e-3)
    assert torch.allclose(tokens.std(0, unbiased=False), torch.ones(80), atol=1e-3)
    key = tok.cache_key()

    def no_measure(self, dataset):
        raise AssertionError("measured again")

    monkeypatch.setattr(MelTokenizer, "measure", no_measure)
    again = MelTokenizer()
    again.fit(data, cache_dir=str(tmp_path))
    assert again.cache_key() == key and torch.equal(again.mean, tok.mean)
    other = tones(TonesConfig(train_per_class=3, eval_per_class=1), seed=1)
    monkeypatch.undo()
    moved = MelTokenizer()
    moved.fit(other, cache_dir=str(tmp_path))
    assert moved.cache_key() != key  # other data, other statistics, other encodings


def _log_mel_error(tok: MelTokenizer, x: torch.Tensor, iters: int) -> float:
    """Mean |log-mel(decode(encode(x))) - log-mel(x)| in nats over frames within 60 dB of the peak."""
    c = tok.config
    y = mel_module.mel_to_audio(tok.to_log_mel(tok.encode(x)), c, iters=iters)[:, : x.shape[2]]
    a, b = log_mel(x[:, 0], c), log_mel(y, c)
    loud = a.max(-1).values > a.max() - 6.9  # 60 dB
    return float((a - b).abs()[loud].mean())


def test_griffin_lim_decoding_keeps_the_log_mel_of_tones() -> None:
    data = tones(TonesConfig(train_per_class=2, eval_per_class=1))
    tok = MelTokenizer()
    tok.fit(data)
    x = torch.stack([data[i].media["audio"] for i in range(0, 24, 6)])
    out = tok.decode(tok.encode(x))
    assert out.shape == (4, 1, 63 * 256) and float(out.abs().max()) <= 1.0
    error, random_phase = _log_mel_error(tok, x, 64), _log_mel_error(tok, x, 0)
    # measured here (4 clips): 0.285 nats after 64 iterations, 0.441 with random phases (no iteration); the
    # error sits in the quiet bins between harmonics, which a log distance weighs like the loud ones
    assert error < 0.32 and error < 0.75 * random_phase


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_griffin_lim_decoding_keeps_the_log_mel_of_spoken_digits(tmp_path) -> None:
    pytest.importorskip("soxr", reason="the audio extra (soxr) is not installed")
    from selfflow.plugins.audio.spoken_digits import SpokenDigitsConfig, spoken_digits

    c = SpokenDigitsConfig(train_per_class=2, eval_per_class=1, cache_dir=str(tmp_path))
    data = spoken_digits(c, split="train", seed=0)
    tok = MelTokenizer()
    tok.fit(data)
    x = torch.stack([data[i].media["audio"] for i in range(0, 20, 5)])
    error, random_phase = _log_mel_error(tok, x, 64), _log_mel_error(tok, x, 0)
    # measured here (4 clips): 0.121 nats after 64 iterations, 0.681 with random phases (no iteration)
    assert error < 0.15 and error < 0.3 * random_phase
    assert np.isfinite(error)
