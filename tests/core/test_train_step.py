"""One training step: update, clipping, EMA follow-up, refusal of non-finite losses and spikes, Ctrl-C."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from torch import nn

from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import SelfFlow
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import BadStepError, LossSpikeError, NonFiniteLossError, TrainState, train_step
from selfflow.core.types import LossBreakdown

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = [("text", 3, 2, "condition"), ("image", 8, 3, "generate")]


def _state(
    *, optimizer: str = "adamw", lr: float = 1e-2, grad_clip: float = 1.0, decay: float = 0.9, seed: int = 0
) -> TrainState:
    torch.manual_seed(seed)
    model = FlowTransformer(ModelConfig(channels={"text": 2, "image": 3}, width=32, depth=2, heads=2, num_classes=3))
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    params = list(model.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    return TrainState(
        model=model,
        teacher=EMATeacher(model, EMAConfig(decay=decay, warmup=False)),
        objective=objective,
        optimizer=opt,
        grad_clip=grad_clip,
    )


def _snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in state.model.state_dict().items()}
    out.update({f"teacher.{k}": v.clone() for k, v in state.teacher.state_dict().items()})
    out.update({f"objective.{k}": v.clone() for k, v in state.objective.state_dict().items()})
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_updates_student_then_teacher_by_the_ema_formula(make_batch, gen):
    state = _state()
    batch = make_batch(SPECS, batch=4, num_classes=3)
    teacher_before = [p.clone() for p in state.teacher.model.parameters()]
    student_before = [p.detach().clone() for p in state.model.parameters()]
    result = train_step(state, batch, generator=gen)
    assert state.step == 1 and result.ema_decay == 0.9 and result.lr == 1e-2
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0
    assert result.losses.representation is not None
    moved = [not torch.equal(a, b) for a, b in zip(student_before, state.model.parameters())]
    assert sum(moved) > len(moved) // 2
    for p_ema, p_old, p in zip(state.teacher.model.parameters(), teacher_before, state.model.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * p_old + 0.1 * p, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in state.trainable_parameters())  # zeroed after the step
    assert all(p.grad is None for p in state.teacher.parameters())


def test_gradient_clipping_bounds_the_update(make_batch, gen):
    clip = 1e-3
    state = _state(optimizer="sgd", lr=1.0, grad_clip=clip)
    batch = make_batch(SPECS, batch=4, num_classes=3)
    before = [p.detach().clone() for p in state.trainable_parameters()]
    result = train_step(state, batch, generator=gen)
    assert result.grad_norm > 10 * clip  # the clip is active
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(state.trainable_parameters(), before)])
    assert float(delta.norm()) == pytest.approx(clip, rel=1e-3)  # SGD, lr 1: the step is -clipped grad


def test_lr_schedule_is_stepped(make_batch, gen):
    state = _state(lr=1.0)
    state.lr_schedule = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 0.5**step)
    batch = make_batch(SPECS, batch=2, num_classes=3)
    lrs = [train_step(state, batch, generator=gen).lr for _ in range(3)]
    assert lrs == [1.0, 0.5, 0.25]


class _NaNObjective(nn.Module):
    """Finite forward, NaN loss: a parameter times NaN."""

    def forward(self, model, batch, *, teacher, generator):
        loss = sum(p.sum() for p in model.parameters()) * float("nan")
        return LossBreakdown(total=loss, flow=loss)


class _InfGradObjective(nn.Module):
    """A finite loss (0) whose gradient is not finite: d sqrt(u) / du at u = 0."""

    def forward(self, model, batch, *, teacher, generator):
        p = next(model.parameters())
        u = (p - p.detach()).sum()  # value 0, gradient 1
        loss = torch.sqrt(u.abs())
        return LossBreakdown(total=loss, flow=loss)


def test_nan_loss_raises_and_changes_nothing(make_batch, gen):
    state = _state()
    batch = make_batch(SPECS, batch=2, num_classes=3)
    train_step(state, batch, generator=gen)  # optimiser state exists
    state.objective = _NaNObjective()
    before, opt_before = (
        _snapshot(state),
        [v.clone() for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)],
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1 .*no update was applied"):
        train_step(state, batch, generator=gen)
    assert _same(before, _snapshot(state)) and state.step == 1
    opt_after = [v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(opt_before, opt_after))
    assert all(p.grad is None for p in state.model.parameters())  # no gradient is left behind


def test_nan_tokens_raise(make_batch, gen):
    state = _state()
    batch = make_batch(SPECS, batch=2, num_classes=3)
    x = batch.segments[1].tokens.clone()
    x[0, 0, 0] = float("nan")
    bad = batch.with_tokens([batch.segments[0].tokens, x])
    before = _snapshot(state)
    with pytest.raises(NonFiniteLossError):
        train_step(state, bad, generator=gen)
    assert _same(before, _snapshot(state)) and state.step == 0


def test_non_finite_gradient_raises_and_changes_nothing(make_batch, gen):
    state = _state()
    state.objective = _InfGradObjective()
    batch = make_batch(SPECS, batch=2, num_classes=3)
    before = _snapshot(state)
    with pytest.raises(NonFiniteLossError, match="gradient norm is (nan|inf) at step 0; no update was applied"):
        train_step(state, batch, generator=gen)
    assert _same(before, _snapshot(state)) and state.step == 0
    assert all(p.grad is None for p in state.model.parameters())


def test_a_refusal_names_the_step_and_the_component(make_batch, gen):
    state = _state()
    batch = make_batch(SPECS, batch=2, num_classes=3)
    x = batch.segments[1].tokens.clone()
    x[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 0 \(flow/image is nan; ") as info:
        train_step(state, batch.with_tokens([batch.segments[0].tokens, x]), generator=gen)
    err = info.value
    assert isinstance(err, BadStepError) and isinstance(err, FloatingPointError)
    assert (err.step, err.component, err.checkpoint) == (0, "flow/image", None) and math.isnan(err.value)
    assert set(err.losses) == {"loss", "flow", "representation", "flow/image"}
    assert "\n" not in str(err)
    state.objective = _InfGradObjective()
    with pytest.raises(NonFiniteLossError) as info:
        train_step(state, batch, generator=gen)
    assert info.value.component == "gradient norm" and not math.isfinite(info.value.value)


def test_a_bad_second_micro_batch_drops_the_first_ones_gradients(make_batch, gen):
    state = _state()
    good = make_batch(SPECS, batch=2, num_classes=3, seed=1)
    x = good.segments[1].tokens.clone()
    x[1, 2, 0] = float("nan")
    bad = good.with_tokens([good.segments[0].tokens, x])
    before = _snapshot(state)
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        train_step(state, [good, bad], generator=gen)
    assert _same(before, _snapshot(state)) and state.step == 0
    assert all(p.grad is None for p in state.trainable_parameters())
    assert int(state.teacher.num_updates) == 0 and not state.optimizer.state


def test_a_loss_above_max_loss_is_refused_like_a_non_finite_one(make_batch):
    batch = make_batch(SPECS, batch=2, num_classes=3)
    probe = train_step(_state(), batch, generator=torch.Generator().manual_seed(3))
    assert probe.global_loss == float(probe.losses.total)  # one process: this rank's loss
    state = _state()
    state.lr_schedule = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 0.5**step)
    before = _snapshot(state)
    with pytest.raises(LossSpikeError, match=r"^loss spike at step 0: loss \S+ is above the limit 0\.5 .*no update"):
        train_step(state, batch, generator=torch.Generator().manual_seed(3), max_loss=0.5)
    assert _same(before, _snapshot(state)) and state.step == 0 and state.lr_schedule.last_epoch == 0
    assert all(p.grad is None for p in state.trainable_parameters())
    # at or below the limit the step is applied, with the numbers of a step without one
    result = train_step(state, batch, generator=torch.Generator().manual_seed(3), max_loss=probe.global_loss)
    assert result.losses.detached() == probe.losses.detached() and state.step == 1


class _InterruptingSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Ctrl-C arrives while the update is being applied (after the optimiser step)."""

    def step(self, epoch=None):
        if getattr(self, "armed", False):
            signal.raise_signal(signal.SIGINT)
        super().step(epoch)


