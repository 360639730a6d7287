"""``audio/mel``: log-mel frames, standardised per bin, decoded by Griffin-Lim (torch ops only).

Audio ``(B, 1, samples)`` in [-1, 1] -> tokens ``(B, N, n_mels)`` with ``N = ceil(samples /
hop)``: frame ``k`` is a Hann-windowed ``n_fft``-point STFT centred on sample ``k * hop``
(zeros beyond the clip), its magnitude mapped to ``n_mels`` mel bands (Slaney mel scale,
area-normalised triangles, ``f_min``..``f_max``), ``log(max(mel, floor))``, standardised per
bin as ``(logmel - mean) / std`` with ``mean`` and ``std`` measured on the data by ``fit``.
Defaults: 80 bins, ``n_fft`` 1024, hop 256 at 16 kHz = 62.5 frames/s, 48 ticks apart on the
shared time axis (``h = w = 0``). A list of clips of different lengths gives ``valid[b, k] =
k * hop < length_b``.

``decode``: un-standardise, ``exp``, a non-negative least-squares inverse of the filterbank
(pseudo-inverse, then multiplicative updates that keep it >= 0), then fast Griffin-Lim
(Perraudin et al. 2013, momentum ``momentum``, ``griffin_lim_iters`` iterations, phases
started from a fixed seed, so decoding is deterministic) -> ``(B, 1, N * hop)`` clamped to
[-1, 1], invalid frames silent.

Why hand-written: torchaudio has ``MelScale``/``InverseMelScale``/``GriffinLim``, but its
import fails here (a CUDA build, see ``docs/audio.md``), and librosa is not a dependency; the
filterbank and the iterations are a few lines of ``torch.stft`` / ``torch.istft`` and are
checked against analytic answers in ``tests/plugins/audio/test_mel.py``.

``fit`` reads the statistics from ``<cache_dir>/audio-mel/<key>/`` or measures them over the
valid frames of the data (float64 sums) and writes that entry (safetensors + ``meta.json``);
the key hashes the data fingerprint and the config; ``cache_key()`` hashes the statistics.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings

import attrs
import torch
from torch import Tensor

from selfflow.core.files import CacheEntry, content_key
from selfflow.core.types import Segment
from selfflow.plugins.audio.clips import audio_batch, check_rate, with_rate
from selfflow.plugins.audio.frames import MASK_RATIO, frame_positions, frame_valid, frames_of

FORMAT = 1
_CACHE = "audio-mel"
_FILE = "stats.safetensors"


def _f_max(instance, attribute, value) -> None:
    if value is not None and not 0 < value <= instance.sample_rate / 2:
        raise ValueError(f"audio/mel f_max must be in (0, sample_rate / 2 = {instance.sample_rate / 2}], got {value}")


@attrs.frozen(kw_only=True)
class MelConfig:
    """``sample_rate`` Hz; ``n_fft``: STFT size (window = Hann of ``n_fft``); ``hop``: samples
    per frame (frames/s = sample_rate / hop); ``n_mels``: bins per frame (the token width);
    ``f_min`` / ``f_max``: band edges in Hz (``f_max`` default sample_rate / 2); ``floor``:
    magnitude floor before the log; ``standardize``: per-bin mean/std from the data (else
    raw log-mel); ``griffin_lim_iters`` / ``momentum``: the decoder's iterations; ``stats_items``:
    at most this many items measure the statistics."""

    sample_rate: int = attrs.field(default=16000, validator=attrs.validators.ge(1000))
    n_fft: int = attrs.field(default=1024, validator=attrs.validators.ge(16))
    hop: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    n_mels: int = attrs.field(default=80, validator=attrs.validators.ge(1))
    f_min: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    f_max: float | None = attrs.field(default=None, validator=_f_max)
    floor: float = attrs.field(default=1e-5, validator=attrs.validators.gt(0))
    standardize: bool = True
    griffin_lim_iters: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    momentum: float = attrs.field(default=0.99, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    stats_items: int = attrs.field(default=4096, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.hop > self.n_fft:
            raise ValueError(
                f"audio/mel hop ({self.hop}) must be at most n_fft ({self.n_fft}): frames would miss samples"
            )
        top = self.f_max if self.f_max is not None else self.sample_rate / 2
        if self.f_min >= top:
            raise ValueError(f"audio/mel f_min ({self.f_min}) must be below f_max ({top})")


# ----------------------------------------------------------------------------- DSP


def hz_to_mel(f: Tensor) -> Tensor:
    """Slaney's mel scale (librosa's default): linear below 1 kHz (3 mels per 200 Hz), log above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    lin = f / (200.0 / 3.0)
    log = 15.0 + torch.log(f.clamp_min(1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(f < 1000.0, lin, log)


def mel_to_hz(m: Tensor) -> Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.where(m < 15.0, m * (200.0 / 3.0), 1000.0 * torch.exp((m - 15.0) * (math.log(6.4) / 27.0)))


@functools.cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """``(n_mels, n_fft // 2 + 1)`` float32: triangles with edges equally spaced in mel,
    each scaled by ``2 / (upper - lower)`` Hz so its area is the same (Slaney norm)."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    fb = torch.clamp(torch.minimum(up, down), min=0.0) * (2.0 / (upper - lower))
    return fb.float()


@functools.cache
def _window(n_fft: int, device: str) -> Tensor:
    return torch.hann_window(n_fft, device=device)


def stft(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """``(B, samples)`` -> complex ``(B, n_fft // 2 + 1, samples // hop + 1)``, centred, zero-padded."""
    return torch.stft(
        x, n_fft, hop, window=_window(n_fft, str(x.device)), center=True, pad_mode="constant", return_complex=True
    )


def istft(spec: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    return torch.istft(spec, n_fft, hop, window=_window(n_fft, str(spec.device)), center=True, length=length)


def log_mel(x: Tensor, c: MelConfig) -> Tensor:
    """``(B, samples)`` float -> ``(B, ceil(samples / hop), n_mels)`` natural-log mel magnitudes."""
    n = -(-x.shape[1] // c.hop)
    x = torch.nn.functional.pad(x.float(), (0, n * c.hop - x.shape[1]))
    mag = stft(x, c.n_fft, c.hop).abs()[..., :n]  # the last centred frame lies past the clip
    fb = _bank(c).to(x.device)
    return torch.log(torch.clamp(fb @ mag, min=c.floor)).transpose(1, 2)


def _bank(c: MelConfig) -> Tensor:
    return mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max or c.sample_rate / 2)


def mel_to_linear(mel: Tensor, c: MelConfig, *, iters: int = 30) -> Tensor:
    """``(B, n_mels, N)`` mel magnitudes -> ``(B, n_fft // 2 + 1, N)`` non-negative linear
    magnitudes ``S`` with ``fb @ S ~ mel``: the pseudo-inverse clamped to >= 0, refined by
    ``iters`` multiplicative (Lee-Seung) least-squares updates, which stay non-negative."""
    fb = _bank(c).to(mel.device)
    s = (torch.linalg.pinv(fb) @ mel).clamp_min(0.0) + 1e-8
    gram, target = fb.T @ fb, fb.T @ mel
    for _ in range(iters):
        s = s * target / (gram @ s).clamp_min(1e-12)
    return s


def griffin_lim(mag: Tensor, c: MelConfig, length: int, *, iters: int, momentum: float, seed: int = 0) -> Tensor:
    """``(B, F, N + 1)`` STFT magnitudes -> ``(B, length)`` audio by fast Griffin-Lim."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=g)).to(mag.device)
    previous = torch.zeros_like(angles)
    for _ in range(iters):
        rebuilt = stft(istft(mag * angles, c.n_fft, c.hop, length), c.n_fft, c.hop)
        angles = rebuilt - (momentum / (1.0 + momentum)) * previous
        angles = angles / angles.abs().clamp_min(1e-16)
        previous = rebuilt
    return istft(mag * angles, c.n_fft, c.hop, length)


def mel_to_audio(logmel: Tensor, c: MelConfig, *, iters: int | None = None) -> Tensor:
    """``(B, N, n_mels)`` natural-log mel magnitudes -> ``(B, N * hop)`` audio (Griffin-Lim)."""
    mag = mel_to_linear(logmel.float().transpose(1, 2).exp(), c)
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)  # the centred frame past the clip's end
    n = logmel.shape[1]
    return griffin_lim(mag, c, n * c.hop, iters=c.griffin_lim_iters if iters is None else iters, momentum=c.momentum)


# ----------------------------------------------------------------------------- the tokenizer


class MelTokenizer:
    """Audio ``(B, 1, samples)`` <-> standardised log-mel tokens ``(B, ceil(samples / hop), n_mels)``."""

    modality = "audio"
    mask_ratio = MASK_RATIO

    def __init__(self, config: MelConfig | None = None) -> None:
        self.config = config or MelConfig()
        self.mean = torch.zeros(self.config.n_mels)
        self.std = torch.ones(self.config.n_mels)
        self.fitted = not self.config.standardize

    @classmethod
    def from_config(cls, config: MelConfig | None, **context) -> MelTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        return self.config.n_mels

    @property
    def frame_rate(self) -> float:
        return self.config.sample_rate / self.config.hop

    def fit_key(self, dataset) -> str:
        return content_key({"format": FORMAT, "data": dataset.fingerprint(), "config": attrs.asdict(self.config)})

    def cache_key(self) -> str | None:
        if not self.fitted:
            return None
        stats = hashlib.sha256(self.mean.numpy().tobytes() + self.std.numpy().tobytes()).hexdigest()
        fields = {k: v for k, v in attrs.asdict(self.config).items() if k not in ("griffin_lim_iters", "momentum")}
        return content_key("audio/mel", FORMAT, fields, stats)

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Per-bin mean and std of the data's log-mel frames (cached under ``cache_dir``)."""
        check_rate(dataset, self.config.sample_rate, "audio/mel")
        if "audio" not in getattr(dataset, "modalities", ()):
            raise ValueError(f"audio/mel fits on audio, the dataset has {getattr(dataset, 'modalities', None)!r}")
        if not self.config.standardize:
            return
        entry = CacheEntry(cache_dir, _CACHE, self.fit_key(dataset)) if cache_dir else None
        if entry is not None and entry.exists():
            try:
                t = entry.load_tensors(_FILE)
                self.mean, self.std, self.fitted = t["mean"], t["std"], True
                return
            except (ValueError, KeyError) as err:
                warnings.warn(
                    f"audio/mel: ignoring the unreadable cache {entry.path} ({err}); measuring again", stacklevel=2
                )
        self.mean, self.std = self.measure(dataset)
        self.fitted = True
        if entry is not None:
            with entry.write() as w:
                w.save_tensors(_FILE, {"mean": self.mean, "std": self.std})
                w.set_meta({"format": FORMAT, "tokenizer": "audio/mel", "config": attrs.asdict(self.config)})

    def measure(self, dataset) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` ``(n_mels,)`` float32 over the valid frames of up to ``stats_items`` items."""
        n = min(len(dataset), self.config.stats_items)
        total = torch.zeros(self.config.n_mels, dtype=torch.float64)
        sq, count = torch.zeros_like(total), 0
        for start in range(0, n, 256):
            x, lengths = audio_batch(
                [dataset[i].media["audio"] for i in range(start, min(n, start + 256))], who="audio/mel"
            )
            m = log_mel(x, self.config).double()
            valid = frame_valid(lengths, m.shape[1], self.config.hop)
            frames = m.reshape(-1, m.shape[2]) if valid is None else m[valid]
            total, sq, count = total + frames.sum(0), sq + frames.square().sum(0), count + frames.shape[0]
        mean = total / count
        std = (sq / count - mean.square()).clamp_min(1e-6).sqrt()
        return mean.float(), std.float()

    def _ready(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                "audio/mel is not fitted: call fit(dataset, cache_dir=...) first (or standardize = false)"
            )

    def encode(self, media) -> Segment:
        self._ready()
        x, lengths = audio_batch(media, who="audio/mel")
        m = log_mel(x, self.config)
        tokens = (m - self.mean.to(m.device)) / self.std.to(m.device)
        b, n, _ = tokens.shape
        return Segment(
            modality=self.modality,
            tokens=tokens.contiguous(),
            positions=frame_positions(n, self.frame_rate, batch=b, device=x.device),
            valid=frame_valid(lengths, n, self.config.hop),
        )

    def to_log_mel(self, segment: Segment) -> Tensor:
        """``(B, N, n_mels)`` log-mel magnitudes of a segment (standardisation undone)."""
        self._ready()
        if segment.channels != self.config.n_mels:
            raise ValueError(
                f"audio/mel decodes {self.config.n_mels}-bin tokens, got {segment.channels}-channel tokens"
            )
        frames_of(segment, "audio/mel")
        t = segment.tokens.float()
        return t * self.std.to(t.device) + self.mean.to(t.device)

    def decode(self, segment: Segment) -> Tensor:
        """``(B, 1, N * hop)`` float in [-1, 1] by Griffin-Lim; invalid frames silent."""
        audio = mel_to_audio(self.to_log_mel(segment), self.config)
        if segment.valid is not None:
            audio = audio * segment.valid.repeat_interleave(self.config.hop, dim=1)
        return with_rate(audio[:, None].clamp(-1.0, 1.0), self.config.sample_rate)
