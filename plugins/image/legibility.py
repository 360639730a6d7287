"""Text legibility: can tesseract read the word an image was asked to show?

Two numbers per evaluation, both in [0, 1]:
- ``word_accuracy``: share of images whose reading equals the target word exactly;
- ``char_accuracy``: mean of ``1 - levenshtein(read, target) / max(len(read), len(target))``.

Readings and targets are compared after stripping and collapsing whitespace, case-folded
unless ``case_sensitive``. Each image is converted to grey (ITU-R 601 luminance),
contrast-stretched, inverted when its border is the dark side (tesseract wants dark text on
light), cropped to its ink, scaled to ``height`` pixels and padded with white; tesseract
then reads all images of one page segmentation mode in a single call (8: a single word; 10
for single-character targets). The ``tesseract`` binary comes from the Debian package
``tesseract-ocr`` and is called through ``subprocess``: no Python wrapper needed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from selfflow.plugins.protocols import MetricContext, MetricResult

INSTALL_HINT = "install the Debian package 'tesseract-ocr' (apt-get install -y tesseract-ocr)"


class TesseractNotFound(RuntimeError):
    """The ``tesseract`` binary is not installed (or not where the config says)."""


@attrs.frozen(kw_only=True)
class LegibilityConfig:
    """``psm``: tesseract page segmentation mode (8 = one word, 10 = one character, 7 = one
    line); ``None`` picks 8 for words and 10 for single-character targets, which tesseract's
    word mode often misreads; ``height``: pixel height the text is scaled to before reading
    (its box when ``crop``, the whole image otherwise); ``crop``: cut the image to the box of
    its ink first (word mode reads the whole page as one word); ``case_sensitive``: compare case;
    ``whitelist``: characters tesseract may output ("" = any); ``binary``: the tesseract
    executable (a name on ``PATH`` or a path); ``language``: tesseract language data."""

    psm: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(tuple(range(14))))
    )
    height: int = attrs.field(default=32, validator=attrs.validators.ge(8))
    case_sensitive: bool = False
    whitelist: str = ""
    crop: bool = True
    binary: str = "tesseract"
    language: str = "eng"


def find_tesseract(binary: str = "tesseract") -> str:
    """The absolute path of ``binary``, or ``TesseractNotFound`` saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise TesseractNotFound(
            f"the text legibility metric needs tesseract, but {binary!r} was not found on PATH: {INSTALL_HINT}"
        )
    return path


def tesseract_available(binary: str = "tesseract") -> bool:
    return shutil.which(binary) is not None


@functools.cache
def tesseract_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    first = (out.stdout or out.stderr).splitlines()[0]  # "tesseract 5.3.0"
    return first.split()[-1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) len(b))."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(read: str, target: str) -> float:
    """``1 - levenshtein / max(len)``: 1 for an exact reading, 0 for nothing in common."""
    longest = max(len(read), len(target))
    return 1.0 if longest == 0 else 1.0 - levenshtein(read, target) / longest


def to_ocr_image(image: Tensor, height: int, *, crop: bool = True) -> Image.Image:
    """``(C, H, W)`` in [-1, 1] -> a padded, upscaled, dark-on-light grey PIL image."""
    x = torch.nan_to_num(image.detach().float().cpu()).clamp(-1, 1).add(1).mul(127.5)
    if x.shape[0] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    elif x.shape[0] == 1:
        x = x[0]
    else:
        raise ValueError(f"expected 1- or 3-channel images, got {x.shape[0]} channels")
    grey = x.round().to(torch.uint8).numpy()
    pil = ImageOps.autocontrast(Image.fromarray(grey))  # darkest -> 0, lightest -> 255
    stretched = np.asarray(pil)
    border = np.concatenate([stretched[0], stretched[-1], stretched[:, 0], stretched[:, -1]])
    if np.median(border) < 128:  # the background is the darker side: light text on dark
        pil = ImageOps.invert(pil)
    if crop:  # psm 8 reads the whole page as one word: give it the word, not the empty square
        ink = np.asarray(pil) < 192  # faint antialiased strokes count: thin ascenders are light grey
        if ink.any():  # a tight box: a margin brings in grey fringes tesseract reads as punctuation
            rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
            pil = pil.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    w, h = pil.size
    pil = pil.resize((max(1, round(w * height / h)), height), Image.Resampling.BICUBIC)
    pad = height // 4
    return ImageOps.expand(pil, border=pad, fill=255)


