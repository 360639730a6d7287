"""Text legibility metric: edit-distance maths, OCR preprocessing, tesseract readings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from selfflow.plugins.image.glyphs import GlyphsConfig, font_dir, glyphs
from selfflow.plugins.image.legibility import (
    INSTALL_HINT,
    LegibilityConfig,
    TesseractNotFound,
    TextLegibility,
    char_accuracy,
    levenshtein,
    tesseract_available,
    to_ocr_image,
)
from selfflow.plugins.protocols import MediaMetric, MetricContext

needs_tesseract = pytest.mark.skipif(not tesseract_available(), reason=f"tesseract not found: {INSTALL_HINT}")


def _word_image(word: str, *, fg: int = 0, bg: int = 255, size=(64, 32)) -> torch.Tensor:
    im = Image.new("L", size, bg)
    ImageDraw.Draw(im).text((4, 4), word, font=ImageFont.truetype(str(font_dir() / "DejaVuSans.ttf"), 18), fill=fg)
    return torch.from_numpy(np.array(im)).float()[None].div(127.5).sub(1)


def test_edit_distance_and_char_accuracy() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert char_accuracy("cat", "cat") == 1.0
    assert char_accuracy("", "cat") == 0.0 and char_accuracy("dog", "cat") == 0.0
    assert char_accuracy("cot", "cat") == pytest.approx(2 / 3)
    assert char_accuracy("cats", "cat") == pytest.approx(3 / 4)  # normalised by the longer string
    assert char_accuracy("", "") == 1.0


def test_preprocessing_gives_dark_text_on_white_cropped_and_scaled() -> None:
    dark_on_light = np.asarray(to_ocr_image(_word_image("hi"), 32))
    light_on_dark = np.asarray(to_ocr_image(_word_image("hi", fg=230, bg=20), 32))
    for img in (dark_on_light, light_on_dark):
        pad = 32 // 4
        assert img.shape[0] == 32 + 2 * pad
        assert img[:pad].min() == 255 and img[-pad:].min() == 255  # white border
        assert img.min() < 40  # dark ink
    assert np.abs(dark_on_light.astype(int) - light_on_dark.astype(int)).mean() < 20  # same picture


def test_missing_tesseract_names_the_debian_package() -> None:
    with pytest.raises(TesseractNotFound, match="tesseract-ocr"):
        TextLegibility(LegibilityConfig(binary="no-such-tesseract-binary"))


@needs_tesseract
def test_update_validates_its_inputs() -> None:
    metric = TextLegibility()
    assert isinstance(metric, MediaMetric)
    images = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="texts"):
        metric.update(fake=images)
    with pytest.raises(ValueError, match="vocabulary"):
        metric.update(fake=images, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 target words"):
        metric.update(fake=images, texts=["a"])
    with pytest.raises(ValueError, match="no images"):
        metric.compute()


@needs_tesseract
def test_reads_clean_words_exactly_and_reports_its_protocol() -> None:
    words = ["hello", "flow", "Self", "7"]
    metric = TextLegibility()
    metric.update(fake=torch.stack([_word_image(w) for w in words[:2]]), texts=words[:2])
    metric.update(fake=torch.stack([_word_image(w, fg=240, bg=10) for w in words[2:]]), texts=words[2:])
    word, char = metric.compute()
    assert (word.name, word.value) == ("legibility/word_accuracy", 1.0)
    assert (char.name, char.value) == ("legibility/char_accuracy", 1.0)
    assert word.details["num_images"] == 4
    assert word.details["tesseract"][0].isdigit() and "8" in str(word.details["psm"])


@needs_tesseract
def test_labels_index_the_dataset_vocabulary() -> None:
    ds = glyphs(GlyphsConfig(num_eval=12, size=48), split="eval", seed=0)

    def no_reference():
        raise AssertionError("legibility needs no reference network")

    context = MetricContext(
        modality="image",
        train_dataset=glyphs(GlyphsConfig(num_train=4, size=48), split="train", seed=0),
        eval_dataset=ds,
        tokenizer=None,
        device=torch.device("cpu"),
        cache_dir=Path("unused"),
        reference=no_reference,
    )
    metric = TextLegibility.from_config(None, context=context)
    assert isinstance(metric, MediaMetric) and metric.vocabulary == tuple(ds.class_names)
    metric.update(
        fake=torch.stack([ds[i].media["image"] for i in range(12)]),
        labels=torch.tensor([ds[i].label for i in range(12)]),
    )
    assert metric.compute()[0].value >= 0.9
    # the wrong words for the same images: nothing matches
    metric.reset()
    metric.update(fake=torch.stack([ds[i].media["image"] for i in range(12)]), texts=["zzzz"] * 12)
    word, char = metric.compute()
    assert word.value == 0.0 and char.value < 0.1


@needs_tesseract
def test_pure_noise_reads_as_nothing() -> None:
    # measured with tesseract 5.3.0: word 0.00 and char 0.13 (stray "a" readings) for "cat";
    # word 0.00 and char 0.00 for single digits
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(40, 3, 32, 32, generator=g) * 2 - 1
    metric = TextLegibility()
    metric.update(fake=noise, texts=["cat"] * 40)
    word, char = metric.compute()
    assert word.value <= 0.05 and char.value <= 0.25
