"""Roles chosen per batch (``ConditionRule``) and the shared position convention."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.conditioning import ConditionRule
from selfflow.core.model import MultiAxisRope
from selfflow.core.types import ROPE_TIME_TICKS, TIME_RATE, Role, grid_positions, sequence_positions, time_ticks

SPECS = [("video", 6, 3, "generate"), ("audio", 4, 2, "generate"), ("text", 3, 5, "generate")]


def test_always_conditions_are_clean_every_batch(make_batch):
    batch = make_batch(SPECS, batch=2)
    out = ConditionRule(always={"text"})(batch)
    assert [s.role for s in out.segments] == [Role.GENERATE, Role.GENERATE, Role.CONDITION]
    assert torch.equal(out.segments[2].tokens, batch.segments[2].tokens)  # roles change, tokens do not
    assert ConditionRule()(batch) is batch  # nothing to do: the same batch, no copy


def test_condition_probabilities_match_their_rate(make_batch):
    batch = make_batch(SPECS, batch=2)
    rule = ConditionRule(always={"text"}, probability={"video": 0.25, "audio": 0.5})
    g = torch.Generator().manual_seed(0)
    counts = {"video": 0, "audio": 0}
    n = 4000
    for _ in range(n):
        roles = rule.roles(batch.modalities, g)
        assert roles[2] is Role.CONDITION and Role.GENERATE in roles  # something is always generated
        for i, m in enumerate(("video", "audio")):
            counts[m] += roles[i] is Role.CONDITION
    # both drawn together (p = 0.125) keeps one of them generated, chosen uniformly: the
    # marginals are p - 0.125 / 2
    assert counts["video"] / n == pytest.approx(0.25 - 0.0625, abs=0.02)
    assert counts["audio"] / n == pytest.approx(0.5 - 0.0625, abs=0.025)


def test_roles_repeat_for_the_same_generator_seed(make_batch):
    batch = make_batch(SPECS, batch=2)
    rule = ConditionRule(probability={"video": 0.5, "audio": 0.5, "text": 0.5})
    draws = [[rule.roles(batch.modalities, torch.Generator().manual_seed(s)) for s in range(20)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_invalid_rules_are_refused(make_batch):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        ConditionRule(probability={"video": 1.5})
    with pytest.raises(ValueError, match="always conditions and also have a condition probability"):
        ConditionRule(always={"video"}, probability={"video": 0.5})
    batch = make_batch([("text", 3, 5, "generate")], batch=2)
    with pytest.raises(ValueError, match="nothing to generate"):
        ConditionRule(always={"text"})(batch)
    with pytest.raises(ValueError, match="needs a generator"):
        ConditionRule(probability={"text": 0.5})(batch)


# ----------------------------------------------------------------------------- positions


def test_time_ticks_put_common_rates_on_whole_ticks():
    for rate in (24, 25, 30, 60, 50, 62.5, 75):
        ticks = time_ticks(torch.arange(10), rate)
        assert ticks.dtype == torch.long
        assert torch.equal(ticks, (torch.arange(10) * TIME_RATE / rate).long())  # exact: whole ticks
    # a video frame at 25 fps and the audio frames played with it share t
    assert int(time_ticks(5, 25)) == int(time_ticks(15, 75)) == TIME_RATE // 5
    with pytest.raises(ValueError, match="positive"):
        time_ticks(1, 0)


def test_text_positions_never_collide_with_an_image_grid():
    text = sequence_positions(8, batch=2)
    image = grid_positions(1, 4, 4, batch=2)
    assert text.shape == (2, 8, 3) and text.dtype == torch.long
    assert not (set(map(tuple, text[0].tolist())) & set(map(tuple, image[0].tolist())))
    assert torch.equal(text[0, 1:] - text[0, :-1], torch.tensor([[0, 1, 1]]).expand(7, 3))  # one step per token


def test_rope_reads_time_in_rotary_steps_and_leaves_images_unchanged():
    rope = MultiAxisRope(head_dim=12, theta=10000.0)
    # one rotary step of time (ROPE_TIME_TICKS ticks) rotates the time pairs as one unit of h does an h pair
    cos_t, _ = rope(torch.tensor([[[ROPE_TIME_TICKS, 0, 0]]]))
    cos_h, _ = rope(torch.tensor([[[0, 1, 0]]]))
    t_pairs = (rope.axis == 0).nonzero().flatten()
    h_pairs = (rope.axis == 1).nonzero().flatten()
    torch.testing.assert_close(cos_t[0, 0, 0, t_pairs[:2]], cos_h[0, 0, 0, h_pairs[:2]])
    # at t = 0 the time axis adds nothing: image angles are those of (h, w) alone
    cos0, sin0 = rope(grid_positions(1, 3, 3))
    assert torch.equal(cos0[..., t_pairs], torch.ones_like(cos0[..., t_pairs]))
    assert torch.equal(sin0[..., t_pairs], torch.zeros_like(sin0[..., t_pairs]))
