"""Audio media metrics: a reference-free sanity check and the tokenizer's reconstruction ceiling.

Class accuracy, FD and KID of audio are the generic metrics (``plugins/metrics.py``) in the
feature space of the audio reference network (``plugins/audio/reference.py``; its FD is an
FAD-style metric, not comparable with published VGGish FAD). This module adds:

- ``audio/sanity``: is a sample audio at all, or silence, or noise? Per clip: the reference
  network's **confidence** (its max softmax probability: high on real speech, near
  1/classes on what it cannot place), the **spectral flatness** of the clip's Welch power
  spectrum (geometric / arithmetic mean over frequency of the power averaged over its
  non-silent frames: white noise ~1, a pure tone ~0, speech low) and its **RMS level** in
  dBFS; plus the share of clips that are silent (RMS below ``silence_dbfs``) or noise-like
  (flatness above ``noise_flatness``). Reported for the scored clips (samples, or held-out
  real clips with ``selfflow eval --real``) and, in ``details``, for the real clips they are
  compared with, so a broken decoder cannot hide behind FD.
- ``audio/reconstruction``: real audio through the run's tokenizer (``encode`` -> ``decode``),
  scored by the reference classifier (accuracy on the clips' own labels) and FD against the
  real comparison set, with the waveform SNR: the **reconstruction ceiling** that generated
  rows are read against, as audio benchmarks report it. Run it on real clips:
  ``selfflow eval RUN --real --metric audio/reconstruction`` (``--real`` scores held-out
  items in place of samples); ``reconstruction_ceiling(...)`` is the same in one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from selfflow.plugins.protocols import FeatureNetwork, MetricContext, MetricResult, Tokenizer


def _check_audio(name: str, audio: Any) -> Tensor:
    if not isinstance(audio, Tensor) or audio.ndim != 3:
        shape = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
        raise ValueError(f"{name} scores audio batches (B, channels, samples) in [-1, 1], got {shape}")
    return audio.detach().float().cpu()


# ----------------------------------------------------------------------------- clip statistics


def rms_dbfs(audio: Tensor) -> Tensor:
    """``(B, C, S)`` -> RMS level per clip in dB relative to full scale (a full-scale sine is -3 dB)."""
    rms = audio.float().square().mean((1, 2)).sqrt()
    return 20.0 * torch.log10(rms.clamp_min(1e-10))


def spectral_flatness(audio: Tensor, *, n_fft: int = 1024, active_db: float = 40.0) -> Tensor:
    """``(B, C, S)`` -> flatness per clip in [0, 1]: geometric over arithmetic mean (over the
    rFFT bins above DC) of the power spectrum averaged over the clip's active frames (frame RMS
    within ``active_db`` of its loudest frame and above -80 dBFS; Hann windows, hop n/4).
    White noise gives ~1, a pure tone ~0; a silent clip gives 0."""
    x = audio.float().mean(1)  # mono
    n = min(n_fft, 2 ** int(math.log2(max(16, x.shape[-1]))))
    frames = x.unfold(-1, n, n // 4) if x.shape[-1] >= n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))[:, None]
    power = torch.fft.rfft(frames * torch.hann_window(n), dim=-1).abs().square()[..., 1:]  # (B, F, bins)
    level = frames.square().mean(-1).sqrt()  # (B, F)
    loudest = level.amax(-1, keepdim=True)
    active = (level >= loudest * 10.0 ** (-active_db / 20.0)) & (level > 1e-4)
    weights = active.float() / active.float().sum(-1, keepdim=True).clamp_min(1.0)
    spectrum = (power * weights[..., None]).sum(1)  # (B, bins): Welch average over active frames
    geo = torch.exp(torch.log(spectrum.clamp_min(1e-20)).mean(-1))
    flat = geo / spectrum.mean(-1).clamp_min(1e-20)
    return torch.where(active.any(-1), flat.clamp(0.0, 1.0), torch.zeros_like(flat))


def confidence(reference: FeatureNetwork, audio: Tensor) -> Tensor:
    """The reference classifier's max softmax probability per clip ``(B,)``."""
    return reference.logits(audio).float().softmax(-1).amax(-1).cpu()


# ----------------------------------------------------------------------------- audio/sanity


