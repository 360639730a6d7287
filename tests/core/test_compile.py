"""``torch.compile`` of the model (``core.acceleration.compile_blocks``, ``run.compile``): the
same numbers as eager, the EMA teacher and its truncated forward correct, and checkpoints
without ``_orig_mod.`` keys. Backends ``eager`` and ``aot_eager`` keep these fast on CPU (the
second traces the hand-written autograd kernels through AOTAutograd); inductor is slow-marked."""

from __future__ import annotations

import copy

import pytest
import torch

from selfflow.core import checkpoint as ckpt
from selfflow.core.acceleration import compile_blocks, is_compiled, resolve_compile
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import SelfFlow
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import TrainState, train_step
from selfflow.core.types import Timesteps
from tests.core.test_precision import tiny_batch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_state(compile_backend: str | None) -> TrainState:
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"image": 4}, width=64, depth=2, heads=2, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher = EMATeacher(model, EMAConfig(decay=0.5))  # copied first, then each compiled on its own
    if compile_backend is not None:
        compile_blocks(model, backend=compile_backend)
        compile_blocks(teacher.model, backend=compile_backend)
    torch.manual_seed(1)
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    params = list(model.parameters()) + list(objective.parameters())
    return TrainState(model=model, teacher=teacher, objective=objective, optimizer=torch.optim.AdamW(params, lr=1e-3))


def test_resolve_compile():
    assert resolve_compile("auto", "cpu") is False and resolve_compile("auto", "cuda") is True
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False
    with pytest.raises(ValueError, match="run.compile"):
        resolve_compile("yes", "cpu")


def _steps(state: TrainState, n: int) -> list[float]:
    batch, g = tiny_batch(), torch.Generator().manual_seed(7)
    return [float(train_step(state, batch, generator=g).losses.total) for _ in range(n)]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_steps_equal_eager_steps(backend):
    """Three Self-Flow steps (student, truncated teacher, EMA) compiled and eager: the same
    losses and weights (eager backend: bit for bit; aot_eager re-derives the backward, 1e-5)."""
    ref, comp = make_state(None), make_state(backend)
    assert is_compiled(comp.model) and is_compiled(comp.teacher.model) and not is_compiled(ref.model)
    a, b = _steps(ref, 3), _steps(comp, 3)
    tol = 0.0 if backend == "eager" else 1e-5
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=tol, rtol=tol)
    for part in ("model", "teacher"):
        sa = getattr(ref, part).state_dict() if part == "model" else ref.teacher.state_dict()
        sb = getattr(comp, part).state_dict() if part == "model" else comp.teacher.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], atol=tol, rtol=tol, msg=k)


def test_teacher_runs_its_own_weights_and_truncated_forward_under_compile():
    """After updates the compiled teacher computes with its own (EMA) weights, truncated or
    whole, exactly as an eager copy of them does."""
    state = make_state("eager")
    _steps(state, 2)
    batch = tiny_batch()
    ts = Timesteps.uniform(torch.full((4,), 0.3), batch)
    eager_teacher = FlowTransformer(state.teacher.model.cfg)
    eager_teacher.load_state_dict(state.teacher.model.state_dict())
    eager_student = FlowTransformer(state.model.cfg)
    eager_student.load_state_dict(state.model.state_dict())
    with torch.no_grad():
        want = eager_teacher(batch, ts, stop_after=1, return_hidden=(1,)).hidden[1]
        got = state.teacher(batch, ts, stop_after=1, return_hidden=(1,)).hidden[1]
        student = eager_student(batch, ts, stop_after=1, return_hidden=(1,)).hidden[1]
        full = state.teacher(batch, ts).velocity[0]
    assert torch.equal(got, want)
    assert not torch.allclose(got, student)  # the teacher lags the student: different weights, different numbers
    with torch.no_grad():
        assert torch.equal(full, eager_teacher(batch, ts).velocity[0])

    # even a deepcopy of an already compiled model computes with its own weights (torch >= 2.13's
    # Module.compile); the run copies first and compiles each anyway, which does not depend on it
    copied = copy.deepcopy(state.model)
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
        assert not copied(batch, ts).velocity[0].any() and state.model(batch, ts).velocity[0].any()


def test_checkpoints_of_compiled_models_have_plain_keys(tmp_path):
    state = make_state("eager")
    _steps(state, 1)
    keys = list(state.model.state_dict()) + list(state.teacher.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    path = ckpt.save_checkpoint(tmp_path, state, generator=torch.Generator())
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    assert sorted(saved) == sorted(FlowTransformer(state.model.cfg).state_dict())
    fresh = make_state(None)  # an eager run resumes a compiled run's checkpoint, and the reverse
    ckpt.load_checkpoint(path, fresh, generator=torch.Generator())
    for k, v in state.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    compiled = make_state("eager")
    ckpt.load_checkpoint(path, compiled, generator=torch.Generator())
    assert _steps(compiled, 1) == _steps(fresh, 1)


@pytest.mark.slow
def test_inductor_step_matches_eager():
    """The default backend, as CUDA runs use it (here on CPU: C++ codegen, tens of seconds)."""
    ref, comp = make_state(None), make_state("inductor")
    torch.testing.assert_close(torch.tensor(_steps(comp, 2)), torch.tensor(_steps(ref, 2)), atol=1e-4, rtol=1e-4)
