"""audio/encodec: the guarded encodec import, token layout and standardisation, the in-run fit
(cache, bit-identical resume), the three weight sources and their refusals.

Tiny SEANets (n_filters 4, hop 32) on synthetic 8 kHz tones keep every fit to a few steps; the
official-checkpoint path is checked on a state dict of the official architecture written here
(no download), with the official checksum table patched to that file's checksum.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

# not pytest.importorskip("encodec"): a plain import of encodec is what fails here (its torchaudio import)
if importlib.util.find_spec("encodec") is None:
    pytest.skip("audio/encodec needs the encodec package: pip install 'selfflow[audio]'", allow_module_level=True)

from selfflow.core.types import TIME_RATE, Segment, time_ticks
from selfflow.plugins.audio import encodec as enc
from selfflow.plugins.audio.encodec import EncodecConfig, EncodecTokenizer, FitSource
from selfflow.plugins.protocols import Example, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = EncodecConfig(
    n_filters=4,
    dimension=8,
    ratios=(4, 4, 2),
    steps=4,
    batch_size=2,
    crop_seconds=0.064,
    stft_scales=(64, 128),
    holdout=2,
    stats_items=16,
    partial_every=0,
    progress=False,
)


class Tones:
    """Labelled sine tones with a decaying envelope: ``n`` clips of ``samples`` at ``rate`` Hz."""

    modalities = ("audio",)
    class_names = ("low", "high")
    num_classes = 2

    def __init__(self, n: int = 8, samples: int = 1024, rate: int = 8000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(samples) / rate
        self.labels = torch.arange(n) % 2
        freq = torch.where(self.labels == 0, 220.0, 880.0) * (1 + 0.05 * torch.rand(n, generator=g))
        env = torch.exp(-3.0 * t)
        self.clips = (0.5 * torch.sin(2 * torch.pi * freq[:, None] * t) * env)[:, None]
        self.sample_rate = rate
        self.tag = f"tones-{n}-{samples}-{rate}-{seed}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"audio": self.clips[i]}, label=int(self.labels[i]))

    def fingerprint(self) -> str:
        return self.tag


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("encodec-cache")
    tok = EncodecTokenizer(TINY)
    tok.fit(Tones(), cache_dir=str(cache))
    return tok, cache


def test_guard_keeps_encodec_working_without_torchaudio(tmp_path):
    """torchaudio unimportable (ImportError) or broken (OSError, as its CUDA build is here):
    encodec still imports, a SEANet trains a step, and ``torchaudio`` is not left stubbed."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        MODE = sys.argv[1]
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torchaudio":
                    if MODE == "absent":
                        raise ModuleNotFoundError("No module named 'torchaudio'", name="torchaudio")
                    raise OSError("Could not load this library: _torchaudio.so")
        sys.meta_path.insert(0, Block())
        import torch
        from selfflow.plugins.audio.encodec import build_codec, import_encodec
        encodec = import_encodec()
        assert "torchaudio" not in sys.modules, sorted(m for m in sys.modules if "torchaudio" in m)
        try:
            encodec.utils.convert_audio(torch.zeros(1, 10), 8000, 8000, 1)
        except ImportError as err:
            assert "soxr" in str(err), err
        else:
            raise AssertionError("the stub must say torchaudio is not there")
        arch = {"kind": "seanet", "sample_rate": 8000, "n_filters": 4, "dimension": 8, "ratios": [4, 2],
                "residual_layers": 1, "lstm": 0, "causal": False}
        net = build_codec(arch)
        y = net.decode(net.encode(torch.zeros(1, 1, 64)))
        y.abs().mean().backward()
        print("ok", tuple(y.shape))
        """
    )
    for mode in ("absent", "broken"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "ok (1, 1, 64)" in out.stdout


def test_tokens_positions_and_standardisation(fitted):
    tok, _ = fitted
    data = Tones()
    assert isinstance(tok, Tokenizer) and tok.mask_ratio == 0.5 and tok.channels == 8
    assert tok.hop == 32 and tok.frame_rate == 250.0 and tok.source is FitSource.TRAINED
    x = data.clips[:3]
    seg = tok.encode(x)
    assert seg.tokens.shape == (3, 1024 // 32, 8) and seg.modality == "audio"
    assert torch.equal(seg.positions[0, :, 0], time_ticks(torch.arange(32), 250.0))
    assert int(seg.positions[0, 1, 0]) == TIME_RATE // 250 and not seg.positions[..., 1:].any()
    # standardised with the statistics of the training clips: exactly zero mean, unit std over them
    _, train = enc.split(tok.config, data)
    z = tok.encode(torch.stack([data.clips[int(i)] for i in train])).tokens.double().reshape(-1, 8)
    assert torch.allclose(z.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(z.std(0, correction=0), torch.ones(8, dtype=torch.float64), atol=1e-3)
    y = tok.decode(seg)
    assert y.shape == (3, 1, 1024) and y.abs().max() <= 1.0
    # a length that is not a whole number of frames is padded up: ceil(1000 / 32) = 32 frames
    assert tok.encode(x[..., :1000]).num_tokens == 32


def test_fit_metrics_log_and_cache(fitted):
    tok, cache = fitted
    m = tok.metrics
    assert (
        m is not None and m.items == 1 and m.steps == 4
    )  # holdout: at most a fifth of 8 clips and m.snr_db == m.snr_db and m.mel_distance_db > 0
    entry = tok.path.parent
    log = [line for line in (entry / "fit_log.jsonl").read_text().splitlines() if line]
    assert '"held_out"' in log[-1] and "snr_db" in log[-1]
    again = EncodecTokenizer(TINY)
    again.fit(Tones(), cache_dir=str(cache))
    assert again.source is FitSource.CACHE and again.cache_key() == tok.cache_key()
    x = Tones().clips[:2]
    assert torch.equal(again.encode(x).tokens, tok.encode(x).tokens)
    other = EncodecTokenizer(attrs.evolve(TINY, steps=3))
    assert other.fit_key(Tones()) != tok.fit_key(Tones())
    assert EncodecTokenizer(attrs.evolve(TINY, progress=True)).fit_key(Tones()) == tok.fit_key(Tones())


def test_interrupted_fit_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = attrs.evolve(TINY, steps=6, partial_every=2)
    whole = EncodecTokenizer(cfg)
    whole.fit(Tones(), cache_dir=str(tmp_path / "a"))

    calls = {"n": 0}
    real_crops = enc._crops

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_crops(*args, **kwargs)

    monkeypatch.setattr(enc, "_crops", interrupt_at_step_5)
    first = EncodecTokenizer(cfg)
    with pytest.raises(KeyboardInterrupt):
        first.fit(Tones(), cache_dir=str(tmp_path / "b"))
    partial = tmp_path / "b" / "audio-encodec" / f"{first.fit_key(Tones())}-partial"
    assert (partial / "meta.json").is_file()
    monkeypatch.setattr(enc, "_crops", real_crops)
    resumed = EncodecTokenizer(cfg)
    resumed.fit(Tones(), cache_dir=str(tmp_path / "b"))
    assert resumed.source is FitSource.TRAINED and not partial.exists()
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.shift, resumed.shift) and resumed.metrics == whole.metrics


def test_rate_mismatch_names_the_fix():
    with pytest.raises(ValueError, match=r"dataset_options = \{sample_rate = 16000\}"):
        EncodecTokenizer(attrs.evolve(TINY, sample_rate=16000)).fit(Tones(rate=8000))


def test_safetensors_checkpoint_round_trip(fitted, tmp_path):
    tok, _ = fitted
    path = tok.save(tmp_path / "codec.safetensors")
    loaded = EncodecTokenizer.from_checkpoint(path)
    via_fit = EncodecTokenizer(EncodecConfig(checkpoint=str(path), progress=False))
    via_fit.fit(Tones())
    x = Tones().clips[:2]
    assert loaded.source is FitSource.CHECKPOINT and loaded.channels == 8
    assert torch.equal(loaded.encode(x).tokens, tok.encode(x).tokens)
    assert torch.equal(via_fit.decode(via_fit.encode(x)), tok.decode(tok.encode(x)))
    with pytest.raises(ValueError, match="trained on 8000 Hz"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(path))).fit(Tones(rate=16000))


def test_foreign_and_untrusted_files_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not run on an unverified file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    wrong_name = tmp_path / "encodec_24khz-deadbeef.th"
    wrong_name.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="deadbeef.*not the official 'd7cc33bc'"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(wrong_name))).fit(Tones(rate=24000))
    right_name = tmp_path / "encodec_24khz-d7cc33bc.th"
    right_name.write_bytes(b"not the official bytes")
    with pytest.raises(ValueError, match="is not the official EnCodec 24 kHz checkpoint"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(right_name))).fit(Tones(rate=24000))
    for name in ("weights.bin", "model.ckpt"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ValueError, match="never opened"):
            EncodecTokenizer(EncodecConfig(checkpoint=str(tmp_path / name))).fit(Tones())
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors is not a readable audio/encodec file"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(plain))).fit(Tones())
    with pytest.raises(FileNotFoundError, match="encodec_24khz-d7cc33bc.th"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(tmp_path / "missing.th"))).fit(Tones(rate=24000))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A state dict of the official 24 kHz architecture (random weights) saved like the official file."""
    torch.manual_seed(0)
    with enc._quiet_weight_norm():
        model = enc.import_encodec().EncodecModel.encodec_model_24khz(pretrained=False)
    path = tmp_path_factory.mktemp("official") / "encodec_24khz.th"
    torch.save(model.state_dict(), path)
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    named = path.with_name(f"encodec_24khz-{checksum}.th")
    path.rename(named)
    return named, checksum, model