@attrs.frozen(kw_only=True)
class SanityConfig:
    """``silence_dbfs``: a clip with RMS below this is silent; ``noise_flatness``: a clip
    with spectral flatness above this is noise-like; ``n_fft``: the flatness FFT size."""

    silence_dbfs: float = -50.0
    noise_flatness: float = attrs.field(default=0.5, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    n_fft: int = attrs.field(default=1024, validator=attrs.validators.ge(16))


class AudioSanity:
    """``audio/sanity`` (module docstring): ``update(fake=clips)`` (``real=`` clips are
    summarised in ``details``); ``compute()`` -> ``confidence``, ``spectral_flatness``,
    ``rms_dbfs`` (means over clips), ``silent_fraction``, ``noise_fraction``."""

    name = "audio/sanity"

    def __init__(self, reference: FeatureNetwork | Callable[[], FeatureNetwork], config: SanityConfig | None = None):
        self._reference = reference
        self.config = config or SanityConfig()
        self._stats: dict[str, list[Tensor]] = {"fake": [], "real": []}

    @classmethod
    def from_config(cls, config: SanityConfig | None, *, context: MetricContext) -> AudioSanity:
        return cls(context.reference, config)

    @property
    def reference(self) -> FeatureNetwork:
        if not isinstance(self._reference, FeatureNetwork):
            self._reference = self._reference()
        return self._reference

    def _clip_stats(self, audio: Tensor) -> Tensor:
        return torch.stack(
            [
                confidence(self.reference, audio),
                spectral_flatness(audio, n_fft=self.config.n_fft),
                rms_dbfs(audio),
            ],
            dim=1,
        )

    def update(self, *, real: Any = None, fake: Any = None, labels: Tensor | None = None) -> None:
        if fake is not None:
            self._stats["fake"].append(self._clip_stats(_check_audio(self.name, fake)))
        if real is not None:
            self._stats["real"].append(self._clip_stats(_check_audio(self.name, real)))

    def reset(self) -> None:
        self._stats["fake"].clear()

    def _summary(self, rows: list[Tensor]) -> dict[str, float]:
        s = torch.cat(rows)
        c = self.config
        return {
            "confidence": float(s[:, 0].mean()),
            "spectral_flatness": float(s[:, 1].mean()),
            "rms_dbfs": float(s[:, 2].mean()),
            "silent_fraction": float((s[:, 2] < c.silence_dbfs).double().mean()),
            "noise_fraction": float((s[:, 1] > c.noise_flatness).double().mean()),
            "clips": len(s),
        }

    def compute(self) -> list[MetricResult]:
        if not self._stats["fake"]:
            raise ValueError("audio/sanity has no clips: call update(fake=...) first")
        fake = self._summary(self._stats["fake"])
        details: dict[str, Any] = {
            "clips": fake["clips"],
            "silence_dbfs": self.config.silence_dbfs,
            "noise_flatness": self.config.noise_flatness,
            "flatness": "Welch power spectrum over active frames; white noise ~1, tone ~0",
            "confidence": f"max softmax of the reference classifier (chance {1.0 / self.reference.num_classes:.3f})",
            **self.reference.describe(),
        }
        if self._stats["real"]:
            details |= {f"real_{k}": v for k, v in self._summary(self._stats["real"]).items()}
        keys = ("confidence", "spectral_flatness", "rms_dbfs", "silent_fraction", "noise_fraction")
        return [MetricResult(name=k, value=fake[k], details=details) for k in keys]


# ----------------------------------------------------------------------------- audio/reconstruction


@attrs.frozen(kw_only=True)
class ReconstructionConfig:
    """``batch_size``: clips per encode/decode call."""

    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))


