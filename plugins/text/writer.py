"""The ``text`` writer: a batch of generated strings -> one UTF-8 ``.txt`` file.

Layout of ``{stem}.txt``: the title as a first line ``# title`` (always there, ``# `` when
the title is empty; its whitespace collapsed to single spaces), then one line per sample,
``label<TAB>text`` (just ``text`` without labels).
Backslashes, tabs, newlines and carriage returns inside a label or a text are written as
``\\\\``, ``\\t``, ``\\n``, ``\\r``, so every sample stays on its own line and the file
splits back exactly (``read_samples``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from selfflow.plugins.gallery import check_labels, check_stem, replacing
from selfflow.plugins.protocols import MediaFile

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def unescape(text: str) -> str:
    out, chars = [], iter(text)
    for c in chars:
        out.append(_UNESCAPES.get(next(chars, "\\"), "\\") if c == "\\" else c)
    return "".join(out)


def check_texts(media: object) -> list[str]:
    """``media`` as a list of ``str``, or an error that says what was expected."""
    expected = "the text writer takes a list of str, one decoded text per sample"
    if isinstance(media, str):
        raise TypeError(f"{expected}; got a single str {media[:40]!r}: pass [text]")
    if not isinstance(media, (list, tuple)):
        shape = f" of shape {tuple(media.shape)}" if hasattr(media, "shape") else ""
        raise TypeError(
            f"{expected}; got a {type(media).__name__}{shape} (tokens? decode them with the text tokenizer first)"
        )
    bad = next((i for i, t in enumerate(media) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{expected}; item {bad} is a {type(media[bad]).__name__}")
    if not media:
        raise ValueError(f"{expected}; got an empty list")
    return list(media)


def read_samples(path: Path) -> tuple[str, list[tuple[str | None, str]]]:
    """``(title, [(label or None, text), ...])`` of a file this writer wrote."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")[:-1]
    title = lines.pop(0)[2:] if lines else ""
    samples: list[tuple[str | None, str]] = []
    for line in lines:
        label, tab, text = line.partition("\t")
        samples.append((unescape(label), unescape(text)) if tab else (None, unescape(line)))
    return title, samples


class TextWriter:
    """Writes ``directory/{stem}.txt`` (layout in the module docstring); no options."""

    modality = "text"

    @classmethod
    def from_config(cls, config: None = None) -> TextWriter:
        if config is not None:
            raise TypeError(f"the text writer has no options, got {config!r}")
        return cls()

    def write(
        self, media: Sequence[str], directory: Path, *, stem: str, labels: Sequence[str] | None, title: str
    ) -> list[MediaFile]:
        texts = check_texts(media)
        labels = check_labels(labels, len(texts), "text")
        path = Path(directory) / f"{check_stem(stem)}.txt"
        lines = [f"# {' '.join(title.split())}"]
        if labels is None:
            lines += [escape(t) for t in texts]
        else:
            lines += [f"{escape(label)}\t{escape(t)}" for label, t in zip(labels, texts)]
        with replacing(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [MediaFile(path=path, element="text", items=range(len(texts)), caption=f"{len(texts)} samples")]
