"""The plugin manager: built-in and third-party plugins through one path.

Plugins are found through the setuptools entry-point group ``selfflow`` (the built-ins are
listed there too, in ``pyproject.toml``). Load order is deterministic: built-ins in the order
below, then third-party plugins sorted by entry-point name.

Environment switches:

- ``SELFFLOW_DISABLE_PLUGINS=1``: load only the built-in plugins;
- ``SELFFLOW_BLOCK_PLUGINS=a,b``: skip the plugins with these names (built-ins included);
- ``SELFFLOW_STRICT_PLUGINS=1``: a plugin that fails to load or register, or registers a
  name another plugin already has, is an error instead of a warning.

Built-ins register first and keep their names: a later plugin's entry under a taken name is
refused (that entry only; the rest of the plugin registers), reported by the newcomer's name
and kept in its ``PluginInfo`` (``refused``, and ``error`` for ``selfflow plugins list``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pluggy

from selfflow.plugins import hookspecs

BUILTINS: dict[str, str] = {
    "samplers": "selfflow.plugins.samplers",
    "metrics": "selfflow.plugins.metrics",
    "image": "selfflow.plugins.image",
    "text": "selfflow.plugins.text",
    "recipes": "selfflow.plugins.recipes",
}
GROUP = "selfflow"


class PluginLoadError(RuntimeError):
    """A plugin failed to load or register (strict mode)."""


class PluginWarning(UserWarning):
    """A plugin failed to load or register and was skipped."""


@attrs.define
class PluginInfo:
    name: str
    module: str
    version: str
    builtin: bool
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    refused: list[str] = attrs.field(factory=list)  # one line per entry refused for a name clash
    error: str | None = None  # every failure and refusal, "; "-joined: what `selfflow plugins list` shows

    def note(self, text: str) -> None:
        self.error = text if not self.error else f"{self.error}; {text}"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _blocked() -> set[str]:
    return {p.strip() for p in os.environ.get("SELFFLOW_BLOCK_PLUGINS", "").split(",") if p.strip()}


class PluginHost:
    """Owns the ``pluggy.PluginManager`` and what each plugin did."""

    def __init__(self, *, strict: bool | None = None) -> None:
        self.strict = _flag("SELFFLOW_STRICT_PLUGINS") if strict is None else strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}

    def _fail(self, info: PluginInfo, what: str, err: BaseException) -> None:
        info.note(f"{what}: {type(err).__name__}: {err}")
        msg = f"selfflow plugin {info.name!r} ({info.module}) failed to {what}: {type(err).__name__}: {err}"
        if self.strict:
            raise PluginLoadError(msg + " (SELFFLOW_STRICT_PLUGINS is set)") from err
        warnings.warn(msg + "; skipped", PluginWarning, stacklevel=3)

    def _refuse(self, name: str, info: PluginInfo | None, kind: str, text: str) -> None:
        """``name``'s entry of ``kind`` was refused (``text``: which, and who keeps it)."""
        where = f" ({info.module})" if info is not None else ""
        msg = f"selfflow plugin {name!r}{where}: {text}"
        if info is not None:
            info.refused.append(text)
            info.note(f"register {kind}: {text}")
        if self.strict:
            raise PluginLoadError(
                f"{msg} (SELFFLOW_STRICT_PLUGINS is set); rename the entry in {name!r}, "
                f"block the plugin with SELFFLOW_BLOCK_PLUGINS={name}, or unset SELFFLOW_STRICT_PLUGINS"
            )
        warnings.warn(
            f"{msg}; its other entries are kept (rename it, or block the plugin with SELFFLOW_BLOCK_PLUGINS={name})",
            PluginWarning,
            stacklevel=3,
        )

    def add(self, name: str, load: Callable[[], Any], *, module: str, version: str, builtin: bool) -> None:
        """Load one plugin object and register it with pluggy."""
        info = PluginInfo(name=name, module=module, version=version, builtin=builtin)
        self.plugins[name] = info
        try:
            plugin = load()
            self.pm.register(plugin, name=name)
        except Exception as err:  # noqa: BLE001 - any failure of a plugin is reported by name
            self._fail(info, "load", err)

    def load_default(self) -> PluginHost:
        """Built-ins, then the entry points of installed packages (see module docstring)."""
        blocked = _blocked()
        version = importlib.metadata.version("selfflow") if _installed() else "dev"
        eps = [ep for ep in importlib.metadata.entry_points(group=GROUP)]
        by_name = {ep.name: ep for ep in eps}
        for name, module in BUILTINS.items():
            if name in blocked:
                continue
            ep = by_name.get(name)
            load = ep.load if ep is not None and ep.value == module else (lambda m=module: importlib.import_module(m))
            self.add(name, load, module=module, version=version, builtin=True)
        if not _flag("SELFFLOW_DISABLE_PLUGINS"):
            for ep in sorted(eps, key=lambda e: e.name):
                if ep.name in BUILTINS or ep.name in blocked:
                    continue
                dist = getattr(ep, "dist", None)
                self.add(ep.name, ep.load, module=ep.value, version=getattr(dist, "version", "?"), builtin=False)
        self.pm.check_pending()
        return self

    def call_register_hooks(self, registers: Mapping[str, Callable[[str], Any]]) -> None:
        """Call every ``selfflow_register_<kind>`` hook plugin by plugin.

        ``registers[kind](plugin_name)`` returns the register object handed to that plugin;
        it must have ``added: list[str]`` and may have ``refused: list[str]`` (entries it
        refused because an earlier plugin has the name: each is reported by this plugin's
        name, a warning or, strict, an error). A plugin whose hook raises is skipped (its
        entries of that kind stay as far as they got) with a warning naming it.
        """
        for kind, make_register in registers.items():
            hook = getattr(self.pm.hook, f"selfflow_register_{kind}")
            impls = {self.pm.get_name(impl.plugin): impl for impl in hook.get_hookimpls()}
            # load order, stated here rather than taken from pluggy's listing order: built-ins
            # first, so they keep their names and a clash is the newcomer's failure
            order = [n for n in self.plugins if n in impls] + [n for n in impls if n not in self.plugins]
            for name in order:
                impl = impls[name]
                info = self.plugins.get(name)
                register = make_register(name)
                failure: Exception | None = None
                try:
                    impl.function(register=register)
                except Exception as err:  # noqa: BLE001 - reported by name below
                    failure = err
                if info is not None and register.added:
                    info.registered.setdefault(kind, []).extend(register.added)
                for text in getattr(register, "refused", ()):
                    self._refuse(name, info, kind, text)
                if failure is not None:
                    if info is None:
                        raise failure
                    self._fail(info, f"register {kind}", failure)


def _installed() -> bool:
    try:
        importlib.metadata.version("selfflow")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
