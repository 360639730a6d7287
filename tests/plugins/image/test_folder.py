"""``image/folder``: labels from sub-folders, resize + centre crop, split, fingerprint, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.plugins.image.folder import FolderConfig, UnreadableImageError, UnreadableImageWarning, folder
from selfflow.plugins.protocols import Dataset

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _save(path: Path, colour, size, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    """cat/: 5 red images, dog/: 4 blue ones, in PNG and JPEG and in several sizes."""
    sizes = [(40, 30), (30, 50), (64, 64), (17, 23), (50, 20)]
    for i, size in enumerate(sizes):
        _save(tmp_path / "cat" / f"c{i}.{'png' if i % 2 else 'jpg'}", RED, size, "PNG" if i % 2 else "JPEG")
    for i, size in enumerate(sizes[:4]):
        _save(
            tmp_path / "dog" / ("deep" if i == 3 else "") / f"d{i}.{'jpeg' if i % 2 else 'PNG'}",
            BLUE,
            size,
            "JPEG" if i % 2 else "PNG",
        )
    (tmp_path / ".hidden").mkdir()
    _save(tmp_path / ".hidden" / "x.png", RED, (8, 8), "PNG")  # ignored: hidden
    return tmp_path


def _both(root: Path, **options):
    cfg = FolderConfig(path=str(root), size=16, eval_fraction=0.25, **options)
    return folder(cfg, split="train", seed=0), folder(cfg, split="eval", seed=0)


def test_labels_from_sorted_sub_folders(classes: Path) -> None:
    train, evaluation = _both(classes)
    assert isinstance(train, Dataset) and train.modalities == ("image",)
    assert train.class_names == ("cat", "dog") and train.num_classes == 2
    assert len(train) + len(evaluation) == 9 and len(evaluation) == 2  # round(0.25 * 9)
    for ds in (train, evaluation):
        for i in range(len(ds)):
            ex = ds[i]
            assert set(ex.media) == {"image"}
            img = ex.media["image"]
            assert img.shape == (3, 16, 16) and img.dtype == torch.float32
            assert float(img.min()) >= -1 and float(img.max()) <= 1
            red, blue = float(img[0].mean()), float(img[2].mean())
            assert ex.label == (0 if red > blue else 1)  # cat is red, dog is blue
            assert ds.files[i].parent.name in ("cat", "dog", "deep")


def test_split_is_a_deterministic_partition(classes: Path) -> None:
    train, evaluation = _both(classes)
    assert not set(train.files) & set(evaluation.files)
    assert len(set(train.files) | set(evaluation.files)) == 9
    again, _ = _both(classes)
    assert again.files == train.files and torch.equal(again.images, train.images)
    cfg = FolderConfig(path=str(classes), size=16, eval_fraction=0.25)
    held_out = {tuple(folder(cfg, split="eval", seed=s).files) for s in range(6)}
    assert len(held_out) > 1 and all(len(files) == 2 for files in held_out)  # the seed picks them


def test_flat_folder_is_unlabelled_and_grayscale_option(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / f"{i}.png", (i * 60, i * 60, i * 60), (20 + i, 30), "PNG")
    ds = folder(FolderConfig(path=str(tmp_path), size=8, channels=1, eval_fraction=0.25), split="train", seed=0)
    assert ds.num_classes == 0 and ds.class_names == () and len(ds) == 3
    ex = ds[0]
    assert ex.label is None and ex.media["image"].shape == (1, 8, 8)
    levels = torch.tensor([0, 60, 120, 180]) / 127.5 - 1
    for i in range(len(ds)):  # flat grey images stay flat and keep their level
        img = ds[i].media["image"]
        assert float(img.max() - img.min()) < 0.02
        assert float((levels - img.mean()).abs().min()) < 0.02


def test_shorter_side_resize_then_centre_crop(tmp_path: Path) -> None:
    # 40x20: red | green | blue in columns 0-10 | 10-30 | 30-40; resized to 32x16 the crop
    # (columns 8-24) is exactly the green part
    x = np.zeros((20, 40, 3), np.uint8)
    x[:, :10, 0] = x[:, 10:30, 1] = x[:, 30:, 2] = 255
    for i in range(2):
        Image.fromarray(x).save(tmp_path / f"{i}.png")
    ds = folder(FolderConfig(path=str(tmp_path), size=16, eval_fraction=0.5), split="train", seed=0)
    img = ds[0].media["image"]
    assert img.shape == (3, 16, 16)
    assert float(img[1, :, 2:-2].min()) > 0.95  # green inside
    assert float(img[0].mean()) < -0.8 and float(img[2].mean()) < -0.8  # no red or blue columns left


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    for i in range(2):
        Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / f"{i}.png")
    ds = folder(FolderConfig(path=str(tmp_path), size=10, eval_fraction=0.5), split="eval", seed=0)
    assert float(ds[0].media["image"].min()) == 1.0


def test_fingerprint_follows_files_and_config(classes: Path) -> None:
    train, evaluation = _both(classes)
    assert train.fingerprint() == _both(classes)[0].fingerprint()
    assert train.fingerprint() != evaluation.fingerprint()
    assert (
        folder(FolderConfig(path=str(classes), size=8, eval_fraction=0.25), split="train", seed=0).fingerprint()
        != train.fingerprint()
    )
    target = classes / "dog" / "d0.PNG"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _both(classes)[0].fingerprint() != train.fingerprint()


@pytest.fixture
def with_bad_files(classes: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(classes / "cat" / "truncated.jpg", format="JPEG")
    data = (classes / "cat" / "truncated.jpg").read_bytes()
    # the header survives (Image.open succeeds), the scan data ends early: only decoding tells
    (classes / "cat" / "truncated.jpg").write_bytes(data[: int(len(data) * 0.7)])
    with Image.open(classes / "cat" / "truncated.jpg") as im:
        assert im.size == (64, 64)
    (classes / "dog" / "fake.png").write_text("this is not a picture\n")
    (classes / "dog" / "notes.txt").write_text("not an image extension\n")
    return classes


def test_skip_mode_reports_every_bad_file_by_path(with_bad_files: Path) -> None:
    with pytest.warns(UnreadableImageWarning) as record:
        train, evaluation = _both(with_bad_files)
    text = "\n".join(str(w.message) for w in record)
    assert str(with_bad_files / "dog" / "notes.txt") in text
    assert str(with_bad_files / "cat" / "truncated.jpg") in text
    assert str(with_bad_files / "dog" / "fake.png") in text
    skipped = {p.name for p, _ in train.skipped + evaluation.skipped}
    assert skipped == {"truncated.jpg", "fake.png"}
    kept = {p.name for p in train.files + evaluation.files}
    assert len(kept) == 9 and not kept & {"truncated.jpg", "fake.png", "notes.txt"}
    assert "truncated" in text  # Pillow's reason is kept next to the path


def test_raise_mode_names_the_file(with_bad_files: Path) -> None:
    cfg = FolderConfig(path=str(with_bad_files), size=16, eval_fraction=0.25, on_error="raise")
    bad = {str(with_bad_files / "cat" / "truncated.jpg"), str(with_bad_files / "dog" / "fake.png")}
    for split in ("train", "eval"):
        for seed in range(3):
            try:
                with pytest.warns(UnreadableImageWarning, match="notes.txt"):
                    folder(cfg, split=split, seed=seed)
            except UnreadableImageError as err:
                assert any(repr(b) in str(err) for b in bad) and 'on_error = "skip"' in str(err)
                break
        else:
            pytest.fail(f"no seed put a bad file in the {split} split")


def test_missing_empty_and_mixed_folders_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder(FolderConfig(path=str(tmp_path / "nope")), split="train", seed=0)
    with pytest.raises(ValueError, match="it is empty"):
        folder(FolderConfig(path=str(tmp_path)), split="train", seed=0)
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no files ending in .png"):
        folder(FolderConfig(path=str(tmp_path)), split="train", seed=0)
    _save(tmp_path / "top.png", RED, (8, 8), "PNG")
    _save(tmp_path / "cls" / "a.png", RED, (8, 8), "PNG")
    with pytest.raises(ValueError, match="mixes images at the top level"):
        folder(FolderConfig(path=str(tmp_path)), split="train", seed=0)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        FolderConfig(path="x", on_error="ignore")
    with pytest.raises(ValueError):
        FolderConfig(path="x", channels=2)
    with pytest.raises(TypeError):
        FolderConfig("x")  # keyword-only
    assert FolderConfig(path="x", extensions=["PNG", ".webp"]).extensions == (".png", ".webp")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        FolderConfig(path="x").size = 3
