"""p(t) samplers and the dual-timestep scheduler: statistics over many seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow.core.timesteps import (
    DualTimestepScheduler,
    GapTeacher,
    LogitNormalTime,
    MinTeacher,
    ShiftedTime,
    UniformTime,
    frame_leaders,
    shift_time,
)
from selfflow.core.types import Segment, TokenBatch, grid_positions, time_ticks

# ----------------------------------------------------------------------------- p(t)


def test_uniform_time_moments(gen):
    t = UniformTime().sample(200_000, generator=gen)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    assert abs(float(t.mean()) - 0.5) < 0.005
    assert abs(float(t.var()) - 1 / 12) < 0.002


def test_logit_normal_time_moments(gen):
    t = LogitNormalTime(mean=0.5, std=0.8).sample(200_000, generator=gen)
    z = torch.logit(t.double())
    assert abs(float(z.mean()) - 0.5) < 0.01
    assert abs(float(z.std()) - 0.8) < 0.01
    with pytest.raises(ValueError):
        LogitNormalTime(std=0.0)


def test_shift_time_endpoints_and_direction():
    t = torch.linspace(0, 1, 101)
    assert float(shift_time(t, 3.0)[0]) == 0.0 and float(shift_time(t, 3.0)[-1]) == 1.0
    assert bool((shift_time(t, 3.0) >= t - 1e-7).all())  # a > 1 moves mass towards noise
    assert bool((shift_time(t, 1 / 3) <= t + 1e-7).all())
    torch.testing.assert_close(shift_time(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    torch.testing.assert_close(shift_time(t, 1.0), t)


def test_shifted_time_shifts_base_draws():
    base = UniformTime()
    a = ShiftedTime(base=base, shift=2.0).sample(1000, generator=torch.Generator().manual_seed(3))
    b = base.sample(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, shift_time(b, 2.0))
    assert ShiftedTime.for_resolution(base, 1024, base_tokens=256).shift == 2.0
    with pytest.raises(ValueError):
        ShiftedTime(base=base, shift=0.0)


# ----------------------------------------------------------------------------- scheduler


def _dense(steps):
    return steps.student.per_token(), steps.teacher.per_token()


def test_mask_rate_matches_ratio_over_many_draws(make_batch, gen):
    batch = make_batch([("image", 64, 2, "generate")], batch=256)
    sched = DualTimestepScheduler(mask_ratio=0.25)
    frac = torch.stack([sched(batch, generator=gen).masked.float().mean() for _ in range(10)])
    # 163,840 Bernoulli(0.25) draws: the standard error of the mean is 0.0011
    assert abs(float(frac.mean()) - 0.25) < 0.005
    # per token per sample, not a fixed count: per-sample counts are Binomial(64, 0.25)
    counts = sched(batch, generator=gen).masked.sum(1).float()
    assert abs(float(counts.var()) - 64 * 0.25 * 0.75) < 0.25 * 64 * 0.25 * 0.75


def test_per_modality_mask_ratios(make_batch, gen):
    specs = [
        ("text", 16, 2, "condition"),
        ("image", 64, 2, "generate"),
        ("video", 64, 2, "generate"),
        ("audio", 64, 2, "generate"),
        ("depth", 32, 2, "generate"),
    ]
    batch = make_batch(specs, batch=128)
    sched = DualTimestepScheduler(mask_ratio={"image": 0.25, "video": 0.10, "audio": 0.50, "text": 0.5})
    masked = torch.cat([sched(batch, generator=gen).masked for _ in range(8)])
    parts = dict(zip(batch.modalities, masked.split([16, 64, 64, 64, 32], dim=1)))
    assert not bool(parts["text"].any())  # condition tokens are never masked, whatever the ratio
    assert not bool(parts["depth"].any())  # a modality missing from the mapping is not masked
    for name, ratio in (("image", 0.25), ("video", 0.10), ("audio", 0.50)):
        assert abs(float(parts[name].float().mean()) - ratio) < 0.01, name


def test_mask_ratio_validation():
    with pytest.raises(ValueError, match=r"mask ratio for '\*' is 0.6"):
        DualTimestepScheduler(mask_ratio=0.6)
    with pytest.raises(ValueError, match=r"mask ratio for 'audio' is 0.7"):
        DualTimestepScheduler(mask_ratio={"image": 0.25, "audio": 0.7})
    with pytest.raises(ValueError):
        DualTimestepScheduler(mask_ratio=-0.1)


def test_unmasked_samples_keep_the_teacher_at_t(make_batch, gen):
    # with 2 tokens at ratio 0.25, ~56% of samples have no masked token: their only level is t
    batch = make_batch([("image", 2, 2, "generate")], batch=4096)
    steps = DualTimestepScheduler(mask_ratio=0.25).__call__(batch, generator=gen)
    none = ~steps.masked.any(dim=1)
    assert 0.5 < float(none.float().mean()) < 0.62
    t = steps.student.levels[:, 1]
    assert torch.equal(steps.teacher.per_token()[none], t[none][:, None].expand(-1, 2))
    assert torch.equal(steps.student.levels[none, 2], t[none])


def test_t_and_s_unsorted_and_independent(make_batch, gen):
    # 64 tokens: every sample has masked tokens (P(none) = 0.75^64), so every s is a real draw
    batch = make_batch([("image", 64, 2, "generate")], batch=8192)
    levels = DualTimestepScheduler(mask_ratio=0.25).__call__(batch, generator=gen).student.levels
    t, s = levels[:, 1], levels[:, 2]
    assert bool((levels[:, 0] == 0).all())
    p_less = float((t < s).float().mean())
    assert 0.47 < p_less < 0.53  # both orders occur, about equally often
    corr = float(torch.corrcoef(torch.stack([t, s]))[0, 1])
    assert abs(corr) < 0.04
    # the joint factorises on a grid of quadrants, and t and s have the same law
    for a in (0.3, 0.5, 0.7):
        for b in (0.3, 0.5, 0.7):
            joint = float(((t < a) & (s < b)).float().mean())
            assert abs(joint - float((t < a).float().mean()) * float((s < b).float().mean())) < 0.02
        assert abs(float((t < a).float().mean()) - float((s < a).float().mean())) < 0.03


def test_student_levels_per_token(make_batch, gen):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 40, 2, "generate")], batch=64, padded={"image": 5})
    steps = DualTimestepScheduler(mask_ratio=0.5)(batch, generator=gen)
    tau, _ = _dense(steps)
    t, s = steps.student.levels[:, 1:2], steps.student.levels[:, 2:3]
    gen_mask = batch.generate_mask()
    expected = torch.where(steps.masked, s, t) * gen_mask  # condition and padding at 0
    assert torch.equal(tau, expected)
    assert not bool((steps.masked & ~gen_mask).any())
    assert torch.equal(steps.groups(), gen_mask.long() + steps.masked.long())


def test_teacher_level_is_min_t_s_for_every_generated_token(make_batch, gen):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 24, 2, "generate")], batch=256)
    steps = DualTimestepScheduler(mask_ratio=0.5)(batch, generator=gen)
    _, teacher = _dense(steps)
    tmin = torch.minimum(steps.student.levels[:, 1], steps.student.levels[:, 2])
    gen_mask = batch.generate_mask()
    assert torch.equal(teacher[gen_mask], tmin[:, None].expand_as(teacher)[gen_mask])
    assert bool((teacher[~gen_mask] == 0).all())
    assert torch.equal(steps.teacher.index, steps.student.index)


def test_gap_teacher_levels_within_gap(make_batch, gen):
    batch = make_batch([("text", 2, 2, "condition"), ("image", 16, 2, "generate")], batch=4096)
    gap = 0.2
    steps = DualTimestepScheduler(mask_ratio=0.5, teacher_rule=GapTeacher(gap=gap))(batch, generator=gen)
    student, teacher = steps.student.levels, steps.teacher.levels
    assert bool((teacher[:, 0] == 0).all())
    lower = (student[:, 1:] - gap).clamp_min(0.0)
    assert bool((teacher[:, 1:] <= student[:, 1:]).all()) and bool((teacher[:, 1:] >= lower - 1e-7).all())
    # tau - U(0, gap): where nothing is clamped, the drop is uniform on [0, gap]
    free = student[:, 1:] > gap
    drop = (student[:, 1:] - teacher[:, 1:])[free]
    assert abs(float(drop.mean()) - gap / 2) < 0.005
    assert float(drop.min()) < 0.01 and float(drop.max()) > gap - 0.01
    # each noise group draws its own offset
    both = free.all(1)
    assert (
        float((drop_t := student[both, 1] - teacher[both, 1]).sub(student[both, 2] - teacher[both, 2]).abs().mean())
        > 0.03
    )
    assert drop_t.numel() > 100
    # the dense teacher levels follow the shared index
    tau_teacher = steps.teacher.per_token()
    assert torch.equal(tau_teacher[:, :2], torch.zeros(4096, 2))
    with pytest.raises(ValueError):
        GapTeacher(gap=0.0)


def test_max_gap_switch(make_batch, gen):
    batch = make_batch([("image", 64, 2, "generate")], batch=4096)  # every sample has masked tokens
    levels = DualTimestepScheduler(mask_ratio=0.25, max_gap=0.2)(batch, generator=gen).student.levels
    gap = (levels[:, 1] - levels[:, 2]).abs()
    assert float(gap.max()) <= 0.2 + 1e-6
    assert float(gap.mean()) > 0.05  # not collapsed onto t
    t, s = levels[:, 1], levels[:, 2]
    assert 0.4 < float((t < s).float().mean()) < 0.6  # still unsorted
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0


def test_min_gap_switch(make_batch, gen):
    batch = make_batch([("image", 64, 2, "generate")], batch=4096)  # every sample has masked tokens
    levels = DualTimestepScheduler(mask_ratio=0.25, min_gap=0.3)(batch, generator=gen).student.levels
    assert float((levels[:, 1] - levels[:, 2]).abs().min()) >= 0.3
    both = DualTimestepScheduler(mask_ratio=0.25, min_gap=0.1, max_gap=0.25, time=UniformTime())(
        batch, generator=gen
    ).student.levels
    gap = (both[:, 1] - both[:, 2]).abs()
    assert float(gap.min()) >= 0.1 and float(gap.max()) <= 0.25 + 1e-6


def test_gap_validation():
    with pytest.raises(ValueError, match="min_gap=0.5 is larger than max_gap=0.2"):
        DualTimestepScheduler(mask_ratio=0.25, min_gap=0.5, max_gap=0.2)
    with pytest.raises(ValueError, match=r"min_gap must be in \[0, 1\)"):
        DualTimestepScheduler(mask_ratio=0.25, min_gap=1.0)
    with pytest.raises(ValueError, match=r"max_gap must be in \(0, 1\]"):
        DualTimestepScheduler(mask_ratio=0.25, max_gap=0.0)


def test_single_timestep_mode(make_batch, gen):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 8, 2, "generate")], batch=16)
    steps = DualTimestepScheduler(dual=False, mask_ratio=0.5)(batch, generator=gen)
    tau, teacher = _dense(steps)
    assert not bool(steps.masked.any())
    t = DualTimestepScheduler(mask_ratio=0.25).time.sample(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tau, t[:, None] * batch.generate_mask())  # the first draw is t, as in FlowMatching
    assert torch.equal(teacher, tau)


@pytest.mark.parametrize("rule", [MinTeacher(), GapTeacher(gap=0.2)])
@pytest.mark.parametrize("gaps", [{}, {"max_gap": 0.3, "min_gap": 0.05}])
def test_scheduler_uses_only_the_explicit_generator(make_batch, global_rng_untouched, rule, gaps):
    batch = make_batch([("text", 3, 2, "condition"), ("image", 16, 2, "generate")], batch=32)
    sched = DualTimestepScheduler(mask_ratio=0.25, teacher_rule=rule, **gaps)
    torch.manual_seed(123)
    with global_rng_untouched():
        a = sched(batch, generator=torch.Generator().manual_seed(7))
        b = sched(batch, generator=torch.Generator().manual_seed(7))
        c = sched(batch, generator=torch.Generator().manual_seed(8))
    for x, y in ((a.student, b.student), (a.teacher, b.teacher)):
        assert torch.equal(x.levels, y.levels) and torch.equal(x.index, y.index)
    assert torch.equal(a.masked, b.masked)
    assert not torch.equal(a.student.levels, c.student.levels)


def test_time_samplers_use_only_the_explicit_generator(global_rng_untouched):
    samplers = [UniformTime(), LogitNormalTime(), ShiftedTime(base=LogitNormalTime(), shift=math.sqrt(2))]
    with global_rng_untouched():
        for s in samplers:
            a = s.sample(64, generator=torch.Generator().manual_seed(1))
            b = s.sample(64, generator=torch.Generator().manual_seed(1))
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- mask unit


def _video_batch(batch: int, frames: int = 5, side: int = 4, *, shuffle: bool = False) -> TokenBatch:
    """Latent-video-like tokens: ``frames`` time steps of ``side x side`` tokens, at the
    ticks a 10 fps clip's latent frames sit at; ``shuffle`` puts the tokens out of frame order."""
    pos = grid_positions(frames, side, side, batch=batch).clone()
    pos[..., 0] = time_ticks(pos[..., 0] * 4, 10.0)
    if shuffle:
        pos = pos[:, torch.randperm(pos.shape[1], generator=torch.Generator().manual_seed(1))]
    n = pos.shape[1]
    seg = Segment(modality="video", tokens=torch.zeros(batch, n, 2), positions=pos)
    return TokenBatch(segments=[seg])


