"""``video/folder``: a user's folder of videos (mp4, avi, webm, mkv, mov), any size and rate.

Layout: videos directly in ``path`` (unlabelled) or one sub-folder per class
(``path/walk/*.mp4``; class ids follow the sorted sub-folder names). Hidden files and
folders are ignored; other files without a video extension are listed in one warning.
The split is a seeded permutation of the sorted file list (it does not depend on which
files decode).

**One clip per file.** Frame ``i`` (``0 <= i < frames``) of the clip is source frame

- with ``fps > 0`` (resampling to a target rate): ``floor(start + i * src_fps / fps + 0.5)``
  (rounding halves up),
  ``src_fps`` the file's own rate (so a 30 fps file at ``fps = 10`` keeps every 3rd frame and
  a 5 fps file repeats each frame twice);
- with ``fps = 0``: ``start + i * stride`` (the file's own rate divided by ``stride``).

``start = "fixed"`` starts every clip at source frame 0; ``start = "random"`` draws the
start uniformly over the positions where the whole clip fits, from a generator seeded by
(``seed``, split, file index): deterministic, the same in every run and every access (the
run encodes each item once and caches its latents, so a per-access draw would be frozen
at its first value anyway).

**Shorter videos** (the clip needs source frames past the last): ``short = "loop"`` wraps
the index around (``index mod num_frames``), ``"pad"`` repeats the last frame and records
how many frames are real in ``valid_frames[i]`` (``valid_frames(i)``; the tokenizers see the
padded clip, the mask is for the user's own code and for reports), ``"skip"`` leaves the
file out (listed in a warning with the skip count).

Frames are resized so the shorter side is ``size`` (bilinear, antialiased), centre-cropped
to ``size x size``, and converted to ``channels`` = 3 (RGB) or 1 (BT.601 luma). Items are
``media["video"]`` ``(channels, frames, size, size)`` float in [-1, 1].

**Reading.** At construction every file of the split is probed (``decode.probe_video``:
frame count, rate, size, and its last frame decoded, so truncated files are caught then);
clips are decoded on first access (decord, PyAV where decord fails) and kept in memory as
uint8 (``channels * frames * size**2`` bytes each). A file that cannot be read (empty, text,
not a video, truncated, zero frames) is named with its reason: ``on_error = "skip"`` leaves
it out with one warning listing every such file and the count (also in ``skipped``),
``on_error = "raise"`` stops with a ``VideoReadError`` naming it.

``fingerprint()`` hashes the options, split, seed and every file's relative path, size and
modification time, so the run's latent cache (keyed by it) is reused until a file changes;
a second run decodes nothing.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from selfflow.plugins.folders import Words, extensions, listing, scan
from selfflow.plugins.protocols import Example

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")


WORDS = Words(modality="video", files="video files", plural="videos", mixed="videos", one="video")


class UnreadableVideoWarning(UserWarning):
    """Some files of a ``video/folder`` data set could not be used and were left out."""


def _non_negative(instance, attribute, value) -> None:
    if not value >= 0:
        raise ValueError(f"video/folder {attribute.name} must be >= 0 (0: use stride), got {value!r}")


@attrs.frozen(kw_only=True)
class VideoFolderConfig:
    """``path``: the folder; ``frames``: clip length; ``fps``: target frame rate (0: keep
    the file's, stepping by ``stride``); ``stride``: source frames per clip frame when
    ``fps = 0``; ``size``: side of the square frames (shorter side resized, centre crop);
    ``channels``: 3 (RGB) or 1 (gray); ``start``: ``"fixed"`` (frame 0) or ``"random"``
    (seeded per file); ``short``: ``"loop"``, ``"pad"`` or ``"skip"`` for videos shorter
    than a clip; ``on_error``: ``"skip"`` or ``"raise"`` for unreadable files;
    ``eval_fraction``: share of files held out; ``extensions``: which files are videos."""

    path: str = attrs.field(validator=attrs.validators.min_len(1))
    frames: int = attrs.field(default=17, validator=attrs.validators.ge(1))
    fps: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    stride: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    size: int = attrs.field(default=64, validator=attrs.validators.ge(4))
    channels: int = attrs.field(default=3, validator=attrs.validators.in_((1, 3)))
    start: str = attrs.field(default="fixed", validator=attrs.validators.in_(("fixed", "random")))
    short: str = attrs.field(default="loop", validator=attrs.validators.in_(("loop", "pad", "skip")))
    on_error: str = attrs.field(default="skip", validator=attrs.validators.in_(("skip", "raise")))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    extensions: tuple[str, ...] = attrs.field(
        default=VIDEO_EXTENSIONS, converter=extensions, validator=attrs.validators.min_len(1)
    )

    def __attrs_post_init__(self) -> None:
        if self.fps > 0 and self.stride != 1:
            raise ValueError(
                f"video/folder: set either fps (resample to a rate, got {self.fps}) or stride "
                f"(got {self.stride}), not both; stride applies only when fps = 0"
            )


def clip_indices(
    num_frames: int, src_fps: float, config: VideoFolderConfig, rng: np.random.Generator | None
) -> tuple[list[int], int] | None:
    """Source frame of each clip frame and how many are real (``valid``), by the module's
    rule; ``None`` when the video is too short and ``short = "skip"``."""
    n = config.frames
    step = src_fps / config.fps if config.fps > 0 else float(config.stride)
    span = (n - 1) * step  # source frames from the first to the last clip frame
    room = (num_frames - 1) - span  # how far the start can move with the whole clip inside
    start = 0.0
    if config.start == "random" and room > 0:
        assert rng is not None
        start = float(rng.uniform(0.0, room)) if config.fps > 0 else float(rng.integers(0, int(room) + 1))
    raw = [math.floor(start + i * step + 0.5) for i in range(n)]
    inside = sum(1 for r in raw if r < num_frames)
    if inside == n:
        return raw, n
    if config.short == "skip":
        return None
    if config.short == "loop":
        return [r % num_frames for r in raw], n
    return [min(r, num_frames - 1) for r in raw], inside


def resize_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(3, T, size, size)`` uint8: shorter side to ``size``
    (bilinear, antialiased), centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    _, _, h, w = x.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


class VideoFolderDataset:
    """One split of a folder of videos: one clip per readable file."""

    modalities = ("video",)

    def __init__(self, config: VideoFolderConfig, *, split: str, seed: int) -> None:
        from selfflow.plugins.video.decode import VideoReadError, probe_video

        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split, self.seed = config, split, seed
        self.root = Path(config.path).expanduser()
        files, labels, self.class_names, ignored = scan(self.root, config.extensions, WORDS)
        self.num_classes = len(self.class_names)
        if ignored:
            warnings.warn(
                f"video/folder {str(self.root)!r}: left out {len(ignored)} file(s) without a video extension "
                f"({', '.join(config.extensions)}):\n" + listing([(p, "not a video extension") for p in ignored]),
                UnreadableVideoWarning,
                stacklevel=2,
            )
        if len(files) < 2:
            raise ValueError(
                f"video folder {str(self.root)!r} has {len(files)} video; a train/eval split needs at least 2: "
                "add videos to it"
            )
        order = np.random.default_rng(seed).permutation(len(files))
        n_eval = min(max(1, round(config.eval_fraction * len(files))), len(files) - 1)
        chosen = sorted(order[:n_eval] if split == "eval" else order[n_eval:])
        split_id = 0 if split == "train" else 1

        kept, plans, skipped = [], [], []
        for i in chosen:
            try:
                info = probe_video(files[i])
            except VideoReadError as err:
                if config.on_error == "raise":
                    raise VideoReadError(
                        f'{err}; or set on_error = "skip" in the video/folder dataset_options to leave '
                        "unreadable files out"
                    ) from err
                skipped.append((files[i], err.reason))
                continue
            rng = np.random.default_rng((seed, split_id, int(i)))
            plan = clip_indices(info.num_frames, info.fps, config, rng)
            if plan is None:
                skipped.append((files[i], f'{info.num_frames} frames, shorter than a clip (short = "skip")'))
                continue
            kept.append(i)
            plans.append(plan)
        self.skipped: tuple[tuple[Path, str], ...] = tuple(skipped)
        if skipped:
            warnings.warn(
                f"video/folder {str(self.root)!r} ({split} split): skipped {len(skipped)} of {len(chosen)} file(s):\n"
                + listing(skipped),
                UnreadableVideoWarning,
                stacklevel=2,
            )
        if not kept:
            path, reason = skipped[0]
            raise ValueError(
                f"no video of the {split} split of {str(self.root)!r} could be used: all {len(skipped)} were skipped "
                f"(e.g. {path.name!r}: {reason}); replace them, or set video/folder path to another folder"
            )
        self.files = tuple(files[i] for i in kept)
        self.indices = tuple(tuple(p[0]) for p in plans)
        self._valid = tuple(p[1] for p in plans)
        self.labels = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        self._fingerprint = self._hash(files)
        self._decoded: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _hash(self, files: list[Path]) -> str:
        h = hashlib.sha256(f"video/folder|{self.split}|{self.seed}|{self.config}".encode())
        for p in files:  # every file of the folder: a change anywhere changes both splits
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    @property
    def fps(self) -> float:
        """The clips' frame rate when it is one for all (``fps > 0``), else 0."""
        return self.config.fps

    def valid_frames(self, i: int) -> int:
        """Real frames of clip ``i`` (the rest repeat its last frame; ``short = "pad"``)."""
        return self._valid[i]

    def __len__(self) -> int:
        return len(self.files)

    def clip_uint8(self, i: int) -> torch.Tensor:
        """Clip ``i`` as ``(channels, frames, size, size)`` uint8 (decoded once)."""
        from selfflow.plugins.video.decode import VideoReadError, read_video

        with self._lock:
            cached = self._decoded.get(i)
        if cached is not None:
            return cached
        try:
            video = read_video(self.files[i], list(self.indices[i]))
        except VideoReadError as err:  # it probed fine: changed since, or damaged mid-stream
            raise VideoReadError(
                f"{err} (it was readable when the dataset was built)", path=err.path, reason=err.reason
            ) from err
        x = resize_crop(video.frames, self.config.size)
        if self.config.channels == 1:
            x = (0.299 * x[0].float() + 0.587 * x[1].float() + 0.114 * x[2].float()).round().to(torch.uint8)[None]
        with self._lock:
            self._decoded[i] = x
        return x

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"video/folder has {len(self)} clips, index {i} is out of range")
        i %= len(self)
        media = self.clip_uint8(i).float().div(127.5).sub(1.0)
        return Example(media={"video": media}, label=int(self.labels[i]) if self.num_classes else None)

    def fingerprint(self) -> str:
        return self._fingerprint


def video_folder(config: VideoFolderConfig | None, *, split: str = "train", seed: int = 0) -> VideoFolderDataset:
    if config is None:
        raise ValueError('video/folder needs options: at least path = "/path/to/videos"')
    return VideoFolderDataset(config, split=split, seed=seed)
