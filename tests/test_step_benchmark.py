"""The step benchmark's GPU columns, exercised on CPU: precision and compile rows, the memory
column (empty on CPU, with the process's peak RSS in the report), the peak's source."""

from __future__ import annotations

import json

import pytest
import torch

from selfflow.benchmarks import step


def test_quick_run_has_precision_compile_and_memory_columns(tmp_path):
    argv = ["--quick", "--methods", "vanilla", "--precision", "fp32", "bf16", "--compile", "off", "on"]
    argv += ["--compile-backend", "eager", "--warmup", "1", "--repeats", "1", "--no-progress", "--out", str(tmp_path)]
    argv += ["--results-md", str(tmp_path / "RESULTS.md")]
    assert step.main(argv) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    rows = report["rows"]
    assert [(r["precision"], r["compile"]) for r in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("bf16", False),
        ("bf16", True),
    ]
    assert all(r["peak_memory_mib"] is None for r in rows)  # CPU: no per-row allocator peak
    assert report["environment"]["peak_rss_mib"] > 0 and report["environment"]["device"] == "cpu"
    assert report["peak_source"] == "measured fp32 torch.mm"
    assert set(report["ratios"]) == {
        "vanilla fp32+compile speedup",
        "vanilla bf16 speedup",
        "vanilla bf16+compile speedup",
    }
    # the eager backend runs the same ops: the compiled fp32 row trained to the same loss
    assert rows[1]["last_loss"] == pytest.approx(rows[0]["last_loss"], abs=1e-6)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| precision | compile |" in md and "| peak memory |" in md and "fp32, fp32+compile, bf16" in md


def test_spec_peak_and_cuda_refusal(monkeypatch):
    assert step.spec_peak(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert step.spec_peak(torch.device("cuda")) == ("NVIDIA H100 80GB HBM3", 989_000.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert step.spec_peak(torch.device("cuda"))[1] == 756_000.0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            step.main(["--quick", "--device", "cuda"])