@pytest.mark.parametrize("unit", ["token", "frame"])
def test_mask_unit_rate_matches_ratio_over_10000_draws(gen, unit):
    batch = _video_batch(10_000)
    sched = DualTimestepScheduler(mask_ratio=0.10, mask_unit={"video": unit})
    steps = sched(batch, generator=gen)
    # 10,000 samples: per token SE 0.0003; per frame (5 frames) SE 0.0013 -> +-0.01 is > 7 SE
    assert abs(float(steps.masked.float().mean()) - 0.10) < 0.01


@pytest.mark.parametrize("shuffle", [False, True])
def test_frame_unit_gives_one_level_per_frame(gen, shuffle):
    batch = _video_batch(512, shuffle=shuffle)
    steps = DualTimestepScheduler(mask_ratio=0.5, mask_unit="frame")(batch, generator=gen)
    t_pos = batch.segments[0].positions[..., 0]
    levels = steps.student.per_token()
    mixed = 0
    for frame in t_pos[0].unique():
        in_frame = t_pos == frame
        per_frame = steps.masked[in_frame].view(512, -1)
        assert bool((per_frame == per_frame[:, :1]).all()), "a frame's tokens got different mask draws"
        lv = levels[in_frame].view(512, -1)
        assert bool((lv == lv[:, :1]).all())
        mixed += int(per_frame[:, 0].sum())
    assert 0 < mixed < 512 * 5  # frames are masked in some samples, not in all
    # token mode on the same batch mixes levels inside frames
    tok = DualTimestepScheduler(mask_ratio=0.5, mask_unit="token")(batch, generator=gen)
    first = t_pos == t_pos[0, 0]
    assert not bool((tok.masked[first].view(512, -1) == tok.masked[first].view(512, -1)[:, :1]).all())


