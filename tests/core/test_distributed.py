"""A 2-process gloo run equals a 1-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "train",
    "debug",
    "--set",
    "run.steps=4",
    "--set",
    "run.batch_size=16",
    "--set",
    "output.progress=false",
    "--set",
    "output.checkpoint_every=0",
    "--set",
    "run.threads=1",
]


def run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "selfflow", *ARGS, "--out", str(one)], env)
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "selfflow",
            *ARGS,
            "--out",
            str(two),
        ],
        env,
    )
    for part in ("model", "teacher", "objective"):
        a = load_file(str(one / "checkpoints" / "step_0000004" / f"{part}.safetensors"))
        b = load_file(str(two / "checkpoints" / "step_0000004" / f"{part}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=f"{part}.{k}")
    # and training did move the weights (the comparison is not between two initialisations)
    init = load_file(str(two / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in init.items() if "adaLN" in k)
