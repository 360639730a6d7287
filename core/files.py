"""Content keys and atomic directories: the one way selfflow writes checkpoints and caches.

- ``content_key(*parts)``: a stable sha256 hex key of JSON-canonicalised parts; what a
  cache entry is named after.
- ``atomic_directory(final)``: build a directory under a hidden temporary name beside
  ``final`` and rename it into place, so a reader sees the previous entry or the new one,
  never half of one; a failure (a full disk mid-write) leaves the previous entry as it was.
- ``clean_stale(parent)``: writers call it first; it removes what dead writers left behind.
- ``CacheEntry(root, kind, key)``: ``root/kind/key/``, a directory of safetensors files and a
  ``meta.json`` written last. An entry is complete, and ``exists()``, only with its meta.

Tensors are stored with safetensors only; nothing here ever pickles or unpickles.

Temporary names are ``.{final}.tmp-{host}-{pid}-{token}`` (and ``.old-`` for a replaced entry
on its way out): hidden, in the same directory (so the rename stays on one filesystem), and
naming their writer, so ``clean_stale`` removes only what a dead process on this host left.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

import attrs
import torch
from safetensors.torch import load_file, save_file

META = "meta.json"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
# name . kind - host - pid - token; host has no '-', so the split is unambiguous
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
_ATTEMPTS = 5


class CacheError(ValueError):
    """A cache entry that cannot be read; the message names the file. Caches can be rebuilt."""


# ----------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str) -> Any:
    if value is None or (isinstance(value, (str, bool, int, float)) and not isinstance(value, enum.Enum)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if attrs.has(type(value)):
        return {f.name: _canonical(getattr(value, f.name), f"{where}.{f.name}") for f in attrs.fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"content_key: {where} has a non-string key {bad[0]!r}; use string keys")
        return {k: _canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"content_key: {where} is a {type(value).__name__}, which has no stable text form; "
        "pass str, int, float, bool, None, Path, lists, tuples, string-keyed dicts or attrs instances of those"
    )


def content_key(*parts: Any, length: int = 20) -> str:
    """The first ``length`` hex digits of the sha256 of ``parts`` as canonical JSON.

    Dicts are key-sorted, tuples become lists, ``Path`` becomes ``str`` and attrs instances
    their fields, so equal values give equal keys in any process. Anything else (tensors,
    arrays, enums, arbitrary objects) is a ``TypeError``: a ``repr`` may hold an address.
    """
    if not 1 <= length <= 64:
        raise ValueError(f"content_key length must be in 1..64 (sha256 has 64 hex digits), got {length}")
    canonical = [_canonical(p, f"part {i}") for i, p in enumerate(parts)]
    try:
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"content_key: {err}; NaN and infinity have no canonical form, pass them as strings") from err
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# ----------------------------------------------------------------------------- atomic directories


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the data files were synced
        if path.is_file():
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _temporary(final: Path) -> tuple[Path, Path]:
    """A fresh hidden directory beside ``final`` (mode from the umask, unlike ``mkdtemp``'s
    0700) and the name its writer moves a replaced entry aside to."""
    for _ in range(100):
        tag = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = final.with_name(f".{final.name}.tmp-{tag}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp, final.with_name(f".{final.name}.old-{tag}")
    raise FileExistsError(f"could not create a temporary directory beside {final}")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success fsync it and rename
    it to ``final``, on an exception remove it and re-raise.

    An existing ``final`` is renamed aside first and removed after the new one is in place,
    so at every moment ``final`` is the complete old entry, the complete new one, or (for
    the instant between two renames) absent. Call ``clean_stale(final.parent)`` before, to
    clear what crashed writers left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = _temporary(final)
    try:
        yield tmp
        _fsync_tree(tmp)  # data on disk before the rename makes it visible
        for _ in range(_ATTEMPTS):
            moved = False
            if os.path.lexists(final):
                with contextlib.suppress(FileNotFoundError):  # another writer may move it first
                    os.replace(final, aside)
                    moved = True
            try:
                os.replace(tmp, final)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    if moved and not os.path.lexists(final):
                        os.replace(aside, final)  # put the last good entry back
                    raise
                # another writer renamed its entry in between our two renames: replace that one
                if moved:
                    _remove(aside)
                continue
            if moved:
                _remove(aside)
            _fsync(final.parent)
            return
        raise RuntimeError(f"could not rename {tmp} to {final}: other writers kept replacing it ({_ATTEMPTS} attempts)")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove temporary directories that dead processes on this host left in ``parent``.

    A replaced entry renamed aside by a writer that died before its new entry was in place
    is renamed back (it is the last good one). Live writers' and other hosts' directories
    are left alone. Returns the paths removed or restored.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    done = []
    # .old first: a dead writer's aside is restored before its temporary directory goes
    for path in sorted(parent.iterdir(), key=lambda p: ".tmp-" in p.name):
        m = _TEMP.match(path.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == "old" and not os.path.lexists(final):
            try:
                os.replace(path, final)
            except OSError:  # a live writer put a new entry in place meanwhile
                _remove(path)
        else:
            _remove(path)
        done.append(path)
    return done


# ----------------------------------------------------------------------------- cache entries


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """One safetensors file of CPU, contiguous, detached copies; ``metadata`` goes in its header."""
    out = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(out, str(path), metadata=dict(metadata) if metadata is not None else None)


def _check_filename(name: str) -> None:
    if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
        raise ValueError(f"a cache entry's tensor file is a plain name ending in .safetensors, got {name!r}")


class EntryWriter:
    """What ``CacheEntry.write()`` / ``write_entry`` yield: a temporary ``directory`` to fill.

    ``save_tensors(name, tensors)`` writes ``name`` (``*.safetensors``) into it; ``set_meta``
    gives the JSON metadata, written as ``meta.json`` after everything else when the block
    ends. Other files may be written into ``directory`` directly.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta: dict[str, Any] | None = None

    def save_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> Path:
        _check_filename(name)
        save_tensors(self.directory / name, tensors, metadata)
        return self.directory / name

    def set_meta(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)