@pytest.mark.parametrize("unit", ["token", "frame"])
def test_per_token_level_marginal_follows_p_t(gen, unit):
    """t and s are not sorted, so every token's level is a draw from p(t) whichever unit masks
    it: a two-sided KS test of per-token levels against the logit-normal CDF."""
    from scipy import stats

    batch = _video_batch(4000)
    time = LogitNormalTime()
    steps = DualTimestepScheduler(time=time, mask_ratio=0.10, mask_unit=unit)(batch, generator=gen)
    levels = steps.student.per_token()
    # one token per sample (the masked ones and the others alike): independent draws
    pick = torch.randint(levels.shape[1], (levels.shape[0],), generator=gen)
    x = levels[torch.arange(levels.shape[0]), pick].double()
    z = torch.logit(x.clamp(1e-12, 1 - 1e-12))
    result = stats.kstest(((z - time.mean) / time.std).numpy(), "norm")
    assert result.pvalue > 0.01, result
    # and the masked tokens alone (level s) follow it too
    sel = steps.masked.any(1)
    s_tok = steps.student.levels[sel, 2].double()
    z = torch.logit(s_tok.clamp(1e-12, 1 - 1e-12))
    assert stats.kstest(((z - time.mean) / time.std).numpy(), "norm").pvalue > 0.01


def test_frame_leaders_and_unit_validation():
    pos = torch.tensor([[[3, 0, 0], [0, 0, 0], [3, 0, 1], [0, 1, 0]]])
    assert frame_leaders(pos).tolist() == [[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="'token'.*'frame'"):
        DualTimestepScheduler(mask_ratio=0.1, mask_unit="patch")
    with pytest.raises(ValueError, match="mask unit for 'video'"):
        DualTimestepScheduler(mask_ratio=0.1, mask_unit={"video": "clip"})
