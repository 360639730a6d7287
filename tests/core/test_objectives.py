"""Objectives: what the student and teacher are fed, which tokens carry loss, and the
losses against hand computations. A per-token stub model (each token's output depends on
that token only) makes inputs and outputs inspectable; a tiny FlowTransformer checks the
pieces that need the real network (gradients, attention separation, exact equivalences)."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

from selfflow.core.attention import separation_mask
from selfflow.core.distill import EMAConfig, EMATeacher
from selfflow.core.model import FlowTransformer, ModelConfig, ModelOutput
from selfflow.core.objectives import (
    ExternalAlignment,
    FlowMatching,
    SelfFlow,
    SelfFlowConfig,
    draw_noise,
    drop_labels,
)
from selfflow.core.timesteps import DualTimestepScheduler, LogitNormalTime
from selfflow.core.types import Role, TokenBatch

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 3


class MidTime:
    """t ~ U(0.2, 0.8): keeps (x_tau - (1 - tau) x0) / tau well conditioned for recovering eps."""

    def sample(self, n, *, generator, device="cpu"):
        return (0.2 + 0.6 * torch.rand(n, generator=generator)).to(device)


class StubModel(nn.Module):
    """Per-token stand-in for ``FlowTransformer``: ``h_i = W_m x_i + tau_i + label``, velocity
    ``U_m h_i`` for *every* segment (condition ones too, to prove they are ignored), hidden
    state after block l is ``l h``. ``junk`` is added to every output at tokens that are not
    generated (condition tokens, padding). Calls are recorded."""

    def __init__(self, channels: dict[str, int], width: int = 8, depth: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.inp = nn.ParameterDict({m: nn.Parameter(torch.randn(c, width, generator=g)) for m, c in channels.items()})
        self.out = nn.ParameterDict({m: nn.Parameter(torch.randn(width, c, generator=g)) for m, c in channels.items()})
        self.label = nn.Parameter(torch.randn(NUM_CLASSES + 1, width, generator=g))
        self.width, self.depth, self.null_label = width, depth, NUM_CLASSES
        self.junk = 0.0
        self.calls: list[dict] = []

    def forward(self, batch, timesteps, *, return_hidden=(), stop_after=None, attn_mask=None):
        h = torch.cat([seg.tokens @ self.inp[seg.modality] for seg in batch.segments], dim=1)
        h = h + timesteps.per_token()[..., None]
        if batch.labels is not None:
            h = h + self.label[batch.labels][:, None]
        h = torch.where(batch.generate_mask()[..., None], h, h + self.junk)
        hidden = {l: l * h for l in return_hidden}
        if stop_after is None:
            parts = h.split([s.num_tokens for s in batch.segments], dim=1)
            velocity = tuple(p @ self.out[s.modality] for s, p in zip(batch.segments, parts))
        else:
            velocity = tuple(None for _ in batch.segments)
        self.calls.append(
            dict(
                batch=batch,
                timesteps=timesteps,
                return_hidden=tuple(return_hidden),
                stop_after=stop_after,
                attn_mask=attn_mask,
                velocity=velocity,
                hidden=hidden,
            )
        )
        return ModelOutput(velocity=velocity, hidden=hidden)


SPECS = [("text", 3, 2, "condition"), ("image", 12, 3, "generate")]


def _stub_setup(make_batch, *, config=None, scheduler=None, specs=SPECS, padded=None, batch=16):
    data = make_batch(specs, batch=batch, num_classes=NUM_CLASSES, padded=padded)
    model = StubModel({m: c for m, _, c, _ in specs})
    teacher = EMATeacher(model, EMAConfig(decay=0.9))
    obj = SelfFlow.for_model(
        model,
        scheduler=scheduler or DualTimestepScheduler(time=MidTime(), mask_ratio=0.5),
        config=config or SelfFlowConfig(label_dropout=0.5),
    )
    return data, model, teacher, obj


def _tiny_model(channels: dict[str, int], depth: int = 4, seed: int = 0) -> FlowTransformer:
    """A small FlowTransformer with random (not DiT-zeroed) weights, so every path is live."""
    torch.manual_seed(seed)
    model = FlowTransformer(ModelConfig(channels=channels, width=32, depth=depth, heads=2, num_classes=NUM_CLASSES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _recover_eps(x_tau, x0, tau):
    tau = tau[..., None]
    return (x_tau - (1 - tau) * x0) / tau


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize(("depth", "layers"), [(12, (4, 8)), (28, (8, 20)), (4, (1, 3)), (2, (1, 1)), (1, (1, 1))])
def test_default_layers_are_03_and_07_depth(depth, layers):
    obj = SelfFlow(width=8, depth=depth, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    assert (obj.student_layer, obj.teacher_layer) == layers


def test_layer_validation():
    assert (
        SelfFlow(
            width=8,
            depth=6,
            scheduler=DualTimestepScheduler(mask_ratio=0.25),
            config=SelfFlowConfig(student_layer=2, teacher_layer=5),
        ).teacher_layer
        == 5
    )
    with pytest.raises(ValueError, match=r"teacher_layer=7 is outside blocks 1..6"):
        SelfFlow(
            width=8, depth=6, scheduler=DualTimestepScheduler(mask_ratio=0.25), config=SelfFlowConfig(teacher_layer=7)
        )
    with pytest.raises(ValueError, match=r"student_layer=0 is outside blocks 1..6"):
        SelfFlow(
            width=8, depth=6, scheduler=DualTimestepScheduler(mask_ratio=0.25), config=SelfFlowConfig(student_layer=0)
        )


# ----------------------------------------------------------------------------- inputs


def test_student_and_teacher_inputs(make_batch, gen):
    data, model, teacher, obj = _stub_setup(make_batch)
    obj(model, data, teacher=teacher, generator=gen)
    (student,), (teach,) = model.calls, teacher.model.calls
    assert student["return_hidden"] == (obj.student_layer,) and student["stop_after"] is None
    assert teach["return_hidden"] == (obj.teacher_layer,) and teach["stop_after"] == obj.teacher_layer

    # condition tokens: clean, at level 0, in both
    for call in (student, teach):
        assert torch.equal(call["batch"].segments[0].tokens, data.segments[0].tokens)
        assert bool((call["timesteps"].per_token()[:, :3] == 0).all())
    # the same (possibly dropped) label for both
    labels = student["batch"].labels
    assert torch.equal(labels, teach["batch"].labels)
    dropped = labels == NUM_CLASSES
    assert bool(dropped.any()) and bool((labels[~dropped] == data.labels[~dropped]).all())

    # generated tokens: teacher at min(t, s), the student at its own level, the same noise
    x0 = data.segments[1].tokens
    tau_s = student["timesteps"].per_token()[:, 3:]
    tau_t = teach["timesteps"].per_token()[:, 3:]
    levels = student["timesteps"].levels
    torch.testing.assert_close(
        tau_t, torch.minimum(levels[:, 1], levels[:, 2])[:, None].expand_as(tau_t), rtol=0, atol=0
    )
    assert bool((tau_s == levels[:, 1:2]).any()) and bool((tau_s == levels[:, 2:3]).any())
    eps_s = _recover_eps(student["batch"].segments[1].tokens, x0, tau_s)
    eps_t = _recover_eps(teach["batch"].segments[1].tokens, x0, tau_t)
    torch.testing.assert_close(eps_s, eps_t, rtol=0, atol=1e-5)
    assert abs(float(eps_s.std()) - 1.0) < 0.15  # it is fresh N(0, 1) noise


# ----------------------------------------------------------------------------- losses by hand


def _hand_losses(obj, student, teach, x0, valid, tokens):
    """Flow MSE and mean(1 - cos) computed token by token from the recorded calls."""
    tau = student["timesteps"].per_token()[:, 3:]
    eps = _recover_eps(student["batch"].segments[1].tokens, x0, tau)
    v = student["velocity"][1]
    flow_num, flow_den = 0.0, 0
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if valid[b, i]:
                flow_num += float(((v[b, i] - (eps[b, i] - x0[b, i])) ** 2).mean().detach())
                flow_den += 1
    proj = obj.projector(student["hidden"][obj.student_layer]).detach()
    target = teach["hidden"][obj.teacher_layer]
    rep_num, rep_den = 0.0, 0
    for b in range(x0.shape[0]):
        for i in range(proj.shape[1]):
            if tokens[b, i]:
                a, c = proj[b, i].double(), target[b, i].double()
                rep_num += 1.0 - float(a @ c) / (float(a.norm()) * float(c.norm()))
                rep_den += 1
    return flow_num / flow_den, rep_num / rep_den


@pytest.mark.parametrize("which", ["all", "masked"])
def test_losses_match_hand_computation(make_batch, gen, which):
    data, model, teacher, obj = _stub_setup(
        make_batch,
        config=SelfFlowConfig(label_dropout=0.5, representation_tokens=which, gamma=0.8),
        padded={"image": 4},
    )
    losses = obj(model, data, teacher=teacher, generator=gen)
    (student,), (teach,) = model.calls, teacher.model.calls
    valid = data.segments[1].valid_mask()
    tokens = data.generate_mask()
    if which == "masked":
        masked = student["timesteps"].index == 2
        assert bool(masked.any()) and not bool(masked.all())
        tokens = tokens & masked
    flow, rep = _hand_losses(obj, student, teach, data.segments[1].tokens, valid, tokens)
    assert _f(losses.flow) == pytest.approx(flow, rel=1e-5)
    assert _f(losses.representation) == pytest.approx(rep, rel=1e-5)
    assert _f(losses.total) == pytest.approx(flow + 0.8 * rep, rel=1e-5)
    assert float(losses.per_modality["image"]) == pytest.approx(flow, rel=1e-5)


def test_masked_only_ignores_unmasked_tokens_and_all_does_not(make_batch):
    def rep(which, junk_unmasked):
        torch.manual_seed(0)  # the projector's init
        data, model, teacher, obj = _stub_setup(make_batch, config=SelfFlowConfig(representation_tokens=which))
        if junk_unmasked:  # move the teacher's targets at the tokens that got t (unmasked)
            original = teacher.model.forward

            def forward(batch, timesteps, **kw):
                out = original(batch, timesteps, **kw)
                k = kw["stop_after"]
                unmasked = (timesteps.index == 1)[..., None]
                hid = torch.where(unmasked, out.hidden[k] + 100.0 * torch.randn_like(out.hidden[k]), out.hidden[k])
                return attrs.evolve(out, hidden={k: hid})

            teacher.model.forward = forward
        return _f(obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(3)).representation)

    assert rep("masked", False) == rep("masked", True)
    assert abs(rep("all", False) - rep("all", True)) > 1e-3


def test_condition_tokens_carry_no_loss(make_batch):
    """Changing condition tokens, and every output at condition/padding tokens, leaves the
    flow and representation losses exactly unchanged (the stub is per-token, so the
    generated tokens' outputs do not move)."""

    def losses(cond_tokens=None, junk=0.0):
        torch.manual_seed(0)  # the projector's init
        data, model, teacher, obj = _stub_setup(make_batch, padded={"image": 3})
        if cond_tokens is not None:
            data = data.with_tokens([cond_tokens, data.segments[1].tokens])
        model.junk = teacher.model.junk = junk
        out = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(5))
        return out.flow, out.representation

    base = losses()
    for changed in (losses(cond_tokens=torch.full((16, 3, 2), 7.0)), losses(junk=123.0)):
        assert torch.equal(changed[0], base[0]) and torch.equal(changed[1], base[1])