def _normalise(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


class TextLegibility:
    """Accumulates (image, target word) pairs; ``compute()`` reads them all with tesseract.

    ``update(fake=images, texts=words)``, or ``update(fake=images, labels=ids)`` when the
    metric was built with a ``vocabulary`` (the class names of ``image/glyphs``).
    """

    name = "legibility"

    def __init__(self, config: LegibilityConfig | None = None, *, vocabulary: Sequence[str] | None = None) -> None:
        self.config = config or LegibilityConfig()
        self.binary = find_tesseract(self.config.binary)
        self.vocabulary = tuple(vocabulary) if vocabulary is not None else None
        self._images: list[Tensor] = []
        self._texts: list[str] = []

    @classmethod
    def from_config(cls, config: LegibilityConfig | None, *, context: MetricContext) -> TextLegibility:
        """The vocabulary is the class names of the context's data (``image/glyphs``' words)."""
        vocabulary = getattr(context.eval_dataset, "class_names", None)
        return cls(config, vocabulary=vocabulary or None)

    def reset(self) -> None:
        self._images, self._texts = [], []

    def update(
        self,
        *,
        real: Tensor | None = None,
        fake: Tensor | None = None,
        labels: Tensor | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        """``fake (B, C, H, W)`` in [-1, 1] and the words they should show: ``texts`` (B
        strings) or ``labels (B,)`` indexing the vocabulary. ``real`` is ignored."""
        if fake is None:
            raise ValueError("legibility reads generated images: call update(fake=images, texts=words)")
        if fake.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got {tuple(fake.shape)}")
        if texts is None:
            if labels is None:
                raise ValueError("legibility needs the target words: pass texts=[...] or labels with a vocabulary")
            if self.vocabulary is None:
                raise ValueError(
                    "labels given but the metric has no vocabulary: build it with vocabulary=... or pass texts"
                )
            texts = [self.vocabulary[int(i)] for i in labels]
        if isinstance(texts, str) or len(texts) != len(fake):
            raise ValueError(f"expected a list of {len(fake)} target words, got {texts!r}")
        self._images.extend(fake.detach().cpu().unbind(0))
        self._texts.extend(str(t) for t in texts)

    def psm_for(self, text: str) -> int:
        if self.config.psm is not None:
            return self.config.psm
        return 10 if len(text.strip()) == 1 else 8

    def read(self, images: Sequence[Tensor], *, psm: int = 8) -> list[str]:
        """Tesseract's reading of each ``(C, H, W)`` image, in one subprocess call."""
        if not images:
            return []
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="selfflow-ocr-") as tmp:
            paths = []
            for i, image in enumerate(images):
                path = Path(tmp) / f"{i:06d}.png"
                to_ocr_image(image, cfg.height, crop=cfg.crop).save(path)
                paths.append(str(path))
            listing = Path(tmp) / "images.txt"
            listing.write_text("\n".join(paths) + "\n")
            cmd = [self.binary, str(listing), "stdout", "--psm", str(psm), "-l", cfg.language]
            if cfg.whitelist:
                cmd += ["-c", f"tessedit_char_whitelist={cfg.whitelist}"]
            env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core: tesseract threads cost more than they save here
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"tesseract failed ({' '.join(cmd)}): {out.stderr.strip()[-500:]}")
        pages = out.stdout.split("\f")  # one form feed after every page but the last
        if len(pages) == len(images) + 1 and not pages[-1].strip():
            pages = pages[:-1]
        if len(pages) != len(images):
            raise RuntimeError(f"tesseract returned {len(pages)} pages for {len(images)} images")
        return [" ".join(p.split()) for p in pages]

    def compute(self) -> list[MetricResult]:
        if not self._images:
            raise ValueError("no images: call update(fake=..., texts=...) before compute()")
        modes = [self.psm_for(t) for t in self._texts]
        readings = [""] * len(self._images)
        for psm in sorted(set(modes)):  # one tesseract call per mode
            idx = [i for i, m in enumerate(modes) if m == psm]
            for i, text in zip(idx, self.read([self._images[i] for i in idx], psm=psm)):
                readings[i] = text
        cs = self.config.case_sensitive
        pairs = [(_normalise(r, cs), _normalise(t, cs)) for r, t in zip(readings, self._texts)]
        details = {
            "num_images": len(pairs),
            "tesseract": tesseract_version(self.binary),
            "psm": self.config.psm if self.config.psm is not None else "8 (words), 10 (single characters)",
            "height": self.config.height,
            "case_sensitive": cs,
            "whitelist": self.config.whitelist,
            "language": self.config.language,
        }
        word = float(np.mean([r == t for r, t in pairs]))
        char = float(np.mean([char_accuracy(r, t) for r, t in pairs]))
        return [
            MetricResult(name=f"{self.name}/word_accuracy", value=word, details=details),
            MetricResult(name=f"{self.name}/char_accuracy", value=char, details=dict(details)),
        ]


def legibility(config: LegibilityConfig | None, *, context: MetricContext) -> TextLegibility:
    return TextLegibility.from_config(config, context=context)
