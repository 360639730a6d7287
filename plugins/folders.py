"""What every ``*/folder`` dataset shares: finding a user's media files under a folder (labels
from sub-folder names), normalising extension options, and listing the files it left out.

The messages name the modality's own words (``Words``), so an image, video or audio folder
reads as its own while the rules are one: hidden files and folders are skipped, files sit
either all at the top level (no labels) or all in one sub-folder per class, never both.
"""

from __future__ import annotations

from pathlib import Path

import attrs

LISTED = 20  # paths written out in one warning; the rest are counted


@attrs.frozen(kw_only=True)
class Words:
    """How a modality's folder speaks of its files: ``modality`` ("image"), ``files`` for
    "a folder of ..." ("PNG/JPEG files"), ``plural`` ("images"), ``mixed`` / ``one`` in the
    mixed-layout message ("images" / "image"), ``hint``: appended to the no-files message."""

    modality: str
    files: str
    plural: str
    mixed: str
    one: str
    hint: str = ""


def extensions(value) -> tuple[str, ...]:
    """``"mp4"``, ``".MP4"`` or a list of them -> lower-case suffixes with their dot."""
    value = (value,) if isinstance(value, str) else tuple(value)
    return tuple(v.lower() if v.startswith(".") else "." + v.lower() for v in value)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(
    root: Path, suffixes: tuple[str, ...], words: Words
) -> tuple[list[Path], list[int], tuple[str, ...], list[Path]]:
    """``(files, labels, class_names, ignored)`` under ``root``, sorted by path.

    ``labels`` are all -1 for a flat folder; ``ignored`` are visible files without one of
    ``suffixes`` (reported by the caller, never used).
    """
    w = words
    if not root.exists():
        raise FileNotFoundError(
            f"{w.modality} folder {str(root)!r} does not exist; set {w.modality}/folder path to a folder of {w.files}"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"{w.modality} folder {str(root)!r} is a file, not a folder; set path to the folder that holds the "
            f"{w.plural}"
        )
    every = sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root))
    found = [p for p in every if p.suffix.lower() in suffixes]
    ignored = [p for p in every if p.suffix.lower() not in suffixes]
    top = [p for p in found if p.parent == root]
    nested = [p for p in found if p.parent != root]
    if not found:
        raise ValueError(
            f"{w.modality} folder {str(root)!r} has no files ending in {', '.join(suffixes)}"
            + (f" (found {len(ignored)} other files, e.g. {ignored[0].name!r})" if ignored else " (it is empty)")
            + f"; put {w.plural} in it, directly or in one sub-folder per class{w.hint}"
        )
    if top and nested:
        raise ValueError(
            f"{w.modality} folder {str(root)!r} mixes {w.mixed} at the top level (e.g. {top[0].name!r}) with "
            f"{w.mixed} in sub-folders (e.g. {str(nested[0].relative_to(root))!r}); move every {w.one} into a "
            "class sub-folder for labels, or all to the top level for none"
        )
    if top:
        return top, [-1] * len(top), (), ignored
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in nested}))
    ids = {name: i for i, name in enumerate(class_names)}
    return nested, [ids[p.relative_to(root).parts[0]] for p in nested], class_names, ignored


def listing(items: list[tuple[Path, str]]) -> str:
    """One indented ``path: reason`` line per item, the first ``LISTED``, then a count."""
    lines = [f"  {p}: {reason}" for p, reason in items[:LISTED]]
    if len(items) > LISTED:
        lines.append(f"  ... and {len(items) - LISTED} more")
    return "\n".join(lines)
