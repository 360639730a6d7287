"""The ``selfflow`` command: one clear line per error, the listing commands, sampling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from selfflow import cli


def test_errors_are_one_line_and_a_hint(capsys):
    assert cli.main(["registry", "show", "image/mnsit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "did you mean 'image/mnist'" in err[0]
    assert err[1].startswith("hint: ")

    assert cli.main(["train", "debug", "--set", "objective.gama=1"]) == 2
    err = capsys.readouterr().err
    assert "'objective.gama': unknown key; did you mean 'objective.gamma'" in err and "Traceback" not in err

    assert cli.main(["train", "imag/mnist-selfflow"]) == 2
    assert "did you mean 'image/mnist-selfflow'" in capsys.readouterr().err

    assert cli.main(["sample", "/nonexistent/run"]) == 2
    assert "no selfflow checkpoint" in capsys.readouterr().err


def test_listings(capsys):
    assert cli.main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("image/mnist-selfflow", "image/mnist-fm", "debug"):
        assert name in out
    assert cli.main(["registry", "show", "image/patch"]) == 0
    out = capsys.readouterr().out
    assert "from plugin 'image'" in out and "patch: int (default 4)" in out
    assert cli.main(["registry", "show", "debug"]) == 0
    assert "[modalities.image]" in capsys.readouterr().out


def test_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(["train", "debug", "--out", str(out), "--set", "run.steps=4", "--set", "output.progress=false"]) == 0
    )
    for name in ("config.toml", "metrics.jsonl", "loss.png", "samples.png", "summary.md"):
        assert (out / name).is_file(), name
    assert (out / "samples.html").is_file() and "samples/step_0000004.png" in (out / "samples.html").read_text()
    where = tmp_path / "drawn"
    assert cli.main(["sample", str(out), "--labels", "3,7", "--n", "2", "--steps", "4", "--out", str(where)]) == 0
    img = np.asarray(Image.open(where / "step_0000004.png"))
    assert img.ndim == 3 and img.shape[0] > 2 * 8  # two labelled rows of samples
    page = (where / "samples.html").read_text()
    assert 'src="step_0000004.png"' in page and "ode/euler" in page
    assert cli.main(["sample", str(out), "--labels", "12"]) == 2
    assert "outside 0..9" in capsys.readouterr().err
    assert cli.main(["sample", str(out), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "selfflow", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "registry" in out.stdout


def test_eval_writes_numbers_with_their_protocol(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert (
        cli.main(["train", "debug", "--out", str(out), "--set", "run.steps=2", "--set", "output.progress=false"]) == 0
    )
    assert cli.main(["eval", str(out), "--samples", "30", "--metric", "class-accuracy", "--metric", "fd"]) == 0
    report = json.loads((out / "eval" / "eval_step_0000002.json").read_text())
    assert set(report["results"]) == {"image/class_accuracy", "image/fd"}
    assert 0.0 <= report["results"]["image/class_accuracy"] <= 1.0 and report["results"]["image/fd"] > 0
    assert report["protocol"]["metrics"] == [
        {"name": "class-accuracy", "modality": None, "options": {}},
        {"name": "fd", "modality": None, "options": {}},
    ]
    proto = report["protocol"]
    assert proto["num_samples"] == 30 and proto["sampler"] == "ode/euler" and proto["cfg_scale"] == 1.5
    assert proto["reference_network"]["reference_accuracy"] > 0.8  # the 8x8 digits classifier
    recorded = (out / "config.toml").read_text()
    assert (
        cli.main(["eval", str(out), "--samples", "10", "--metric", "fd", "--sampler", "ode/heun", "--steps", "3"]) == 0
    )
    assert (
        out / "config.toml"
    ).read_text() == recorded  # evaluating with another sampler rewrites nothing the run recorded
    # each protocol has its own report (eval_step_N-<protocol hash>); eval_step_N is the latest
    keyed = sorted((out / "eval").glob("eval_step_0000002-*.json"))
    assert len(keyed) == 2 and {json.loads(p.read_text())["protocol"]["sampler"] for p in keyed} == {
        "ode/euler",
        "ode/heun",
    }
    assert json.loads((out / "eval" / "eval_step_0000002.json").read_text())["protocol"]["sampler"] == "ode/heun"
    # the ceiling (--real) and the tokenizer's floor (--reconstructions): debug's image/patch is an exact round
    # trip, so its reconstructions score what the real items score, to the last bit
    two = ["--samples", "30", "--metric", "class-accuracy", "--metric", "fd"]
    assert cli.main(["eval", str(out), *two, "--real"]) == 0
    assert cli.main(["eval", str(out), *two, "--reconstructions"]) == 0
    real = json.loads((out / "eval" / "eval_real_data.json").read_text())
    recon = json.loads((out / "eval" / "eval_reconstructions.json").read_text())
    assert recon["results"] == real["results"] and set(real["results"]) == {"image/class_accuracy", "image/fd"}
    assert recon["protocol"]["model"].startswith("none: real held-out items passed through the tokenizer")
    assert recon["protocol"]["tokenizer"] == "image/patch" and recon["protocol_key"] != real["protocol_key"]
    # --device cpu: the same protocol as the first evaluation above, so the same key and numbers
    assert cli.main(["eval", str(out), *two, "--device", "cpu", "--out", str(tmp_path / "on-cpu")]) == 0
    on_cpu = json.loads((tmp_path / "on-cpu" / "eval_step_0000002.json").read_text())
    first = json.loads((out / "eval" / f"eval_step_0000002-{on_cpu['protocol_key']}.json").read_text())
    assert on_cpu["results"] == first["results"] == report["results"]
    assert cli.main(["eval", str(out), "--real", "--reconstructions"]) == 2
    assert "--real and --reconstructions exclude each other" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--metric", "fid"]) == 2
    assert "did you mean 'fd'" in capsys.readouterr().err
    # a reference network is not a metric: a clear error, not a crash
    assert cli.main(["eval", str(out), "--metric", "image/reference"]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown metric 'image/reference'" in err
        and "reference network is not a metric" in err
        and "Traceback" not in err
    )
    assert cli.main(["eval", str(out), "--metric", "fd@audio"]) == 2
    assert "modality 'audio' is not generated by the run; choose one of ['image']" in capsys.readouterr().err


def test_eval_of_a_text_conditioned_run_knows_the_words(tmp_path, monkeypatch):
    """Text-to-image (``image/glyphs`` + ``text/chars``): evaluation conditions sample i on
    the text of a real item of class i mod K, so legibility reads each against its word."""
    import json
    import shutil

    import pytest

    if shutil.which("tesseract") is None:
        pytest.skip("tesseract is not installed (apt-get install tesseract-ocr)")
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "glyphs"
    tiny = [
        "run.steps=2",
        "run.batch_size=8",
        "output.progress=false",
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "streams[0].dataset_options={size = 32, channels = 1, num_train = 40, num_eval = 20}",
    ]
    assert (
        cli.main(["train", "image/glyphs-selfflow", "--out", str(out), *[a for o in tiny for a in ("--set", o)]]) == 0
    )
    assert cli.main(["eval", str(out), "--samples", "20", "--metric", "image/legibility"]) == 0
    report = json.loads((out / "eval" / "eval_step_0000002.json").read_text())
    assert set(report["results"]) == {"image/legibility/word_accuracy", "image/legibility/char_accuracy"}
    assert report["details"]["image/legibility/word_accuracy"]["num_images"] == 20
    assert 0.0 <= report["results"]["image/legibility/char_accuracy"] <= 1.0
    assert "conditioned on a real item of its class (text)" in report["protocol"]["labels"]
    # --real: the same metric on real held-out renders, the ceiling the samples are read against
    assert cli.main(["eval", str(out), "--samples", "20", "--metric", "image/legibility", "--real"]) == 0
    ceiling = json.loads((out / "eval" / "eval_real_data.json").read_text())
    assert ceiling["results"]["image/legibility/word_accuracy"] >= 0.85  # measured 0.95 on these 20 (tesseract 5.3.0)
    assert ceiling["protocol"]["model"].startswith("none: real held-out items")
