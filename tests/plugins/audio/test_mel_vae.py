"""``audio/mel-vae``: fit -> cache -> checkpoint, shapes and time positions, held-out error."""

from __future__ import annotations

import attrs
import pytest
import torch

from selfflow.plugins.audio.mel import MelConfig
from selfflow.plugins.audio.mel_vae import MelVAEConfig, MelVAETokenizer
from selfflow.plugins.audio.tones import TonesConfig, tones
from selfflow.plugins.protocols import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMALL = MelVAEConfig(
    mel=MelConfig(n_mels=32, griffin_lim_iters=4),
    latent_channels=4,
    hidden=16,
    steps=80,
    batch_size=8,
    lr=5e-3,
    holdout=6,
    seed=0,
    progress=False,
)


@pytest.fixture(scope="module")
def data():
    return tones(TonesConfig(train_per_class=3, eval_per_class=1, seconds=0.5))


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tok = MelVAETokenizer(SMALL)
    tok.fit(data, cache_dir=str(cache))
    return tok, cache


def test_fit_trains_measures_and_caches(fitted, data, monkeypatch) -> None:
    tok, cache = fitted
    assert isinstance(tok, Tokenizer) and tok.mask_ratio == 0.5 and tok.channels == 4 and tok.source == "trained"
    m = tok.metrics
    # measured here: held-out MSE 1.35 after 1 step, 0.54 after these 80 (standardised mel: variance ~1)
    assert m.items == 6 and m.steps == 80 and 0 < m.mse < 0.7
    assert m.db_l1 == pytest.approx(m.log_mel_l1 * 20 / 2.302585, rel=1e-4)
    assert tok.path is not None and tok.path.is_file() and tok.path.parent.parent.name == "audio-mel-vae"

    def no_training(self, *args):
        raise AssertionError("trained again")

    monkeypatch.setattr(MelVAETokenizer, "_train", no_training)
    again = MelVAETokenizer(SMALL)
    again.fit(data, cache_dir=str(cache))
    assert again.source == "cache" and again.cache_key() == tok.cache_key() and again.metrics == tok.metrics
    x = data[0].media["audio"][None]
    assert torch.equal(again.encode(x).tokens, tok.encode(x).tokens)
    loaded = MelVAETokenizer.from_checkpoint(tok.path)
    assert loaded.source == "checkpoint" and torch.equal(loaded.encode(x).tokens, tok.encode(x).tokens)


def test_shapes_positions_and_valid_masks(fitted) -> None:
    tok, _ = fitted
    x = torch.zeros(2, 1, 8000)
    seg = tok.encode(x)
    n_mel = -(-8000 // 256)  # 32 mel frames -> 16 latents
    assert seg.tokens.shape == (2, n_mel // 2, 4) and seg.valid is None
    assert tok.frame_rate == 31.25 and seg.positions[0, :3, 0].tolist() == [0, 96, 192]
    out = tok.decode(seg)
    assert out.shape == (2, 1, 16 * 2 * 256) and float(out.abs().max()) <= 1.0
    ragged = tok.encode([torch.zeros(1, 8000), torch.zeros(1, 1500)])
    assert ragged.valid[0].all() and ragged.valid[1].sum() == 3  # latents starting before sample 1500 (every 512)
    assert float(tok.decode(ragged)[1, 0, 3 * 512 :].abs().max()) == 0.0


def test_checkpoint_mismatch_unfitted_and_bad_files(fitted, data, tmp_path) -> None:
    tok, _ = fitted
    with pytest.raises(ValueError, match="latent_channels=4"):
        MelVAETokenizer(attrs.evolve(SMALL, latent_channels=8, checkpoint=str(tok.path))).fit(data)
    with pytest.raises(RuntimeError, match="not fitted"):
        MelVAETokenizer(SMALL).encode(torch.zeros(1, 1, 800))
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable audio/mel-vae file"):
        MelVAETokenizer(attrs.evolve(SMALL, checkpoint=str(bad))).fit(data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MelVAETokenizer.from_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="multiple of 8"):
        MelVAEConfig(hidden=20)


def test_a_damaged_cache_is_retrained_with_a_warning(data, tmp_path) -> None:
    tiny = attrs.evolve(SMALL, steps=2)
    tok = MelVAETokenizer(tiny)
    tok.fit(data, cache_dir=str(tmp_path))
    tok.path.write_bytes(b"garbage")
    again = MelVAETokenizer(tiny)
    with pytest.warns(UserWarning, match="unreadable cache"):
        again.fit(data, cache_dir=str(tmp_path))
    assert again.source == "trained"
    other = MelVAETokenizer(tiny)
    other.fit(tones(TonesConfig(train_per_class=3, eval_per_class=1, seconds=0.5), seed=5))
    assert other.cache_key() != again.cache_key()
