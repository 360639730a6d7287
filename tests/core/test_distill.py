"""EMA teacher, projector and representation loss against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfflow.core.distill import EMAConfig, EMATeacher, Projector, cosine_distance, representation_loss


def _net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(dtype)


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=gen, dtype=b.dtype))


# ----------------------------------------------------------------------------- EMA


def test_ema_starts_as_exact_copy_that_never_requires_grad():
    student = _net()
    teacher = EMATeacher(student, EMAConfig(decay=0.9))
    s_state, t_state = student.state_dict(), teacher.model.state_dict()
    assert s_state.keys() == t_state.keys()
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), teacher.model.parameters()))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert int(teacher.num_updates) == 0


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_update_matches_formula_without_warmup(decay, gen):
    student = _net()
    teacher = EMATeacher(student, EMAConfig(decay=decay, warmup=False))
    for _ in range(3):
        old = [p.clone() for p in teacher.model.parameters()]
        _perturb(student, gen)
        assert teacher.update(student) == decay
        for p_ema, p_old, p in zip(teacher.model.parameters(), old, student.parameters()):
            torch.testing.assert_close(p_ema, decay * p_old + (1 - decay) * p, rtol=0, atol=1e-14)
        for b_ema, b in zip(teacher.model.buffers(), student.buffers()):  # buffers are copied
            assert torch.equal(b_ema, b)
    assert int(teacher.num_updates) == 3


def test_ema_warmup_decay_schedule(gen):
    student = _net()
    teacher = EMATeacher(student, EMAConfig(decay=0.5, warmup=True))
    # min(decay, (1 + n) / (10 + n)): 0.1, 2/11, ..., capped at 0.5 from n = 8 on
    expected = [min(0.5, (1 + n) / (10 + n)) for n in range(12)]
    assert expected[0] == 0.1 and expected[-1] == 0.5 and expected[7] < 0.5
    for d_expected in expected:
        old = [p.clone() for p in teacher.model.parameters()]
        _perturb(student, gen)
        assert teacher.current_decay() == pytest.approx(d_expected, abs=0)
        d = teacher.update(student)
        assert d == d_expected
        for p_ema, p_old, p in zip(teacher.model.parameters(), old, student.parameters()):
            torch.testing.assert_close(p_ema, d * p_old + (1 - d) * p, rtol=0, atol=1e-14)


def test_ema_update_in_float32_is_the_formula_to_rounding(gen):
    student = _net(dtype=torch.float32)
    teacher = EMATeacher(student, EMAConfig(decay=0.99, warmup=False))
    old = [p.clone() for p in teacher.model.parameters()]
    _perturb(student, gen)
    teacher.update(student)
    for p_ema, p_old, p in zip(teacher.model.parameters(), old, student.parameters()):
        torch.testing.assert_close(p_ema, 0.99 * p_old + 0.01 * p, rtol=1e-6, atol=1e-7)


def test_ema_rejects_a_different_model():
    teacher = EMATeacher(_net())
    with pytest.raises(RuntimeError, match="different parameter lists"):
        teacher.update(nn.Linear(4, 3).double())


def test_ema_config_validation():
    with pytest.raises(ValueError):
        EMAConfig(decay=1.0)
    with pytest.raises(ValueError):
        EMAConfig(decay=-0.1)


def test_teacher_forward_builds_no_graph():
    student = _net()
    teacher = EMATeacher(student)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, student.eval()(x).detach())


# ----------------------------------------------------------------------------- projector and loss


def test_projector_is_linear_silu_linear():
    proj = Projector(6)
    assert [type(m) for m in proj] == [nn.Linear, nn.SiLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features, proj[2].out_features) == (6, 12, 6)
    assert Projector(6, out=10)[2].out_features == 10
    x = torch.randn(2, 3, 6)
    h = x @ proj[0].weight.T + proj[0].bias
    expected = (h * torch.sigmoid(h)) @ proj[2].weight.T + proj[2].bias
    torch.testing.assert_close(proj(x), expected)


def test_cosine_distance_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [4.0, 3.0]])
    torch.testing.assert_close(cosine_distance(a, b), torch.tensor([0.0, 2.0, 1.0, 1 - 24 / 25]))


def _hand_rep_loss(s: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if tokens[b, i]:
                x, y = s[b, i].double(), t[b, i].double()
                total += 1.0 - float(x @ y) / (float(x.norm()) * float(y.norm()))
                count += 1
    return total / count


def test_representation_loss_matches_hand_computation(gen):
    s = torch.randn(3, 7, 16, generator=gen)
    t = torch.randn(3, 7, 16, generator=gen)
    every = torch.ones(3, 7, dtype=torch.bool)
    some = torch.rand(3, 7, generator=gen) < 0.4
    assert 0 < int(some.sum()) < 21
    assert float(representation_loss(s, t, every)) == pytest.approx(_hand_rep_loss(s, t, every), abs=1e-6)
    assert float(representation_loss(s, t, some)) == pytest.approx(_hand_rep_loss(s, t, some), abs=1e-6)
    # tokens outside the selection do not matter at all
    t2 = torch.where(some[..., None], t, torch.randn(3, 7, 16, generator=gen))
    assert torch.equal(representation_loss(s, t, some), representation_loss(s, t2, some))


def test_representation_loss_never_sends_gradient_to_the_teacher(gen):
    s = torch.randn(2, 4, 8, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 8, generator=gen, requires_grad=True)
    representation_loss(s, t, torch.ones(2, 4, dtype=torch.bool)).backward()
    assert t.grad is None
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
