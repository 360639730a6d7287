"""The contention benchmark's quick profile runs end to end: fresh processes, the old and new
OpenMP spin counts really in effect, and the report it promises."""

from __future__ import annotations

import json

from selfflow.benchmarks import contention


def test_contention_quick_profile(tmp_path):
    out = tmp_path / "contention"
    assert (
        contention.main(
            ["--quick", "--warmup", "0", "--variants", "old-default", "new-default", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    report = json.loads((out / "contention.json").read_text())
    assert report["command"].startswith("python -m selfflow.benchmarks.contention --quick")
    cells = report["summary"]["quiet"]
    assert set(cells) == {"old-default", "new-default"} and set(report["summary"]) == {"quiet"}
    for cell in cells.values():
        assert cell["ms"] > 0 and cell["threads"][0] >= 1
    spins = {name: cell["spin_count"] for name, cell in cells.items()}
    if spins["old-default"]:  # libgomp reported its settings (torch's OpenMP): the cells differ as promised
        assert spins == {"old-default": [300_000], "new-default": [10_000]}
    md = (out / "contention.md").read_text()
    assert "| torch's threads, 300,000 spins (old default) |" in md
    assert "- quiet: new-default / old-default = **" in md and "the acceptance check (must be <= 1.05)" in md
    assert [r["a"] for r in report["ratios"]] == ["new-default"]
