"""FlowTransformer: factored adaLN equals the per-token computation, truncated forward and
feature taps, preset sizes, DiT init, per-modality projections, and the hand-written
kernels (fused RoPE, GELU, multiply-add, level gather) against their plain references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfflow.core import kernels as K
from selfflow.core import model as M
from selfflow.core.model import PRESETS, FlowTransformer, ModelConfig
from selfflow.core.types import Role, Segment, Timesteps, TokenBatch, grid_positions

pytestmark = pytest.mark.usefixtures("single_thread")

CHANNELS = {"image": 6, "audio": 4}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (DiT init zeroes adaLN and the output layer, which would
    make most comparisons trivially exact), scaled by fan-in so activations stay O(1) and an
    absolute tolerance of 1e-5 means what it says."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _model(modulation: str = "factored", *, seed: int = 0, depth: int = 3, **kw) -> FlowTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(channels=CHANNELS, width=48, depth=depth, heads=2, num_classes=5, modulation=modulation, **kw)
    return _randomise(FlowTransformer(cfg), seed)


def _batch(b: int = 3, seed: int = 1) -> TokenBatch:
    """An image segment (generated, 4x4 grid) followed by an audio segment (condition)."""
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(
        segments=(
            Segment(
                modality="image", tokens=torch.randn(b, 16, 6, generator=g), positions=grid_positions(1, 4, 4, batch=b)
            ),
            Segment(
                modality="audio",
                tokens=torch.randn(b, 5, 4, generator=g),
                positions=grid_positions(5, 1, 1, batch=b),
                role=Role.CONDITION,
            ),
        ),
        labels=torch.tensor([0, 4, 5])[:b],  # 5 is the null label
    )


def _dual_levels(batch: TokenBatch, seed: int = 2) -> Timesteps:
    """Three levels per sample: 0 for the condition tokens, t and s mixed over the image."""
    g = torch.Generator().manual_seed(seed)
    b = batch.batch_size
    levels = torch.cat([torch.zeros(b, 1), torch.rand(b, 2, generator=g)], dim=1)
    image = 1 + torch.randint(0, 2, (b, 16), generator=g)
    image[:, 0], image[:, 1] = 1, 2  # both generated levels occur in every sample
    index = torch.cat([image, torch.zeros(b, 5, dtype=torch.long)], dim=1)
    return Timesteps(levels=levels, index=index)


# ----------------------------------------------------------------------------- factored == dense


def test_factored_modulation_equals_dense_per_token_reference():
    factored, dense = _model("factored"), _model("dense")
    dense.load_state_dict(factored.state_dict())
    batch, ts = _batch(), _dual_levels(_batch())
    assert ts.levels.shape[1] == 3 and all(len(row.unique()) == 3 for row in ts.index)

    out_f = factored(batch, ts, return_hidden=(1, 2))
    out_d = dense(batch, ts, return_hidden=(1, 2))
    torch.testing.assert_close(out_f.velocity[0], out_d.velocity[0], rtol=0, atol=1e-5)
    for l in (1, 2):
        torch.testing.assert_close(out_f.hidden[l], out_d.hidden[l], rtol=0, atol=1e-5)
    assert out_f.velocity[1] is None and out_d.velocity[1] is None  # the condition segment
    assert out_f.velocity[0].abs().mean() > 0.1  # not trivially equal

    # and the gradients, which go through the level gather's hand-written backward
    (out_f.velocity[0].square().sum() + out_f.hidden[2].sum()).backward()
    (out_d.velocity[0].square().sum() + out_d.hidden[2].sum()).backward()
    for (name, p_f), p_d in zip(factored.named_parameters(), dense.parameters()):
        if p_f.grad is None:
            assert p_d.grad is None, name
            continue
        scale = p_d.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p_f.grad / scale, p_d.grad / scale, rtol=0, atol=1e-5, msg=name)


def test_dense_modulation_is_the_per_token_adaln_of_each_block():
    """The dense path is the reference: block 1's output recomputed by hand from
    ``c_i = temb(tau_i) + label_emb`` and ``Linear(SiLU(c_i))`` per token."""
    model = _model("dense", depth=1)
    batch, ts = _batch(), _dual_levels(_batch())
    blk = model.blocks[0]
    with torch.no_grad():
        x = model.embed(batch)
        c = model.t_embed(ts.per_token()) + model.label_embed(batch.labels)[:, None]
        shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN(c).chunk(6, dim=-1)  # SiLU -> Linear
        b, n, d = x.shape
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale1) + shift1
        q, k, v = blk.qkv(h).view(b, n, 3, 2, d // 2).unbind(2)
        positions = torch.cat([s.positions for s in batch.segments], dim=1)
        cos, sin = model.rope(positions)
        q, k = K.apply_rope(q, cos, sin), K.apply_rope(k, cos, sin)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // 2), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
        x = x + gate1 * blk.proj(o)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale2) + shift2
        x = x + gate2 * blk.fc2(F.gelu(blk.fc1(h), approximate="tanh"))
        got = model(batch, ts, return_hidden=(1,)).hidden[1]
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


def test_single_level_broadcasts_and_equals_dense():
    factored, dense = _model("factored"), _model("dense")
    dense.load_state_dict(factored.state_dict())
    batch = _batch()
    t = torch.tensor([0.1, 0.5, 0.9])
    ts = Timesteps(levels=t[:, None], index=torch.zeros(3, 21, dtype=torch.long))
    torch.testing.assert_close(factored(batch, ts).velocity[0], dense(batch, ts).velocity[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- truncation and taps


def test_truncated_forward_returns_exactly_the_full_forwards_block_k():
    model = _model(depth=4)
    batch, ts = _batch(), _dual_levels(_batch())
    with torch.no_grad():
        full = model(batch, ts, return_hidden=(1, 2, 3, 4))
        for k in (1, 2, 3):
            cut = model(batch, ts, stop_after=k, return_hidden=(k,))
            assert torch.equal(cut.hidden[k], full.hidden[k])
            assert cut.velocity == (None, None)


def test_return_hidden_is_one_indexed():
    model = _model(depth=3)
    batch, ts = _batch(), _dual_levels(_batch())
    with torch.no_grad():
        out = model(batch, ts, return_hidden=(1, 3))
        x = model.embed(batch)
        cond, mod = model.conditioning(ts, batch.labels)
        positions = torch.cat([s.positions for s in batch.segments], dim=1)
        after_first = model.blocks[0](x, F.silu(cond), mod, model.rope(positions), None)
    assert sorted(out.hidden) == [1, 3]
    assert torch.equal(out.hidden[1], after_first)
    assert not torch.equal(out.hidden[1], x)  # block 1's output, not the embedding
    with pytest.raises(ValueError, match="1-indexed"):
        model(batch, ts, return_hidden=(0,))
    with pytest.raises(ValueError, match="outside the blocks run"):
        model(batch, ts, return_hidden=(3,), stop_after=2)
    with pytest.raises(ValueError, match="stop_after"):
        model(batch, ts, stop_after=4)


# ----------------------------------------------------------------------------- sizes and init


def _analytic_parameters(
    width: int, depth: int, channels: dict[str, int], num_classes: int, mlp_ratio: float = 4.0
) -> int:
    d, f, freq = width, int(width * mlp_ratio), 256
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + (d * 6 * d + 6 * d)
    t_embed = (freq * d + d) + (d * d + d)
    labels = (num_classes + 1) * d if num_classes > 0 else 0
    projections = sum((c * d + d) + (d * c + c) for c in channels.values())
    final = d * 2 * d + 2 * d
    return depth * block + t_embed + labels + projections + final


# one modality of 16-channel tokens and 10 classes: the README's table
README_PARAMETERS = {"tiny": 181_136, "XS": 4_167_568, "S": 32_478_736, "B": 129_543_184, "L": 456_810_512}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_the_formula(name):
    width, depth, heads = PRESETS[name]
    for channels, classes in (({"image": 16}, 10), ({"image": 16}, 1000), ({"image": 16, "audio": 8}, 0)):
        cfg = ModelConfig.preset(name, channels=channels, num_classes=classes)
        assert (cfg.width, cfg.depth, cfg.heads) == (width, depth, heads)
        with torch.device("meta"):  # counts only: no memory, no init time
            model = FlowTransformer(cfg)
        assert model.num_parameters() == _analytic_parameters(width, depth, channels, classes)
    assert _analytic_parameters(width, depth, {"image": 16}, 10) == README_PARAMETERS[name]


def test_dit_init_zeroes_adaln_and_output_so_the_initial_velocity_is_exactly_zero():
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels=CHANNELS, width=48, depth=2, heads=2, num_classes=5))
    for blk in model.blocks:
        assert not blk.adaLN[-1].weight.any() and not blk.adaLN[-1].bias.any()
    assert not model.final.adaLN[-1].weight.any()
    assert all(not lin.weight.any() and not lin.bias.any() for lin in model.final.out.values())
    assert model.blocks[0].qkv.weight.abs().sum() > 0  # xavier elsewhere
    batch, ts = _batch(), _dual_levels(_batch())
    out = model(batch, ts, return_hidden=(2,))
    assert torch.equal(out.velocity[0], torch.zeros(3, 16, 6))
    assert out.hidden[2].abs().sum() > 0


# ----------------------------------------------------------------------------- modalities


def test_per_modality_projections_with_two_channel_widths_in_one_sequence():
    model = _model()
    g = torch.Generator().manual_seed(3)
    batch = TokenBatch(
        segments=(
            Segment(
                modality="image", tokens=torch.randn(2, 4, 6, generator=g), positions=grid_positions(1, 2, 2, batch=2)
            ),
            Segment(
                modality="audio", tokens=torch.randn(2, 3, 4, generator=g), positions=grid_positions(3, 1, 1, batch=2)
            ),
        )
    )
    ts = Timesteps(levels=torch.tensor([[0.3], [0.7]]), index=torch.zeros(2, 7, dtype=torch.long))
    x = model.embed(batch)
    assert x.shape == (2, 7, 48)
    torch.testing.assert_close(x[:, :4], model.inp["image"](batch.segments[0].tokens), rtol=0, atol=0)
    torch.testing.assert_close(x[:, 4:], model.inp["audio"](batch.segments[1].tokens), rtol=0, atol=0)

    out = model(batch, ts)
    assert out.velocity[0].shape == (2, 4, 6) and out.velocity[1].shape == (2, 3, 4)
    # each segment's velocity comes out of its own projection: perturbing the audio output
    # layer changes only the audio velocity
    with torch.no_grad():
        model.final.out["audio"].weight.add_(1.0)
    again = model(batch, ts)
    assert torch.equal(again.velocity[0], out.velocity[0])
    assert not torch.allclose(again.velocity[1], out.velocity[1])


def test_unknown_modality_names_the_known_ones():
    model = _model()
    batch = TokenBatch(
        segments=(Segment(modality="video", tokens=torch.randn(1, 2, 6), positions=grid_positions(2, 1, 1)),)
    )
    ts = Timesteps(levels=torch.tensor([[0.5]]), index=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(KeyError, match="audio.*image"):
        model(batch, ts)


def test_timesteps_of_the_wrong_length_are_rejected():
    model = _model()
    batch = _batch()
    with pytest.raises(ValueError, match="timesteps.index"):
        model(batch, Timesteps(levels=torch.rand(3, 1), index=torch.zeros(3, 20, dtype=torch.long)))


# ----------------------------------------------------------------------------- hand-written kernels


def test_fused_rope_equals_the_reference_rotation_forward_and_backward():
    g = torch.Generator().manual_seed(4)
    b, n, h, dh = 2, 10, 3, 12
    rope = M.MultiAxisRope(dh, 10000.0)
    positions = torch.randint(0, 7, (b, n, 3), generator=g)
    cos, sin = rope(positions)
    qkv = torch.randn(b, n, 3, h, dh, generator=g, requires_grad=True)
    q, k, v = K.rotate_qkv(qkv, cos, sin)
    assert q.shape == (b, h, n, dh)

    ref = qkv.detach().clone().requires_grad_()
    rq, rk, rv = ref.unbind(2)
    rq, rk = K.apply_rope(rq, cos, sin), K.apply_rope(rk, cos, sin)
    for got, want in ((q, rq), (k, rk), (v, rv)):
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-6)

    w = [torch.randn(b, n, h, dh, generator=g) for _ in range(3)]
    sum(((t.transpose(1, 2) * wi).sum() for t, wi in zip((q, k, v), w))).backward()
    sum(((t * wi).sum() for t, wi in zip((rq, rk, rv), w))).backward()
    torch.testing.assert_close(qkv.grad, ref.grad, rtol=0, atol=1e-6)


def test_rope_rotates_pairs_by_position_times_frequency():
    """One axis, one pair: the rotation angle is position * inv_freq, in the (i, i + Dh/2) plane."""
    rope = M.MultiAxisRope(6, 10000.0)  # 3 pairs: one per axis (t, h, w)
    positions = torch.tensor([[[2, 0, 0], [0, 3, 0], [0, 0, 5]]])
    cos, sin = rope(positions)
    x = torch.zeros(1, 3, 1, 6)
    x[..., 0] = 1.0  # the t-axis pair (dims 0 and 3)
    y = K.apply_rope(x, cos, sin)
    angle = 2 * rope.inv_freq[0]
    torch.testing.assert_close(y[0, 0, 0, [0, 3]], torch.stack([angle.cos(), angle.sin()]))
    torch.testing.assert_close(y[0, 1:, 0, [0, 3]], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # other axes moved


def test_gelu_equals_torch_tanh_gelu_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 96, generator=g) * 4).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    y, y_ref = K.gelu_tanh(x), F.gelu(ref, approximate="tanh")
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    w = torch.randn(64, 96, generator=g)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(K.gelu_tanh(x), y_ref, rtol=1e-6, atol=1e-6)
    xd = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(K.gelu_tanh, (xd,))


@pytest.mark.parametrize(
    "shapes", [((4, 5, 6), (4, 5, 6), (4, 5, 6)), ((4, 1, 6), (4, 5, 6), (4, 1, 6)), ((4, 5, 6), (4, 1, 6), (4, 5, 6))]
)
def test_muladd_gradients_match_autograd(shapes):
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(K.muladd, tuple(ts))


def test_level_gather_backward_sums_each_levels_tokens():
    g = torch.Generator().manual_seed(7)
    index = torch.randint(0, 3, (2, 9), generator=g)
    mod = M.Modulation(index, 3)
    rows = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    got = mod.per_token(rows)
    torch.testing.assert_close(got, rows.gather(1, index[..., None].expand(-1, -1, 4)), rtol=0, atol=0)
    mod.assign = mod.assign.double()
    assert torch.autograd.gradcheck(lambda r: mod.per_token(r), (rows,))


# ----------------------------------------------------------------------------- FLOP accounting


def test_step_benchmark_flop_count_matches_the_matmuls_a_step_executes():
    """``benchmarks/step.py`` divides by an analytic FLOP count; every matmul a training step
    runs (forward, backward, teacher, projector, level reductions) must be in it. Attention
    is left out of the comparison: the CPU flash kernel has no entry in the flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from selfflow.benchmarks import step as bench

    setup = bench.Setup(width=48, depth=3, heads=2, tokens=12, channels=5, batch=3, classes=4)
    batch = bench.make_batch(setup)
    torch.manual_seed(0)
    weights = FlowTransformer(bench.model_config(setup, "factored")).state_dict()
    totals = {}
    for method in bench.METHODS:
        state = bench.build_state(setup, method, weights, "fused")
        with FlopCounterMode(display=False) as counter:
            bench.train_step(state, batch, generator=torch.Generator().manual_seed(0))
        student_levels, teacher_levels = bench.levels_used(state, batch, 0)
        flops = bench.step_flops(
            setup,
            method,
            student_layer=getattr(state.objective, "student_layer", 0),
            teacher_layer=getattr(state.objective, "teacher_layer", 0),
            student_levels=student_levels,
            teacher_levels=teacher_levels,
        )
        assert counter.get_total_flops() == sum(v for k, v in flops.items() if "attention" not in k), method.name
        totals[method.name] = sum(flops.values())
    assert totals["vanilla"] < totals["selfflow"] < totals["selfflow-dense"]


