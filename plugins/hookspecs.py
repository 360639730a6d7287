"""The hooks a selfflow plugin implements.

A plugin is a module or object with functions marked ``@selfflow.plugins.hookimpl`` whose
names are the hooks below; it is found through the setuptools entry-point group
``selfflow`` (the built-in plugins are listed there too). Every hook receives one keyword
argument, ``register``, and adds entries with

    register.add(name, factory, config_cls=None, doc="")

- ``name``: ``"modality/name"`` (unique across all plugins; a clash names both plugins);
- ``factory(config, **context)``: builds the object; ``config`` is an instance of
  ``config_cls`` validated from the run's TOML table (``None`` when ``config_cls`` is None);
- ``config_cls``: a frozen attrs class whose fields are the entry's options;
- ``doc``: one line shown by ``selfflow registry show`` and ``selfflow plugins list``.

Hooks return nothing; they are called once per plugin manager, in the plugins' load order
(built-ins first, then third-party plugins sorted by name). A plugin that raises is skipped
with a warning that names it (``SELFFLOW_STRICT_PLUGINS=1`` makes that fatal).
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "selfflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def selfflow_register_tokenizers(register: Any) -> None:
    """Add tokenizers: media <-> ``Segment`` (see ``plugins.protocols.Tokenizer``).

    ``factory(config, **context)`` returns a tokenizer; ``context`` may hold ``modality``
    options the run gives. Called once, with ``register`` bound to the calling plugin.
    """


@hookspec
def selfflow_register_datasets(register: Any) -> None:
    """Add datasets (see ``plugins.protocols.Dataset``).

    ``factory(config, *, split, seed)`` returns a map-style dataset of ``Example``s for
    ``split`` in {"train", "eval"}; the split must be deterministic given ``seed``.
    """


@hookspec
def selfflow_register_metrics(register: Any) -> None:
    """Add metrics (see ``plugins.protocols.Metric``).

    ``factory(config, **context)`` returns a metric; ``context`` holds ``dataset`` (the
    run's eval dataset), ``tokenizer``, ``device`` and ``cache_dir`` when the run has them.
    """


@hookspec
def selfflow_register_samplers(register: Any) -> None:
    """Add samplers: callables ``sampler(velocity_fn, template, *, generator) -> TokenBatch``
    (see ``plugins.samplers.Sampler``). ``factory(config)`` returns one."""


@hookspec
def selfflow_register_runs(register: Any) -> None:
    """Add run recipes.

    ``factory(None)`` returns the run's TOML text (a ``str``), parsed and validated like a
    user's ``--config`` file; ``config_cls`` is ``None``. Built-in recipes live in
    ``registry/runs/*.toml``.
    """


HOOKS = (
    "selfflow_register_tokenizers",
    "selfflow_register_datasets",
    "selfflow_register_metrics",
    "selfflow_register_samplers",
    "selfflow_register_runs",
)
