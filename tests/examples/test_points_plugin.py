"""The worked third-party modality, as a user meets it: ``examples/selfflow-points`` installed
with pip into this environment (its entry point, no path tricks), then trained, sampled and
evaluated through the ``selfflow`` command in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "selfflow-points"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example (no dependencies: selfflow is this checkout) and remove it after;
    built from a copy, so the build leaves nothing in the checkout."""
    import shutil

    source = tmp_path_factory.mktemp("pkg") / "selfflow-points"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    done = _pip("install", "-q", "--no-deps", "--no-build-isolation", str(source))
    assert done.returncode == 0, done.stderr
    yield
    _pip("uninstall", "-q", "-y", "selfflow-points")


def _selfflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfflow", *args], capture_output=True, text=True, timeout=900, env=env)


def test_the_example_plugin_trains_samples_and_evaluates_through_the_cli(installed, tmp_path):
    import os

    env = {**os.environ, "SELFFLOW_CACHE": str(tmp_path / "cache"), "SELFFLOW_STRICT_PLUGINS": "1"}
    listing = _selfflow("plugins", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "points 0.1.0 (external, selfflow_points)" in listing.stdout
    for kind, name in [("datasets", "points/shapes"), ("tokenizers", "points/xy"), ("writers", "points"),
                       ("references", "points"), ("metrics", "points/on-shape"), ("runs", "points/shapes-selfflow")]:
        assert f"{kind}: {name}" in listing.stdout, (kind, name)

    run = tmp_path / "run"
    train = _selfflow("train", "points/shapes-selfflow", "--out", str(run), "--set", "run.steps=40",
                      "--set", "output.progress=false", "--set", "eval.num_samples=16", env=env)
    assert train.returncode == 0, train.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and "flow/points" in rows[-1]
    # the plugin's writer drew the samples; samples.html shows them
    assert (run / "samples.png").is_file() and (run / "samples" / "step_0000040.png").is_file()
    assert 'src="samples/step_0000040.png"' in (run / "samples.html").read_text()
    # eval.at_end ran the recipe's metrics: the plugin's own and the built-in fd through its reference network
    report = json.loads((run / "eval" / "eval_step_0000040.json").read_text())
    assert set(report["results"]) == {"points/on_shape", "points/fd"}
    assert report["protocol"]["reference_network"]["reference_accuracy"] > 0.9

    drawn = tmp_path / "drawn"
    sample = _selfflow("sample", str(run), "--n", "2", "--out", str(drawn), env=env)
    assert sample.returncode == 0, sample.stderr
    assert (drawn / "step_0000040.png").is_file() and (drawn / "samples.html").is_file()

    ev = _selfflow("eval", str(run), "--metric", "points/on-shape", "--samples", "16", "--real", env=env)
    assert ev.returncode == 0, ev.stderr
    ceiling = json.loads((run / "eval" / "eval_real_data.json").read_text())
    assert ceiling["results"]["points/on_shape"] < 0.05  # real sets lie on their outlines
