"""``audio/tones``: synthetic pitched notes; label = pitch class (C, C#, ..., B). No system dependency.

Each clip is one note of ``seconds`` length at ``sample_rate``: fundamental
``f = 440 * 2 ** ((midi - 69) / 12)`` with ``midi = 12 * (octave + 1) + pitch_class`` for an
octave drawn from ``octaves``, plus harmonics ``2f, 3f, ...`` (up to ``harmonics`` partials,
never above 0.45 x the sample rate) whose amplitudes fall as ``k ** -rolloff`` with a rolloff
drawn in [0.8, 2.5], random phases, under an ADSR envelope (attack 5-60 ms, decay 40-250 ms,
sustain level 0.3-0.9, release 30-300 ms) over a note duration drawn in ``duration`` seconds,
starting 0-100 ms into the clip; the peak is scaled to a loudness drawn in ``loudness``.

Deterministic: split ``"train"`` and ``"eval"`` draw from ``numpy.random.default_rng([seed, 0])``
and ``[seed, 1]``; ``per_class`` notes of every pitch class, in class order.
"""

from __future__ import annotations

import attrs
import numpy as np

from selfflow.plugins.audio.clips import AudioClips

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _range(name: str):
    def check(instance, attribute, value) -> None:
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError(f"audio/tones {name} is [low, high] with 0 < low <= high, got {list(value)!r}")

    return check


@attrs.frozen(kw_only=True)
class TonesConfig:
    """``sample_rate`` Hz; ``seconds``: clip length; ``train_per_class`` / ``eval_per_class``:
    notes per pitch class in each split; ``octaves``: octaves the notes are drawn from (4 holds
    A4 = 440 Hz); ``harmonics``: partials per note (1 = pure sine); ``duration``: [min, max]
    note length in seconds (cut at the clip's end); ``loudness``: [min, max] peak amplitude."""

    sample_rate: int = attrs.field(default=16000, validator=attrs.validators.ge(4000))
    seconds: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0.05), attrs.validators.le(30.0)])
    train_per_class: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    eval_per_class: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    octaves: tuple[int, ...] = attrs.field(
        default=(3, 4, 5), converter=tuple, validator=attrs.validators.deep_iterable(attrs.validators.in_(range(1, 8)))
    )
    harmonics: int = attrs.field(default=4, validator=[attrs.validators.ge(1), attrs.validators.le(16)])
    duration: tuple[float, float] = attrs.field(default=(0.3, 0.9), converter=tuple, validator=_range("duration"))
    loudness: tuple[float, float] = attrs.field(default=(0.2, 0.8), converter=tuple, validator=_range("loudness"))

    def __attrs_post_init__(self) -> None:
        if not self.octaves:
            raise ValueError("audio/tones octaves must list at least one octave, e.g. [3, 4, 5]")
        if self.loudness[1] > 1.0:
            raise ValueError(f"audio/tones loudness is a peak amplitude in (0, 1], got {list(self.loudness)!r}")
        top = 440.0 * 2 ** ((12 * (max(self.octaves) + 1) + 11 - 69) / 12)
        if top >= 0.45 * self.sample_rate:
            raise ValueError(
                f"audio/tones: octave {max(self.octaves)} reaches {top:.0f} Hz, above 0.45 x sample_rate "
                f"{self.sample_rate}; lower the octaves or raise sample_rate"
            )


def adsr(n: int, rate: int, attack: float, decay: float, sustain: float, release: float, length: float) -> np.ndarray:
    """``(n,)`` envelope in [0, 1]: linear attack to 1, decay to ``sustain``, hold until
    ``length`` seconds, linear release to 0 (times in seconds)."""

    def held(t):  # attack, then decay towards the sustain level
        return np.where(t < attack, t / attack, 1.0 - (1.0 - sustain) * np.clip((t - attack) / decay, 0.0, 1.0))

    t = np.arange(n) / rate
    released = held(np.float64(length)) * np.clip(1.0 - (t - length) / release, 0.0, 1.0)
    return np.where(t < length, held(t), released)


def note(rng: np.random.Generator, pitch_class: int, c: TonesConfig) -> np.ndarray:
    """One clip ``(round(seconds * sample_rate),)`` float32 of ``pitch_class`` (module docstring)."""
    n, rate = round(c.seconds * c.sample_rate), c.sample_rate
    octave = int(rng.choice(c.octaves))
    f0 = 440.0 * 2 ** ((12 * (octave + 1) + pitch_class - 69) / 12)
    rolloff = rng.uniform(0.8, 2.5)
    onset = rng.uniform(0.0, 0.1)
    length = rng.uniform(*c.duration)
    env = adsr(
        n,
        rate,
        attack=rng.uniform(0.005, 0.06),
        decay=rng.uniform(0.04, 0.25),
        sustain=rng.uniform(0.3, 0.9),
        release=rng.uniform(0.03, 0.3),
        length=length,
    )
    shift = int(onset * rate)
    env = np.concatenate([np.zeros(shift), env[: n - shift]])
    t = np.arange(n) / rate
    wave = np.zeros(n)
    for k in range(1, c.harmonics + 1):
        if k * f0 >= 0.45 * rate:
            break
        wave += k**-rolloff * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    x = wave * env
    peak = np.abs(x).max()
    return (x * (rng.uniform(*c.loudness) / peak if peak > 0 else 0.0)).astype(np.float32)


def tones(config: TonesConfig | None = None, *, split: str = "train", seed: int = 0) -> AudioClips:
    """The ``split`` of ``audio/tones`` (``per_class`` notes of each of the 12 pitch classes)."""
    c = config or TonesConfig()
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    per = c.train_per_class if split == "train" else c.eval_per_class
    labels = [pc for pc in range(12) for _ in range(per)]
    clips = [note(rng, pc, c) for pc in labels]
    return AudioClips(
        clips,
        labels,
        class_names=PITCH_CLASSES,
        sample_rate=c.sample_rate,
        tag=f"audio/tones|{split}|{seed}|{attrs.asdict(c)}",
    )
