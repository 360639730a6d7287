"""The benchmarks run end to end (their quick profiles) and write what they promise."""

from __future__ import annotations

import json

from selfflow.benchmarks import image_methods


def test_image_methods_quick_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "im"
    assert (
        image_methods.main(["--profile", "quick", "--methods", "flow-matching", "self-flow", "repa", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["flow-matching", "self-flow", "repa"]
    for r in data["runs"]:
        assert [row["step"] for row in r["rows"]] == [10, 20]
        assert {"class_accuracy", "fd", "kid_mean"} <= set(r["rows"][-1])
    md = (out / "results.md").read_text()
    assert "| self-flow | 20 |" in md and "ms/step" in md
    assert (out / "metrics.png").stat().st_size > 10_000

    # --from: the same checkpoints re-evaluated under another sampler setting, nothing trained
    again = tmp_path / "no-cfg"
    partial = tmp_path / "interrupted"  # holds step 10 only: skipped for the directory that has every step
    (partial / "flow-matching" / "seed0" / "checkpoints" / "step_0000010").mkdir(parents=True)
    assert (
        image_methods.main(
            [
                "--profile",
                "quick",
                "--methods",
                "flow-matching",
                "self-flow",
                "--from",
                str(partial),
                str(out),
                "--set",
                "sampler.cfg_scale=1",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    redo = json.loads((again / "results.json").read_text())["runs"]
    assert [r["method"] for r in redo] == ["flow-matching", "self-flow"]
    for r, first in zip(redo, data["runs"][:2]):
        assert r["protocol"]["cfg_scale"] == 1.0 and first["protocol"]["cfg_scale"] == 2.0
        assert (
            r["source"] == str(out)
            and r["ms_per_step"] == first["ms_per_step"]
            and [row["step"] for row in r["rows"]] == [10, 20]
        )
        assert not (again / r["method"] / "seed0" / "checkpoints").exists()  # evaluation writes no checkpoint
    assert "Re-evaluated (nothing trained)" in (again / "results.md").read_text()

    # without overrides, re-evaluating (the run built once, each checkpoint loaded into it)
    # reproduces the numbers measured during training
    same = tmp_path / "same"
    assert (
        image_methods.main(["--profile", "quick", "--methods", "self-flow", "--from", str(out), "--out", str(same)])
        == 0
    )
    (redo,) = json.loads((same / "results.json").read_text())["runs"]
    trained = data["runs"][1]
    assert trained["method"] == "self-flow"
    for a, b in zip(redo["rows"], trained["rows"], strict=True):
        assert {k: a[k] for k in ("step", "class_accuracy", "fd", "kid_mean")} == {
            k: b[k] for k in ("step", "class_accuracy", "fd", "kid_mean")
        }


def test_image_methods_aggregate_merges_parallel_invocations(tmp_path, monkeypatch):
    runs = [
        {
            "method": m,
            "seed": s,
            "rows": [
                {"step": 10, "class_accuracy": 0.5 + s / 10, "fd": 1.0 + s},
                {"step": 20, "class_accuracy": 0.6 + s / 10, "fd": 2.0 + s},
            ],
            "ms_per_step": 10.0 * (1 + (m == "self-flow")),
            "parameters": 1000,
            "protocol": {"sampler": "ode/euler", "sampler_options": {}, "cfg_scale": 1.0, "guidance_interval": [0, 1]},
        }
        for m in ("flow-matching", "self-flow")
        for s in (0, 1)
    ]
    for s in (0, 1):
        d = tmp_path / f"seed{s}"
        d.mkdir()
        (d / "runs.json").write_text(json.dumps([r for r in runs if r["seed"] == s]))
    out = tmp_path / "merged"
    assert (
        image_methods.main(
            [
                "--profile",
                "quick",
                "--methods",
                "flow-matching",
                "self-flow",
                "--seeds",
                "0",
                "1",
                "--aggregate",
                str(tmp_path / "seed0"),
                str(tmp_path / "seed1"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    agg = json.loads((out / "results.json").read_text())["aggregate"]
    mean, std = agg["table"]["self-flow"]["20"]["class_accuracy"]
    assert abs(mean - 0.65) < 1e-9 and abs(std - 0.0707106781) < 1e-6
    assert "| self-flow | 20 | 0.650 ± 0.071 | 2.500 ± 0.707 | 20 (2.00x) |" in (out / "results.md").read_text()