def test_per_modality_loss_weights(make_batch, gen):
    specs = [("image", 6, 3, "generate"), ("audio", 4, 2, "generate")]
    data, model, teacher, obj = _stub_setup(make_batch, specs=specs)
    obj.loss_weights = {"image": 2.0, "audio": 0.5}
    out = obj(model, data, teacher=teacher, generator=gen)
    per = out.per_modality
    assert set(per) == {"image", "audio"}
    assert _f(out.flow) == pytest.approx(2.0 * _f(per["image"]) + 0.5 * _f(per["audio"]), rel=1e-6)


def test_attention_separation_mask_is_passed_to_the_student_only(make_batch, gen):
    data, model, teacher, obj = _stub_setup(
        make_batch, config=SelfFlowConfig(attention_separation=True), padded={"image": 2}
    )
    obj(model, data, teacher=teacher, generator=gen)
    (student,), (teach,) = model.calls, teacher.model.calls
    groups = student["timesteps"].index
    mask = student["attn_mask"]
    assert teach["attn_mask"] is None
    assert torch.equal(mask, separation_mask(groups, data.valid_mask()))
    q, k = groups[:, :, None], groups[:, None, :]
    cross = (q != k) & (q > 0) & (k > 0)
    assert bool(cross.any()) and not bool(mask[:, 0][cross].any())  # t-group and s-group never meet
    valid = data.valid_mask()
    same = (q == k) & (q > 0) & valid[:, :, None] & valid[:, None, :]
    assert bool(mask[:, 0][same].all())
    assert bool(mask[:, 0][(q > 0) & (k == 0) & valid[:, None, :]].all())  # everyone sees the condition
    assert not bool(mask[:, 0][(q == 0) & (k > 0)].any())  # the condition sees no noise group


