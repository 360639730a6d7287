"""Sharded checkpoints (FSDP2, ``torch.distributed.checkpoint``) across world sizes.

A 2-process FSDP run checkpoints at step 20; resumed on 1 and on 3 processes it reaches the
step-40 weights, teacher, projector, optimiser moments and data position of an uninterrupted
1-process run (to 1e-5: only the float reduction order differs). The shards are safetensors
with JSON headers (DCP's pickled ``.metadata`` is never written, and one is refused), every
file is in the manifest, and ``selfflow checkpoint export`` writes the format-1 checkpoint
that samples on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow.core.checkpoint import CheckpointError, load_weights, read_sharded, verify

ARGS = [
    "train",
    "debug",
    "--set",
    "run.steps=40",
    "--set",
    "run.batch_size=12",  # divisible by 1, 2 and 3 processes
    "--set",
    "run.parallel=fsdp",
    "--set",
    "output.progress=false",
    "--set",
    "output.samples=false",
    "--set",
    "output.checkpoint_every=20",
    "--set",
    "run.threads=1",
    # attention's key bias has a zero gradient in exact arithmetic: its gradient is rounding
    # noise, which AdamW with eps 1e-8 turns into lr-sized steps that differ with the reduction
    # order (1e-4 after 40 steps); eps 1e-6 keeps that noise below the comparison's 1e-5
    "--set",
    "optimizer.eps=1e-6",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _selfflow(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "selfflow"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launch += ["-m", "selfflow"]
    out = subprocess.run([*launch, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _assert_same(a: Path, b: Path) -> None:
    for part in ("model", "teacher", "objective", "optimizer"):
        x, y = load_weights(a, part), load_weights(b, part)
        assert x.keys() == y.keys(), part
        for k in x:
            torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=f"{part}.{k}": f"{k}: {m}")
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["step"] == sb["step"]
    assert sa["data_position"] == sb["data_position"]
    assert sa["lr_schedule"] == sb["lr_schedule"]
    # the training generator is global: every rank of every run holds the same state
    gens = {tuple(r["generator"]) for s in (sa, sb) for r in s["rng"]}
    assert len(gens) == 1


@pytest.mark.slow
def test_save_on_two_resume_on_one_and_three_equals_forty_steps(tmp_path):
    ref, two = tmp_path / "ref", tmp_path / "two"
    _selfflow([*ARGS, "--out", str(ref)])  # 40 steps, one process
    _selfflow([*ARGS, "--out", str(two)], nproc=2)  # 40 steps on 2 ranks, a checkpoint at 20
    half = _step(two, 20)
    state = json.loads((half / "state.json").read_text())
    assert state["format"] == 2 and state["world"] == 2 and len(state["rng"]) == 2
    shards = sorted(p.name for p in (half / "shards").iterdir())
    assert shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    manifest = json.loads((half / "manifest.json").read_text())
    assert {f"shards/{n}" for n in shards} | {"state.json"} == set(manifest["sha256"])
    _assert_same(_step(ref, 40), _step(two, 40))
    for n in (1, 3):  # 20 steps, resume on another world size, 20 more
        out = tmp_path / f"resumed{n}"
        _selfflow(["train", "--resume", str(half), "--out", str(out)], nproc=n)
        _assert_same(_step(ref, 40), _step(out, 40))
    # exported for one machine: whole tensors, the same numbers, and it samples
    exported = tmp_path / "exported"
    _selfflow(["checkpoint", "export", str(_step(two, 40)), "--out", str(exported)])
    ckpt = _step(exported, 40)
    assert json.loads((ckpt / "state.json").read_text())["format"] == 1
    for part in ("model", "teacher", "objective"):
        x, y = read_sharded(_step(two, 40), part), load_weights(ckpt, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    _selfflow(["sample", str(exported), "--n", "4"])
    assert any((exported / "samples-cli").glob("*.png"))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> Path:
    """A format-2 checkpoint of one process (run.parallel = 'fsdp' writes shards on any world size)."""
    run = tmp_path_factory.mktemp("dcp") / "run"
    args = [a if a != "run.steps=40" else "run.steps=2" for a in ARGS]
    _selfflow([*args, "--out", str(run)])
    return _step(run, 2)


def test_a_sharded_checkpoint_is_safetensors_and_json_only(sharded_checkpoint):
    names = sorted(p.relative_to(sharded_checkpoint).as_posix() for p in sharded_checkpoint.rglob("*") if p.is_file())
    assert names == ["manifest.json", "shards/shard-00001-model-00001-of-00001.safetensors", "state.json"]
    verify(sharded_checkpoint)


def test_a_pickled_dcp_metadata_file_is_refused(sharded_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "step_0000002"
    shutil.copytree(sharded_checkpoint, copy)
    (copy / "shards" / ".metadata").write_bytes(b"\x80\x04N.")  # what DCP's default writer leaves: a pickle
    with pytest.raises(CheckpointError, match=r"\.metadata is a pickle-based file"):
        verify(copy)


def test_an_edited_shard_is_refused_by_name(sharded_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "step_0000002"
    shutil.copytree(sharded_checkpoint, copy)
    shard = next((copy / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its sha256"):
        load_weights(copy, "teacher")


def test_export_refuses_to_overwrite(sharded_checkpoint, tmp_path):
    from selfflow.core.checkpoint import export_checkpoint

    final = export_checkpoint(sharded_checkpoint, tmp_path / "out")
    assert (final / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="exists; give another --out"):
        export_checkpoint(sharded_checkpoint, tmp_path / "out")
