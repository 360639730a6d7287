"""The plugin manager with a real third-party plugin installed through entry-point metadata."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from selfflow import cli
from selfflow.plugins import hookspecs
from selfflow.plugins.manager import BUILTINS, PluginLoadError, PluginWarning
from selfflow.registry import compose

TOY_PLUGIN = '''
"""A third-party modality: 'toy' vectors, tokenized one vector per token."""
import attrs
import torch
from selfflow.core.types import Segment, grid_positions
from selfflow.plugins import hookimpl
from selfflow.plugins.protocols import Example, MediaFile, MetricResult

CALLED = []


@attrs.frozen(kw_only=True)
class ToyDataConfig:
    size: int = 64
    tokens: int = 4
    channels: int = 3


class ToyData:
    modalities = ("toy",)
    num_classes = 2
    class_names = ("neg", "pos")

    def __init__(self, config, *, split, seed):
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        self.labels = torch.randint(0, 2, (config.size,), generator=g)
        sign = self.labels.float() * 2 - 1
        self.x = sign[:, None, None] + 0.1 * torch.randn(config.size, config.tokens, config.channels, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Example(media={"toy": self.x[i]}, label=int(self.labels[i]))

    def fingerprint(self):
        return "toy"


class ToyTokenizer:
    modality = "toy"
    mask_ratio = 0.5

    def __init__(self, config):
        self._channels = None

    @property
    def channels(self):
        return self._channels

    def fit(self, dataset, *, cache_dir=None, generator=None):
        self._channels = dataset[0].media["toy"].shape[-1]

    def cache_key(self):
        return None

    def encode(self, media):
        b, n, _ = media.shape
        return Segment(modality="toy", tokens=media, positions=grid_positions(1, 1, n, batch=b))

    def decode(self, segment):
        return segment.tokens


class ToyWriter:
    modality = "toy"

    def write(self, media, directory, *, stem, labels, title):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.txt"
        means = media.mean((1, 2)).tolist()
        path.write_text("; ".join(f"{l}: {v}" for l, v in zip(labels or [""] * len(media), means)))
        return [MediaFile(path=path, element="text", items=tuple(range(len(media))))]


class ToyMean:
    name = "mean"

    def __init__(self, context):
        self.sums = []

    def update(self, *, real=None, fake=None, labels=None):
        self.sums.append(float(fake.mean()))

    def compute(self):
        return [MetricResult(name=self.name, value=sum(self.sums) / len(self.sums))]


RUN = """
[run]
name = "toy/run"
steps = 6
batch_size = 8
[modalities.toy]
dataset = "toy/vectors"
tokenizer = "toy/identity"
[model]
preset = "tiny"
[output]
log_every = 2
"""


@hookimpl
def selfflow_register_tokenizers(register):
    CALLED.append("tokenizers")
    register.add("toy/identity", ToyTokenizer, None, "one vector per token")


@hookimpl
def selfflow_register_datasets(register):
    CALLED.append("datasets")
    register.add("toy/vectors", ToyData, ToyDataConfig, "two clusters of vectors")


@hookimpl
def selfflow_register_writers(register):
    CALLED.append("writers")
    register.add("toy", lambda config: ToyWriter(), None, "mean of each sample, as text")


@hookimpl
def selfflow_register_references(register):
    CALLED.append("references")
    register.add("toy", lambda config, *, context: None, None, "a placeholder reference entry")


@hookimpl
def selfflow_register_metrics(register):
    CALLED.append("metrics")
    register.add("toy/mean", lambda config, *, context: ToyMean(context), None, "mean of the samples")


@hookimpl
def selfflow_register_probes(register):
    CALLED.append("probes")
    register.add("toy/params", lambda config, *, context: (lambda model: []), None, "a placeholder probe")


@hookimpl
def selfflow_register_samplers(register):
    from selfflow.plugins.samplers import EulerSampler
    CALLED.append("samplers")
    register.add("toy/euler4", lambda config: EulerSampler(steps=4), None, "4-step Euler")


@hookimpl
def selfflow_register_runs(register):
    CALLED.append("runs")
    register.add("toy/run", lambda config: RUN, None, "toy run")
'''

BROKEN_PLUGIN = """
raise RuntimeError("this plugin is broken on purpose")
"""

BAD_REGISTER = """
from selfflow.plugins import hookimpl