def test_attention_separation_blocks_information_between_groups(make_batch):
    """With the separation mask, perturbing the s-group's inputs leaves the t-group's outputs
    unchanged in a real FlowTransformer (and without the mask it does not)."""
    model = _tiny_model({"text": 2, "image": 3})
    data = make_batch(SPECS, batch=4, num_classes=NUM_CLASSES)
    steps = DualTimestepScheduler(mask_ratio=0.5)(data, generator=torch.Generator().manual_seed(0))
    groups = steps.groups()
    s_group = (groups == 2)[:, 3:, None]
    assert bool(s_group.any()) and bool((groups[:, 3:] == 1).any())
    x = data.segments[1].tokens
    moved = data.with_tokens([data.segments[0].tokens, torch.where(s_group, x + 5.0, x)])
    mask = separation_mask(groups)
    t_group = (groups == 1)[:, 3:]
    with torch.no_grad():
        a = model(data, steps.student, attn_mask=mask, return_hidden=(2,))
        b = model(moved, steps.student, attn_mask=mask, return_hidden=(2,))
        c = model(data, steps.student)
        d = model(moved, steps.student)
    torch.testing.assert_close(a.velocity[1][t_group], b.velocity[1][t_group], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.hidden[2][:, :3], b.hidden[2][:, :3], rtol=0, atol=1e-5)  # condition tokens
    assert float((c.velocity[1][t_group] - d.velocity[1][t_group]).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- equivalences


def test_self_flow_without_representation_and_dual_is_flow_matching(make_batch):
    model = _tiny_model({"text": 2, "image": 3})
    data = make_batch(SPECS, batch=8, num_classes=NUM_CLASSES, padded={"image": 2})
    fm = FlowMatching(time=LogitNormalTime(), label_dropout=0.3)
    sf = SelfFlow.for_model(
        model,
        scheduler=DualTimestepScheduler(time=LogitNormalTime(), dual=False, mask_ratio=0.5),
        config=SelfFlowConfig(representation=False, label_dropout=0.3),
    )
    assert sf.projector is None
    for seed in range(3):
        a = fm(model, data, generator=torch.Generator().manual_seed(seed))
        b = sf(model, data, teacher=None, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a.total, b.total) and torch.equal(a.flow, b.flow)
        assert b.representation is None
        assert torch.equal(a.per_modality["image"], b.per_modality["image"])


def test_self_flow_needs_the_teacher_for_the_representation_loss(make_batch, gen):
    data, model, _, obj = _stub_setup(make_batch)
    with pytest.raises(ValueError, match="needs the EMA teacher"):
        obj(model, data, teacher=None, generator=gen)


# ----------------------------------------------------------------------------- gradients


def test_no_gradient_reaches_the_teacher(make_batch):
    model = _tiny_model({"text": 2, "image": 3})
    data = make_batch(SPECS, batch=4, num_classes=NUM_CLASSES)
    # the teacher is copied after a backward: stale student gradients must not come along
    FlowMatching()(model, data, generator=torch.Generator().manual_seed(0)).total.backward()
    teacher = EMATeacher(model)
    model.zero_grad(set_to_none=True)
    obj = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    out = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(1))
    out.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in obj.projector.parameters())
    # every student parameter but the condition modality's output head (it predicts nothing)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert all("text" in n for n in no_grad), no_grad
    # the representation loss alone sends gradient into the student (blocks up to l)
    model.zero_grad(set_to_none=True)
    obj.zero_grad(set_to_none=True)
    out = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(1))
    out.representation.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.blocks[0].parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- REPA-style


