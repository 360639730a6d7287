"""The GPU paths on a real GPU (skipped without CUDA): xformers' packed kernel against padded
SDPA, a bf16 Self-Flow step against fp32, an inductor-compiled step against eager. One file so
a session with a GPU runs them in one go: ``pytest tests/core/test_cuda.py -q``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfflow.core.attention import attend, padding_mask, xformers_available
from selfflow.core.kernels import PackedLayout
from tests.core.test_compile import make_state
from tests.core.test_precision import tiny_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(not xformers_available(), reason="needs xformers on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_packed_equals_padded_sdpa(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    valid = torch.rand(6, 77, generator=g, device="cuda") > 0.3
    valid[:, 0] = True
    q, k, v = (torch.randn(6, 4, 77, 32, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    packed = attend(q, k, v, PackedLayout(valid))  # xformers, BlockDiagonalMask
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask(valid))
    keep = valid[:, None, :, None].expand_as(padded)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed[keep].float(), padded[keep].float(), atol=tol, rtol=tol)


def _cuda_state(compile_backend, precision):
    state = make_state(compile_backend)
    state.model.cuda()
    state.teacher.cuda()
    state.objective.cuda()
    state.precision = precision
    state.optimizer = torch.optim.AdamW(state.trainable_parameters(), lr=1e-3)
    return state


def _losses(state, n=2):
    from selfflow.core.train_step import train_step

    batch, g = tiny_batch().to("cuda"), torch.Generator().manual_seed(7)
    return torch.tensor([float(train_step(state, batch, generator=g).losses.total) for _ in range(n)])


def test_bf16_step_on_cuda_matches_fp32():
    ref, amp = _cuda_state(None, None), _cuda_state(None, torch.bfloat16)
    torch.testing.assert_close(_losses(amp), _losses(ref), rtol=1e-2, atol=1e-2)
    assert all(p.dtype == torch.float32 for p in amp.trainable_parameters())


def test_inductor_step_on_cuda_matches_eager():
    torch._dynamo.reset()
    ref, comp = _cuda_state(None, None), _cuda_state("inductor", None)
    torch.testing.assert_close(_losses(comp), _losses(ref), rtol=1e-4, atol=1e-4)
