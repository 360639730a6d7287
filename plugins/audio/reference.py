"""The audio reference feature network: a small log-mel CNN classifier trained on the run's clips.

No pretrained audio network (VGGish, PANNs) can be downloaded here, so Fréchet distance, KID
and class accuracy of audio use this network. The Fréchet distance in its feature space is an
**FAD-style** metric (Fréchet Audio Distance computes the same statistic on VGGish
embeddings) but it is *not* comparable with published FAD numbers: the embedding is this
network, trained on this run's data; read it against its own real-vs-real floor and the
held-out accuracy that ``describe()`` writes next to every number.

Input: audio ``(B, 1, samples)`` float in [-1, 1] at the ``sample_rate`` it was trained on
(clips of any length: the network pools over time). Front end: a log-mel power spectrogram
(``n_mels`` bins, ``window_ms`` Hann windows every ``hop_ms``), **normalised per clip** (zero
mean, unit std over the clip's whole spectrogram, so the gain of a clip does not matter).
Training augments each clip with a random time shift (up to ``shift_ms``, zero fill), a random
gain (up to ``gain_db``) and white noise at a random SNR in ``noise_snr_db``. Architecture: conv
stages over (mel, time) (two 3x3 convs + BatchNorm + ReLU, 2x2 max-pool between stages) ->
adaptive 4x4 average pool -> Linear(``features``) + ReLU (the **features**, times a constant
that makes their RMS over the training clips 1, as the image reference does) -> Linear(classes).

``token_features(media, segment)``: the last stage's map averaged over the mel axis gives one
vector per map frame (map frame ``j`` is centred at spectrogram frame ``j s + (s - 1) / 2``,
``s = 2^(stages - 1)``); each token of the segment reads the map at its own time ``t``
(``positions[..., 0]`` on the shared time axis) by linear interpolation, after the map is
average-pooled to the tokens' frame rate when the tokens are at least twice as coarse:
REPA-style alignment targets in time with the segment's tokens, whatever tokenizer made them.

Cached by (data fingerprints, sample rate, config) under ``<cache_dir>/reference/audio-<key>/``
as safetensors weights + JSON metadata (``core/files.write_entry``); nothing is unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.files import META, CacheEntry, content_key, write_entry
from selfflow.core.types import TIME_RATE, Segment
from selfflow.plugins.protocols import ReferenceContext

NAME = "audio/classifier"
_FORMAT = 1  # bump when the architecture, front end or training changes: old caches are then ignored
_WEIGHTS = "weights.safetensors"


# ----------------------------------------------------------------------------- log-mel front end


def _hz_to_mel(f: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)  # HTK mel scale


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=64)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular HTK-mel filters ``(n_mels, n_fft // 2 + 1)`` over the rFFT bins, peak 1
    (as ``torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk")``)."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    lo_mel, hi_mel = (float(_hz_to_mel(torch.tensor(f, dtype=torch.float64))) for f in (f_min, f_max))
    edges = _mel_to_hz(torch.linspace(lo_mel, hi_mel, n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(
    wave: Tensor, sample_rate: int, *, n_mels: int = 80, window_ms: float = 32.0, hop_ms: float = 10.0
) -> Tensor:
    """``(B, S)`` waveforms -> natural-log mel power ``(B, n_mels, frames)`` (floor 1e-10),
    Hann windows of ``window_ms`` rounded to a power-of-two FFT, hop ``hop_ms``, centred."""
    n_fft = 2 ** max(4, round(math.log2(window_ms * sample_rate / 1000.0)))
    hop = max(1, round(hop_ms * sample_rate / 1000.0))
    if wave.shape[-1] < n_fft // 2 + 1:
        wave = F.pad(wave, (0, n_fft // 2 + 1 - wave.shape[-1]))
    spec = torch.stft(
        wave.float(), n_fft, hop, window=torch.hann_window(n_fft, device=wave.device), return_complex=True
    )
    power = spec.real.square() + spec.imag.square()
    mel = mel_filterbank(int(sample_rate), n_fft, n_mels).to(wave.device) @ power
    return torch.log(mel.clamp_min(1e-10))


# ----------------------------------------------------------------------------- config and network


def _widths(value: Any) -> tuple[int, ...]:
    widths = tuple(int(w) for w in value)
    if not widths or min(widths) <= 0:
        raise ValueError(f"reference.widths must be a non-empty list of positive channel counts, got {value!r}")
    return widths


def _range(value: Any) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"reference.noise_snr_db must be [low, high] with low <= high, got {value!r}")
    return lo, hi


@attrs.frozen(kw_only=True)
class AudioReferenceConfig:
    """The front end, the classifier and how it is trained (every field is in the cache key).

    ``sample_rate``: of the clips in Hz (``None``: the dataset's ``sample_rate``);
    ``n_mels``, ``window_ms``, ``hop_ms``: the log-mel front end; ``widths``: channels of the
    conv stages; ``features``: width of the penultimate layer (the metric feature space);
    augmentation: ``shift_ms`` (random time shift, 0: none), ``gain_db`` (random gain of up
    to +-this), ``noise_snr_db`` ([low, high] SNR of added white noise; ``noise_probability``
    of adding it); ``eval_fraction``: share held out when no eval dataset is given.
    """

    sample_rate: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(0)))
    n_mels: int = attrs.field(default=64, validator=attrs.validators.ge(8))
    window_ms: float = attrs.field(default=32.0, validator=attrs.validators.gt(0))
    hop_ms: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    widths: tuple[int, ...] = attrs.field(default=(16, 32, 64), converter=_widths)
    features: int = attrs.field(default=128, validator=attrs.validators.gt(0))
    epochs: int = attrs.field(default=12, validator=attrs.validators.gt(0))
    batch_size: int = attrs.field(default=64, validator=attrs.validators.gt(0))
    lr: float = attrs.field(default=3e-3, validator=attrs.validators.gt(0))
    weight_decay: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0))
    dropout: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    shift_ms: float = attrs.field(default=100.0, validator=attrs.validators.ge(0))
    gain_db: float = attrs.field(default=6.0, validator=attrs.validators.ge(0))
    noise_snr_db: tuple[float, float] = attrs.field(default=(20.0, 40.0), converter=_range)
    noise_probability: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    seed: int = 0


class AudioClassifierNet(nn.Module):
    """Log-mel front end (per-clip normalised) -> conv stages over (mel, time) -> adaptive 4x4
    pool -> Linear(F) + ReLU (features) -> Linear(classes)."""

    def __init__(self, *, sample_rate: int, num_classes: int, config: AudioReferenceConfig) -> None:
        super().__init__()
        self.sample_rate = int(sample_rate)
        self.n_mels, self.window_ms, self.hop_ms = config.n_mels, config.window_ms, config.hop_ms
        stages, c = [], 1
        for w in config.widths:
            layers: list[nn.Module] = []
            for c_in in (c, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.ModuleList(stages)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, config.features), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, num_classes)

    @property
    def frame_rate(self) -> float:
        """Spectrogram frames per second (the time resolution of ``feature_map`` is this / 2^(S-1))."""
        return self.sample_rate / max(1, round(self.hop_ms * self.sample_rate / 1000.0))

    def spectrogram(self, audio: Tensor) -> Tensor:
        """``(B, 1, S)`` -> per-clip normalised log-mel ``(B, 1, n_mels, frames)``."""
        m = log_mel(audio[:, 0], self.sample_rate, n_mels=self.n_mels, window_ms=self.window_ms, hop_ms=self.hop_ms)
        m = (m - m.mean((1, 2), keepdim=True)) / m.std((1, 2), keepdim=True).clamp_min(1e-5)
        return m[:, None]

    def feature_map(self, audio: Tensor) -> Tensor:
        """The last stage's output ``(B, widths[-1], n_mels / 2^(S-1), frames / 2^(S-1))``."""
        x = self.spectrogram(audio)
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2, ceil_mode=True) if i else x)
        return x

    def features(self, audio: Tensor) -> Tensor:
        return self.embed(F.adaptive_avg_pool2d(self.feature_map(audio), 4))

    def forward(self, audio: Tensor) -> Tensor:
        return self.head(self.drop(self.features(audio)))