# ----------------------------------------------------------------------------- position options


def test_rope_axes_give_every_pair_to_the_axes_named():
    """``rope_axes=(Dh/2, 0, 0)``: all pairs on t with t's geometric frequencies; h, w moves rotate nothing."""
    rope = M.MultiAxisRope(12, 10000.0, (6, 0, 0))
    assert rope.axis.tolist() == [0] * 6
    expected = 10000.0 ** (-torch.arange(6, dtype=torch.float64) / 6) / M.ROPE_TIME_TICKS
    torch.testing.assert_close(rope.inv_freq, expected.float())
    cos, sin = rope(torch.tensor([[[0, 7, 9]]]))
    torch.testing.assert_close(cos, torch.ones_like(cos))
    torch.testing.assert_close(sin, torch.zeros_like(sin))
    default = M.MultiAxisRope(12, 10000.0)
    assert default.axis.tolist() == [0, 0, 1, 1, 2, 2]


def test_rope_axes_must_sum_to_the_pair_count():
    with pytest.raises(ValueError, match=r"rope_axes=\[8, 4, 1\].*summing to head_dim / 2 = 12"):
        ModelConfig(channels={"audio": 4}, width=48, heads=2, rope_axes=[8, 4, 1])
    with pytest.raises(ValueError, match="3 non-negative"):
        ModelConfig(channels={"audio": 4}, width=48, heads=2, rope_axes=[13, -1, 0])
    assert ModelConfig(channels={"audio": 4}, width=48, heads=2, rope_axes=[12, 0, 0]).rope_axes == (12, 0, 0)


