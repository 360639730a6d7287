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
