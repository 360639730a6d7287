"""Typed registries: name -> entry (factory, config class, one-line doc, the plugin that added it).

Names are namespaced ``modality/name`` (``image/patch``, ``audio/encodec``). A duplicate
name raises and names both plugins (through a plugin's ``Register`` the later one's entry is
refused instead, and the rest of that plugin stays); an unknown name raises and lists the
closest matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate registry name. ``str()`` is the message (not its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The closest matches of ``name`` among ``candidates`` (also by the part after ``/``)."""
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(found) < n:
        tail = name.rsplit("/", 1)[-1]
        for c in candidates:
            if c not in found and (c.rsplit("/", 1)[-1] == tail or tail in c):
                found.append(c)
    return found[:n]


@attrs.frozen(kw_only=True)
class Entry(Generic[T]):
    """``factory(config, **context) -> T``; ``config_cls`` is an attrs class (or ``None``
    when the entry takes no options); ``plugin`` is the name of the plugin that added it."""

    name: str
    factory: Callable[..., T]
    config_cls: type | None
    doc: str
    plugin: str


class Registry(Generic[T]):
    """Entries of one kind (``tokenizer``, ``dataset``, ``metric``, ``sampler``, ``run``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(
        self, name: str, factory: Callable[..., T], config_cls: type | None = None, doc: str = "", *, plugin: str
    ) -> None:
        if not name or name != name.strip() or " " in name:
            raise ValueError(f"{self.kind} name {name!r} is not valid: use 'modality/name' without spaces")
        if config_cls is not None and not attrs.has(config_cls):
            raise TypeError(f"{self.kind} {name!r}: config_cls must be an attrs class, got {config_cls!r}")
        if name in self._entries:
            raise RegistryError(
                f"{self.clash(name, plugin)}; rename one of them or block a plugin with SELFFLOW_BLOCK_PLUGINS"
            )
        self._entries[name] = Entry(name=name, factory=factory, config_cls=config_cls, doc=doc.strip(), plugin=plugin)

    def clash(self, name: str, plugin: str) -> str:
        """What is wrong when ``plugin`` adds ``name`` a second time (``name`` must be registered)."""
        owner = self._entries[name].plugin
        return f"{self.kind} {name!r} is registered twice: by plugin {owner!r} and by plugin {plugin!r}"

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            near = closest(name, list(self._entries))
            hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}{hint} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def build(self, name: str, options: dict[str, Any] | None = None, **context: Any) -> T:
        """Instantiate ``name`` with ``options`` validated by its config class."""
        entry = self.get(name)
        options = dict(options or {})
        if entry.config_cls is None:
            if options:
                raise ValueError(f"{self.kind} {name!r} takes no options, got {sorted(options)}")
            return entry.factory(None, **context)
        from selfflow.registry.structuring import structure  # validated, with key-naming errors

        config = structure(entry.config_cls, options, where=f"{self.kind} {name!r}")
        return entry.factory(config, **context)


@attrs.define
class Register:
    """Handed to a plugin's hook: ``register.add(name, factory, config_cls, doc)`` adds an
    entry attributed to that plugin. Nothing registers itself on import.

    A name another plugin registered earlier is *refused*, not raised: the earlier plugin keeps
    it (built-ins register first, so a built-in always keeps its names), ``refused`` records
    one line per refused entry, and the hook carries on, so one clash never costs the plugin
    its other entries. The plugin manager reports each refusal by the newcomer's name (a
    warning, or an error in strict mode)."""

    registry: Registry[Any]
    plugin: str
    added: list[str] = attrs.field(factory=list)
    refused: list[str] = attrs.field(factory=list)

    def add(self, name: str, factory: Callable[..., Any], config_cls: type | None = None, doc: str = "") -> None:
        if name in self.registry:
            owner = self.registry.get(name).plugin
            self.refused.append(f"{self.registry.clash(name, self.plugin)}; {owner!r} keeps it, this entry was refused")
            return
        self.registry.add(name, factory, config_cls, doc, plugin=self.plugin)
        self.added.append(name)


@attrs.define
class Registries:
    """All registries of one plugin manager, one per hook (``plugins/hookspecs.py``)."""

    tokenizers: Registry[Any] = attrs.field(factory=lambda: Registry("tokenizer"))
    datasets: Registry[Any] = attrs.field(factory=lambda: Registry("dataset"))
    writers: Registry[Any] = attrs.field(factory=lambda: Registry("writer"))
    references: Registry[Any] = attrs.field(factory=lambda: Registry("reference network"))
    metrics: Registry[Any] = attrs.field(factory=lambda: Registry("metric"))
    probes: Registry[Any] = attrs.field(factory=lambda: Registry("probe"))
    samplers: Registry[Any] = attrs.field(factory=lambda: Registry("sampler"))
    runs: Registry[Any] = attrs.field(factory=lambda: Registry("run"))

    def kinds(self) -> dict[str, Registry[Any]]:
        """Hook suffix -> registry (``selfflow_register_<kind>``)."""
        return {
            "tokenizers": self.tokenizers,
            "datasets": self.datasets,
            "writers": self.writers,
            "references": self.references,
            "metrics": self.metrics,
            "probes": self.probes,
            "samplers": self.samplers,
            "runs": self.runs,
        }

    def measure(self, name: str) -> tuple[str, Entry[Any]]:
        """A metric or probe by name: ``("metrics" | "probes", entry)``. The two kinds share
        one name space (``--metric NAME`` finds either); a name in both is an error."""
        in_metrics, in_probes = name in self.metrics, name in self.probes
        if in_metrics and in_probes:
            raise RegistryError(
                f"{name!r} is registered both as a metric (plugin {self.metrics.get(name).plugin!r}) and as a "
                f"probe (plugin {self.probes.get(name).plugin!r}); rename one of them"
            )
        if in_probes:
            return "probes", self.probes.get(name)
        if in_metrics:
            return "metrics", self.metrics.get(name)
        candidates = self.metrics.names() + self.probes.names()
        near = closest(name, candidates)
        hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
        extra = ""
        if name in self.references or name.rsplit("/", 1)[0] in self.references:
            extra = (
                " (a reference network is not a metric: it is what fd, kid and class-accuracy measure with; "
                "pick it with [modalities.NAME] reference = ...)"
            )
        raise RegistryError(f"unknown metric {name!r}{hint}{extra} (known: {', '.join(sorted(candidates)) or 'none'})")
