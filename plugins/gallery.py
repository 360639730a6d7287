"""``samples.html``: one page of every sample a run wrote, newest step first.

Every writer's files (``protocols.MediaFile``) are shown as their element (``<img>``,
``<video>``, ``<audio>``, or a text file's contents in a ``<pre>``) beside the labels and
conditions of the samples they show, under the protocol that produced them (sampler and
options, guidance, EMA, seed, ...). The page opens from disk: no scripts, no external
styles or fonts, links relative to the page's directory. Media must live under that
directory (a file outside it is refused, so the run directory stays movable as a whole).

Entries are recorded as JSON lines in ``samples/gallery.jsonl`` (file paths relative to the
page's directory), one ``write`` per line, so a resumed run or another process (``selfflow
sample``) appends to the same page; each ``add`` re-renders the page from all of them. An
entry that shows the same files as an earlier one (a resumed run re-sampling a step)
replaces it. A line that does not parse (a crash mid-write) is skipped with a warning.

Writers share three small helpers from here: ``check_labels``, ``check_stem`` and
``replacing`` (write a file under a hidden name, then rename it into place).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

import attrs

from selfflow.plugins.protocols import MediaFile

PAGE = "samples.html"
LOG = Path("samples") / "gallery.jsonl"
FORMAT = 1
MAX_TEXT = 64_000  # characters of a text file shown inline; the link has the rest
FOLD_ROWS = 16  # label tables longer than this start folded


# ----------------------------------------------------------------------------- writer helpers


def check_labels(labels: Sequence[str] | None, n: int, writer: str) -> list[str] | None:
    """``labels`` as a list of ``n`` strings (or ``None``), or an error that names the fix."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"the {writer} writer takes one label string per sample, got a single str {labels!r}")
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(
            f"the {writer} writer got {len(labels)} labels for {n} samples: give one label per sample (or None)"
        )
    bad = next((i for i, label in enumerate(labels) if not isinstance(label, str)), None)
    if bad is not None:
        raise TypeError(
            f"the {writer} writer takes labels as strings (class names, condition texts); label {bad} is "
            f"{type(labels[bad]).__name__} {labels[bad]!r}: map class ids through the dataset's class_names"
        )
    return labels


def check_stem(stem: str) -> str:
    """A writer's ``stem``: one visible file-name component without suffix."""
    if not isinstance(stem, str) or not stem or Path(stem).name != stem or stem.startswith(".") or "\\" in stem:
        raise ValueError(
            f"a writer's stem is a plain visible file name without suffix (e.g. 'step_0000500'), got {stem!r}"
        )
    return stem


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (same suffix, so libraries that pick a
    format from it still do); on success rename it onto ``path``, on an error remove it. A
    reader of ``path`` (the page, a browser) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- entries


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (paths as str, tuples as lists, attrs instances as dicts)."""
    if isinstance(value, float) and not isinstance(value, enum.Enum) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or (isinstance(value, (str, bool, int, float)) and not isinstance(value, enum.Enum)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name), f"{where}.{f.name}") for f in attrs.fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(
        f"GalleryEntry {where} is a {type(value).__name__}; the protocol is written to JSON: "
        "give str, int, float, bool, None, paths, lists or dicts of those (e.g. str(dtype))"
    )


def _protocol(value: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"GalleryEntry.protocol is a mapping name -> value, got {type(value).__name__}")
    return _plain(value, "protocol")


def _conditions(value: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError(
            "GalleryEntry.conditions maps a condition modality to one description per sample, "
            f"got {type(value).__name__}"
        )
    return {str(k): tuple(str(d) for d in v) for k, v in value.items()}


def _step(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"GalleryEntry.step is the training step of the weights (an int >= 0) or None, got {value!r}")


@attrs.frozen(kw_only=True)
class GalleryEntry:
    """One writer's output for one sampling: ``labels`` has one entry per sample (what it
    was generated for, ``""`` when unconditional) and every file's ``items`` index into
    it; ``conditions`` maps a condition modality to one description per sample (the
    text, a file name); ``protocol``: how the samples were drawn (JSON data)."""

    step: int | None = attrs.field(validator=_step)
    stream: str
    modality: str
    files: tuple[MediaFile, ...] = attrs.field(converter=tuple)
    labels: tuple[str, ...] = attrs.field(converter=lambda v: tuple(str(x) for x in v))
    conditions: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_conditions)
    protocol: Mapping[str, Any] = attrs.field(factory=dict, converter=_protocol)
    title: str = ""

    def __attrs_post_init__(self) -> None:
        n = len(self.labels)
        for f in self.files:
            if not isinstance(f, MediaFile):
                raise TypeError(f"GalleryEntry.files holds MediaFiles (what a writer returns), got {type(f).__name__}")
            if any(not 0 <= i < n for i in f.items):
                raise ValueError(
                    f"{f.path} shows samples {list(f.items)} but the entry has {n} labels: "
                    "give one label per sample ('' when unconditional)"
                )
        for modality, descriptions in self.conditions.items():
            if len(descriptions) != n:
                raise ValueError(
                    f"condition {modality!r} has {len(descriptions)} descriptions for {n} samples: give one per sample"
                )


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (posix), refusing anything outside ``base``."""
    absolute, root = Path(path).resolve(), Path(base).resolve()
    if not absolute.is_relative_to(root):
        raise ValueError(
            f"{path} is outside {base}, the directory of {PAGE}: write media under it "
            f"(e.g. {Path(base) / 'samples'}) so the page's relative links survive moving the directory"
        )
    return absolute.relative_to(root).as_posix()


