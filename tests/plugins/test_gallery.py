"""``samples.html``: entries persisted as JSON lines, one page with relative, quoted links."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from selfflow.plugins.gallery import Gallery, GalleryEntry, render
from selfflow.plugins.image.writer import ImageWriter
from selfflow.plugins.protocols import MediaFile
from selfflow.plugins.text.writer import TextWriter

PROTOCOL = {
    "sampler": {"name": "euler", "steps": 8},
    "cfg_scale": 1.5,
    "cfg_interval": [0.0, 0.7],
    "ema": True,
    "seed": 3,
}


class Page(HTMLParser):
    """Tags with their attributes, text inside each open tag, and ids."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        for tag in set(self.open):
            self.text.setdefault(tag, []).append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]

    def joined(self, tag: str) -> str:
        return "".join(self.text.get(tag, []))


def image_entry(run: Path, step: int, labels: list[str]) -> GalleryEntry:
    files = ImageWriter.from_config().write(
        torch.zeros(len(labels), 1, 4, 4),
        run / "samples",
        stem=f"step {step:07d}#a",
        labels=labels,
        title=f"step {step}",
    )
    return GalleryEntry(
        step=step,
        stream="image/digits",
        modality="image",
        files=files,
        labels=labels,
        conditions={"text": [f"say {label}" for label in labels]},
        protocol=PROTOCOL,
        title=f"EMA step {step}",
    )


