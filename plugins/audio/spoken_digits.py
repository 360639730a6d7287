"""``audio/spoken-digits``: the words "zero" .. "nine" spoken by espeak-ng (Debian ``espeak-ng``).

Rendering: for each digit, ``train_per_class + eval_per_class`` distinct settings are drawn
without replacement (``numpy.random.default_rng(seed)``) from the grid voices x variants x
speeds x pitches; the first ``eval_per_class`` of each digit are the eval split and the rest
the train split, so **no rendering setting of a digit is in both splits** and both come from
the same distribution. Every clip is rendered once, in parallel (``workers`` espeak-ng
processes), to WAV files at espeak-ng's own rate (22,050 Hz) in one cache entry,
``<cache_dir>/spoken-digits/<key>/`` (``core/files.CacheEntry``: written under a temporary
name and renamed into place, ``meta.json`` last, listing each clip's setting), keyed by every
rendering option, the seed and the espeak-ng version. ``cache_dir`` defaults to
``$SELFFLOW_CACHE`` or ``~/.cache/selfflow`` (the run's cache).

Loading: each WAV is read (soundfile), its leading and trailing silence trimmed (samples below
1 % of the clip's peak, keeping 10 ms either side), resampled by soxr to ``sample_rate``, scaled
to a peak of ``peak`` and placed in a clip of ``seconds``: centred (``align = "center"``) or at
the start (``"start"``), zero-padded (the silence is part of the clip: every sample is
valid); a word longer than the clip is cropped to its middle
(counted in ``cropped``; none are at the defaults). Label = the digit, ``class_names`` the words.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

import attrs
import numpy as np

from selfflow.core.files import CacheEntry, content_key
from selfflow.plugins.audio.clips import AudioClips, fit_clip

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORMAT = 1  # bump when rendering or the entry's layout changes: old renders stop matching
_CACHE = "spoken-digits"
_PACKAGE = "espeak-ng"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed (or not on ``PATH``)."""


def _nonempty(name: str):
    def check(instance, attribute, value) -> None:
        if not value:
            raise ValueError(f"audio/spoken-digits {name} must list at least one value")

    return check


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen(kw_only=True)
class SpokenDigitsConfig:
    """``sample_rate`` Hz and ``seconds`` per clip; ``train_per_class`` / ``eval_per_class``:
    clips per digit in each split (distinct settings: at most voices x variants x speeds x
    pitches per digit); ``voices``: espeak-ng voice names; ``variants``: voice variants
    (``"m3"``, ``"f2"``; ``""`` = the voice's own); ``speeds``: words per minute; ``pitches``:
    espeak-ng pitch 0-99; ``peak``: peak amplitude of every clip; ``align``: ``"center"`` or
    ``"start"``; ``cache_dir``: where renders are kept (default ``$SELFFLOW_CACHE`` or
    ``~/.cache/selfflow``); ``workers``: parallel espeak-ng processes."""

    sample_rate: int = attrs.field(default=16000, validator=attrs.validators.ge(4000))
    seconds: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0.1), attrs.validators.le(10.0)])
    train_per_class: int = attrs.field(default=150, validator=attrs.validators.ge(1))
    eval_per_class: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    voices: tuple[str, ...] = attrs.field(default=VOICES, converter=tuple, validator=_nonempty("voices"))
    variants: tuple[str, ...] = attrs.field(default=VARIANTS, converter=tuple, validator=_nonempty("variants"))
    speeds: tuple[int, ...] = attrs.field(
        default=(130, 145, 160, 175, 190, 205),
        converter=_ints,
        validator=[_nonempty("speeds"), attrs.validators.deep_iterable(attrs.validators.in_(range(80, 451)))],
    )
    pitches: tuple[int, ...] = attrs.field(
        default=(20, 30, 40, 50, 60, 70, 80),
        converter=_ints,
        validator=[_nonempty("pitches"), attrs.validators.deep_iterable(attrs.validators.in_(range(0, 100)))],
    )
    peak: float = attrs.field(default=0.7, validator=[attrs.validators.gt(0), attrs.validators.le(1.0)])
    align: str = attrs.field(default="center", validator=attrs.validators.in_(("center", "start")))
    cache_dir: str | None = None
    workers: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        grid = len(self.voices) * len(self.variants) * len(self.speeds) * len(self.pitches)
        need = self.train_per_class + self.eval_per_class
        if need > grid:
            raise ValueError(
                f"audio/spoken-digits: train_per_class + eval_per_class = {need} distinct settings per digit, but "
                f"voices x variants x speeds x pitches has only {grid}; list more of them or ask for fewer clips"
            )
        bad = [v for v in self.variants if v and not v.isalnum()]
        if bad:
            raise ValueError(f"audio/spoken-digits variants are names like 'm3' or 'f2' (or ''), got {bad[0]!r}")


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError(
            "audio/spoken-digits renders its words with espeak-ng, which is not installed: "
            f"apt-get install {_PACKAGE} (Debian/Ubuntu; the package is '{_PACKAGE}'), "
            "or use audio/tones or audio/folder instead"
        )
    return exe