class AudioReferenceFeatures(nn.Module):
    """The ``nn.Module`` view torchmetrics' ``feature=`` expects: audio ``(B, 1, S)`` ->
    scaled features ``(B, F)``; ``num_features`` set; always in eval mode."""

    def __init__(self, reference: AudioReference) -> None:
        super().__init__()
        self.net = reference.net
        self.num_features = reference.num_features
        self.scale = reference.feature_scale
        self._check = reference.check_audio

    def train(self, mode: bool = True) -> AudioReferenceFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        self._check(audio)
        self.net.eval()
        device = next(self.net.parameters()).device
        return self.net.features(audio.to(device=device, dtype=torch.float32)) * self.scale


# ----------------------------------------------------------------------------- the reference


class AudioReference:
    """A trained ``AudioClassifierNet`` with its metadata (``meta``): ``accuracy`` held out
    (``meta["eval"]`` says on what); build it with ``fit``, ``load`` or ``from_config``."""

    name = NAME

    def __init__(self, net: AudioClassifierNet, meta: dict[str, Any], *, from_cache: bool = False) -> None:
        self.net = net.eval()
        self.meta = meta
        self.from_cache = from_cache

    @property
    def accuracy(self) -> float:
        return float(self.meta["accuracy"])

    @property
    def num_features(self) -> int:
        return int(self.meta["config"]["features"])

    @property
    def feature_scale(self) -> float:
        return float(self.meta["feature_scale"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    @property
    def token_feature_dim(self) -> int:
        return int(self.meta["config"]["widths"][-1])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> AudioReference:
        self.net.to(device)
        return self

    def check_audio(self, audio: Any) -> None:
        if not isinstance(audio, Tensor) or audio.ndim != 3 or audio.shape[1] != 1 or audio.shape[-1] < 2:
            shape = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise ValueError(
                f"the audio reference network reads mono clips (B, 1, samples) in [-1, 1] at {self.sample_rate} Hz, "
                f"got {shape}; mix down to mono (dataset_options channels = 1)"
            )

    @torch.no_grad()
    def _run(self, fn, audio: Tensor, chunk: int = 256) -> Tensor:
        self.check_audio(audio)
        self.net.eval()
        return torch.cat([fn(part.to(device=self.device, dtype=torch.float32)) for part in audio.split(chunk)])

    def features(self, audio: Tensor) -> Tensor:
        """``(B, 1, S)`` in [-1, 1] -> scaled penultimate features ``(B, F)`` (RMS 1 on the training clips)."""
        return self._run(self.net.features, audio) * self.feature_scale

    def logits(self, audio: Tensor) -> Tensor:
        """``(B, 1, S)`` in [-1, 1] -> class logits ``(B, num_classes)``."""
        return self._run(self.net, audio)

    def predict(self, audio: Tensor) -> Tensor:
        return self.logits(audio).argmax(dim=-1)

    def feature_module(self) -> AudioReferenceFeatures:
        return AudioReferenceFeatures(self)

    def token_features(self, audio: Tensor, segment: Segment) -> Tensor:
        """One frozen vector per token of ``segment`` (the tokens ``audio`` was encoded to):
        ``(B, N, token_feature_dim)``, the mel-averaged last-stage map read at each token's
        time ``t`` (module docstring)."""
        times = segment.positions[..., 0].to(torch.float64) / TIME_RATE  # (B, N) seconds
        if times.shape[0] != audio.shape[0]:
            raise ValueError(f"token_features: {audio.shape[0]} clips but a segment of {times.shape[0]}")
        unique = torch.unique(times[0])
        token_rate = 1.0 / float(unique.diff().median()) if len(unique) > 1 else None

        hop_s = max(1, round(self.net.hop_ms * self.sample_rate / 1000.0)) / self.sample_rate
        stride = 2 ** (len(self.net.stages) - 1)  # spectrogram frames per feature-map frame
        map_rate = 1.0 / (stride * hop_s)

        def per_token(x: Tensor, t: Tensor) -> Tensor:
            m = self.net.feature_map(x).mean(
                2
            )  # (b, C, frames'): map frame j is centred at (j stride + (stride-1)/2) hop
            pos = (t / hop_s - (stride - 1) / 2) / stride  # token times in map frames
            if token_rate is not None and map_rate / token_rate >= 2:  # coarser tokens: average the map first
                k = int(map_rate // token_rate)
                m = F.avg_pool1d(m, k, k, ceil_mode=True)
                pos = (pos - (k - 1) / 2) / k
            pos = pos.clamp(0, m.shape[-1] - 1).to(m.dtype)
            lo = pos.floor().long()
            hi = (lo + 1).clamp_max(m.shape[-1] - 1)
            w = (pos - lo)[:, None, :]

            def at(i: Tensor) -> Tensor:
                return m.gather(2, i[:, None, :].expand(-1, m.shape[1], -1))

            return ((1 - w) * at(lo) + w * at(hi)).transpose(1, 2)

        self.check_audio(audio)
        self.net.eval()
        with torch.no_grad():
            parts = [
                per_token(a.to(self.device, torch.float32), t.to(self.device))
                for a, t in zip(audio.split(256), times.split(256))
            ]
        return torch.cat(parts)

    def describe(self) -> dict[str, Any]:
        """The protocol written next to every metric computed with this network."""
        return {
            "reference": self.name,
            "reference_accuracy": self.accuracy,
            "reference_eval": self.meta["eval"],
            "reference_eval_samples": self.meta["eval_samples"],
            "reference_features": self.num_features,
            "reference_sample_rate": self.sample_rate,
            "reference_key": self.meta["key"],
            "fd_kind": "FAD-style (Fréchet distance of this run-trained log-mel CNN's features; "
            "not comparable with published VGGish FAD)",
        }

    # -- construction

    @classmethod
    def from_config(cls, config: AudioReferenceConfig | None, *, context: ReferenceContext) -> AudioReference:
        """Registry factory: trains on the context's training clips, scored on its eval clips (cached)."""
        if "audio" not in getattr(context.train_dataset, "modalities", ()):
            raise ValueError(f"the audio reference network reads audio; modality {context.modality!r} has none")
        return cls.fit(
            context.train_dataset,
            config,
            eval_dataset=context.eval_dataset,
            cache_dir=context.cache_dir,
            device=context.device,
            progress=context.progress,
        )

    @classmethod
    def fit(
        cls,
        dataset,
        config: AudioReferenceConfig | None = None,
        *,
        eval_dataset=None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> AudioReference:
        """Train on ``dataset`` (or load the cached network of the same data and config);
        accuracy on ``eval_dataset`` or a seeded held-out ``eval_fraction`` of ``dataset``."""
        config = config or AudioReferenceConfig()
        device = torch.device(device or "cpu")
        rate = _sample_rate(dataset, config)
        key = cache_key(dataset, config, eval_dataset, rate)
        entry = CacheEntry(cache_dir, "reference", f"audio-{key}") if cache_dir is not None else None
        if entry is not None and entry.exists():
            return cls.load(entry.path, device=device, from_cache=True)
        ref = _train(dataset, config, eval_dataset=eval_dataset, key=key, rate=rate, device=device, progress=progress)
        if entry is not None:
            ref.save(entry.path)
        return ref

    def save(self, path: str | os.PathLike) -> None:
        with write_entry(path) as w:
            w.save_tensors(_WEIGHTS, self.net.state_dict(), metadata={"format": str(_FORMAT), "name": self.name})
            w.set_meta(self.meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, from_cache: bool = False
    ) -> AudioReference:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META).is_file() or not (path / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a reference network directory: it needs {META} and {_WEIGHTS}")
        meta = json.loads((path / META).read_text())
        if meta.get("format") != _FORMAT or meta.get("name") != NAME:
            raise ValueError(
                f"{path} holds {meta.get('name')!r} format {meta.get('format')}, this reads {NAME} format {_FORMAT}; "
                "delete it to retrain"
            )
        config = AudioReferenceConfig(**meta["config"])
        net = AudioClassifierNet(sample_rate=meta["sample_rate"], num_classes=meta["num_classes"], config=config)
        net.load_state_dict(load_file(str(path / _WEIGHTS)))
        return cls(net.to(device or "cpu"), meta, from_cache=from_cache)


def _sample_rate(dataset, config: AudioReferenceConfig) -> int:
    have = getattr(dataset, "sample_rate", None)
    if config.sample_rate is not None and have is not None and int(have) != config.sample_rate:
        raise ValueError(
            f"reference_options sample_rate={config.sample_rate} but the dataset's audio is {have} Hz; "
            "drop the option or resample the data (dataset_options sample_rate)"
        )
    rate = config.sample_rate or have
    if rate is None:
        raise ValueError(
            f"the audio reference network needs the clips' sample rate: {type(dataset).__name__} has no sample_rate "
            "attribute; set reference_options = {sample_rate = ...}"
        )
    return int(rate)


def cache_key(dataset, config: AudioReferenceConfig, eval_dataset=None, rate: int | None = None) -> str:
    """Hash of what determines the trained network: the data, the held-out data, the rate, the config."""
    return content_key(
        {
            "format": _FORMAT,
            "train": dataset.fingerprint(),
            "eval": eval_dataset.fingerprint() if eval_dataset is not None else None,
            "sample_rate": rate,
            "config": config,
        },
        length=16,
    )


# ----------------------------------------------------------------------------- training


def _stack(dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    """Clips ``(n, 1, S)`` (zero-padded to the longest) and labels ``(n,)``."""
    clips, labels = [], []
    for i in indices:
        ex = dataset[i]
        if ex.label is None:
            raise ValueError(
                f"the audio reference network needs labelled clips; item {i} of {type(dataset).__name__} has no label"
            )
        x = torch.as_tensor(ex.media["audio"], dtype=torch.float32)
        if x.ndim != 2 or x.shape[0] != 1:
            raise ValueError(
                f"the audio reference network reads mono clips (1, samples); item {i} of {type(dataset).__name__} "
                f"is {tuple(x.shape)}: mix it down to mono (dataset_options channels = 1)"
            )
        clips.append(x)
        labels.append(int(ex.label))
    n = max(c.shape[-1] for c in clips)
    return torch.stack([F.pad(c, (0, n - c.shape[-1])) for c in clips]), torch.tensor(labels)


def augment(x: Tensor, config: AudioReferenceConfig, rate: int, g: torch.Generator) -> Tensor:
    """Random time shift (zero fill), gain and white noise per clip of ``x (B, 1, S)``."""
    b, _, s = x.shape
    out = x
    max_shift = int(config.shift_ms * rate / 1000.0)
    if max_shift:
        shift = torch.randint(-max_shift, max_shift + 1, (b,), generator=g)
        idx = torch.arange(s)[None, :] - shift[:, None]
        valid = (idx >= 0) & (idx < s)
        out = torch.where(valid[:, None], x.gather(2, idx.clamp(0, s - 1)[:, None]), torch.zeros(()))
    if config.gain_db:
        gain = 10.0 ** ((torch.rand(b, generator=g) * 2 - 1) * config.gain_db / 20.0)
        out = out * gain[:, None, None]
    if config.noise_probability:
        lo, hi = config.noise_snr_db
        snr = lo + (hi - lo) * torch.rand(b, generator=g)
        power = out.square().mean((1, 2)).clamp_min(1e-8)
        sigma = (power / 10.0 ** (snr / 10.0)).sqrt() * (torch.rand(b, generator=g) < config.noise_probability)
        out = out + sigma[:, None, None] * torch.randn(out.shape, generator=g)
    return out.clamp(-1.0, 1.0)


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    net.eval()
    correct = sum(int((net(xb.to(device)).argmax(-1).cpu() == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    return correct / max(len(y), 1)


def _train(
    dataset, config: AudioReferenceConfig, *, eval_dataset, key: str, rate: int, device: torch.device, progress: bool
) -> AudioReference:
    from tqdm.auto import tqdm

    num_classes = int(dataset.num_classes)
    if num_classes < 2:
        raise ValueError(
            f"the audio reference network is a classifier: it needs a labelled dataset, got num_classes={num_classes}"
        )
    if eval_dataset is None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_eval = max(1, round(config.eval_fraction * len(dataset)))
        x_train, y_train = _stack(dataset, order[n_eval:])
        x_eval, y_eval = _stack(dataset, order[:n_eval])
        held_out = f"{config.eval_fraction:g} of the training data, held out (seed {config.seed})"
    else:
        x_train, y_train = _stack(dataset, list(range(len(dataset))))
        x_eval, y_eval = _stack(eval_dataset, list(range(len(eval_dataset))))
        held_out = f"eval dataset {eval_dataset.fingerprint()}"

    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(y_train) // config.batch_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # init and dropout are seeded, the caller's RNG untouched
        torch.manual_seed(config.seed)
        net = AudioClassifierNet(sample_rate=rate, num_classes=num_classes, config=config).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.25
        )
        bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"fit {NAME}", unit="step", disable=not progress)
        for epoch in range(config.epochs):
            net.train()
            for idx in torch.randperm(len(y_train), generator=gen).split(config.batch_size):
                xb = augment(x_train[idx], config, rate, gen)
                loss = F.cross_entropy(net(xb.to(device)), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        accuracy = _accuracy(net, x_eval, y_eval, device)
        net.eval()
        with torch.no_grad():
            rms = torch.cat([net.features(xb.to(device)).cpu() for xb in x_train.split(256)]).square().mean().sqrt()
        bar.set_postfix(held_out_accuracy=f"{accuracy:.4f}")
        bar.close()
    meta = {
        "format": _FORMAT,
        "name": NAME,
        "key": key,
        "accuracy": accuracy,
        "feature_scale": 1.0 / max(float(rms), 1e-12),
        "eval": held_out,
        "eval_samples": len(y_eval),
        "train_samples": len(y_train),
        "train_fingerprint": dataset.fingerprint(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "sample_rate": rate,
        "num_classes": num_classes,
        "class_names": list(getattr(dataset, "class_names", ())),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(config).items()},
        "torch": torch.__version__,
    }
    return AudioReference(net.eval(), meta)
