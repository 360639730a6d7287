"""core/files: content keys, atomic directories, stale temporaries, cache entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from selfflow.core import files
from selfflow.core.files import CacheEntry, atomic_directory, clean_stale, content_key


@attrs.frozen(kw_only=True)
class Config:
    width: int = 8
    widths: tuple[int, ...] = (1, 2)
    path: Path = Path("data/x")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- keys


def test_content_key_is_stable_and_canonical():
    key = content_key({"format": 1, "data": "mnist-16"}, Config())
    # pinned: sha256 of [{"data":"mnist-16","format":1},{"path":"data/x","width":8,"widths":[1,2]}];
    # a change of canonical form silently orphans every cache, so it must be deliberate
    assert key == content_key({"data": "mnist-16", "format": 1}, Config()) == "6d88584fd40bb3ea7d01"
    assert len(content_key("x")) == 20 and len(content_key("x", length=64)) == 64
    # tuples are lists, paths are strings, attrs instances are their fields
    assert content_key((1, 2)) == content_key([1, 2])
    assert content_key(Path("a/b")) == content_key("a/b")
    assert content_key(Config()) == content_key({"width": 8, "widths": [1, 2], "path": "data/x"})


def test_content_key_follows_every_field_and_part():
    base = content_key("data", Config())
    assert content_key("data", attrs.evolve(Config(), width=9)) != base
    assert content_key("data", attrs.evolve(Config(), widths=(1, 3))) != base
    assert content_key("other", Config()) != base
    assert content_key(Config(), "data") != base  # parts are ordered
    assert content_key({"a": 1}) != content_key({"a": 1.5}) != content_key({"a": "1"})


@pytest.mark.parametrize("bad", [object(), torch.zeros(2), {1: "int key"}, {"x": {1, 2}}, float("nan")])
def test_content_key_refuses_values_without_a_stable_text_form(bad):
    with pytest.raises((TypeError, ValueError), match="content_key"):
        content_key("ok", bad)


# ----------------------------------------------------------------------------- atomic directories


def test_atomic_directory_writes_then_renames(tmp_path):
    final = tmp_path / "cache" / "entry"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".entry.tmp-") and str(os.getpid()) in tmp.name
        assert not final.exists()  # nothing visible until the block succeeds
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert snapshot(final) == {"a.txt": b"a", "sub/b.txt": b"b"}
    assert hidden(final.parent) == []


def test_a_failure_mid_write_leaves_the_previous_entry_byte_identical(tmp_path):
    final = tmp_path / "entry"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_bytes(bytes(range(256)))
        (tmp / "meta.json").write_text('{"v": 1}')
    before = snapshot(final)
    with pytest.raises(OSError, match="No space left"), atomic_directory(final) as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert snapshot(final) == before
    assert hidden(tmp_path) == []


def test_an_existing_entry_is_replaced_whole(tmp_path):
    final = tmp_path / "entry"
    with atomic_directory(final) as tmp:
        (tmp / "old-only.txt").write_text("old")
        (tmp / "shared.txt").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "shared.txt").write_text("new")
    assert snapshot(final) == {"shared.txt": b"new"}
    assert hidden(tmp_path) == []


def _crash_mid_write(final: Path) -> int:
    """Run a writer that dies inside atomic_directory; its pid (the process is gone)."""
    code = (
        "import os, sys; from pathlib import Path; from selfflow.core.files import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'part').write_text('half'); print(os.getpid(), flush=True); os._exit(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, check=False)
    assert out.returncode == 1, out.stderr
    return int(out.stdout)


def test_clean_stale_removes_dead_writers_leftovers_only(tmp_path):
    final = tmp_path / "entry"
    dead = _crash_mid_write(final)
    (left,) = hidden(tmp_path)
    assert f"-{dead}-" in left and not final.exists()
    host = left.split(".tmp-")[1].rsplit("-", 2)[0]
    # a dead writer that had moved the last good entry aside: it is put back
    aside = tmp_path / f".other.old-{host}-{dead}-0000abcd"
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    # another host's writer (its pid means nothing here) and an unrelated hidden directory
    (tmp_path / f".entry.tmp-elsewhere-{dead}-0000abcd").mkdir()
    (tmp_path / ".entry.tmp").mkdir()
    with atomic_directory(final) as live:  # a live writer (this process) mid-write
        (live / "x").write_text("x")
        cleaned = clean_stale(tmp_path)
        assert sorted(p.name for p in cleaned) == sorted([left, aside.name])
        assert live.is_dir()
        assert (tmp_path / "other" / "meta.json").is_file()
        assert hidden(tmp_path) == sorted([live.name, ".entry.tmp", f".entry.tmp-elsewhere-{dead}-0000abcd"])
    assert snapshot(final) == {"x": b"x"}
    assert clean_stale(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- cache entries


def test_cache_entry_round_trip(tmp_path):
    entry = CacheEntry(tmp_path, "latents", content_key("mnist-16", "image/vae:abc"))
    assert entry.path == tmp_path / "latents" / entry.key and not entry.exists()
    tokens = torch.randn(3, 4, 2)
    with entry.write() as w:
        w.save_tensors("tokens.safetensors", {"tokens": tokens}, metadata={"note": "x"})
        w.set_meta({"items": 3})
    assert entry.exists() and entry.read_meta() == {"items": 3}
    assert torch.equal(entry.load_tensors("tokens.safetensors")["tokens"], tokens)
    assert sorted(p.name for p in entry.path.iterdir()) == ["meta.json", "tokens.safetensors"]


def test_an_entry_without_meta_is_not_complete(tmp_path):
    entry = CacheEntry(tmp_path, "reference", "image-1234")
    entry.path.mkdir(parents=True)
    files.save_tensors(entry.path / "weights.safetensors", {"w": torch.ones(2)})
    assert not entry.exists()
    with pytest.raises(ValueError, match="set_meta"), entry.write() as w:  # forgetting the meta is an error
        w.save_tensors("weights.safetensors", {"w": torch.zeros(2)})
    assert not entry.exists() and hidden(entry.path.parent) == []
    assert torch.equal(entry.load_tensors("weights.safetensors")["w"], torch.ones(2))  # the old files are untouched


def test_cache_entry_refuses_odd_names_and_reports_unreadable_files(tmp_path):
    for kind, key in (("../up", "k"), ("kind", ""), ("kind", ".hidden"), ("kind", "a/b")):
        with pytest.raises(ValueError, match="one visible path component"):
            CacheEntry(tmp_path, kind, key)
    entry = CacheEntry(tmp_path, "kind", "key")
    with pytest.raises(ValueError, match="ending in .safetensors"), entry.write() as w:
        w.save_tensors("weights.pt", {"w": torch.ones(1)})
    entry.path.mkdir(parents=True)
    (entry.path / "meta.json").write_text("{not json")
    (entry.path / "t.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(files.CacheError, match="meta.json is unreadable"):
        entry.read_meta()
    with pytest.raises(files.CacheError, match="t.safetensors is unreadable"):
        entry.load_tensors("t.safetensors")