def test_external_alignment_matches_hand_computation(make_batch, gen):
    data = make_batch(SPECS, batch=4, num_classes=NUM_CLASSES)
    model = StubModel({"text": 2, "image": 3})
    feats = torch.randn(4, 12, 5, generator=gen)
    obj = ExternalAlignment(width=8, depth=4, encoder=lambda b: feats, encoder_dim=5, gamma=0.5)
    out = obj(model, data, generator=gen)
    (call,) = model.calls
    hidden = call["hidden"][obj.student_layer][:, 3:]  # the generated tokens
    proj = obj.projector(hidden).detach()
    expected = (1 - torch.nn.functional.cosine_similarity(proj.double(), feats.double(), dim=-1)).mean()
    assert _f(out.representation) == pytest.approx(float(expected), rel=1e-5)
    assert _f(out.total) == pytest.approx(_f(out.flow) + 0.5 * float(expected), rel=1e-5)


def test_external_alignment_with_padding_keeps_samples_apart(make_batch, gen):
    """Padding: the features stay per sample and padded tokens carry no loss."""
    specs = [("image", 5, 3, "generate"), ("text", 2, 2, "condition"), ("audio", 4, 2, "generate")]
    data = make_batch(specs, batch=3, num_classes=NUM_CLASSES, padded={"image": 2, "audio": 3})
    model = StubModel({"image": 3, "text": 2, "audio": 2})
    feats = torch.randn(3, 9, 5, generator=gen)
    obj = ExternalAlignment(width=8, depth=4, encoder=lambda b: feats, encoder_dim=5)
    out = obj(model, data, generator=torch.Generator().manual_seed(0))
    (call,) = model.calls
    h = call["hidden"][obj.student_layer]
    hidden = torch.cat([h[:, :5], h[:, 7:]], dim=1)  # the generated segments
    valid = torch.cat([data.segments[0].valid_mask(), data.segments[2].valid_mask()], dim=1)
    proj = obj.projector(hidden).detach().double()
    dist = 1 - torch.nn.functional.cosine_similarity(proj, feats.double(), dim=-1)
    assert _f(out.representation) == pytest.approx(float(dist[valid].mean()), rel=1e-5)
    # junk features at padded positions change nothing
    junk = torch.where(valid[..., None], feats, torch.full_like(feats, 1e3))
    obj.encoder = lambda b: junk
    again = obj(model, data, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.representation, out.representation)


