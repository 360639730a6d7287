"""The loop's run safety: the bad-step policy (``LoopGuard``), Ctrl-C, stale temporary
checkpoints and read-only resumes. A tiny model on fixed batches; no timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import attrs
import pytest
import torch

from selfflow.core import files
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.loop import (
    BadStepWarning,
    Loop,
    LoopConfig,
    LoopGuard,
    LoopOutput,
    TrainingInterrupted,
    warmup_schedule,
)
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import SelfFlow
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import LossSpikeError, NonFiniteLossError, TrainState, train_step

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = [("image", 6, 3, "generate")]


def _state(steps: int = 8) -> TrainState:
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"image": 3}, width=32, depth=2, heads=2, num_classes=3))
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    opt = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-2)
    return TrainState(
        model=model,
        teacher=EMATeacher(model, EMAConfig(decay=0.9, warmup=False)),
        objective=objective,
        optimizer=opt,
        lr_schedule=torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(2, steps, "cosine")),
    )


class _Source:
    """Batch ``i`` of draw ``i`` (seeded); draws in ``nan`` have a NaN token, draws in
    ``spike`` tokens 1000x as large; draw ``interrupt`` raises KeyboardInterrupt once."""

    def __init__(self, make_batch, *, nan=(), spike=(), interrupt=None) -> None:
        self.make_batch, self.nan, self.spike, self.interrupt = make_batch, set(nan), set(spike), interrupt
        self.cursor = 0

    def next_batch(self):
        i = self.cursor
        if i == self.interrupt:
            self.interrupt = None
            raise KeyboardInterrupt
        self.cursor += 1
        batch = self.make_batch(SPECS, batch=4, num_classes=3, seed=i)
        if i in self.nan or i in self.spike:
            x = batch.segments[0].tokens.clone()
            if i in self.nan:
                x[0, 0, 0] = float("nan")
            else:
                x *= 1000.0
            batch = batch.with_tokens([x])
        return batch

    def position(self):
        return {"cursor": self.cursor}

    def restore(self, position):
        self.cursor = int(position["cursor"])


def _loop(tmp_path, make_batch, *, steps=8, guard=None, grad_accum=1, callbacks=(), every=0, keep=10, **source) -> Loop:
    output = LoopOutput(log_every=1, checkpoint_every=every, keep_checkpoints=keep, progress=False)
    return Loop(
        state=_state(steps),
        source=_Source(make_batch, **source),
        generator=torch.Generator().manual_seed(7),
        config=LoopConfig(steps=steps, grad_accum=grad_accum, output=output, guard=guard or LoopGuard()),
        out_dir=tmp_path,
        callbacks=callbacks,
    )


def _everything(state: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state.module.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in state.teacher.state_dict().items()})
    out.update({f"objective.{k}": v for k, v in state.objective.state_dict().items()})
    for i, st in state.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def _assert_equal(a: TrainState, b: TrainState) -> None:
    x, y = _everything(a), _everything(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert a.step == b.step and a.lr_schedule.state_dict() == b.lr_schedule.state_dict()


def _losses(loop: Loop) -> list[float]:
    return [row["loss"] for row in loop.history]


# ----------------------------------------------------------------------------- the config


def test_guard_is_frozen_keyword_only_and_validated():
    g = LoopGuard()
    assert (g.max_consecutive_skips, g.spike_factor, g.spike_window, g.stop_on_spike) == (5, 10.0, 20, False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        g.spike_factor = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoopGuard(5)  # type: ignore[misc]
    with pytest.raises(ValueError, match="'max_consecutive_skips' must be >= 1"):
        LoopGuard(max_consecutive_skips=0)
    for bad in (0.5, 1.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="must be 0 .* or above 1"):
            LoopGuard(spike_factor=bad)
    with pytest.raises(ValueError, match="'spike_window' must be >= 1"):
        LoopGuard(spike_window=0)
    assert LoopGuard(spike_factor=0).spike_factor == 0
    assert LoopConfig(steps=1).guard == LoopGuard()


# ----------------------------------------------------------------------------- no bad step: today's numbers


def test_a_guarded_loop_without_bad_steps_equals_plain_train_steps(tmp_path, make_batch):
    """The policy on, its spike detector armed after 2 steps and skipping spikes: with no bad
    step the losses and every tensor equal a plain sequence of ``train_step`` calls."""
    guard = LoopGuard(spike_window=2, stop_on_spike=True)
    loop = _loop(tmp_path, make_batch, steps=6, guard=guard, grad_accum=2)
    loop.run()

    state, source, g = _state(6), _Source(make_batch), torch.Generator().manual_seed(7)
    plain = [train_step(state, [source.next_batch(), source.next_batch()], generator=g) for _ in range(6)]
    assert _losses(loop) == [float(r.losses.total) for r in plain]
    _assert_equal(loop.state, state)
    assert torch.equal(loop.generator.get_state(), g.get_state())
    assert [(r["skipped"], r["spikes"]) for r in loop.history] == [(0, 0)] * 6


# ----------------------------------------------------------------------------- bad steps


def test_non_finite_steps_are_skipped_warned_and_logged_and_do_not_count(tmp_path, make_batch):
    loop = _loop(tmp_path, make_batch, steps=5, nan={1, 3, 4})
    with pytest.warns(RuntimeWarning) as caught:
        loop.run()
    assert all(w.category is BadStepWarning for w in caught)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert messages[0] == (
        "bad step skipped (1 in a row; guard.max_consecutive_skips = 5 stop the run): "
        f"loss is nan at step 1 (flow/image is nan; {messages[0].split('; ')[2]}"
    )
    assert messages[0].split("; ")[2].startswith("flow=nan, representation=")
    assert messages[2].startswith("bad step skipped (2 in a row; ") and "loss is nan at step 2 " in messages[2]
    # 5 updates from 8 draws: no optimiser, schedule or EMA step for the skipped ones
    assert loop.state.step == 5 and loop.source.cursor == 8
    assert int(loop.state.teacher.num_updates) == 5
    assert loop.state.lr_schedule.last_epoch == 5
    assert {int(s["step"]) for s in loop.state.optimizer.state.values()} == {5}
    assert all(p.grad is None for p in loop.state.trainable_parameters())
    rows = [json.loads(line) for line in loop.metrics_path.read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 1), (3, 2), (4, 0), (5, 0)]
    assert all(map(lambda r: all(v == v for v in r.values()), rows))  # no NaN reaches the log


def test_k_bad_steps_in_a_row_stop_the_run_naming_the_last_sane_checkpoint(tmp_path, make_batch):
    """Checkpoints at 2, 4 and 6; a spike (applied) at draw 5 makes step 6's checkpoint not
    sane; NaN from draw 7 on: the third in a row stops the run and names step 4's."""
    guard = LoopGuard(max_consecutive_skips=3, spike_window=2)
    loop = _loop(tmp_path, make_batch, steps=20, guard=guard, every=2, spike={5}, nan=range(7, 100))
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(NonFiniteLossError) as info:
        loop.run()
    warned = [str(w.message) for w in caught]
    assert len(warned) == 3 and warned[0].startswith("loss spike at step 5: loss ")
    assert "the update was applied" in warned[0] and warned[2].startswith("bad step skipped (2 in a row; ")
    assert "loss is nan at step 7 (flow/image is nan" in warned[2]
    sane = tmp_path / "checkpoints" / "step_0000004"
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "training stopped: 3 bad steps in a row (guard.max_consecutive_skips = 3), the last: loss is nan at step 7 "
        "(flow/image is nan; flow=nan, "
    )
    assert message.endswith(
        f"; the last checkpoint whose losses were finite and spike-free is {sane}: resume from it with a lower "
        "optimizer.lr"
    )
    assert info.value.checkpoint == sane and info.value.step == 7 and info.value.component == "flow/image"
    assert loop.state.step == 7 and not (tmp_path / "checkpoints" / "step_0000007").exists()
    sanity = {
        p.name: json.loads((p / "state.json").read_text())["extra"]["loop"]["sane"]
        for p in sorted((tmp_path / "checkpoints").iterdir())
    }
    assert sanity == {"step_0000002": True, "step_0000004": True, "step_0000006": False}
    assert [r["spikes"] for r in loop.history] == [0, 0, 0, 0, 0, 1, 0]


