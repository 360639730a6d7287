"""``image/glyphs``: rendered words or characters, generated locally and deterministically.

Each item is one word of a configured vocabulary drawn with a DejaVu font (the ``.ttf`` files
that ship inside matplotlib, so no system font is needed) at a random size, position and
colour pair. Item ``i`` of a split depends only on ``(seed, split, i)``: items are rendered on
demand, in any order, and identical on every machine with the same Pillow and fonts.

``Example(media={"image": (C, size, size) float in [-1, 1], "text": the word}, label=index of the word)``:
``text`` becomes a condition segment through ``text/chars``, ``label`` a class condition.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import attrs
import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont

from selfflow.plugins.protocols import Example

WORDS = ("cat", "dog", "sun", "box", "red", "map", "fox", "cup", "hat", "pen")
DIGITS = tuple("0123456789")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")
RENDER_VERSION = 1  # bump when the rendering below changes what an item looks like
_SPLITS = {"train": 0, "eval": 1}
_MAX_COLOUR_DRAWS = 1000


def _words(value) -> tuple[str, ...]:
    return tuple(value) if not isinstance(value, str) else (value,)


def _check_vocabulary(instance, attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("vocabulary is empty: give at least one word, e.g. ['cat', 'dog']")
    for word in value:
        if not isinstance(word, str) or not word.strip() or word != word.strip() or "\n" in word:
            raise ValueError(
                f"vocabulary entry {word!r} must be a non-empty single-line string without surrounding spaces"
            )
    if len(set(value)) != len(value):
        dupes = sorted({w for w in value if value.count(w) > 1})
        raise ValueError(f"vocabulary has duplicate words {dupes}: each word is one class")


def _check_range(instance, attribute, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"{attribute.name} must be (low, high) with 0 < low <= high <= 1, got {value}")


@attrs.frozen(kw_only=True)
class GlyphsConfig:
    """Options of ``image/glyphs``.

    ``size``: image side in pixels; ``channels``: 3 (random colours) or 1 (random grey
    levels); ``vocabulary``: the words (or single characters, e.g. ``DIGITS``), one class
    each; ``fonts``: file names in matplotlib's font folder or paths to ``.ttf`` files, one
    drawn per item; ``scale``: text size as a fraction of the largest size at which the word
    fits inside the margins; ``jitter``: how much of the free space the text moves in
    (0 = always centred, 1 = anywhere inside the margins); ``margin``: fraction of the side
    kept clear at each border; ``min_contrast``: least luminance difference (0..1) between
    text and background; ``num_train`` / ``num_eval``: items per split.
    """

    size: int = attrs.field(default=32, validator=attrs.validators.ge(16))
    channels: int = attrs.field(default=3, validator=attrs.validators.in_((1, 3)))
    vocabulary: tuple[str, ...] = attrs.field(default=WORDS, converter=_words, validator=_check_vocabulary)
    fonts: tuple[str, ...] = attrs.field(default=FONTS, converter=_words, validator=attrs.validators.min_len(1))
    scale: tuple[float, float] = attrs.field(default=(0.6, 1.0), converter=tuple, validator=_check_range)
    jitter: float = attrs.field(default=1.0, validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    margin: float = attrs.field(default=0.06, validator=[attrs.validators.ge(0), attrs.validators.lt(0.3)])
    min_contrast: float = attrs.field(default=0.4, validator=[attrs.validators.ge(0), attrs.validators.le(0.8)])
    num_train: int = attrs.field(default=5000, validator=attrs.validators.ge(1))
    num_eval: int = attrs.field(default=500, validator=attrs.validators.ge(1))


@functools.cache
def font_dir() -> Path:
    """The DejaVu ``.ttf`` files that ship inside matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def resolve_font(name: str) -> Path:
    path = Path(name) if ("/" in name or "\\" in name) else font_dir() / name
    if not path.is_file():
        available = sorted(p.name for p in font_dir().glob("DejaVu*.ttf"))
        raise FileNotFoundError(
            f"font {name!r} not found (looked at {path}); use one of {available} or a path to a .ttf file"
        )
    return path


@functools.lru_cache(maxsize=512)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=px)


