"""The built-in ``recipes`` plugin: every ``registry/runs/*.toml`` file is a run, named by its
``[run] name``."""

from __future__ import annotations

import functools
import importlib.resources
import tomllib

from selfflow.plugins.hookspecs import hookimpl


def _recipes() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted(importlib.resources.files("selfflow.registry").joinpath("runs").iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".toml"):
            continue
        text = f.read_text()
        name = tomllib.loads(text).get("run", {}).get("name", f.name[:-5])
        first = text.splitlines()[0].lstrip("# ").strip() if text.startswith("#") else ""
        out.append((name, text, first))
    return out


def _text(text: str, config: None) -> str:
    return text


@hookimpl
def selfflow_register_runs(register) -> None:
    for name, text, doc in _recipes():
        register.add(name, functools.partial(_text, text), None, doc)