@hookimpl
def selfflow_register_datasets(register):
    raise ValueError("cannot register today")
"""


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """A real distribution on sys.path: module + dist-info with an entry point."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[selfflow]\n{name} = {name}\n")
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for var in ("SELFFLOW_DISABLE_PLUGINS", "SELFFLOW_BLOCK_PLUGINS", "SELFFLOW_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    compose.default_registries.cache_clear()
    yield
    compose.default_registries.cache_clear()


def test_builtins_load_in_a_fixed_order():
    _, host = compose.load_registries()
    names = list(host.plugins)
    assert names[: len(BUILTINS)] == list(BUILTINS)
    assert all(host.plugins[n].builtin and host.plugins[n].error is None for n in BUILTINS)


def test_third_party_modality_trains_through_the_cli(tmp_path, monkeypatch, capsys):
    install(tmp_path, monkeypatch, "toyplug", TOY_PLUGIN)
    regs, host = compose.load_registries()
    import toyplug

    assert sorted(set(toyplug.CALLED)) == sorted(h.removeprefix("selfflow_register_") for h in hookspecs.HOOKS)
    assert host.plugins["toyplug"].registered["datasets"] == ["toy/vectors"]
    assert "toy/run" in regs.runs and regs.runs.get("toy/run").plugin == "toyplug"

    out = tmp_path / "run"
    assert cli.main(["train", "toy/run", "--out", str(out)]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(l)["step"] for l in lines] == [2, 4, 6]
    assert (out / "checkpoints" / "step_0000006" / "manifest.json").is_file()
    assert (out / "samples.txt").is_file() and "samples/step_0000006.txt" in (out / "samples.html").read_text()
    assert cli.main(["eval", str(out), "--metric", "toy/mean", "--samples", "8"]) == 0
    report = __import__("json").loads((out / "eval" / "eval_step_0000006.json").read_text())
    assert set(report["results"]) == {"toy/mean"}

    assert cli.main(["plugins", "list"]) == 0
    listing = capsys.readouterr().out
    assert "toyplug 0.1 (external, toyplug)" in listing and "datasets: toy/vectors" in listing


def test_disable_and_block_switches(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "toyplug", TOY_PLUGIN)
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGINS", "1")
    regs, host = compose.load_registries()
    assert "toyplug" not in host.plugins and "toy/run" not in regs.runs
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGINS")
    monkeypatch.setenv("SELFFLOW_BLOCK_PLUGINS", "toyplug, image")
    regs, host = compose.load_registries()
    assert "toyplug" not in host.plugins and "image" not in host.plugins
    assert "image/mnist" not in regs.datasets and "ode/euler" in regs.samplers


def test_a_broken_plugin_is_skipped_by_name_or_fatal_when_strict(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "brokenplug", BROKEN_PLUGIN)
    install(tmp_path, monkeypatch, "badregister", BAD_REGISTER)
    with pytest.warns(PluginWarning) as caught:
        regs, host = compose.load_registries()
    messages = " | ".join(str(w.message) for w in caught)
    assert "'brokenplug'" in messages and "broken on purpose" in messages
    assert "'badregister'" in messages and "register datasets" in messages
    assert host.plugins["brokenplug"].error and "image/mnist" in regs.datasets  # the rest still loaded

    monkeypatch.setenv("SELFFLOW_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="brokenplug"):
        compose.load_registries()


CLASHING = """
from selfflow.plugins import hookimpl

@hookimpl
def selfflow_register_datasets(register):
    register.add("image/mnist", lambda config, *, split, seed: None, None, "a clash with a built-in")
"""


def test_builtins_register_first_and_keep_their_names(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "clashplug", CLASHING)
    with pytest.warns(PluginWarning) as caught:
        regs, host = compose.load_registries()
    assert regs.datasets.get("image/mnist").plugin == "image"  # the built-in keeps its name ...
    assert {"image/digits", "image/folder", "image/glyphs"} <= set(regs.datasets.names())  # ... and the rest
    messages = " | ".join(str(w.message) for w in caught)
    assert "'clashplug'" in messages and "registered twice: by plugin 'image' and by plugin 'clashplug'" in messages
    assert host.plugins["image"].error is None and host.plugins["clashplug"].error


MIXED = """
from selfflow.plugins import hookimpl

@hookimpl
def selfflow_register_datasets(register):
    register.add("image/mnist", lambda config, *, split, seed: None, None, "a clash with the built-in image plugin")
    register.add("toy/other", lambda config, *, split, seed: None, None, "registered after the clash")

@hookimpl
def selfflow_register_runs(register):
    register.add("debug", lambda config: "", None, "a clash with the built-in recipes plugin")
    register.add("toy/mixed", lambda config: "", None, "registered after the clash")
"""


def test_a_clash_refuses_only_that_entry_and_names_the_newcomer(tmp_path, monkeypatch, capsys):
    baseline, _ = compose.load_registries()
    install(tmp_path, monkeypatch, "mixplug", MIXED)
    with pytest.warns(PluginWarning) as caught:
        regs, host = compose.load_registries()
    for kind, reg in baseline.kinds().items():  # every built-in entry stays, with its owner
        assert {e.name: e.plugin for e in regs.kinds()[kind] if e.plugin != "mixplug"} == {
            e.name: e.plugin for e in reg
        }, kind
    assert regs.datasets.get("image/mnist").plugin == "image" and regs.runs.get("debug").plugin == "recipes"
    assert regs.runs.get(compose.DEFAULT_RUN).plugin == "recipes"
    assert regs.datasets.get("toy/other").plugin == "mixplug" and regs.runs.get("toy/mixed").plugin == "mixplug"

    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all(m.startswith("selfflow plugin 'mixplug' (mixplug): ") for m in messages)
    assert "dataset 'image/mnist' is registered twice: by plugin 'image' and by plugin 'mixplug'" in messages[0]
    assert "run 'debug' is registered twice: by plugin 'recipes' and by plugin 'mixplug'" in messages[1]
    assert all("'mixplug' keeps" not in m and "SELFFLOW_BLOCK_PLUGINS=mixplug" in m for m in messages)
    info = host.plugins["mixplug"]
    assert info.registered == {"datasets": ["toy/other"], "runs": ["toy/mixed"]}
    assert len(info.refused) == 2 and "image/mnist" in info.refused[0] and "'debug'" in info.refused[1]
    assert info.error and "register datasets: dataset 'image/mnist'" in info.error and "run 'debug'" in info.error
    assert all(host.plugins[n].error is None and not host.plugins[n].refused for n in BUILTINS)

    with pytest.warns(PluginWarning):
        assert cli.main(["plugins", "list"]) == 0
    blocks: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():  # "NAME VERSION (...)" then indented lines
        if not line.startswith(" "):
            blocks[line.split()[0]] = []
        else:
            blocks[list(blocks)[-1]].append(line.strip())
    assert not any(line.startswith("ERROR") for line in blocks["image"] + blocks["recipes"])  # never the built-in
    assert "datasets: toy/other" in blocks["mixplug"]
    assert any(line.startswith("ERROR: register datasets: dataset 'image/mnist'") for line in blocks["mixplug"])


def test_strict_mode_makes_a_clash_the_newcomers_error(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "mixplug", MIXED)
    monkeypatch.setenv("SELFFLOW_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError) as err:
        compose.load_registries()
    message = str(err.value)
    assert message.startswith("selfflow plugin 'mixplug' (mixplug): dataset 'image/mnist' is registered twice")
    assert "SELFFLOW_STRICT_PLUGINS is set" in message and "SELFFLOW_BLOCK_PLUGINS=mixplug" in message
    assert "\n" not in message and "plugin 'image' failed" not in message
    # strict mode has nothing to report without the newcomer: the built-ins never clash
    monkeypatch.setenv("SELFFLOW_BLOCK_PLUGINS", "mixplug")
    regs, host = compose.load_registries()
    assert regs.datasets.get("image/mnist").plugin == "image" and "mixplug" not in host.plugins


def test_every_hookspec_is_documented():
    for name in hookspecs.HOOKS:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
    declared = {n for n in dir(hookspecs) if n.startswith("selfflow_register_")}
    assert declared == set(hookspecs.HOOKS)
