"""The plugin manager: built-in and third-party plugins through one path.

Plugins are found through the setuptools entry-point group ``selfflow`` (the built-ins are
listed there too, in ``pyproject.toml``). Load order is deterministic: built-ins in the order
below, then third-party plugins sorted by entry-point name.

Environment switches:

- ``SELFFLOW_DISABLE_PLUGINS=1``: load only the built-in plugins;
- ``SELFFLOW_BLOCK_PLUGINS=a,b``: skip the plugins with these names (built-ins included);
- ``SELFFLOW_STRICT_PLUGINS=1``: a plugin that fails to load or register is an error
  instead of a warning.
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
    error: str | None = None


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
        info.error = f"{what}: {type(err).__name__}: {err}"
        msg = f"selfflow plugin {info.name!r} ({info.module}) failed to {what}: {type(err).__name__}: {err}"
        if self.strict:
            raise PluginLoadError(msg + " (SELFFLOW_STRICT_PLUGINS is set)") from err
        warnings.warn(msg + "; skipped", PluginWarning, stacklevel=3)

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
        it must have ``added: list[str]``. A plugin whose hook raises is skipped (its
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
                try:
                    impl.function(register=register)
                except Exception as err:
                    if info is not None:
                        self._fail(info, f"register {kind}", err)
                    else:
                        raise
                if info is not None and register.added:
                    info.registered.setdefault(kind, []).extend(register.added)


def _installed() -> bool:
    try:
        importlib.metadata.version("selfflow")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
