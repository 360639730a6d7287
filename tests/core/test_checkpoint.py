"""Checkpoints: atomic, verified, never unpickled; exact resume through the whole run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from selfflow.core import checkpoint as ckpt
from selfflow.registry import compose
from selfflow.registry.config import load_config

SMALL = """
[run]
name = "resume-test"
seed = 3
steps = 8
batch_size = 16
[modalities.image]
dataset = "image/digits"
dataset_options = {size = 8}
tokenizer = "image/patch"
tokenizer_options = {patch = 2}
[model]
width = 32
depth = 3
heads = 2
[ema]
decay = 0.9
[optimizer]
lr = 1e-3
warmup_steps = 3
schedule = "cosine"
[output]
log_every = 2
checkpoint_every = 3
keep_checkpoints = 2
progress = false
"""


def build(tmp_path, name, overrides=(), resume=None):
    cfg = load_config(SMALL, list(overrides))
    return compose.build_run(cfg, out_dir=tmp_path / name, resume=resume)


def everything(run) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in run.state.module.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in run.state.teacher.state_dict().items()})
    out.update({f"objective.{k}": v for k, v in run.state.objective.state_dict().items()})
    for i, st in run.state.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def test_exact_resume_bit_for_bit(tmp_path):
    full = build(tmp_path, "full")
    full.train()
    half = build(tmp_path, "half")
    half.train(until=4)
    assert half.state.step == 4
    resumed = build(tmp_path, "half", resume=tmp_path / "half")
    assert resumed.state.step == 4
    resumed.train()
    a, b = everything(full), everything(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.state.lr_schedule.get_last_lr() == full.state.lr_schedule.get_last_lr()
    # the log of the resumed run continues the interrupted one without duplicates
    steps = [json.loads(l)["step"] for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    half_rows = [json.loads(l) for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in half_rows]


def test_keeps_the_last_k_and_ignores_partial_directories(tmp_path):
    run = build(tmp_path, "keep")
    run.train()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "keep" / "checkpoints")]
    assert names == ["step_0000006", "step_0000008"]
    (tmp_path / "keep" / "checkpoints" / ".step_0000009.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "keep" / "checkpoints").name == "step_0000008"


def test_a_failed_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = build(tmp_path, "disk")
    run.train(until=3)
    good = ckpt.latest_checkpoint(tmp_path / "disk" / "checkpoints")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}
    real = ckpt._save_tensors

    def full_disk(tensors, path):  # the disk fills up in the middle of the next checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", full_disk)
    run.state.step += 1
    with pytest.raises(OSError, match="No space left"):
        run.loop.save()
    assert ckpt.latest_checkpoint(tmp_path / "disk" / "checkpoints") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    leftovers = [p for p in (tmp_path / "disk" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tampered_truncated_and_pickled_files_are_refused(tmp_path):
    run = build(tmp_path, "tamper")
    run.train(until=3)
    good = ckpt.latest_checkpoint(tmp_path / "tamper" / "checkpoints")

    bad = tmp_path / "edited"
    shutil.copytree(good, bad)
    weights = load_file(str(bad / "model.safetensors"))
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    from safetensors.torch import save_file

    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors does not match its sha256"):
        ckpt.load_checkpoint(bad, run.state)

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    data = (cut / "optimizer.safetensors").read_bytes()
    (cut / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or modified"):
        ckpt.load_checkpoint(cut, run.state)

    pickled = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ckpt.CheckpointError, match="never unpickles"):
        ckpt.load_checkpoint(pickled, run.state)
    with pytest.raises(ckpt.CheckpointError, match="no selfflow checkpoint"):
        ckpt.resolve(tmp_path / "nothing-here")


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(5)
    state = ckpt.rng_state(g)
    a = (torch.rand(3), torch.rand(3, generator=g))
    ckpt.restore_rng(json.loads(json.dumps(state)), g)
    b = (torch.rand(3), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_checkpoint_of_another_model_is_one_short_line(tmp_path):
    import attrs

    run = build(tmp_path, "narrow")
    run.train(until=3)
    wide = build(tmp_path, "wide", ["model.width=64"])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(tmp_path / "narrow", wide.state)
    message = str(err.value)
    assert "model.safetensors does not fit this model" in message and "tensors differ in shape" in message
    assert "\n" not in message and len(message) < 500  # not torch's list of every tensor
    with pytest.raises(ckpt.CheckpointError, match=r"another model \(width 32 in the checkpoint, 64 here\)"):
        ckpt.check_model(tmp_path / "narrow", attrs.asdict(wide.teacher.cfg))
    ckpt.check_model(tmp_path / "narrow", attrs.asdict(run.teacher.cfg))  # its own model passes


def test_a_checkpoint_that_predates_a_model_setting_compares_with_its_default(tmp_path):
    """A checkpoint written before ``abs_pos`` existed ran without it: with the defaults it
    resumes, and a model that turns the setting on is still refused by name."""
    import attrs

    from selfflow.core.model import ModelConfig

    run = build(tmp_path, "old")
    run.train(until=2)
    ck = ckpt.resolve(tmp_path / "old")
    state = json.loads((ck / "state.json").read_text())
    del state["extra"]["model"]["abs_pos"]  # as an older selfflow wrote it
    (ck / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256((ck / "state.json").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    current = attrs.asdict(run.teacher.cfg)
    defaults = {f.name: f.default for f in attrs.fields(ModelConfig) if f.default is not attrs.NOTHING}
    with pytest.raises(ckpt.CheckpointError, match="abs_pos 'unset' in the checkpoint, 'none' here"):
        ckpt.check_model(ck, current)
    ckpt.check_model(ck, current, defaults)
    with pytest.raises(ckpt.CheckpointError, match="abs_pos 'none' in the checkpoint, 'sincos' here"):
        ckpt.check_model(ck, {**current, "abs_pos": "sincos"}, defaults)


def test_a_quick_look_at_the_state_still_checks_it(tmp_path):
    run = build(tmp_path, "look")
    run.train(until=3)
    good = ckpt.latest_checkpoint(tmp_path / "look" / "checkpoints")
    assert ckpt.read_state(good, full=False)["step"] == 3
    edited = tmp_path / "edited"
    shutil.copytree(good, edited)
    state = json.loads((edited / "state.json").read_text())
    state["step"] = 99
    (edited / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="state.json is missing or does not match its sha256"):
        ckpt.read_state(edited, full=False)
