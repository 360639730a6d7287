"""In-memory audio clips as a dataset, and the one rule that makes a clip a fixed length.

``AudioClips`` holds mono clips ``(1, samples)`` float32 in [-1, 1] with their labels; every
audio dataset of this plugin (spoken digits, tones, a user's folder) is one. ``valid_samples[i]``
is how many samples of item ``i`` are real audio (the rest is padding).

Fixed length (``fit_clip``): a clip longer than ``length`` samples is cropped to a window of
``length`` (at ``start``); a shorter one is padded with zeros at its end (``pad = "zeros"``),
or kept at its own length (``pad = "none"``): the tokenizers encode a batch of clips of
different lengths to segments whose ``valid`` mask is False past each clip's last frame, and
the batching pads token counts with ``valid = False`` (``plugins/batching.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from selfflow.plugins.protocols import Example

PADS = ("zeros", "none")


def fit_clip(x: np.ndarray, length: int, *, start: int = 0, pad: str = "zeros") -> tuple[np.ndarray, int]:
    """``(samples,)`` -> ``(clip, valid)``: ``x[start : start + length]`` (``start`` clamped so
    the window fits), zero-padded at the end to ``length`` when ``pad == "zeros"``; ``valid``
    is the number of real samples in ``clip``."""
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    if len(x) > length:
        start = min(max(0, start), len(x) - length)
        return np.ascontiguousarray(x[start : start + length], dtype=np.float32), length
    if pad == "none" or len(x) == length:
        return np.asarray(x, dtype=np.float32), len(x)
    out = np.zeros(length, dtype=np.float32)
    out[: len(x)] = x
    return out, len(x)


class AudioClips:
    """A map-style dataset of mono clips: ``media["audio"]`` is ``(1, samples)`` float32.

    ``sample_rate``: Hz of every clip; ``labels``: class ids (``None``: unlabelled);
    ``valid_samples``: real samples per item; ``fingerprint()``: a hash of the samples and
    labels themselves (plus ``tag``, what made them), so any change to the data changes it.
    """

    modalities = ("audio",)

    def __init__(
        self,
        clips: Sequence[np.ndarray],
        labels: Sequence[int] | None,
        *,
        class_names: Sequence[str],
        sample_rate: int,
        valid_samples: Sequence[int] | None = None,
        tag: str,
    ) -> None:
        if not clips:
            raise ValueError(f"{tag}: no clips")
        self.sample_rate = int(sample_rate)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        same = len({len(c) for c in clips}) == 1
        self._stacked: Tensor | None = torch.from_numpy(np.stack(clips))[:, None] if same else None
        self._list = None if same else [torch.from_numpy(np.asarray(c, dtype=np.float32))[None] for c in clips]
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        self.valid_samples = torch.as_tensor(
            [len(c) for c in clips] if valid_samples is None else list(valid_samples), dtype=torch.long
        )
        h = hashlib.sha256(tag.encode())
        for c in clips:
            h.update(np.ascontiguousarray(c, dtype=np.float32).tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        self._fingerprint = h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.valid_samples)

    def __getitem__(self, i: int) -> Example:
        clip = self._stacked[i] if self._stacked is not None else self._list[i]
        label = None if self.labels is None or self.num_classes == 0 else int(self.labels[i])
        return Example(media={"audio": clip}, label=label)

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def seconds(self) -> float:
        """Total duration of the real audio, in seconds."""
        return float(self.valid_samples.sum()) / self.sample_rate


def audio_batch(media, *, who: str) -> tuple[Tensor, Tensor]:
    """An audio batch as ``(x (B, samples) float32, lengths (B,) long)``.

    ``media`` is a ``(B, 1, samples)`` tensor (every item full length) or a list of ``(1, n_i)``
    tensors of different lengths (``pad = "none"`` data), zero-padded here to the longest.
    Mono only: a ``(B, channels, samples)`` batch with ``channels > 1`` is refused with the fix.
    """
    expected = f"{who} takes a mono audio batch (B, 1, samples) float in [-1, 1], or a list of (1, samples) tensors"
    if isinstance(media, (list, tuple)):
        if not media:
            raise ValueError(f"{expected}; got an empty list")
        items = [torch.as_tensor(m) for m in media]
        bad = next((i for i, m in enumerate(items) if m.ndim != 2 or m.shape[0] != 1), None)
        if bad is not None:
            raise ValueError(f"{expected}; item {bad} has shape {tuple(items[bad].shape)}")
        lengths = torch.tensor([m.shape[1] for m in items], dtype=torch.long)
        x = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32, device=items[0].device)
        for i, m in enumerate(items):
            x[i, : m.shape[1]] = m[0].float()
        return x, lengths.to(x.device)
    if not isinstance(media, Tensor):
        raise TypeError(f"{expected}; got a {type(media).__name__}")
    if media.ndim != 3:
        hint = " (one clip (1, samples)? add a batch dimension, x[None])" if media.ndim == 2 else ""
        raise ValueError(f"{expected}; got shape {tuple(media.shape)}{hint}")
    if media.shape[1] != 1:
        raise ValueError(
            f"{expected}; got {media.shape[1]} channels in shape {tuple(media.shape)}: mix down to mono first "
            "(x.mean(1, keepdim=True)); the audio datasets already do"
        )
    if not media.is_floating_point():
        raise TypeError(f"{expected}; got dtype {media.dtype} (int16 PCM? pass x.float() / 32768)")
    if media.shape[0] == 0 or media.shape[2] == 0:
        raise ValueError(f"{expected}; got an empty batch, shape {tuple(media.shape)}")
    b, _, s = media.shape
    return media[:, 0].float(), torch.full((b,), s, dtype=torch.long, device=media.device)


def check_rate(dataset, sample_rate: int, who: str) -> None:
    """Refuse a dataset whose clips are at another rate than the tokenizer's (when it says)."""
    rate = getattr(dataset, "sample_rate", None)
    if rate is not None and int(rate) != int(sample_rate):
        raise ValueError(
            f"{who} is set to sample_rate = {sample_rate} Hz but the dataset's clips are {rate} Hz: "
            f"set the same sample_rate in the dataset_options and the tokenizer_options"
        )


_RATE = "selfflow_sample_rate"


def with_rate(audio: Tensor, sample_rate: int) -> Tensor:
    """Tag a decoded ``(B, 1, samples)`` batch with its sample rate (a plain attribute on the
    tensor object), so the writer, which only receives the tensor, writes WAVs at the right
    rate. Returns ``audio`` itself."""
    setattr(audio, _RATE, int(sample_rate))
    return audio


def rate_of(audio) -> int | None:
    """The rate ``with_rate`` tagged ``audio`` with, or ``None`` (untagged, e.g. sliced or copied)."""
    rate = getattr(audio, _RATE, None)
    return int(rate) if rate is not None else None
