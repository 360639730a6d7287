"""The ``text`` writer: a batch of strings -> one ``label<TAB>text`` line per sample."""

from __future__ import annotations

import pytest
import torch

from selfflow.plugins.protocols import MediaWriter
from selfflow.plugins.text import selfflow_register_writers
from selfflow.plugins.text.writer import TextWriter, read_samples


def test_one_line_per_sample_after_the_title(tmp_path):
    [f] = TextWriter().write(["cat", "dog"], tmp_path, stem="step_0000005", labels=["zero", "one"], title="run  step 5")
    assert f.path == tmp_path / "step_0000005.txt" and f.element == "text" and f.items == (0, 1)
    assert f.path.read_text(encoding="utf-8") == "# run step 5\nzero\tcat\none\tdog\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005.txt"]


def test_without_labels_and_with_awkward_characters(tmp_path):
    texts = ["two\nlines", "tab\there", "back\\slash", "# not a title", "ünïcode"]
    [f] = TextWriter().write(texts, tmp_path, stem="s", labels=None, title="")
    lines = f.path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "# " and lines[1:3] == ["two\\nlines", "tab\\there"] and len(lines) == len(texts) + 2
    assert read_samples(f.path) == ("", [(None, t) for t in texts])
    [g] = TextWriter().write(texts, tmp_path, stem="l", labels=["a\tb", "", "c", "d", "e"], title="t")
    assert read_samples(g.path) == ("t", list(zip(["a\tb", "", "c", "d", "e"], texts)))


@pytest.mark.parametrize(
    ("media", "labels", "error", "says"),
    [
        (torch.zeros(2, 16), None, TypeError, "list of str"),
        ("cat", None, TypeError, r"pass \[text\]"),
        (["cat", 3], None, TypeError, "item 1"),
        ([], None, ValueError, "empty"),
        (["cat", "dog"], ["only one"], ValueError, "one label per sample"),
    ],
)
def test_bad_input_says_what_was_expected(tmp_path, media, labels, error, says):
    with pytest.raises(error, match=says):
        TextWriter().write(media, tmp_path, stem="s", labels=labels, title="")
    assert not list(tmp_path.iterdir())


def test_registered_as_the_text_writer():
    added = []

    class Register:
        def add(self, name, factory, config_cls=None, doc=""):
            added.append((name, factory, config_cls, doc))

    selfflow_register_writers(register=Register())
    [(name, factory, config_cls, doc)] = added
    writer = factory(None)
    assert name == "text" == writer.modality and config_cls is None and isinstance(writer, MediaWriter) and doc
