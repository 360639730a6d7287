"""End to end on a toy problem: a tiny FlowTransformer trained with Self-Flow on two classes
in token space (class 0 near +1, class 1 near -1) samples near the right mode per label."""

from __future__ import annotations

import torch

from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.objectives import SelfFlow
from selfflow.core.timesteps import DualTimestepScheduler
from selfflow.core.train_step import TrainState, train_step
from selfflow.core.types import Segment, TokenBatch, grid_positions
from selfflow.plugins.samplers import EulerSampler, model_velocity

TOKENS, CHANNELS, BATCH, STEPS = 4, 2, 64, 400


def _mode(labels: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 1)``: +1 for class 0, -1 for class 1."""
    return (1.0 - 2.0 * labels.float())[:, None, None]


def _toy_batch(g: torch.Generator, labels: torch.Tensor | None = None) -> TokenBatch:
    if labels is None:
        labels = torch.randint(0, 2, (BATCH,), generator=g)
    x = _mode(labels) + 0.1 * torch.randn(len(labels), TOKENS, CHANNELS, generator=g)
    seg = Segment(modality="toy", tokens=x, positions=grid_positions(1, 1, TOKENS, batch=len(labels)))
    return TokenBatch(segments=[seg], labels=labels)


def _distances(model: torch.nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample RMS distance of 20-step Euler samples to the right and the wrong mode."""
    template = _toy_batch(torch.Generator().manual_seed(0), labels)
    out = EulerSampler(steps=20)(model_velocity(model), template, generator=torch.Generator().manual_seed(1))
    x = out.segments[0].tokens
    right = (x - _mode(labels)).pow(2).mean((1, 2)).sqrt()
    wrong = (x + _mode(labels)).pow(2).mean((1, 2)).sqrt()
    return right, wrong


def test_self_flow_learns_two_modes(single_thread):
    torch.manual_seed(0)  # weight init
    model = FlowTransformer(ModelConfig.preset("tiny", channels={"toy": CHANNELS}, num_classes=2))
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    teacher = EMATeacher(model, EMAConfig(decay=0.99, warmup=True))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=3e-3, weight_decay=0.0)
    state = TrainState(model=model, teacher=teacher, objective=objective, optimizer=optimizer)
    labels = torch.tensor([0, 1] * 32)

    right0, _ = _distances(teacher.model, labels)
    assert float(right0.mean()) > 1.0  # before training: noise, far from both modes

    g = torch.Generator().manual_seed(0)
    first = last = None
    for i in range(STEPS):
        losses = train_step(state, _toy_batch(g), generator=g).losses
        if i < 20:
            first = losses.detached()["flow"] if first is None else first + losses.detached()["flow"]
        elif i >= STEPS - 20:
            last = losses.detached()["flow"] if last is None else last + losses.detached()["flow"]
    assert last < 0.3 * first
    assert losses.representation is not None and float(losses.representation.detach()) < 0.2

    # the EMA model is the evaluation model; data noise is 0.1 per coordinate
    right, wrong = _distances(teacher.model, labels)
    assert float(right.mean()) < 0.2
    assert float(right.max()) < 0.4, right
    assert float(wrong.min()) > 1.5, wrong