def _text_box(word: str, path: str, px: int) -> tuple[int, int, int, int]:
    """Ink box ``(left, top, width, height)`` of ``word`` drawn at the origin."""
    left, top, right, bottom = _font(path, px).getbbox(word)
    return left, top, right - left, bottom - top


@functools.lru_cache(maxsize=4096)
def _fit_px(word: str, path: str, room: int) -> int:
    """Largest font size (px) at which ``word`` fits in a ``room x room`` square."""
    _, _, w, h = _text_box(word, path, 100)
    px = max(1, int(100 * room / max(w, h, 1)) + 1)
    while px > 1 and max(_text_box(word, path, px)[2:]) > room:  # hinting is not linear
        px -= 1
    return px


def _luminance(colour: np.ndarray) -> float:
    # ITU-R 601-2, the weights of Pillow's "L" conversion (and of the legibility metric)
    return float(colour @ np.array([0.299, 0.587, 0.114])) if colour.size == 3 else float(colour[0])


def _colours(rng: np.random.Generator, channels: int, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """A (text, background) pair in [0, 1]^channels whose luminances differ by ``min_contrast``."""
    for _ in range(_MAX_COLOUR_DRAWS):
        fg, bg = rng.random(channels), rng.random(channels)
        if abs(_luminance(fg) - _luminance(bg)) >= min_contrast:
            return fg, bg
    # unreachable in practice for min_contrast <= 0.8; keep the item legible if it happens
    return np.zeros(channels), np.ones(channels)


def render(word: str, rng: np.random.Generator, config: GlyphsConfig, fonts: tuple[str, ...]) -> np.ndarray:
    """One image ``(size, size, channels)`` uint8 of ``word``; all randomness from ``rng``."""
    size = config.size
    font = fonts[int(rng.integers(len(fonts)))]
    room = max(1, round(size * (1 - 2 * config.margin)))
    px = max(6, round(_fit_px(word, font, room) * rng.uniform(*config.scale)))
    left, top, w, h = _text_box(word, font, px)
    m = (size - room) / 2
    # centre of the free space, moved by up to ``jitter`` of it in each direction
    x = m + (room - w) / 2 * (1 + config.jitter * rng.uniform(-1, 1))
    y = m + (room - h) / 2 * (1 + config.jitter * rng.uniform(-1, 1))
    fg, bg = (tuple(round(v * 255) for v in c) for c in _colours(rng, config.channels, config.min_contrast))
    image = Image.new("RGB" if config.channels == 3 else "L", (size, size), bg if config.channels == 3 else bg[0])
    ImageDraw.Draw(image).text(
        (round(x) - left, round(y) - top), word, font=_font(font, px), fill=fg if config.channels == 3 else fg[0]
    )
    return np.array(image).reshape(size, size, config.channels)


@functools.cache
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class GlyphsDataset:
    """Rendered words; item ``i`` of ``split`` is a pure function of ``(seed, split, i)``."""

    modalities = ("image", "text")

    def __init__(self, config: GlyphsConfig, *, split: str, seed: int) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split, self.seed = config, split, seed
        self.fonts = tuple(str(resolve_font(f)) for f in config.fonts)
        self.vocabulary = config.vocabulary
        self.class_names = config.vocabulary
        self.num_classes = len(config.vocabulary)
        self._len = config.num_train if split == "train" else config.num_eval

    def __len__(self) -> int:
        return self._len

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], i])

    def __getitem__(self, i: int) -> Example:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} items")
        rng = self.rng(i % self._len)
        label = int(rng.integers(self.num_classes))
        word = self.vocabulary[label]
        pixels = render(word, rng, self.config, self.fonts)
        media = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return Example(media={"image": media.contiguous(), "text": word}, label=label)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(
            f"image/glyphs|v{RENDER_VERSION}|{self.split}|{self.seed}|{self.config}|Pillow {PIL.__version__}".encode()
        )
        for path in self.fonts:
            h.update(_file_digest(path).encode())
        return h.hexdigest()[:16]


def glyphs(config: GlyphsConfig | None, *, split: str = "train", seed: int = 0) -> GlyphsDataset:
    return GlyphsDataset(config or GlyphsConfig(), split=split, seed=seed)