@contextlib.contextmanager
def write_entry(final: str | os.PathLike) -> Iterator[EntryWriter]:
    """Write the entry directory ``final`` atomically, ``meta.json`` last (``EntryWriter``)."""
    final = Path(final)
    clean_stale(final.parent)
    with atomic_directory(final) as tmp:
        writer = EntryWriter(tmp)
        yield writer
        if writer.meta is None:
            raise ValueError(f"the cache entry {final} was written without metadata: call set_meta(...) in the block")
        (tmp / META).write_text(json.dumps(writer.meta, indent=2, sort_keys=True) + "\n")


def _component(inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value or Path(value).name != value or value.startswith("."):
        raise ValueError(f"CacheEntry {attribute.name} must be one visible path component, got {value!r}")


@attrs.frozen
class CacheEntry:
    """``root/kind/key/``: tensors in safetensors files and ``meta.json``, written last.

    ``kind`` names the cache (``"image-vae"``, ``"latents"``); ``key`` is usually a
    ``content_key`` of whatever determines the contents (a dataset fingerprint, a config, a
    tokenizer's cache key).
    """

    root: Path = attrs.field(converter=Path)
    kind: str = attrs.field(validator=_component)
    key: str = attrs.field(validator=_component)

    @property
    def path(self) -> Path:
        return self.root / self.kind / self.key

    def exists(self) -> bool:
        """True for a complete entry only (its ``meta.json`` is written last)."""
        return (self.path / META).is_file()

    def write(self) -> contextlib.AbstractContextManager[EntryWriter]:
        """``with entry.write() as w: w.save_tensors(...); w.set_meta(...)``: atomic, replaces
        an existing entry, leaves nothing behind on an exception."""
        return write_entry(self.path)

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / META).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"{self.path / META} is unreadable ({err}); delete {self.path} to rebuild it") from err

    def load_tensors(self, name: str, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        _check_filename(name)
        try:
            return load_file(str(self.path / name), device=str(device))
        except Exception as err:  # safetensors raises its own error types; the file name is what matters
            why = f"{type(err).__name__}: {err}"
            raise CacheError(f"{self.path / name} is unreadable ({why}); delete {self.path} to rebuild it") from err