def other_entries(run: Path) -> list[GalleryEntry]:
    """A text file, and dummy video/audio files (the page only links them)."""
    texts = TextWriter().write(
        ["hello <there>", "bye & so"], run / "samples", stem="step_0000001-text", labels=["<b>", "x"], title="texts"
    )
    (run / "samples" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (run / "samples" / "clip.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVE")
    media = (
        MediaFile(path=run / "samples" / "clip.mp4", element="video", items=[0, 1], caption="with audio"),
        MediaFile(path=run / "samples" / "clip.wav", element="audio", items=[1]),
    )
    return [
        GalleryEntry(
            step=1, stream="text/words", modality="text", files=texts, labels=["<b>", "x"], protocol={"seed": 0}
        ),
        GalleryEntry(
            step=None,
            stream="joint/talking",
            modality="video",
            files=media,
            labels=["", ""],
            conditions={"audio": ["", "speech.wav"]},
            protocol={},
            title="",
        ),
    ]


def check_links(page_dir: Path, page: Page) -> int:
    ids = {a["id"] for _, a in page.tags if a.get("id")}
    n = 0
    for _, attrs in page.tags:
        for name in ("src", "href"):
            link = attrs.get(name)
            if link is None:
                continue
            n += 1
            if link.startswith("#"):
                assert link[1:] in ids, link
                continue
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc and not link.startswith("/"), f"{link} is not relative"
            assert (page_dir / unquote(parts.path)).is_file(), f"{link} points at no file"
    return n


def test_entries_persist_across_galleries_and_the_page_links_every_file(tmp_path):
    run = tmp_path / "run"
    gallery = Gallery(run, title="demo <run>")
    first = image_entry(run, 100, ["zero", "zero", "<b>", "<b>"])
    assert gallery.add(first) == run / "samples.html"
    second = image_entry(run, 200, ["one", "one", "two", "two"])
    gallery.add(second)
    again = Gallery(run, title="demo <run>").entries()
    assert again == [first, second]  # paths come back under the same directory
    lines = (run / "samples" / "gallery.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["files"][0]["path"].startswith("samples/") for line in lines)

    text = (run / "samples.html").read_text(encoding="utf-8")
    page = Page(text)
    assert not page.open  # every element closed
    assert check_links(run, page) >= 6
    assert all("%23" in a["src"] and "%20" in a["src"] for a in page.all("img"))  # '#' and ' ' quoted
    headings = [h for h in page.joined("h2").split("step ")[1:]]
    assert [h.strip()[:3] for h in headings] == ["200", "100"]  # newest first
    assert page.all("b") == [] and "<b>" in page.joined("td")  # labels escaped, shown as text
    assert "demo <run>" in page.joined("title") and "say <b>" in page.joined("td")
    assert {"euler", "1.5", "0, 0.7", "true"} <= set(page.text["dd"])
    assert "http" not in text and "<script" not in text and "<link" not in text  # opens from disk, alone


def test_text_video_and_audio_elements(tmp_path):
    run = tmp_path / "run"
    gallery = Gallery(run, title="mixed")
    for entry in [image_entry(run, 5, ["a", "b"]), *other_entries(run)]:
        gallery.add(entry)
    page = Page((run / "samples.html").read_text(encoding="utf-8"))
    assert check_links(run, page) >= 8
    pre = page.joined("pre")
    assert "hello <there>" in pre and "bye & so" in pre and "# texts" in pre
    [video] = page.all("video")
    assert video["src"] == "samples/clip.mp4" and {"controls", "loop", "muted", "playsinline"} <= set(video)
    [audio] = page.all("audio")
    assert audio["src"] == "samples/clip.wav" and "controls" in audio
    assert "speech.wav" in page.joined("td")  # the condition of the sample the audio file shows
    order = [t for t, _ in page.tags if t in ("img", "pre", "video")]
    assert order == ["img", "pre", "video"]  # step 5, step 1, unknown step last


def test_files_outside_the_page_directory_are_refused(tmp_path):
    (tmp_path / "elsewhere.png").write_bytes(b"")
    entry = GalleryEntry(
        step=0,
        stream="s",
        modality="image",
        labels=[""],
        files=[MediaFile(path=tmp_path / "elsewhere.png", element="img", items=[0])],
    )
    with pytest.raises(ValueError, match="outside"):
        Gallery(tmp_path / "run", title="t").add(entry)
    with pytest.raises(ValueError, match="outside"):
        render([entry], title="t", base=tmp_path / "run")
    assert not (tmp_path / "run" / "samples.html").exists()


def test_entries_are_checked():
    file = MediaFile(path=Path("x.png"), element="img", items=[0, 1, 2])
    with pytest.raises(ValueError, match="one label per sample"):
        GalleryEntry(step=1, stream="s", modality="image", files=[file], labels=["a", "b"])
    with pytest.raises(ValueError, match="one per sample"):
        GalleryEntry(step=1, stream="s", modality="image", files=[], labels=["a"], conditions={"text": ["x", "y"]})
    with pytest.raises(ValueError, match="step"):
        GalleryEntry(step=-1, stream="s", modality="image", files=[], labels=[])
    with pytest.raises(TypeError, match="protocol"):
        GalleryEntry(step=1, stream="s", modality="image", files=[], labels=[], protocol={"dtype": torch.float32})
    entry = GalleryEntry(
        step=1,
        stream="s",
        modality="image",
        files=[],
        labels=[],
        protocol={"ckpt": Path("a/b"), "fd": math.nan, "grid": (1, 2)},
    )
    assert entry.protocol == {"ckpt": "a/b", "fd": "nan", "grid": [1, 2]}


def test_torn_lines_are_skipped_and_resampled_steps_replace(tmp_path):
    run = tmp_path / "run"
    gallery = Gallery(run, title="t")
    entry = image_entry(run, 10, ["a"])
    gallery.add(entry)
    with open(run / "samples" / "gallery.jsonl", "a") as f:
        f.write('{"format": 1, "step": 2')  # a writer that crashed mid-line
    with pytest.warns(UserWarning, match="gallery.jsonl:2"):
        assert gallery.entries() == [entry]
    with pytest.warns(UserWarning):
        gallery.add(entry)  # the same files again (a resumed run re-sampled step 10)
    with pytest.warns(UserWarning):
        assert gallery.entries() == [entry]
    lines = (run / "samples" / "gallery.jsonl").read_text().split("\n")
    assert json.loads(lines[2])["step"] == 10  # the new line did not join the torn one


def test_an_empty_gallery_renders():
    page = Page(render([], title="nothing yet", base=Path(".")))
    assert "No samples yet" in page.joined("p") and not page.all("img")