def _to_json(entry: GalleryEntry, base: Path) -> str:
    data = attrs.asdict(entry, recurse=False)
    data["files"] = [
        {"path": _relative(f.path, base), "element": f.element, "items": list(f.items), "caption": f.caption}
        for f in entry.files
    ]
    data["labels"], data["conditions"] = list(entry.labels), {k: list(v) for k, v in entry.conditions.items()}
    data["protocol"] = dict(entry.protocol)
    return json.dumps({"format": FORMAT, **data}, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _from_json(data: dict[str, Any], base: Path) -> GalleryEntry:
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"not a format-{FORMAT} gallery line")
    data["files"] = [
        MediaFile(path=base / f["path"], element=f["element"], items=f["items"], caption=f["caption"])
        for f in data["files"]
    ]
    return GalleryEntry(**data)


class Gallery:
    """The page ``directory/samples.html`` and its record ``directory/samples/gallery.jsonl``."""

    def __init__(self, directory: Path, *, title: str) -> None:
        self.directory, self.title = Path(directory), title

    @property
    def page(self) -> Path:
        return self.directory / PAGE

    @property
    def log(self) -> Path:
        return self.directory / LOG

    def add(self, entry: GalleryEntry) -> Path:
        """Record ``entry`` (one appended line) and re-render the page; returns its path."""
        line = (_to_json(entry, self.directory) + "\n").encode("utf-8")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not _ends_with_newline(self.log):
                line = b"\n" + line  # a crashed writer's torn line stays on its own (skipped) line
            written = os.write(fd, line)  # one write: appends from several processes do not interleave
            while written < len(line):  # a short write (a signal, a full disk) is finished, not dropped
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        with replacing(self.page) as tmp:
            tmp.write_text(render(self.entries(), title=self.title, base=self.directory), encoding="utf-8")
        return self.page

    def entries(self) -> list[GalleryEntry]:
        """Every recorded entry, in the order added (a later one with the same files
        replaces an earlier one)."""
        if not self.log.is_file():
            return []
        found: dict[tuple[Any, ...], GalleryEntry] = {}
        for number, text in enumerate(self.log.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                entry = _from_json(json.loads(text), self.directory)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                warnings.warn(f"{self.log}:{number} is not a gallery entry ({err}); skipped", stacklevel=2)
                continue
            key = (entry.step, entry.stream, entry.modality, tuple(str(f.path) for f in entry.files))
            found.pop(key, None)
            found[key] = entry
        return list(found.values())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- the page


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(_value(v) for v in value)
    return json.dumps(value)


def _flat(protocol: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in protocol.items():
        if isinstance(value, Mapping) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _value(value)))
    return rows


def _span(items: list[int]) -> str:
    if items == list(range(items[0], items[0] + len(items))):
        return str(items[0]) if len(items) == 1 else f"{items[0]}\u2013{items[-1]}"
    return ", ".join(map(str, items))


def _label_table(entry: GalleryEntry, items: tuple[int, ...]) -> dict[str, Any] | None:
    """Runs of consecutive samples with the same label and conditions: header and rows."""
    if not items:
        return None
    columns = [
        (name, values)
        for name, values in (("label", entry.labels), *entry.conditions.items())
        if any(values[i] for i in items)
    ]  # columns that say something for these samples
    if not columns:
        return {"header": [], "rows": [], "folded": False, "note": f"{len(items)} samples, unconditional"}
    rows = []
    for key, group in itertools.groupby(items, key=lambda i: tuple(values[i] for _, values in columns)):
        rows.append([_span(list(group)), *key])
    header = ["samples", *(name for name, _ in columns)]
    return {"header": header, "rows": rows, "folded": len(rows) > FOLD_ROWS, "note": ""}