def test_sincos_positions_are_cos_sin_of_each_axis_times_its_frequencies():
    width = 20  # F = 3 frequencies per axis, 18 dims used, 2 zero
    positions = torch.tensor([[[M.ROPE_TIME_TICKS * 2, 3, 5]]])
    out = M.sincos_positions(positions, width)
    assert out.shape == (1, 1, 20)
    omega = 10000.0 ** (-torch.arange(3, dtype=torch.float32) / 3)
    for axis, coord in enumerate((2.0, 3.0, 5.0)):  # t in rotary steps, h and w in grid units
        part = out[0, 0, 6 * axis : 6 * axis + 6]
        torch.testing.assert_close(part, torch.cat([(coord * omega).cos(), (coord * omega).sin()]))
    assert out[0, 0, 18:].abs().max() == 0


def test_abs_pos_tells_a_model_where_a_token_sits_and_rope_alone_does_not():
    """RoPE is relative: shifting every t by the same amount leaves the output unchanged;
    with ``abs_pos="sincos"`` the same shift changes it (the absolute offset is visible)."""

    def out(model: FlowTransformer, shift: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        positions = grid_positions(6, 1, 1, batch=2).clone()
        positions[..., 0] = positions[..., 0] * 48 + shift
        seg = Segment(modality="audio", tokens=torch.randn(2, 6, 4, generator=g), positions=positions)
        batch = TokenBatch(segments=(seg,), labels=torch.tensor([0, 1]))
        ts = Timesteps(levels=torch.full((2, 1), 0.5), index=torch.zeros(2, 6, dtype=torch.long))
        with torch.no_grad():
            return model(batch, ts).velocity[0]

    plain, absolute = _model(), _model(abs_pos="sincos")
    torch.testing.assert_close(out(plain, 0), out(plain, 480), atol=1e-5, rtol=1e-5)
    assert (out(absolute, 0) - out(absolute, 480)).abs().max() > 1e-3