def test_rotation_keeps_the_last_sane_checkpoint(tmp_path, make_batch):
    """keep_checkpoints = 1: a spike at draw 3 and a skipped NaN step at draw 5 make the
    checkpoints at 4 and 6 not sane; rotating them in must not delete step 2's, the one the
    stop (NaN from draw 7 on) then names."""
    guard = LoopGuard(max_consecutive_skips=2, spike_window=2)
    nan = {5, *range(7, 100)}
    loop = _loop(tmp_path, make_batch, steps=20, guard=guard, every=2, keep=1, spike={3}, nan=nan)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError) as info:
        loop.run()
    sane = tmp_path / "checkpoints" / "step_0000002"
    assert info.value.checkpoint == sane and (sane / "manifest.json").is_file()
    # the newest one is kept as always, step 4's (not sane) rotated away
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000006"]


def test_without_a_sane_checkpoint_the_stop_says_so(tmp_path, make_batch):
    loop = _loop(tmp_path, make_batch, guard=LoopGuard(max_consecutive_skips=1), nan={0})
    with pytest.raises(NonFiniteLossError, match="at step 0 .*no kept checkpoint has finite, spike-free losses"):
        loop.run()
    assert loop.state.step == 0


def test_a_checkpoint_at_the_stopping_step_is_not_named(tmp_path, make_batch):
    """Bad from the first step after step 4's checkpoint on: its weights made the bad losses."""
    loop = _loop(tmp_path, make_batch, guard=LoopGuard(max_consecutive_skips=2), every=2, nan=range(4, 100))
    with pytest.warns(BadStepWarning), pytest.raises(NonFiniteLossError) as info:
        loop.run()
    assert loop.state.step == 4 and (tmp_path / "checkpoints" / "step_0000004").is_dir()
    assert info.value.checkpoint == tmp_path / "checkpoints" / "step_0000002"