def _text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(cannot read {Path(path).name}: {err.strerror})"
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n\u2026 (truncated; open the file for the rest)"


def render(entries: Iterable[GalleryEntry], *, title: str, base: Path) -> str:
    """The page's HTML: entries newest step first (unknown steps last; equal steps in the
    order given), every link relative to ``base`` and URL-quoted."""
    entries = sorted(entries, key=lambda e: (e.step is None, -(e.step or 0)))
    view = []
    for number, entry in enumerate(entries):
        files = []
        for f in entry.files:
            href = quote(_relative(f.path, base))
            files.append(
                {
                    "element": f.element,
                    "href": href,
                    "name": Path(f.path).name,
                    "caption": f.caption,
                    "text": _text(f.path) if f.element == "text" else "",
                    "labels": _label_table(entry, f.items),
                    "missing": not Path(f.path).is_file(),
                }
            )
        step = "step ?" if entry.step is None else f"step {entry.step}"
        view.append(
            {
                "id": f"entry-{number}",
                "heading": f"{entry.stream} \u00b7 {entry.modality} \u00b7 {step}",
                "title": entry.title,
                "protocol": _flat(entry.protocol),
                "files": files,
            }
        )
    return _template().render(title=title, entries=view)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:0}
nav{margin:0 0 1em;font-size:.9em}nav a{margin-right:.8em;white-space:nowrap}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:0 0 1.2em}
.title{color:#555;margin:.2em 0 .5em}
dl{display:grid;grid-template-columns:max-content auto;gap:0 .8em;font-size:.85em;margin:.3em 0 .8em;color:#444}
dt{font-weight:600}dd{margin:0;font-family:ui-monospace,monospace}
figure{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;margin:.6em 0}
img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
video{max-width:100%}
pre{background:#f4f4f4;padding:.5em;max-height:24em;overflow:auto;margin:0;font-size:.85em}
figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.85em}th,td{text-align:left;padding:0 .6em 0 0;vertical-align:top}
th{color:#777;font-weight:600}.missing{color:#b00}
"""

_SOURCE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>{{ css }}</style>
</head>
<body>
<h1>{{ title }}</h1>
{% if not entries %}
<p>No samples yet.</p>
{% else %}
<nav>{% for e in entries %}<a href="#{{ e.id }}">{{ e.heading }}</a> {% endfor %}</nav>
{% endif %}
{% for e in entries %}
<section id="{{ e.id }}">
<h2>{{ e.heading }}</h2>
{% if e.title %}<p class="title">{{ e.title }}</p>{% endif %}
{% if e.protocol %}
<dl>{% for k, v in e.protocol %}<dt>{{ k }}</dt><dd>{{ v }}</dd>{% endfor %}</dl>
{% endif %}
{% for f in e.files %}
<figure>
<div>
{% if f.element == "img" %}
<a href="{{ f.href }}"><img src="{{ f.href }}" alt="{{ e.heading }}: {{ f.name }}" loading="lazy"></a>
{% elif f.element == "video" %}
<video src="{{ f.href }}" controls loop muted playsinline preload="metadata"></video>
{% elif f.element == "audio" %}
<audio src="{{ f.href }}" controls preload="metadata"></audio>
{% else %}
<pre>{{ f.text }}</pre>
{% endif %}
<figcaption>{% if f.caption %}{{ f.caption }} &middot; {% endif %}<a href="{{ f.href }}">{{ f.name }}</a>
{%- if f.missing %} <span class="missing">(missing)</span>{% endif %}</figcaption>
</div>
{% if f.labels %}
<div>
{% if f.labels.note %}<p>{{ f.labels.note }}</p>{% else %}
{% if f.labels.folded %}<details><summary>{{ f.labels.rows | length }} label groups</summary>{% endif %}
<table><tr>{% for h in f.labels.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in f.labels.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if f.labels.folded %}</details>{% endif %}
{% endif %}
</div>
{% endif %}
</figure>
{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


@functools.cache
def _template() -> Any:
    import jinja2  # compiled on first render, not when a writer module is imported
    import markupsafe

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_SOURCE, globals={"css": markupsafe.Markup(_CSS)})  # our own constant: not escaped
