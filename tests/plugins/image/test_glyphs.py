"""``image/glyphs``: deterministic renders, varied placement, and renders tesseract can read."""

from __future__ import annotations

import pytest
import torch

from selfflow.plugins.image.glyphs import DIGITS, WORDS, GlyphsConfig, glyphs
from selfflow.plugins.image.legibility import INSTALL_HINT, LegibilityConfig, TextLegibility, tesseract_available
from selfflow.plugins.protocols import Dataset

needs_tesseract = pytest.mark.skipif(not tesseract_available(), reason=f"tesseract not found: {INSTALL_HINT}")
LUMA = torch.tensor([0.299, 0.587, 0.114])


def _stack(ds, n: int) -> torch.Tensor:
    return torch.stack([ds[i].media["image"] for i in range(n)])


def _ink_boxes(images: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` (top, left, bottom, right) of pixels that differ from the corner colour."""
    bg = images[:, :, :1, :1]
    ink = (images - bg).abs().amax(1) > 0.2
    boxes = []
    for m in ink:
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        boxes.append([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
    return torch.tensor(boxes, dtype=torch.float)


def test_examples_follow_the_protocol() -> None:
    ds = glyphs(GlyphsConfig(num_train=200), split="train", seed=0)
    assert isinstance(ds, Dataset) and len(ds) == 200
    assert ds.modalities == ("image", "text")
    assert ds.class_names == WORDS and ds.num_classes == len(WORDS)
    labels = set()
    for i in range(len(ds)):
        ex = ds[i]
        assert set(ex.media) == {"image", "text"}
        img = ex.media["image"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert float(img.min()) >= -1 and float(img.max()) <= 1
        assert ex.media["text"] == WORDS[ex.label]
        labels.add(ex.label)
    assert labels == set(range(len(WORDS)))


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    cfg = GlyphsConfig(num_train=16, num_eval=16)
    a, b = _stack(glyphs(cfg, split="train", seed=0), 16), _stack(glyphs(cfg, split="train", seed=0), 16)
    assert torch.equal(a, b)
    late = glyphs(cfg, split="train", seed=0)[7].media["image"]  # random access: item 7 alone is item 7
    assert torch.equal(late, a[7])
    c = _stack(glyphs(cfg, split="train", seed=1), 16)
    e = _stack(glyphs(cfg, split="eval", seed=0), 16)
    assert (a - c).abs().flatten(1).amax(1).min() > 0.1  # every item differs
    assert (a - e).abs().flatten(1).amax(1).min() > 0.1
    fp = glyphs(cfg, split="train", seed=0).fingerprint()
    assert fp == glyphs(cfg, split="train", seed=0).fingerprint()
    assert (
        len({fp, glyphs(cfg, split="train", seed=1).fingerprint(), glyphs(cfg, split="eval", seed=0).fingerprint()})
        == 3
    )


def test_position_size_and_colour_vary_within_the_margins() -> None:
    cfg = GlyphsConfig(vocabulary=("box",), fonts=("DejaVuSans.ttf",), num_train=64)
    images = _stack(glyphs(cfg, split="train", seed=0), 64)
    boxes = _ink_boxes(images)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert float(widths.max() / widths.min()) > 1.4  # scale (0.6, 1.0) of the largest fit
    assert float(heights.max() - heights.min()) >= 3
    assert float(centres[:, 0].std()) > 1.5 and float(centres[:, 1].std()) > 1.0
    margin = round(0.06 * 32)
    assert float(boxes[:, :2].min()) >= margin - 1 and float(boxes[:, 2:].max()) <= 32 - margin + 1
    backgrounds = images[:, :, 0, 0]
    assert len({tuple(c.tolist()) for c in backgrounds}) == 64  # a new colour pair per item
    # text and background differ in luminance by at least min_contrast (0.4 of [0, 1])
    luma = (images * LUMA[:, None, None]).sum(1)
    spread = luma.flatten(1).amax(1) - luma.flatten(1).amin(1)
    assert float(spread.min()) >= 0.4 * 2 - 0.05


def test_centred_without_jitter_and_grayscale_option() -> None:
    cfg = GlyphsConfig(
        vocabulary=("box",), fonts=("DejaVuSans.ttf",), jitter=0.0, scale=(1.0, 1.0), channels=1, num_train=8
    )
    images = _stack(glyphs(cfg, split="train", seed=0), 8)
    assert images.shape == (8, 1, 32, 32)
    boxes = _ink_boxes(images)
    assert torch.equal(boxes, boxes[:1].expand_as(boxes))  # same size and place every time
    centre = (boxes[0, :2] + boxes[0, 2:]) / 2
    assert (centre - 16).abs().max() <= 1.5


def test_config_is_validated_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        GlyphsConfig(vocabulary=("cat", "cat"))
    with pytest.raises(ValueError, match="empty"):
        GlyphsConfig(vocabulary=())
    with pytest.raises(ValueError, match="scale"):
        GlyphsConfig(scale=(0.8, 0.5))
    with pytest.raises(FileNotFoundError, match="DejaVuSans.ttf"):
        glyphs(GlyphsConfig(fonts=("NoSuchFont.ttf",)), split="train", seed=0)
    assert GlyphsConfig(vocabulary=["a", "b"]).vocabulary == ("a", "b")


# Measured with tesseract 5.3.0 (Debian bookworm) and the legibility metric's defaults on
# train items 0-999 of seed 0 (word / character accuracy): default renders (32x32, three
# DejaVu faces, scale 0.6-1.0, random colours, contrast >= 0.4) 0.985 / 0.990; grayscale
# 0.983 / 0.988; 64x64 1.000 / 1.000; single digits 0.972 / 0.975. The first 60/30 items
# used here all read correctly; the bounds leave room for other tesseract builds.
@needs_tesseract
@pytest.mark.parametrize(
    ("options", "n", "bound"),
    [({}, 60, 0.9), ({"channels": 1}, 30, 0.9), ({"vocabulary": DIGITS}, 30, 0.85)],
)
def test_tesseract_reads_clean_renders(options, n, bound) -> None:
    ds = glyphs(GlyphsConfig(num_train=n, **options), split="train", seed=0)
    metric = TextLegibility(LegibilityConfig())
    metric.update(fake=_stack(ds, n), texts=[ds[i].media["text"] for i in range(n)])
    word, char = metric.compute()
    assert word.value >= bound and char.value >= bound