def test_stop_on_spike_skips_spikes_like_non_finite_steps(tmp_path, make_batch):
    guard = LoopGuard(max_consecutive_skips=2, spike_window=3, stop_on_spike=True)
    loop = _loop(tmp_path, make_batch, steps=6, guard=guard, spike={4})
    with pytest.warns(BadStepWarning, match=r"^bad step skipped .*: loss spike at step 4: loss \S+ is above the limit"):
        loop.run()
    assert loop.state.step == 6 and loop.source.cursor == 7
    assert [r["skipped"] for r in loop.history] == [0, 0, 0, 0, 1, 0]
    # two in a row stop it, with the spike error's own type
    loop = _loop(tmp_path / "b", make_batch, steps=6, guard=guard, spike={4, 5})
    with pytest.warns(RuntimeWarning), pytest.raises(LossSpikeError, match="training stopped: 2 bad steps in a row"):
        loop.run()


# ----------------------------------------------------------------------------- interrupts


def _uninterrupted(tmp_path, make_batch, **kw) -> Loop:
    loop = _loop(tmp_path / "full", make_batch, **kw)
    loop.run()
    return loop


def _resumed(tmp_path, make_batch, checkpoint, **kw) -> Loop:
    loop = _loop(tmp_path / "part", make_batch, **kw)
    assert loop.resume(checkpoint) == 3
    loop.run()
    return loop


def test_ctrl_c_between_steps_checkpoints_the_last_step_and_resumes_exactly(tmp_path, make_batch):
    class Stop:
        def on_step(self, loop, result):
            if loop.state.step == 3:
                raise KeyboardInterrupt

        def on_end(self, loop):
            pass

    loop = _loop(tmp_path / "part", make_batch, callbacks=[Stop()])
    with pytest.raises(TrainingInterrupted) as info:
        loop.run()
    ckpt = tmp_path / "part" / "checkpoints" / "step_0000003"
    assert info.value.checkpoint == ckpt and info.value.step == 3 and (ckpt / "manifest.json").is_file()
    assert not isinstance(info.value, KeyboardInterrupt) and "after step 3" in str(info.value)
    full = _uninterrupted(tmp_path, make_batch)
    resumed = _resumed(tmp_path, make_batch, ckpt)
    _assert_equal(full.state, resumed.state)
    assert _losses(full) == _losses(resumed)


