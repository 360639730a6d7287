"""The benchmarks run end to end (their quick profiles) and write what they promise."""

from __future__ import annotations

import json

from selfflow.benchmarks import image_methods


def test_image_methods_quick_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "im"
    assert image_methods.main(["--profile", "quick", "--methods", "flow-matching", "self-flow", "repa",
                               "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["flow-matching", "self-flow", "repa"]
    for r in data["runs"]:
        assert [row["step"] for row in r["rows"]] == [10, 20]
        assert {"class_accuracy", "fd", "kid_mean"} <= set(r["rows"][-1])
    md = (out / "results.md").read_text()
    assert "| self-flow | 20 |" in md and "ms/step" in md
    assert (out / "metrics.png").stat().st_size > 10_000
