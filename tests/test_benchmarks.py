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


def test_methods_benchmark_takes_any_recipe_and_resumes(tmp_path, monkeypatch, capsys):
    """``selfflow bench methods --recipe``: the generic comparison on a registered recipe
    (``debug``), with the unguided row and the ceiling/floor rows; a second invocation into the
    same ``--out`` keeps the finished runs and trains only the missing ones."""
    from selfflow.benchmarks import methods

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m"
    common = ["--recipe", "debug", "--profile", "quick", "--samples", "20", "--out", str(out)]
    assert methods.main([*common, "--methods", "flow-matching"]) == 0
    first = json.loads((out / "runs.json").read_text())
    assert [r["method"] for r in first] == ["flow-matching"]
    (fm,) = first
    assert set(fm["bounds"]) == {"real_data", "reconstructions"}
    # debug tokenizes with image/patch, an exact round trip: the floor is the ceiling
    assert fm["bounds"]["real_data"] == fm["bounds"]["reconstructions"]
    assert {"class_accuracy", "fd", "kid_mean"} <= set(fm["unguided"]) and fm["protocol"]["cfg_scale"] == 1.5

    assert methods.main([*common, "--methods", "flow-matching", "self-flow"]) == 0
    assert "resuming: 1 finished run(s)" in capsys.readouterr().err
    runs = json.loads((out / "runs.json").read_text())
    assert [r["method"] for r in runs] == ["flow-matching", "self-flow"] and runs[0] == fm
    assert "bounds" not in runs[1]  # the bounds are the data's, measured once per seed
    md = (out / "results.md").read_text()
    assert "### debug methods, profile `quick`" in md and "| self-flow | 20 |" in md
    assert "Without guidance (cfg 1), step 20" in md
    assert "| tokenizer floor: held-out items through the tokenizer |" in md
    assert (out / "metrics.png").stat().st_size > 10_000


def test_methods_benchmark_refuses_a_recipe_it_cannot_score(tmp_path):
    import pytest

    from selfflow.benchmarks import methods

    with pytest.raises(SystemExit, match="no such file"):
        methods.main(["--recipe", str(tmp_path / "missing.toml")])
    with pytest.raises(SystemExit, match="the last evaluation must be at the last step"):
        methods.main(["--recipe", "debug", "--steps", "30", "--eval-at", "10", "20"])


def test_video_vae_speed_times_every_variant_against_the_default(capsys):
    from selfflow.benchmarks import video_vae_speed

    assert video_vae_speed.main(["--repeats", "2", "--batch", "1", "--frames", "5", "--size", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(video_vae_speed.VARIANTS)
    assert lines[1].split()[0] == "default" and lines[1].endswith("x1.00")
    assert all("s/step" in line and "M parameters" in line for line in lines[1:])