def test_ctrl_c_mid_step_discards_the_half_step(tmp_path, make_batch):
    """Ctrl-C inside the 4th step's second micro-batch (the first one's gradients exist, the
    generator has drawn): the checkpoint is the 3rd step's state, random state and data position."""
    loop = _loop(tmp_path / "part", make_batch, grad_accum=2)
    forward, calls = loop.state.objective.forward, []

    def interrupted(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 8:  # step 4, micro-batch 2
            raise KeyboardInterrupt
        return out

    loop.state.objective.forward = interrupted
    with pytest.raises(TrainingInterrupted) as info:
        loop.run()
    del loop.state.objective.forward
    assert info.value.step == 3 and loop.state.step == 3
    assert all(p.grad is None for p in loop.state.trainable_parameters())
    ckpt = info.value.checkpoint
    assert ckpt is not None and ckpt.name == "step_0000003"
    assert json.loads((ckpt / "state.json").read_text())["data_position"] == {"cursor": 6}
    full = _uninterrupted(tmp_path, make_batch, grad_accum=2)
    resumed = _resumed(tmp_path, make_batch, ckpt, grad_accum=2)
    _assert_equal(full.state, resumed.state)
    assert _losses(full) == _losses(resumed)


def test_ctrl_c_in_the_data_source_and_an_existing_checkpoint_is_not_rewritten(tmp_path, make_batch):
    loop = _loop(tmp_path / "part", make_batch, every=3, interrupt=3)
    with pytest.raises(TrainingInterrupted) as info:
        loop.run()
    # the 3rd step was checkpointed by checkpoint_every just before: the same directory, not rewritten
    ckpt = tmp_path / "part" / "checkpoints" / "step_0000003"
    assert info.value.checkpoint == ckpt
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step_0000003"]
    inode = (ckpt / "manifest.json").stat().st_ino
    loop2 = _loop(tmp_path / "part", make_batch, every=3, interrupt=3)
    loop2.resume(ckpt)
    with pytest.raises(TrainingInterrupted) as again:  # Ctrl-C before the resumed run's first step
        loop2.run()
    assert again.value.checkpoint == ckpt and (ckpt / "manifest.json").stat().st_ino == inode
    full = _uninterrupted(tmp_path, make_batch, every=3)
    resumed = _resumed(tmp_path, make_batch, ckpt, every=3)
    _assert_equal(full.state, resumed.state)


def test_ctrl_c_before_the_first_step_writes_nothing(tmp_path, make_batch):
    loop = _loop(tmp_path, make_batch, interrupt=0)
    with pytest.raises(TrainingInterrupted) as info:
        loop.run()
    assert info.value.checkpoint is None and info.value.step == 0 and "nothing to resume" in str(info.value)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- stale temporary checkpoints


def test_starting_a_loop_removes_dead_writers_temporary_checkpoints(tmp_path, make_batch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    checkpoints = tmp_path / "checkpoints"
    stale = checkpoints / f".step_0000001.tmp-{files._HOST}-{dead_pid}-0badcafe"
    live = checkpoints / f".step_0000001.tmp-{files._HOST}-{os.getppid()}-0badcafe"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")

    class Look:
        def on_step(self, loop, result):
            self.seen = sorted(p.name for p in checkpoints.iterdir())

        def on_end(self, loop):
            pass

    look = Look()
    _loop(tmp_path, make_batch, steps=1, callbacks=[look]).run()
    assert look.seen == [live.name]  # gone before the first step finished, not only at the first save
    assert live.is_dir() and not stale.exists()


# ----------------------------------------------------------------------------- read-only resume


def test_a_read_only_resume_restores_everything_and_touches_no_file(tmp_path, make_batch):
    loop = _loop(tmp_path, make_batch, steps=6, every=3)
    loop.run()
    ckpt = tmp_path / "checkpoints" / "step_0000003"

    def tree():
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = tree()
    probe = _loop(tmp_path, make_batch, steps=6, every=3)
    assert probe.resume(ckpt, read_only=True) == 3
    assert tree() == before  # metrics.jsonl still has the rows of steps 4-6
    assert [r["step"] for r in probe.history] == [1, 2, 3]
    reference = _loop(tmp_path / "ref", make_batch, steps=6)
    reference.resume(ckpt)
    _assert_equal(probe.state, reference.state)
    assert torch.equal(probe.generator.get_state(), reference.generator.get_state())
    assert probe.source.cursor == 3
    with pytest.raises(RuntimeError, match="read_only=True; it does not write checkpoints"):
        probe.save()
    with pytest.raises(RuntimeError, match="read_only=True; it does not train"):
        probe.run()
    assert tree() == before
