"""Attention: the SDPA backend against a naive softmax, xformers never on CPU, RoPE depends
on relative positions only, padding and noise-group separation keep information where it
belongs (checked through the whole model, where a leak would show)."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow.core import attention
from selfflow.core.attention import attend, padding_mask, separation_mask
from selfflow.core.kernels import apply_rope
from selfflow.core.model import FlowTransformer, ModelConfig, MultiAxisRope
from selfflow.core.types import Role, Segment, Timesteps, TokenBatch, grid_positions

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with a boolean mask (True = may attend)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _qkv(b=2, h=3, n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("mask_kind", ["none", "keys", "full"])
def test_sdpa_backend_equals_naive_softmax_attention(mask_kind):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "keys":
        valid = torch.ones(2, 7, dtype=torch.bool)
        valid[1, 4:] = False
        mask = padding_mask(valid)
    elif mask_kind == "full":
        mask = torch.rand(2, 1, 7, 7, generator=g) < 0.6
        mask |= torch.eye(7, dtype=torch.bool)  # every query sees at least itself
    want = naive_attention(q, k, v, mask)
    for backend in ("sdpa", "auto"):
        torch.testing.assert_close(attend(q, k, v, mask, backend=backend), want, rtol=1e-5, atol=1e-6)


def test_sdpa_gradients_equal_naive_attention():
    q, k, v = (t.double().requires_grad_() for t in _qkv())
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    w = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    (attend(q, k, v, backend="sdpa") * w).sum().backward()
    (naive_attention(q2, k2, v2) * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_strided_inputs_in_token_major_layout_give_the_same_result():
    """The blocks hand attention ``(B, H, N, Dh)`` views of ``(B, N, H, Dh)`` memory."""
    q, k, v = _qkv()
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    out = attend(*views, backend="sdpa")
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert out.transpose(1, 2).is_contiguous()  # so the blocks' reshape back to (B, N, D) is free


def test_xformers_path_is_never_taken_on_cpu(monkeypatch):
    calls = []

    class FakeOps:
        @staticmethod
        def memory_efficient_attention(*args, **kwargs):
            calls.append(1)
            raise AssertionError("xformers must not run on CPU tensors")

    monkeypatch.setattr(attention, "_xformers_ops", lambda: FakeOps)  # "installed"
    q, k, v = _qkv()
    out = attend(q, k, v, backend="auto")
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert calls == []
    with pytest.raises(RuntimeError, match="CUDA"):
        attend(q, k, v, backend="xformers")
    assert calls == []
    if not torch.cuda.is_available():
        assert not attention.xformers_available()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="sdpa"):
        attend(*_qkv(), backend="flash")


# ----------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_positions():
    g = torch.Generator().manual_seed(2)
    rope = MultiAxisRope(12, 10000.0)
    q = torch.randn(1, 9, 1, 12, generator=g)
    k = torch.randn(1, 9, 1, 12, generator=g)
    positions = torch.randint(0, 6, (1, 9, 3), generator=g)

    def scores(pos):
        cos, sin = rope(pos)
        return torch.einsum("bqhd,bkhd->bqk", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    base = scores(positions)
    for shift in ([3, 0, 0], [0, 5, 0], [0, 0, 7], [2, 4, 6]):
        torch.testing.assert_close(scores(positions + torch.tensor(shift)), base, rtol=1e-5, atol=1e-5)
    # and the positions do matter: moving one token changes its scores
    moved = positions.clone()
    moved[0, 0] += torch.tensor([0, 1, 0])
    assert not torch.allclose(scores(moved), base, atol=1e-3)


def _model(seed=0, **kw) -> FlowTransformer:
    torch.manual_seed(seed)
    model = FlowTransformer(
        ModelConfig(channels={"image": 4, "audio": 3}, width=48, depth=2, heads=2, num_classes=3, **kw)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero adaLN and output layers: every path carries signal
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.ndim == 2 else 100))
    return model


def test_shifting_all_positions_leaves_the_model_output_unchanged():
    model = _model()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 12, 4, generator=g)
    positions = grid_positions(1, 3, 4, batch=2)

    def run(pos):
        batch = TokenBatch(
            segments=(Segment(modality="image", tokens=tokens, positions=pos),), labels=torch.tensor([0, 2])
        )
        ts = Timesteps(levels=torch.tensor([[0.3], [0.8]]), index=torch.zeros(2, 12, dtype=torch.long))
        return model(batch, ts, return_hidden=(1,))

    base = run(positions)
    shifted = run(positions + torch.tensor([5, 2, 9]))
    torch.testing.assert_close(shifted.velocity[0], base.velocity[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted.hidden[1], base.hidden[1], rtol=1e-5, atol=1e-5)
    swapped = run(positions.flip(1))  # a different arrangement is a different input
    assert not torch.allclose(swapped.velocity[0], base.velocity[0], atol=1e-3)


# ----------------------------------------------------------------------------- padding


def _padded_batch(pad_tokens: torch.Tensor, n_real: int = 5, n_pad: int = 3) -> TokenBatch:
    g = torch.Generator().manual_seed(4)
    real = torch.randn(2, n_real, 4, generator=g)
    tokens = torch.cat([real, pad_tokens], dim=1)
    valid = torch.ones(2, n_real + n_pad, dtype=torch.bool)
    valid[:, n_real:] = False
    return TokenBatch(
        segments=(
            Segment(
                modality="image", tokens=tokens, positions=grid_positions(1, 1, n_real + n_pad, batch=2), valid=valid
            ),
        ),
        labels=torch.tensor([1, 2]),
    )


def test_padded_tokens_do_not_change_the_outputs_of_real_tokens():
    model = _model()
    ts = Timesteps(levels=torch.tensor([[0.4], [0.6]]), index=torch.zeros(2, 8, dtype=torch.long))
    a = model(_padded_batch(torch.zeros(2, 3, 4)), ts, return_hidden=(1, 2))
    b = model(
        _padded_batch(100 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5))), ts, return_hidden=(1, 2)
    )
    torch.testing.assert_close(a.velocity[0][:, :5], b.velocity[0][:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.hidden[2][:, :5], b.hidden[2][:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a.velocity[0][:, 5:], b.velocity[0][:, 5:])  # the padding itself did change

    # and the real tokens see exactly what an unpadded batch of them sees
    short = TokenBatch(
        segments=(
            Segment(
                modality="image",
                tokens=_padded_batch(torch.zeros(2, 3, 4)).segments[0].tokens[:, :5],
                positions=grid_positions(1, 1, 5, batch=2),
            ),
        ),
        labels=torch.tensor([1, 2]),
    )
    c = model(short, Timesteps(levels=ts.levels, index=torch.zeros(2, 5, dtype=torch.long)))
    torch.testing.assert_close(a.velocity[0][:, :5], c.velocity[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- separation


def test_separation_mask_blocks_attention_across_noise_groups():
    model = _model()
    g = torch.Generator().manual_seed(6)
    image = torch.randn(2, 8, 4, generator=g)
    audio = torch.randn(2, 3, 3, generator=g)  # a clean condition segment
    groups_image = torch.tensor([[1, 2, 1, 1, 2, 1, 2, 1], [2, 1, 1, 2, 1, 1, 1, 2]])
    groups = torch.cat([groups_image, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    ts = Timesteps(levels=torch.tensor([[0.0, 0.3, 0.9], [0.0, 0.7, 0.2]]), index=groups)
    mask = separation_mask(groups)

    def run(img, cond):
        batch = TokenBatch(
            segments=(
                Segment(modality="image", tokens=img, positions=grid_positions(1, 2, 4, batch=2)),
                Segment(modality="audio", tokens=cond, positions=grid_positions(3, 1, 1, batch=2), role=Role.CONDITION),
            ),
            labels=torch.tensor([0, 1]),
        )
        return model(batch, ts, attn_mask=mask, return_hidden=(1, 2)).hidden[2]

    base = run(image, audio)
    g2 = groups == 2
    changed = image.clone()
    changed[g2[:, :8]] = 50 * torch.randn(int(g2.sum()), 4, generator=g)
    out = run(changed, audio)
    torch.testing.assert_close(out[~g2], base[~g2], rtol=0, atol=1e-6)  # group 1 and condition tokens
    assert not torch.allclose(out[g2], base[g2])

    # without the mask the same change reaches group 1
    def batch(img):
        return TokenBatch(
            segments=(
                Segment(modality="image", tokens=img, positions=grid_positions(1, 2, 4, batch=2)),
                Segment(
                    modality="audio", tokens=audio, positions=grid_positions(3, 1, 1, batch=2), role=Role.CONDITION
                ),
            ),
            labels=torch.tensor([0, 1]),
        )

    g1 = groups == 1
    open_a = model(batch(image), ts, return_hidden=(2,)).hidden[2]
    open_b = model(batch(changed), ts, return_hidden=(2,)).hidden[2]
    assert not torch.allclose(open_a[g1], open_b[g1], atol=1e-4)

    # the condition tokens see only each other: changing group 1 leaves them alone too
    changed1 = image.clone()
    changed1[g1[:, :8]] = 0.0
    out1 = run(changed1, audio)
    cond = groups == 0
    torch.testing.assert_close(out1[cond], base[cond], rtol=0, atol=1e-6)


def test_separation_mask_with_padding_keeps_padded_rows_finite():
    groups = torch.tensor([[1, 2, 1, 0], [2, 2, 1, 0]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    mask = separation_mask(groups, valid)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0, :, 2].tolist() == [False, False, True, False]  # the padded key: only its own row
    assert not mask[0, 0, 0, 1]  # group 1 -> group 2 blocked
    assert mask[0, 0, 0, 3] and not mask[0, 0, 3, 0]  # noise -> condition allowed, condition -> noise not
    q, k, v = _qkv(b=2, h=1, n=4, d=8)
    assert torch.isfinite(attend(q, k, v, mask)).all()
