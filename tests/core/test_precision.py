"""bf16 autocast with fp32 master weights (``core.acceleration``, ``run.precision``): the CPU
autocast path runs a whole Self-Flow step, keeps weights, gradients, optimiser state, teacher
and losses in float32, and matches the fp32 step within bf16's rounding."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.acceleration import autocast, full_precision, resolve_precision
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import SelfFlow, aligned, flow_loss
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import TrainState, train_step
from selfflow.core.types import Segment, TokenBatch, grid_positions


def tiny_batch(b: int = 4, n: int = 16, c: int = 4) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, n, c, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 12:] = False  # one padded sample
    seg = Segment(modality="image", tokens=tokens, positions=grid_positions(1, 4, 4, batch=b), valid=valid)
    return TokenBatch(segments=(seg,), labels=torch.tensor([0, 1, 2, 1]))


def tiny_state(precision: torch.dtype | None) -> TrainState:
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"image": 4}, width=64, depth=2, heads=2, num_classes=3))
    with torch.no_grad():  # adaLN-Zero starts at zero: give every block something to do
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(1)
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    params = list(model.parameters()) + list(objective.parameters())
    return TrainState(
        model=model,
        teacher=EMATeacher(model, EMAConfig(decay=0.5)),
        objective=objective,
        optimizer=torch.optim.AdamW(params, lr=1e-3),
        precision=precision,
    )


def test_resolve_precision():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("auto", "cpu") is None  # CPU runs stay fp32 unless told
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="run.precision"):
        resolve_precision("fp16", "cpu")


def test_losses_are_float32_with_autocast_off():
    batch = tiny_batch()
    a = torch.randn(4, 16, 8).bfloat16()
    with autocast(torch.bfloat16, "cpu"):
        rep = aligned(a, a.float() + 0.01, batch.generate_mask())
        assert torch.is_autocast_enabled("cpu")
        with full_precision("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    assert rep.dtype == torch.float32 and 0 <= float(rep) < 1e-2


def test_bf16_step_matches_fp32_and_keeps_master_weights_fp32():
    """One Self-Flow step (student, teacher, projector, AdamW, EMA) under CPU bf16 autocast
    against the same step in fp32, from the same weights, batch and random draws.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%); every matmul of the
    2-block model rounds its inputs once, and the errors of independent roundings largely
    cancel in the losses' means over 64 tokens x 4 channels: measured 1e-4 relative on both
    losses and a gradient cosine of 0.99999. We allow 1% relative on the flow loss, 5e-3
    absolute on the representation loss (1 - cos, of order 1) -- a couple of roundoffs of
    *systematic* error -- and a gradient cosine above 0.999."""
    batch = tiny_batch()
    ref, amp = tiny_state(None), tiny_state(torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(ref.model.parameters(), amp.model.parameters()))

    grads = {}
    for name, st in (("fp32", ref), ("bf16", amp)):
        g = torch.Generator().manual_seed(3)
        with autocast(st.precision, "cpu"):
            losses = st.objective(st.model, batch, teacher=st.teacher, generator=g)
        assert losses.total.dtype == losses.flow.dtype == losses.representation.dtype == torch.float32
        losses.total.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in st.trainable_parameters()])
        st.optimizer.zero_grad(set_to_none=True)
        if name == "fp32":
            flow32, rep32 = float(losses.flow.detach()), float(losses.representation.detach())
        else:
            flow16, rep16 = float(losses.flow.detach()), float(losses.representation.detach())
    assert abs(flow16 - flow32) <= 0.01 * flow32, (flow16, flow32)
    assert abs(rep16 - rep32) <= 5e-3, (rep16, rep32)
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    print(
        f"bf16 vs fp32: flow {flow16:.5f} vs {flow32:.5f}, representation {rep16:.5f} vs {rep32:.5f}, "
        f"grad cos {float(cos):.5f}"
    )
    assert cos > 0.999, float(cos)

    # autocast really ran in bf16: the student's velocity comes out of a bf16 matmul
    g = torch.Generator().manual_seed(3)
    with autocast(torch.bfloat16, "cpu"):
        steps = amp.objective.scheduler(batch, generator=g)
        out = amp.model(batch, steps.student)
    assert out.velocity[0].dtype == torch.bfloat16
    assert flow_loss(batch, (torch.zeros_like(batch.segments[0].tokens),), out, {})[0].dtype == torch.float32

    # a whole step: master weights, gradients' target, AdamW state and teacher stay float32
    res = [train_step(st, batch, generator=torch.Generator().manual_seed(4)) for st in (ref, amp)]
    assert abs(float(res[1].losses.flow) - float(res[0].losses.flow)) <= 0.01 * float(res[0].losses.flow)
    for st in (amp,):
        assert all(p.dtype == torch.float32 for p in st.trainable_parameters())
        assert all(p.dtype == torch.float32 for p in st.teacher.parameters())
        assert all(v.dtype == torch.float32 for s in st.optimizer.state.values() for v in s.values() if v.ndim)
    moved = [(p - q).abs().max() for p, q in zip(ref.model.parameters(), amp.model.parameters())]
    assert max(moved) < 5e-3  # lr 1e-3 AdamW: both moved the same way, by about lr per weight