@functools.cache
def espeak_version() -> str:
    """``espeak-ng --version``'s first line (part of the render cache key)."""
    out = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def settings(c: SpokenDigitsConfig, seed: int) -> list[dict]:
    """Every clip's rendering setting, eval clips of each digit first (module docstring)."""
    grid = list(itertools.product(c.voices, c.variants, c.speeds, c.pitches))
    rng = np.random.default_rng(seed)
    out = []
    for digit, word in enumerate(WORDS):
        chosen = rng.choice(len(grid), size=c.train_per_class + c.eval_per_class, replace=False)
        for j, g in enumerate(chosen):
            voice, variant, speed, pitch = grid[int(g)]
            split = "eval" if j < c.eval_per_class else "train"
            out.append(
                {"digit": digit, "word": word, "voice": voice + (f"+{variant}" if variant else ""), "speed": speed}
                | {"pitch": pitch, "split": split, "file": f"{word}_{j:04d}.wav"}
            )
    return out


def _render_one(exe: str, s: dict, directory: Path) -> None:
    cmd = [exe, "-v", s["voice"], "-s", str(s["speed"]), "-p", str(s["pitch"]), "-w", str(directory / s["file"])]
    done = subprocess.run([*cmd, s["word"]], capture_output=True, text=True)
    if done.returncode != 0 or not (directory / s["file"]).is_file():
        raise RuntimeError(
            f"espeak-ng failed for voice {s['voice']!r} ({' '.join(cmd)} {s['word']}): "
            f"{done.stderr.strip() or 'no output file'}; remove that voice or variant from the options"
        )


def render(c: SpokenDigitsConfig, seed: int) -> tuple[Path, list[dict]]:
    """The render cache entry's directory and its clips' settings, rendering them if absent."""
    exe = _espeak()
    todo = settings(c, seed)
    render_options = {k: getattr(c, k) for k in ("voices", "variants", "speeds", "pitches")}
    counts = {"train": c.train_per_class, "eval": c.eval_per_class}
    key = content_key({"format": FORMAT, "espeak": espeak_version(), "seed": seed, "counts": counts} | render_options)
    root = Path(c.cache_dir or os.environ.get("SELFFLOW_CACHE") or Path.home() / ".cache" / "selfflow").expanduser()
    entry = CacheEntry(root, _CACHE, key)
    if not entry.exists():
        start = time.perf_counter()
        with entry.write() as w:
            with concurrent.futures.ThreadPoolExecutor(c.workers) as pool:  # each thread waits on a process
                list(pool.map(lambda s: _render_one(exe, s, w.directory), todo))
            w.set_meta(
                {"format": FORMAT, "espeak": espeak_version(), "seed": seed, "clips": todo}
                | {"render_seconds": round(time.perf_counter() - start, 2)}
            )
    return entry.path, entry.read_meta()["clips"]


def trim(x: np.ndarray, rate: int, *, threshold: float = 0.01, margin: float = 0.01) -> np.ndarray:
    """``x`` without leading and trailing samples below ``threshold`` x its peak, keeping
    ``margin`` seconds either side."""
    loud = np.flatnonzero(np.abs(x) >= threshold * np.abs(x).max()) if len(x) and np.abs(x).max() > 0 else []
    if len(loud) == 0:
        return x
    keep = int(margin * rate)
    return x[max(0, loud[0] - keep) : loud[-1] + 1 + keep]


def spoken_digits(config: SpokenDigitsConfig | None = None, *, split: str = "train", seed: int = 0) -> AudioClips:
    """The ``split`` of ``audio/spoken-digits`` (renders the cache entry on first use)."""
    from selfflow.plugins.audio.io import read_audio

    c = config or SpokenDigitsConfig()
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    directory, clips_meta = render(c, seed)
    length = round(c.seconds * c.sample_rate)
    clips, labels, cropped = [], [], 0
    for s in clips_meta:
        if s["split"] != split:
            continue
        x, _ = read_audio(directory / s["file"], sample_rate=c.sample_rate)
        x = trim(x, c.sample_rate)
        x = x * (c.peak / max(float(np.abs(x).max()), 1e-6))
        cropped += len(x) > length
        start = (len(x) - length) // 2 if len(x) > length else 0
        lead = (length - len(x)) // 2 if c.align == "center" and len(x) < length else 0
        clip, _ = fit_clip(np.concatenate([np.zeros(lead, np.float32), x]), length, start=start)
        clips.append(clip)
        labels.append(s["digit"])
    data = AudioClips(
        clips,
        labels,
        class_names=WORDS,
        sample_rate=c.sample_rate,
        tag=f"audio/spoken-digits|{split}|{seed}|{directory.name}|{c.sample_rate}|{c.seconds}|{c.peak}|{c.align}",
    )
    data.cropped = cropped
    data.settings = [s for s in clips_meta if s["split"] == split]
    return data
