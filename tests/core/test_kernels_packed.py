"""Packed variable-length attention (``kernels.PackedLayout``, ``attention.attend``): exact
packing bookkeeping, the block-diagonal mask equal to xformers' own, the packed result equal
to padded SDPA, and the model wired to it -- all on CPU (xformers' kernels run on CUDA only;
its mask objects build anywhere). SDPA only ever sees key-padding masks without separation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfflow.core import attention
from selfflow.core.attention import attend, layout_bias, packed_attention, padding_mask, reference_packed
from selfflow.core.kernels import PackedLayout
from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.core.types import Segment, Timesteps, TokenBatch, grid_positions


def holes(b: int = 4, n: int = 10, seed: int = 0) -> torch.Tensor:
    """Valid masks with right padding, holes, a full row and one row without real tokens."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, n, generator=g) > 0.35
    valid[0] = True
    valid[1, 6:] = False
    valid[2] = False
    return valid


def test_pack_unpack_are_exact_index_copies():
    valid = holes()
    x = torch.randn(4, 10, 3, 5, requires_grad=True)
    layout = PackedLayout(valid)
    packed = layout.pack(x)
    assert torch.equal(packed, x[valid]) and layout.total == int(valid.sum())
    assert layout.seqlens == valid.sum(1).tolist() and layout.seqlens[2] == 0
    assert layout.cu_seqlens.tolist() == [0, *torch.cumsum(valid.sum(1), 0).tolist()]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 10
    back = layout.unpack(packed)
    assert torch.equal(back, x * valid[..., None, None])
    back.sum().backward()  # the gradient reaches exactly the real tokens
    assert torch.equal(x.grad, valid[..., None, None].expand_as(x).float())
    assert torch.equal(layout.sample_ids(), valid.nonzero()[:, 0])
    with pytest.raises(ValueError, match=r"\(B, N\) bool"):
        PackedLayout(valid.float())


def test_block_mask_equals_xformers_block_diagonal_mask():
    pytest.importorskip("xformers")
    valid = holes()
    layout = PackedLayout(valid)
    bias = layout_bias(layout)
    # the same sequence starts (a sample without real tokens adds none)
    assert bias.q_seqinfo.seqstart.tolist() == sorted(set(layout.cu_seqlens.tolist()))
    dense = bias.materialize((layout.total, layout.total))
    assert torch.equal(dense == 0, layout.block_mask())  # 0 where attending, -inf elsewhere
    assert layout_bias(layout) is bias  # built once per forward, shared by the blocks


@pytest.mark.parametrize("use_xformers_mask", [False, True])
def test_packed_attention_equals_padded_sdpa(use_xformers_mask):
    """Each real token's output: attention within its own sample's real tokens, whether the
    batch is padded (SDPA, key-padding mask) or packed (one sequence, block-diagonal mask)."""
    if use_xformers_mask:
        pytest.importorskip("xformers")
    valid = holes(seed=1)
    valid[2, 0] = True  # SDPA returns NaN for a query row with no key at all
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 2, 10, 8, generator=g) for _ in range(3))
    layout = PackedLayout(valid)
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask(valid))

    def kernel(pq, pk, pv, lay):
        if not use_xformers_mask:
            return reference_packed(pq, pk, pv, lay)
        bias = layout_bias(lay).materialize((lay.total, lay.total))
        out = F.scaled_dot_product_attention(pq.transpose(1, 2), pk.transpose(1, 2), pv.transpose(1, 2), attn_mask=bias)
        return out.transpose(1, 2)

    packed = packed_attention(q, k, v, layout, kernel=kernel)
    keep = valid[:, None, :, None].expand_as(padded)
    torch.testing.assert_close(packed[keep], padded[keep], atol=1e-6, rtol=1e-6)
    assert not packed[~keep].any()  # zeros at padding


def test_sdpa_gets_the_layouts_key_padding_mask_and_separation_stays_in_sdpa():
    valid = holes(seed=3)
    valid[2, 0] = True
    q, k, v = (torch.randn(4, 2, 10, 8) for _ in range(3))
    same = attend(q, k, v, PackedLayout(valid))  # CPU: SDPA with (B, 1, 1, N)
    assert torch.equal(same, attend(q, k, v, padding_mask(valid)))
    dense = torch.rand(4, 1, 10, 10) > 0.3
    dense |= torch.eye(10, dtype=torch.bool)
    # attention separation's general mask runs in SDPA even where xformers is chosen: no (B, H, N, N) bias
    torch.testing.assert_close(
        attend(q, k, v, dense, backend="xformers"), F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    )


def _batch() -> tuple[TokenBatch, Timesteps]:
    g = torch.Generator().manual_seed(4)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[0, 11:] = False
    valid[2, 5:] = False
    tokens = torch.randn(3, 16, 4, generator=g) * valid[..., None]
    seg = Segment(modality="image", tokens=tokens, positions=grid_positions(1, 4, 4, batch=3), valid=valid)
    batch = TokenBatch(segments=(seg,), labels=torch.tensor([0, 1, 2]))
    return batch, Timesteps.uniform(torch.tensor([0.2, 0.5, 0.9]), batch)


def _model() -> FlowTransformer:
    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"image": 4}, width=48, depth=2, heads=2, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_model_packed_path_equals_padded_path(monkeypatch):
    """The model's forward and backward with packed attention (xformers' place taken by the
    CPU reference kernel) against the padded SDPA path: the same velocities and parameter
    gradients on real tokens; SDPA on the padded path saw only (B, 1, 1, N) masks."""
    batch, ts = _batch()
    valid = batch.segments[0].valid
    model = _model()
    shapes: list[tuple[int, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    out = model(batch, ts).velocity[0]
    (out * valid[..., None]).square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert shapes == [(3, 1, 1, 16)] * 2
    model.zero_grad(set_to_none=True)

    layouts: list[PackedLayout] = []

    def kernel(q, k, v, layout):
        layouts.append(layout)
        return reference_packed(q, k, v, layout)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr("selfflow.core.model.packing_wanted", lambda device, backend: True)
    monkeypatch.setattr(attention, "_use_xformers", lambda q, backend: True)
    monkeypatch.setattr(attention, "_xformers_ops", lambda: object())
    monkeypatch.setattr(attention, "_xformers_packed", kernel)
    monkeypatch.setattr("selfflow.core.model.layout_bias", lambda layout: None)  # xformers itself may be absent
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    packed = model(batch, ts).velocity[0]
    monkeypatch.undo()
    assert len(layouts) == 2 and layouts[0] is layouts[1]  # one layout per forward, for every block
    keep = valid[..., None].expand_as(out)
    torch.testing.assert_close(packed[keep], out[keep], atol=1e-5, rtol=1e-5)
    (packed * valid[..., None]).square().sum().backward()
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