def test_ctrl_c_during_the_update_is_held_until_the_update_is_whole(make_batch, gen):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    state = _state()
    state.lr_schedule = _InterruptingSchedule(state.optimizer, lambda step: 1.0)
    state.lr_schedule.armed = True
    batch = make_batch(SPECS, batch=2, num_classes=3)
    with pytest.raises(KeyboardInterrupt):
        train_step(state, batch, generator=gen)
    # the whole update was applied: schedule, teacher and step count agree with the optimiser
    assert state.step == 1 and state.lr_schedule.last_epoch == 1 and int(state.teacher.num_updates) == 1
    assert {int(s["step"]) for s in state.optimizer.state.values()} == {1}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_micro_batches_accumulate_the_mean_gradient(make_batch):
    """``train_step(state, [b1, b2])`` makes one update with the mean of the two micro-batches'
    gradients (SGD, no clipping: the update is -lr times it) and logs the mean of their losses."""
    b1 = make_batch(SPECS, batch=2, num_classes=3, seed=1)
    b2 = make_batch(SPECS, batch=2, num_classes=3, seed=2)
    ref = _state(optimizer="sgd", lr=1.0, grad_clip=1e9)
    g = torch.Generator().manual_seed(5)
    grads, totals = [], []
    for b in (b1, b2):  # the same generator sequence train_step will use
        losses = ref.objective(ref.model, b, teacher=ref.teacher, generator=g)
        losses.total.backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ref.trainable_parameters()])
        totals.append(float(losses.total.detach()))
        ref.optimizer.zero_grad(set_to_none=True)

    state = _state(optimizer="sgd", lr=1.0, grad_clip=1e9)
    before = [p.detach().clone() for p in state.trainable_parameters()]
    result = train_step(state, [b1, b2], generator=torch.Generator().manual_seed(5))
    for p, p0, g1, g2 in zip(state.trainable_parameters(), before, *grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * (g1 + g2), rtol=1e-5, atol=1e-6)
    assert float(result.losses.total) == pytest.approx(sum(totals) / 2, rel=1e-6)
    assert state.step == 1


def test_per_modality_losses_average_over_the_micro_batches_that_have_them():
    from selfflow.core.train_step import mean_losses

    a = LossBreakdown(total=torch.tensor(1.0), flow=torch.tensor(1.0), per_modality={"image": torch.tensor(1.0)})
    b = LossBreakdown(
        total=torch.tensor(3.0),
        flow=torch.tensor(3.0),
        representation=torch.tensor(0.5),
        per_modality={"audio": torch.tensor(3.0)},
    )
    m = mean_losses([a, b])
    assert m.detached() == {"loss": 2.0, "flow": 2.0, "representation": 0.5, "flow/audio": 3.0, "flow/image": 1.0}


def test_training_is_reproducible_from_the_seed(make_batch, global_rng_untouched):
    batch = make_batch(SPECS, batch=4, num_classes=3)
    runs = []
    for _ in range(2):
        state = _state()
        g = torch.Generator().manual_seed(42)
        with global_rng_untouched():
            losses = [train_step(state, batch, generator=g).losses.detached() for _ in range(3)]
        runs.append((losses, _snapshot(state)))
    assert runs[0][0] == runs[1][0]
    assert _same(runs[0][1], runs[1][1])