def test_official_checkpoint_is_verified_then_loaded(official_file, monkeypatch, tmp_path):
    path, checksum, model = official_file
    data = Tones(n=4, samples=4800, rate=24000)
    with pytest.raises(ValueError, match="not the official"):  # the real table: this file is not official
        EncodecTokenizer(EncodecConfig(checkpoint=str(path))).fit(data)
    monkeypatch.setitem(enc.OFFICIAL_CHECKSUMS, "encodec_24khz", checksum)
    tok = EncodecTokenizer(EncodecConfig(checkpoint=str(path), stats_items=4, progress=False))
    assert tok.channels == 128
    tok.fit(data, cache_dir=str(tmp_path))
    assert tok.source is FitSource.OFFICIAL and tok.frame_rate == 75.0 and tok.channels == 128
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in tok.net.encoder.state_dict().items())
    seg = tok.encode(data.clips[:2])
    assert seg.tokens.shape == (2, 4800 // 320, 128) and int(seg.positions[0, 1, 0]) == 40
    with torch.no_grad():
        raw = model.encoder(data.clips[:2])
    assert torch.allclose(seg.tokens.transpose(1, 2) * tok.scale[:, None] + tok.shift[:, None], raw, atol=1e-5)
    assert tok.decode(seg).shape == (2, 1, 4800)
    again = EncodecTokenizer(EncodecConfig(checkpoint=str(path), stats_items=4, progress=False))
    again.fit(data, cache_dir=str(tmp_path))  # statistics from the cache
    assert torch.equal(again.scale, tok.scale)
    with pytest.raises(ValueError, match=r"dataset_options = \{sample_rate = 24000\}"):
        EncodecTokenizer(EncodecConfig(checkpoint=str(path))).fit(Tones(rate=16000))


def test_bad_media_and_unfitted_use():
    tok = EncodecTokenizer(TINY)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match=r"mono audio batches \(B, 1, samples\)"):
        enc.check_audio_batch(torch.zeros(2, 2, 64))
    seg = Segment(modality="audio", tokens=torch.zeros(1, 4, 3), positions=torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.decode(seg)
    with pytest.raises(ValueError, match="ratios"):
        EncodecConfig(ratios=(1, 4))
    with pytest.raises(ValueError, match="stft_scales"):
        EncodecConfig(stft_scales=(100,))


def test_spectral_loss_is_zero_only_for_identical_audio():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2048, generator=g) * 0.1
    assert float(enc.spectral_loss(x, x, rate=8000, scales=(64, 256))) == pytest.approx(0.0, abs=1e-6)
    assert float(enc.spectral_loss(x, 0.5 * x, rate=8000, scales=(64, 256))) > 0.5
