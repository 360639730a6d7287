"""``image/folder``: a user's folder of PNG/JPEG images, optionally one sub-folder per class.

Layout: either images directly in ``path`` (unlabelled, ``num_classes = 0``) or one
sub-folder per class (``path/cat/*.png``, ``path/dog/**/*.jpg``; class ids follow the sorted
sub-folder names). Hidden files and folders (``.name``) are ignored; other files without an
image extension are listed in one warning and left out.

The split is a seeded permutation of the sorted file list, so it does not depend on which
files decode. Each split then decodes its own files once, at construction (EXIF rotation
applied, transparency composited on white, shorter side resized to ``size``, centre crop),
and keeps them as uint8 in memory: ``C * size**2`` bytes per image (12 KiB at 64x64 RGB).
A file that cannot be decoded (not an image, truncated, corrupt) is named with its error:
``on_error = "skip"`` leaves it out with one warning listing every such file,
``on_error = "raise"`` stops at the first with an error naming it.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import attrs
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from selfflow.plugins.folders import Words, extensions, listing, scan
from selfflow.plugins.protocols import Example

WORDS = Words(modality="image", files="PNG/JPEG files", plural="images", mixed="images", one="image")


class UnreadableImageWarning(UserWarning):
    """Some files of an ``image/folder`` data set could not be decoded and were left out."""


class UnreadableImageError(ValueError):
    """A file of an ``image/folder`` data set could not be decoded (``on_error = "raise"``)."""


@attrs.frozen(kw_only=True)
class FolderConfig:
    """``path``: the folder; ``size``: side of the square images (shorter side resized to
    it, then centre-cropped); ``channels``: 3 (RGB) or 1 (grayscale); ``eval_fraction``:
    share of files held out for evaluation (at least one file each way); ``on_error``:
    ``"skip"`` (warn, leave out) or ``"raise"`` for files that do not decode;
    ``extensions``: which files are images."""

    path: str = attrs.field(validator=attrs.validators.min_len(1))
    size: int = attrs.field(default=64, validator=attrs.validators.ge(4))
    channels: int = attrs.field(default=3, validator=attrs.validators.in_((1, 3)))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    on_error: str = attrs.field(default="skip", validator=attrs.validators.in_(("skip", "raise")))
    extensions: tuple[str, ...] = attrs.field(
        default=(".png", ".jpg", ".jpeg"), converter=extensions, validator=attrs.validators.min_len(1)
    )


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """``(channels, size, size)`` uint8: upright, on white, shorter side ``size``, centre crop.

    Raises whatever Pillow raises for a file it cannot fully decode (a truncated file too:
    ``load()`` decodes every byte).
    """
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("RGB" if channels == 3 else "L")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)  # antialiased when shrinking
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.array(im, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)


# file signatures of media that are not images (a user's folder may hold a renamed clip)
_NOT_IMAGES = (
    (0, b"RIFF", 8, b"WAVE", "a WAV audio file"),
    (0, b"RIFF", 8, b"AVI ", "an AVI video file"),
    (4, b"ftyp", 4, b"ftyp", "an MP4/MOV video file"),
    (0, b"OggS", 0, b"OggS", "an Ogg audio/video file"),
    (0, b"fLaC", 0, b"fLaC", "a FLAC audio file"),
    (0, b"ID3", 0, b"ID3", "an MP3 audio file"),
    (0, b"\x1aE\xdf\xa3", 0, b"\x1aE\xdf\xa3", "a WebM/MKV video file"),
    (0, b"%PDF", 0, b"%PDF", "a PDF document"),
)


def _why(path: Path, err: Exception) -> str:
    """Why ``path`` did not decode, in words a user can act on: an empty file, a video or
    audio file under an image extension, else Pillow's own reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as read_err:
        return f"{type(read_err).__name__}: {read_err}"
    if not head:
        return "empty file (0 bytes)"
    for at, magic, at2, magic2, kind in _NOT_IMAGES:
        if head[at : at + len(magic)] == magic and head[at2 : at2 + len(magic2)] == magic2:
            return f"{kind}, not an image"
    if isinstance(err, UnidentifiedImageError):  # its text repeats the path and says no more
        return f"not an image Pillow can decode (the file starts with {head[:8]!r})"
    return f"{type(err).__name__}: {err}"


class FolderDataset:
    """Images of one split of a folder, decoded once, held as uint8 ``(M, C, size, size)``."""

    modalities = ("image",)

    def __init__(self, config: FolderConfig, *, split: str, seed: int) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split, self.seed = config, split, seed
        self.root = Path(config.path).expanduser()
        files, labels, self.class_names, ignored = scan(self.root, config.extensions, WORDS)
        self.num_classes = len(self.class_names)
        if ignored:
            warnings.warn(
                f"image/folder {str(self.root)!r}: left out {len(ignored)} file(s) without an image extension "
                f"({', '.join(config.extensions)}):\n" + listing([(p, "not an image extension") for p in ignored]),
                UnreadableImageWarning,
                stacklevel=2,
            )
        if len(files) < 2:
            raise ValueError(
                f"image folder {str(self.root)!r} has {len(files)} image; a train/eval split needs at least 2: "
                "add images to it"
            )

        order = np.random.default_rng(seed).permutation(len(files))
        n_eval = min(max(1, round(config.eval_fraction * len(files))), len(files) - 1)
        chosen = sorted(order[:n_eval] if split == "eval" else order[n_eval:])

        pixels, kept, skipped = [], [], []
        for i in chosen:
            try:
                pixels.append(load_image(files[i], config.size, config.channels))
            except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... per format
                reason = _why(files[i], err)
                if config.on_error == "raise":
                    raise UnreadableImageError(
                        f"cannot read image {str(files[i])!r} ({reason}); delete or replace the file, "
                        'or set on_error = "skip" in the image/folder dataset_options to leave unreadable files out'
                    ) from err
                skipped.append((files[i], reason))
                continue
            kept.append(i)
        self.skipped: tuple[tuple[Path, str], ...] = tuple(skipped)
        if skipped:
            warnings.warn(
                f"image/folder {str(self.root)!r} ({split} split): left out {len(skipped)} of {len(chosen)} file(s) "
                "that could not be read:\n" + listing(skipped),
                UnreadableImageWarning,
                stacklevel=2,
            )
        if not kept:
            path, reason = skipped[0]
            raise ValueError(
                f"no image of the {split} split of {str(self.root)!r} could be read: all {len(skipped)} failed "
                f"(e.g. {path.name!r}: {reason}); replace them with PNG/JPEG images, or set image/folder path "
                "to another folder"
            )
        self.files = tuple(files[i] for i in kept)
        self.images = torch.from_numpy(np.stack(pixels))
        self.labels = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        self._fingerprint = self._hash(files)

    def _hash(self, files: list[Path]) -> str:
        h = hashlib.sha256(f"image/folder|{self.split}|{self.seed}|{self.config}".encode())
        for p in files:  # every file of the folder: a change anywhere changes both splits
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Example:
        media = self.images[i].float().div(127.5).sub(1.0)
        label = int(self.labels[i]) if self.num_classes else None
        return Example(media={"image": media}, label=label)

    def fingerprint(self) -> str:
        return self._fingerprint


def folder(config: FolderConfig, *, split: str = "train", seed: int = 0) -> FolderDataset:
    if config is None:
        raise ValueError('image/folder needs options: at least path = "/path/to/images"')
    return FolderDataset(config, split=split, seed=seed)
