"""The hooks a selfflow plugin implements.

A plugin is a module or object with functions marked ``@selfflow.plugins.hookimpl`` whose
names are the hooks below; it is found through the setuptools entry-point group
``selfflow`` (the built-in plugins are listed there too). Every hook receives one keyword
argument, ``register`` (``plugins.protocols.Register``), and adds entries with

    register.add(name, factory, config_cls=None, doc="")

- ``name``: unique per kind across all plugins (a clash names both plugins): datasets,
  tokenizers, metrics, probes and samplers are namespaced ``"modality/name"``; writers are
  keyed by the modality they write; references by a name the run picks per modality
  (the entry named after the modality is its default);
- ``factory(config, ...)``: builds the object, called as each hook states; ``config`` is an
  instance of ``config_cls`` validated from the run's TOML table (``None`` when
  ``config_cls`` is None);
- ``config_cls``: a frozen attrs class whose fields are the entry's options;
- ``doc``: one line shown by ``selfflow registry show`` and ``selfflow plugins list``.

Hooks return nothing; they are called once per plugin manager, in the plugins' load order
(built-ins first, then third-party plugins sorted by name). A plugin that raises is skipped
with a warning that names it (``SELFFLOW_STRICT_PLUGINS=1`` makes that fatal).
"""

from __future__ import annotations

import pluggy

from selfflow.plugins.protocols import Register

PROJECT = "selfflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def selfflow_register_tokenizers(register: Register) -> None:
    """Add tokenizers: media of one modality <-> ``Segment`` (``protocols.Tokenizer``).

    ``factory(config)`` returns a tokenizer; the run's ``[modalities.NAME]`` table names it
    and gives its options (``tokenizer_options``).
    """


@hookspec
def selfflow_register_datasets(register: Register) -> None:
    """Add datasets (``protocols.Dataset``): items whose ``media`` maps modality -> medium.

    ``factory(config, *, split, seed)`` returns a map-style dataset of ``Example``s for
    ``split`` in {"train", "eval"}; the split must be deterministic given ``seed``. A
    ``[[streams]]`` table of the run names it.
    """


@hookspec
def selfflow_register_writers(register: Register) -> None:
    """Add media writers (``protocols.MediaWriter``), one per modality: ``name`` is the
    modality (``"image"``), ``factory(config)`` returns the writer.

    Sampling during training, ``selfflow sample`` and ``samples.html`` write every generated
    modality through its writer; a run that samples a modality with no writer is refused
    when it is built.
    """


@hookspec
def selfflow_register_references(register: Register) -> None:
    """Add reference feature networks (``protocols.FeatureNetwork``) for a modality.

    ``factory(config, *, context)`` with ``context`` a ``protocols.ReferenceContext``
    returns the network (trained on ``context.train_dataset`` or loaded from a local file;
    never downloaded). The entry named after a modality (``"image"``) is its default; a run
    picks another with ``[modalities.NAME] reference = "..."`` (``reference_options``).
    Media metrics (FD, KID, class accuracy) and REPA-style alignment use it.
    """


@hookspec
def selfflow_register_metrics(register: Register) -> None:
    """Add media metrics (``protocols.MediaMetric``): they compare generated media of one
    modality with real media.

    ``factory(config, *, context)`` with ``context`` a ``protocols.MetricContext`` returns a
    metric; ``[[eval.metrics]]`` or ``selfflow eval --metric`` names it.
    """


@hookspec
def selfflow_register_probes(register: Register) -> None:
    """Add model probes (``protocols.ModelProbe``): they measure the generator itself.

    ``factory(config, *, context)`` with ``context`` a ``protocols.MetricContext`` returns a
    probe, called as ``probe(model)``; named like a metric (names are unique across
    metrics and probes).
    """


@hookspec
def selfflow_register_samplers(register: Register) -> None:
    """Add samplers: callables ``sampler(velocity_fn, template, *, generator) -> TokenBatch``
    (see ``plugins.samplers.Sampler``). ``factory(config)`` returns one."""


@hookspec
def selfflow_register_runs(register: Register) -> None:
    """Add run recipes.

    ``factory(None)`` returns the run's TOML text (a ``str``), parsed and validated like a
    user's ``--config`` file; ``config_cls`` is ``None``. Built-in recipes live in
    ``registry/runs/*.toml``.
    """


HOOKS = (
    "selfflow_register_tokenizers",
    "selfflow_register_datasets",
    "selfflow_register_writers",
    "selfflow_register_references",
    "selfflow_register_metrics",
    "selfflow_register_probes",
    "selfflow_register_samplers",
    "selfflow_register_runs",
)
