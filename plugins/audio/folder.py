"""``audio/folder``: a user's WAV, FLAC, OGG or MP3 files, any rate and channel count.

Layout: files directly in ``path`` (unlabelled) or one sub-folder per class
(``path/dog/*.wav``, ``path/cat/**/*.flac``; class ids follow the sorted sub-folder names).
Hidden files and folders are ignored; other files without an audio extension are listed in
one warning and left out.

Each file is read once, at construction (``io.read_audio``: soundfile, PyAV for what it
cannot read), **mixed down to mono by the mean of its channels**, resampled by soxr to
``sample_rate`` and cut to ``seconds`` (``clips.fit_clip``):

- longer than the clip: a window of ``seconds`` starting at ``offset`` seconds
  (``start = "fixed"``) or at a start drawn once per file from ``numpy.random.default_rng([seed,
  file index])`` (``start = "random"``; drawn once because encodings are cached, so a start drawn
  per call would not augment anyway);
- shorter: zero-padded at its end to the clip length (``pad = "zeros"``: every item has the
  same shape, silence counts as data), or kept at its own length (``pad = "none"``: the
  tokenizers give the missing frames ``valid = False``, so they carry no loss and no attention).
  ``valid_samples[i]`` is the number of real samples of item ``i`` either way.
- ``seconds = 0``: whole files (with ``pad``: padded to the longest file, or kept as they are).

The split is a seeded permutation of the sorted file list, so it does not depend on which
files decode. A file that cannot be read (empty, not audio, truncated, corrupt) is named with
its reason: ``on_error = "skip"`` leaves it out with one warning listing every such file and
their count, ``on_error = "raise"`` stops at the first with an ``AudioReadError`` naming it.
``fingerprint()`` hashes the bytes of every file of the folder (and the options), so it is
stable across copies and changes when any file does.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import attrs
import numpy as np

from selfflow.plugins.audio.clips import PADS, AudioClips, fit_clip
from selfflow.plugins.audio.io import AudioReadError, read_audio
from selfflow.plugins.folders import Words, extensions, listing, scan

WORDS = Words(
    modality="audio", files="audio files", plural="audio files", mixed="files", one="file", hint=" (or set extensions)"
)


class UnreadableAudioWarning(UserWarning):
    """Some files of an ``audio/folder`` data set could not be read and were left out."""


@attrs.frozen(kw_only=True)
class AudioFolderConfig:
    """``path``: the folder; ``sample_rate``: Hz every file is resampled to; ``seconds``: clip
    length (0: whole files); ``start``: ``"fixed"`` (at ``offset`` seconds) or ``"random"``
    (seeded, once per file) for files longer than the clip; ``pad``: ``"zeros"`` or ``"none"``
    for shorter files (module docstring); ``eval_fraction``: share of files held out (at least
    one each way); ``on_error``: ``"skip"`` (warn, leave out) or ``"raise"``; ``extensions``:
    which files are audio."""

    path: str = attrs.field(validator=attrs.validators.min_len(1))
    sample_rate: int = attrs.field(default=16000, validator=attrs.validators.ge(1000))
    seconds: float = attrs.field(default=1.0, validator=[attrs.validators.ge(0), attrs.validators.le(600)])
    start: str = attrs.field(default="fixed", validator=attrs.validators.in_(("fixed", "random")))
    offset: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    pad: str = attrs.field(default="zeros", validator=attrs.validators.in_(PADS))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    on_error: str = attrs.field(default="skip", validator=attrs.validators.in_(("skip", "raise")))
    extensions: tuple[str, ...] = attrs.field(
        default=(".wav", ".flac", ".ogg", ".mp3"), converter=extensions, validator=attrs.validators.min_len(1)
    )


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder(config: AudioFolderConfig | None, *, split: str = "train", seed: int = 0) -> AudioClips:
    """The ``split`` of a user's audio folder as ``AudioClips`` (module docstring); the result
    also carries ``files`` (the path of every item) and ``skipped`` (``(path, reason)`` pairs)."""
    if config is None:
        raise ValueError('audio/folder needs options: at least path = "/path/to/audio"')
    c = config
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = Path(c.path).expanduser()
    files, labels, class_names, ignored = scan(root, c.extensions, WORDS)
    if ignored:
        warnings.warn(
            f"audio/folder {str(root)!r}: left out {len(ignored)} file(s) without an audio extension "
            f"({', '.join(c.extensions)}):\n" + listing([(p, "not an audio extension") for p in ignored]),
            UnreadableAudioWarning,
            stacklevel=2,
        )
    if len(files) < 2:
        raise ValueError(
            f"audio folder {str(root)!r} has {len(files)} audio file; a train/eval split needs at least 2: add files"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    n_eval = min(max(1, round(c.eval_fraction * len(files))), len(files) - 1)
    chosen = sorted(int(i) for i in (order[:n_eval] if split == "eval" else order[n_eval:]))

    decoded, kept, skipped = [], [], []
    for i in chosen:
        try:
            x, _ = read_audio(files[i], sample_rate=c.sample_rate)
        except AudioReadError as err:
            if c.on_error == "raise":
                raise AudioReadError(
                    files[i],
                    f'{err.reason}; delete or replace the file, or set on_error = "skip" in the audio/folder '
                    "dataset_options to leave unreadable files out",
                ) from err
            skipped.append((files[i], err.reason))
            continue
        decoded.append(x)
        kept.append(i)
    if skipped:
        warnings.warn(
            f"audio/folder {str(root)!r} ({split} split): left out {len(skipped)} of {len(chosen)} file(s) "
            "that could not be read:\n" + listing(skipped),
            UnreadableAudioWarning,
            stacklevel=2,
        )
    if not kept:
        path, reason = skipped[0]
        raise ValueError(
            f"no audio file of the {split} split of {str(root)!r} could be read: all {len(skipped)} failed "
            f"(e.g. {path.name!r}: {reason}); replace them, or set audio/folder path to another folder"
        )

    length = round(c.seconds * c.sample_rate) if c.seconds > 0 else max(len(x) for x in decoded)
    clips, valid = [], []
    for i, x in zip(kept, decoded):
        if c.start == "random" and len(x) > length:
            start = int(np.random.default_rng([seed, i]).integers(0, len(x) - length + 1))
        else:
            start = round(c.offset * c.sample_rate)
        clip, n = fit_clip(x, length, start=start, pad=c.pad)
        clips.append(clip)
        valid.append(n)

    h = hashlib.sha256(f"audio/folder|{split}|{seed}|{attrs.asdict(c, filter=lambda a, v: a.name != 'path')}".encode())
    for p in files:  # every file of the folder, by content: a change anywhere changes both splits
        h.update(f"{p.relative_to(root).as_posix()}|{_file_hash(p)}\n".encode())
    data = AudioClips(
        clips,
        [labels[i] for i in kept] if class_names else None,
        class_names=class_names,
        sample_rate=c.sample_rate,
        valid_samples=valid,
        tag=h.hexdigest(),
    )
    data.files = tuple(files[i] for i in kept)
    data.skipped = tuple(skipped)
    return data