class AudioReconstruction:
    """``audio/reconstruction`` (module docstring): the clips given as ``fake`` (real
    held-out clips under ``--real``) go through ``tokenizer.encode -> decode``; results
    ``reconstruction_class_accuracy`` (on ``labels``), ``reconstruction_fd`` (against the
    ``real`` clips) and ``reconstruction_snr_db``; ``details`` hold the same accuracy and FD
    of the clips before the round trip (the reference's own ceiling)."""

    name = "audio/reconstruction"

    def __init__(
        self,
        tokenizer: Tokenizer,
        reference: FeatureNetwork | Callable[[], FeatureNetwork],
        config: ReconstructionConfig | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self._reference = reference
        self.config = config or ReconstructionConfig()
        self._fd: dict[str, Any] = {}
        self._correct = {"reconstruction": 0, "input": 0}
        self._labelled = 0
        self._signal = self._noise = 0.0
        self._clips = 0

    @classmethod
    def from_config(cls, config: ReconstructionConfig | None, *, context: MetricContext) -> AudioReconstruction:
        return cls(context.tokenizer, context.reference, config)

    @property
    def reference(self) -> FeatureNetwork:
        if not isinstance(self._reference, FeatureNetwork):
            self._reference = self._reference()
        return self._reference

    def _distance(self, which: str):
        if which not in self._fd:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self._fd[which] = FrechetInceptionDistance(feature=self.reference.feature_module())
        return self._fd[which]

    def reconstruct(self, audio: Tensor) -> Tensor:
        """``decode(encode(audio))`` in batches, cut or zero-padded to the input's length."""
        out = []
        for part in audio.split(self.config.batch_size):
            y = self.tokenizer.decode(self.tokenizer.encode(part)).detach().float().cpu()
            n = part.shape[-1]
            out.append(torch.nn.functional.pad(y[..., :n], (0, max(0, n - y.shape[-1]))))
        return torch.cat(out)

    def update(self, *, real: Any = None, fake: Any = None, labels: Tensor | None = None) -> None:
        if real is not None:
            real = _check_audio(self.name, real)
            for which in ("reconstruction", "input"):
                self._distance(which).update(real, real=True)
        if fake is None:
            return
        fake = _check_audio(self.name, fake)
        recon = self.reconstruct(fake)
        self._signal += float(fake.double().square().sum())
        self._noise += float((fake - recon).double().square().sum())
        self._clips += len(fake)
        self._distance("reconstruction").update(recon, real=False)
        self._distance("input").update(fake, real=False)
        if labels is not None:
            labels = labels.long().cpu()
            self._correct["reconstruction"] += int((self.reference.logits(recon).argmax(-1).cpu() == labels).sum())
            self._correct["input"] += int((self.reference.logits(fake).argmax(-1).cpu() == labels).sum())
            self._labelled += len(labels)

    def compute(self) -> list[MetricResult]:
        if not self._clips:
            raise ValueError("audio/reconstruction has no clips: call update(fake=real_clips, labels=...) first")
        details: dict[str, Any] = {
            "clips": self._clips,
            "tokenizer": type(self.tokenizer).__name__,
            "round_trip": "tokenizer.decode(tokenizer.encode(clip)), cut to the clip's length",
            **self.reference.describe(),
        }
        snr = 10.0 * math.log10(max(self._signal, 1e-20) / max(self._noise, 1e-20))
        results = [MetricResult(name="reconstruction_snr_db", value=snr, details=details)]
        fd = self._fd.get("reconstruction")
        if fd is not None and int(fd.real_features_num_samples) >= 2 and self._clips >= 2:
            details["real_samples"] = int(fd.real_features_num_samples)
            details["input_fd"] = float(self._fd["input"].compute())
            results.append(MetricResult(name="reconstruction_fd", value=float(fd.compute()), details=details))
        if self._labelled:
            details["input_class_accuracy"] = self._correct["input"] / self._labelled
            details["chance"] = 1.0 / self.reference.num_classes
            value = self._correct["reconstruction"] / self._labelled
            results.append(MetricResult(name="reconstruction_class_accuracy", value=value, details=details))
        return results


def reconstruction_ceiling(
    tokenizer: Tokenizer,
    dataset: Any,
    reference: FeatureNetwork,
    *,
    real_dataset: Any = None,
    num_samples: int | None = None,
    batch_size: int = 64,
) -> list[MetricResult]:
    """The reconstruction ceiling in one call: the first ``num_samples`` clips of ``dataset``
    (held-out real clips, with labels) through ``tokenizer``, FD against as many clips of
    ``real_dataset`` (default: ``dataset`` itself, which only measures the round trip)."""
    from selfflow.plugins.batching import media_of

    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    clips = media_of(dataset, "audio", range(n))
    labels = [dataset[i].label for i in range(n)]
    metric = AudioReconstruction(tokenizer, reference, ReconstructionConfig(batch_size=batch_size))
    real_source = dataset if real_dataset is None else real_dataset
    real = media_of(real_source, "audio", range(min(n, len(real_source))))
    metric.update(real=real, fake=clips, labels=None if None in labels else torch.tensor(labels))
    return metric.compute()