# ----------------------------------------------------------------------------- draws


def test_drop_labels_rate_and_null_id(gen):
    labels = torch.randint(0, 5, (100_000,), generator=gen)
    out = drop_labels(labels, 0.1, 5, gen)
    dropped = out == 5
    assert abs(float(dropped.float().mean()) - 0.1) < 0.005
    assert torch.equal(out[~dropped], labels[~dropped])
    assert drop_labels(labels, 0.0, 5, gen) is labels
    assert drop_labels(None, 0.1, 5, gen) is None


def test_noise_only_for_generated_segments(make_batch, gen):
    data = make_batch(SPECS, batch=4)
    noise = draw_noise(data, gen)
    assert noise[0] is None and noise[1].shape == data.segments[1].tokens.shape


@pytest.mark.parametrize("kind", ["flow_matching", "self_flow", "self_flow_separated"])
def test_objectives_use_only_the_explicit_generator(make_batch, global_rng_untouched, kind):
    model = _tiny_model({"text": 2, "image": 3}, depth=2)
    teacher = EMATeacher(model)
    data = make_batch(SPECS, batch=4, num_classes=NUM_CLASSES)
    if kind == "flow_matching":
        obj = FlowMatching()
    else:
        obj = SelfFlow.for_model(
            model,
            scheduler=DualTimestepScheduler(mask_ratio=0.25),
            config=SelfFlowConfig(attention_separation=kind.endswith("separated")),
        )
    torch.manual_seed(0)
    with global_rng_untouched():
        a = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(4))
        b = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(4))
        c = obj(model, data, teacher=teacher, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.total, b.total) and _f(a.total) != _f(c.total)


def test_condition_role_is_respected_by_the_real_model(make_batch):
    model = _tiny_model({"text": 2, "image": 3}, depth=2)
    data = make_batch(SPECS, batch=2)
    assert data.segments[0].role is Role.CONDITION
    out = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))(
        model, data, teacher=EMATeacher(model), generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(out.total) and out.representation is not None
    assert isinstance(data, TokenBatch) and _f(out.per_modality["image"]) == _f(out.flow)
