"""The ``audio`` writer: per sample, a 16-bit WAV (an ``<audio>`` player in ``samples.html``)
and a log-mel spectrogram PNG (time in seconds, frequency in Hz on a mel-spaced axis,
captioned with the sample's label).

Files: ``{stem}_{i:03d}.wav`` and ``{stem}_{i:03d}.png`` for sample ``i``, in sample order
(WAV then PNG for each). The batch is ``(B, 1, samples)`` float in [-1, 1] at ``sample_rate``
(the rate a tokenizer tagged the batch with, ``clips.with_rate``, else the config's
``sample_rate``, else 16000); values outside
[-1, 1] are clipped in the WAV and counted in the caption, NaN written as silence.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from torch import Tensor

from selfflow.plugins.audio.clips import audio_batch, rate_of
from selfflow.plugins.audio.io import write_wav
from selfflow.plugins.audio.mel import MelConfig, hz_to_mel, log_mel
from selfflow.plugins.gallery import check_labels, check_stem, replacing
from selfflow.plugins.protocols import MediaFile


@attrs.frozen(kw_only=True)
class AudioWriterConfig:
    """``sample_rate``: Hz of the media when the batch does not say (the audio tokenizers tag
    what they decode with their rate, ``clips.with_rate``; default 16000); ``spectrograms``: also write a PNG
    per sample; ``n_mels`` / ``hop``: the spectrogram's bins and hop (samples); ``dpi``: of the
    PNG; ``max_samples``: write at most this many samples of a batch (0: all)."""

    sample_rate: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1000)))
    spectrograms: bool = True
    n_mels: int = attrs.field(default=80, validator=attrs.validators.ge(8))
    hop: int = attrs.field(default=128, validator=attrs.validators.ge(16))
    dpi: int = attrs.field(default=100, validator=attrs.validators.ge(30))
    max_samples: int = attrs.field(default=0, validator=attrs.validators.ge(0))


def save_spectrogram(
    audio: Tensor, path: Path, *, sample_rate: int, title: str, n_mels: int = 80, hop: int = 128, dpi: int = 100
) -> None:
    """A ``(samples,)`` clip's log-mel spectrogram (dB re full scale, 80 dB range) as a PNG."""
    from matplotlib.figure import Figure

    c = MelConfig(sample_rate=sample_rate, n_fft=max(4 * hop, 512), hop=hop, n_mels=n_mels, floor=1e-6)
    mel = log_mel(audio.float().reshape(1, -1), c)[0].T  # (n_mels, frames), natural log
    db = (20.0 / np.log(10.0)) * mel.numpy()
    seconds = audio.numel() / sample_rate
    fig = Figure(figsize=(4.8, 2.6), dpi=dpi)
    ax = fig.add_subplot()
    image = ax.imshow(
        db,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=db.max() - 80.0,
        vmax=db.max(),
        extent=(0.0, seconds, 0, n_mels),
        interpolation="nearest",
    )
    # a mel-spaced axis labelled in Hz: tick at the bin whose centre is each frequency
    top = sample_rate / 2
    lo, hi = float(hz_to_mel(0.0)), float(hz_to_mel(top))
    ticks = [f for f in (0, 250, 500, 1000, 2000, 4000, 8000, 16000) if f <= top]
    ax.set_yticks([(float(hz_to_mel(f)) - lo) / (hi - lo) * n_mels for f in ticks])
    ax.set_yticklabels([f"{f / 1000:g}k" if f >= 1000 else str(f) for f in ticks])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz, mel scale)")
    # a run's titles are long ("<recipe> step N audio (EMA, sampler, cfg) | label"): wrapped, not cut
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    fig.colorbar(image, ax=ax, label="dB", pad=0.02)
    fig.tight_layout()
    fig.savefig(path, format="png")


class AudioWriter:
    """Writes ``directory/{stem}_{i:03d}.wav`` (and ``.png``) for each sample of a batch."""

    modality = "audio"

    def __init__(self, config: AudioWriterConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: AudioWriterConfig | None = None) -> AudioWriter:
        return cls(config if config is not None else AudioWriterConfig())

    def write(self, media, directory: Path, *, stem: str, labels: Sequence[str] | None, title: str) -> list[MediaFile]:
        rate = rate_of(media) or self.config.sample_rate or 16000
        x, lengths = audio_batch(media, who="the audio writer")
        b = x.shape[0]
        labels = check_labels(labels, b, "audio")
        stem = check_stem(stem)
        count = b if not self.config.max_samples else min(b, self.config.max_samples)
        c, out = self.config, []
        for i in range(count):
            clip = x[i, : int(lengths[i])].detach().cpu()
            bad = int((~torch.isfinite(clip)).sum())
            loud = int((clip.abs() > 1.0).sum())
            clip = torch.nan_to_num(clip, nan=0.0).clamp(-1.0, 1.0)
            label = labels[i] if labels else ""
            caption = label or f"sample {i}"
            notes = [f"{clip.numel() / rate:.2f} s"]
            if loud:
                notes.append(f"{loud} samples clipped")
            if bad:
                notes.append(f"{bad} non-finite samples written as silence")
            wav = Path(directory) / f"{stem}_{i:03d}.wav"
            with replacing(wav) as tmp:
                write_wav(tmp, clip, rate)
            out.append(MediaFile(path=wav, element="audio", items=(i,), caption=f"{caption} ({', '.join(notes)})"))
            if c.spectrograms:
                png = wav.with_suffix(".png")
                heading = " | ".join(part for part in (title, label or f"sample {i}") if part)
                with replacing(png) as tmp:
                    save_spectrogram(clip, tmp, sample_rate=rate, title=heading, n_mels=c.n_mels, hop=c.hop, dpi=c.dpi)
                out.append(MediaFile(path=png, element="img", items=(i,), caption=f"{caption}: log-mel spectrogram"))
        return out
