"""The ``image`` writer: a batch -> one labelled grid PNG (one row per run of labels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.plugins.image import selfflow_register_writers
from selfflow.plugins.image.writer import ImageWriter, ImageWriterConfig, grid_rows
from selfflow.plugins.protocols import MediaWriter

PAD, TOP = 2, 18  # save_grid's gap between tiles and its title band


def batch(values: list[float], channels: int = 1, size: int = 8) -> torch.Tensor:
    """One constant image per value (easy to find in the grid)."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, channels, size, size).clone()


def test_rows_follow_runs_of_labels_and_pixels_land_in_them(tmp_path):
    writer = ImageWriter.from_config()
    x = batch([-1.0] * 3 + [0.0] * 3)  # row "a" black, row "b" grey
    files = writer.write(x, tmp_path, stem="step_0000010", labels=["a"] * 3 + ["b"] * 3, title="t")
    [f] = files
    assert f.path == tmp_path / "step_0000010.png" and f.element == "img" and f.items == tuple(range(6))
    assert "2 rows of 3" in f.caption
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010.png"]  # no temporary left
    with Image.open(f.path) as im:
        img = np.asarray(im.convert("L"))
    tile = 8 * 8  # 8 px images enlarged to 64
    assert img.shape[0] == TOP + 2 * (tile + PAD) + PAD
    left = img.shape[1] - (3 * (tile + PAD) + PAD)
    assert left > 8  # a label column
    for row, expected in ((0, 0), (1, 128)):
        y = TOP + PAD + row * (tile + PAD) + tile // 2
        for col in range(3):
            assert img[y, left + PAD + col * (tile + PAD) + tile // 2] == expected
        assert (img[y - 8 : y + 8, :left] < 128).any()  # the row's label is drawn left of it


def test_unequal_runs_or_no_labels_give_a_square_grid(tmp_path):
    assert grid_rows(["a", "a", "b", "b", "b", "c"]) == (None, None)
    assert grid_rows(["", "", ""]) == (None, None)  # unconditional
    assert grid_rows(None) == (None, None)
    assert grid_rows(["x", "y"]) == (2, ["x", "y"])
    writer = ImageWriter(ImageWriterConfig(scale=2))
    [f] = writer.write(
        batch([0.0] * 6, channels=3), tmp_path, stem="s", labels=["a", "a", "b", "b", "b", "c"], title=""
    )
    with Image.open(f.path) as im:
        w, h = im.size
    assert (w, h) == (2 * (16 + PAD) + PAD, 3 * (16 + PAD) + PAD)  # 3 x 2, no label column, no title band
    assert f.caption == "6 samples"


def test_non_finite_samples_are_written_and_said(tmp_path):
    x = batch([0.0, 0.5])
    x[1, 0, 0, 0] = float("nan")
    [f] = ImageWriter.from_config().write(x, tmp_path, stem="nan", labels=None, title="")
    assert f.path.is_file() and "1 with non-finite" in f.caption


@pytest.mark.parametrize(
    ("media", "labels", "stem", "error", "says"),
    [
        (torch.zeros(2, 3, 4, 8, 8), None, "s", ValueError, "video"),
        (["a cat"], None, "s", TypeError, "text writer"),
        (torch.zeros(3, 8, 8), None, "s", ValueError, "batch dimension"),
        (torch.zeros(2, 8, 8, 3), None, "s", ValueError, "channels-last"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), None, "s", TypeError, "float"),
        (torch.zeros(0, 1, 8, 8), None, "s", ValueError, "empty"),
        (torch.zeros(2, 1, 8, 8), ["a"], "s", ValueError, "one label per sample"),
        (torch.zeros(2, 1, 8, 8), [0, 1], "s", TypeError, "class_names"),
        (torch.zeros(2, 1, 8, 8), None, "../s", ValueError, "stem"),
    ],
)
def test_bad_input_says_what_was_expected(tmp_path, media, labels, stem, error, says):
    with pytest.raises(error, match=says):
        ImageWriter.from_config().write(media, tmp_path, stem=stem, labels=labels, title="")
    assert not list(tmp_path.iterdir())


def test_registered_as_the_image_writer():
    added = []

    class Register:
        def add(self, name, factory, config_cls=None, doc=""):
            added.append((name, factory, config_cls, doc))

    selfflow_register_writers(register=Register())
    [(name, factory, config_cls, doc)] = added
    writer = factory(config_cls())
    assert name == "image" == writer.modality and isinstance(writer, MediaWriter) and doc
    with pytest.raises(ValueError):
        ImageWriterConfig(scale=-1)
