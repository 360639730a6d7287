"""Value types: validators name the field, the expected shape/dtype and what was given;
the factored Timesteps gather to the right dense levels."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

from selfflow.core.types import LossBreakdown, Role, Segment, Timesteps, TokenBatch, grid_positions


def _segment(b: int = 2, n: int = 5, c: int = 3, **kw) -> Segment:
    args = dict(modality="image", tokens=torch.zeros(b, n, c), positions=grid_positions(1, 1, n, batch=b))
    args.update(kw)
    return Segment(**args)


# ----------------------------------------------------------------------------- Segment


def test_segment_properties_and_default_valid_mask():
    seg = _segment(b=2, n=5, c=3)
    assert (seg.batch_size, seg.num_tokens, seg.channels) == (2, 5, 3)
    assert seg.generated and seg.role is Role.GENERATE
    assert seg.valid_mask().dtype == torch.bool and bool(seg.valid_mask().all())
    assert not _segment(role=Role.CONDITION).generated


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"tokens": torch.zeros(2, 5)},
            ValueError,
            r"Segment\[image\]\.tokens must have shape \(B, N, C\), got \(2, 5\)",
        ),
        (
            {"tokens": torch.zeros(2, 5, 3, dtype=torch.long)},
            TypeError,
            r"tokens must be floating point, got torch\.int64",
        ),
        ({"tokens": np.zeros((2, 5, 3), dtype=np.float32)}, TypeError, r"tokens must be a torch\.Tensor, got ndarray"),
        (
            {"positions": torch.zeros(2, 5, 2, dtype=torch.long)},
            ValueError,
            r"positions must have shape \(2, 5, 3\), got \(2, 5, 2\)",
        ),
        (
            {"positions": torch.zeros(2, 4, 3, dtype=torch.long)},
            ValueError,
            r"positions must have shape \(2, 5, 3\), got \(2, 4, 3\)",
        ),
        (
            {"positions": torch.zeros(2, 5, 3)},
            TypeError,
            r"positions must be integer .*got torch\.float32; convert with \.long\(\)",
        ),
        ({"positions": torch.zeros(2, 5, 3, dtype=torch.bool)}, TypeError, r"positions must be integer"),
        ({"valid": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"valid must have shape \(2, 5\), got \(2, 4\)"),
        ({"valid": torch.ones(2, 5)}, TypeError, r"valid must be bool, got torch\.float32"),
    ],
)
def test_segment_validators_name_field_expectation_and_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _segment(**kwargs)


def test_segment_is_frozen_and_keyword_only():
    seg = _segment()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        seg.tokens = torch.ones(2, 5, 3)
    with pytest.raises(TypeError):
        Segment("image", torch.zeros(2, 5, 3), grid_positions(1, 1, 5, batch=2))  # positional


def test_with_tokens_revalidates():
    seg = _segment()
    new = seg.with_tokens(torch.ones(2, 5, 3))
    assert torch.equal(new.tokens, torch.ones(2, 5, 3)) and torch.equal(seg.tokens, torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"positions must have shape \(2, 6, 3\)"):
        seg.with_tokens(torch.ones(2, 6, 3))


# ----------------------------------------------------------------------------- TokenBatch


def test_token_batch_validators():
    gen, cond = _segment(), _segment(role=Role.CONDITION, modality="text")
    with pytest.raises(ValueError, match="at least one segment"):
        TokenBatch(segments=[])
    with pytest.raises(ValueError, match=r"same batch size, got image=2, audio=3"):
        TokenBatch(segments=[gen, _segment(b=3, modality="audio")])
    with pytest.raises(ValueError, match="no segment with role GENERATE"):
        TokenBatch(segments=[cond])
    with pytest.raises(TypeError, match=r"segments\[1\] must be a Segment, got Tensor"):
        TokenBatch(segments=[gen, torch.zeros(2, 5, 3)])
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(2, 1\)"):
        TokenBatch(segments=[gen], labels=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.float32"):
        TokenBatch(segments=[gen], labels=torch.zeros(2))
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.bool"):
        TokenBatch(segments=[gen], labels=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        TokenBatch(segments=[gen], labels=[0, 1])
    ok = TokenBatch(segments=[cond, gen], labels=torch.tensor([0, 1]))
    assert ok.batch_size == 2 and ok.num_tokens == 10 and ok.modalities == ("text", "image")


def test_generate_and_valid_masks(make_batch):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 4, 3, "generate")], batch=2, padded={"image": 1})
    expected_gen = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(batch.generate_mask(), expected_gen)
    expected_valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(batch.valid_mask(), expected_valid)
    assert make_batch().valid_mask() is None


def test_token_batch_with_tokens_and_labels(make_batch):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 4, 3, "generate")], batch=2, num_classes=2)
    new = batch.with_tokens([torch.ones(2, 3, 2), torch.full((2, 4, 3), 2.0)])
    assert [float(s.tokens.mean()) for s in new.segments] == [1.0, 2.0]
    assert [s.role for s in new.segments] == [Role.CONDITION, Role.GENERATE]
    assert torch.equal(new.labels, batch.labels)
    with pytest.raises(ValueError, match="expected 2 token tensors, got 1"):
        batch.with_tokens([torch.ones(2, 3, 2)])
    assert batch.with_labels(None).labels is None
    moved = batch.to("cpu")
    assert torch.equal(moved.segments[1].tokens, batch.segments[1].tokens)


# ----------------------------------------------------------------------------- Timesteps


@pytest.mark.parametrize(
    ("levels", "index", "error", "pattern"),
    [
        (
            torch.zeros(2),
            torch.zeros(2, 4, dtype=torch.long),
            ValueError,
            r"Timesteps\.levels must have shape \(B, K\), got \(2,\)",
        ),
        (
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            TypeError,
            r"levels must be floating point",
        ),
        (
            torch.zeros(2, 2),
            torch.zeros(2, 4, 1, dtype=torch.long),
            ValueError,
            r"index must have shape \(B, N_total\), got \(2, 4, 1\)",
        ),
        (
            torch.zeros(2, 2),
            torch.zeros(2, 4, dtype=torch.int32),
            TypeError,
            r"index must be torch\.long .*got torch\.int32",
        ),
        (torch.zeros(3, 2), torch.zeros(2, 4, dtype=torch.long), ValueError, r"batch sizes differ: levels 3, index 2"),
        ([[0.0, 1.0]], torch.zeros(1, 4, dtype=torch.long), TypeError, r"levels must be a torch\.Tensor, got list"),
    ],
)
def test_timesteps_validators(levels, index, error, pattern):
    with pytest.raises(error, match=pattern):
        Timesteps(levels=levels, index=index)


def test_timesteps_gather_and_split():
    levels = torch.tensor([[0.0, 0.3, 0.9], [0.0, 0.6, 0.1]])
    index = torch.tensor([[0, 1, 2, 1, 2], [2, 2, 0, 1, 1]])
    ts = Timesteps(levels=levels, index=index)
    expected = torch.tensor([[0.0, 0.3, 0.9, 0.3, 0.9], [0.1, 0.1, 0.0, 0.6, 0.6]])
    assert ts.num_levels == 3
    assert torch.equal(ts.per_token(), expected)
    a, b = ts.split([2, 3])
    assert torch.equal(a, expected[:, :2]) and torch.equal(b, expected[:, 2:])


def test_timesteps_uniform_all_generated_is_one_broadcast_level(make_batch):
    batch = make_batch(batch=3)
    t = torch.tensor([0.1, 0.5, 0.9])
    ts = Timesteps.uniform(t, batch)
    assert ts.num_levels == 1
    assert torch.equal(ts.per_token(), t[:, None].expand(3, 6))


def test_timesteps_uniform_puts_condition_and_padding_at_zero(make_batch):
    batch = make_batch([("text", 2, 2, "condition"), ("image", 3, 3, "generate")], batch=2, padded={"image": 1})
    ts = Timesteps.uniform(torch.tensor([0.4, 0.8]), batch)
    expected = torch.tensor([[0.0, 0.0, 0.4, 0.4, 0.4], [0.0, 0.0, 0.8, 0.8, 0.0]])
    assert torch.equal(ts.per_token(), expected)


# ----------------------------------------------------------------------------- misc


def test_loss_breakdown_detached_gives_plain_floats():
    lb = LossBreakdown(
        total=torch.tensor(1.5, requires_grad=True) * 1,
        flow=torch.tensor(1.0),
        representation=torch.tensor(0.625),
        per_modality={"image": torch.tensor(0.25)},
    )
    assert lb.detached() == {"loss": 1.5, "flow": 1.0, "representation": 0.625, "flow/image": 0.25}
    assert LossBreakdown(total=torch.tensor(2.0), flow=torch.tensor(2.0)).detached() == {"loss": 2.0, "flow": 2.0}


def test_grid_positions_raster_order():
    pos = grid_positions(2, 2, 3, batch=2)
    assert pos.shape == (2, 12, 3) and pos.dtype == torch.long
    assert pos[0, :4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    assert pos[1, -1].tolist() == [1, 1, 2]
