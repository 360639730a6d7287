"""REPA's per-item target cache (``registry.builders.TokenFeatureCache``): items already seen are
not decoded again, a target depends on its item alone (not on the batch it came in), and the
cache stays under its byte budget."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.types import Segment, TokenBatch, grid_positions
from selfflow.registry.builders import TokenFeatureCache, alignment_encoder


class CountingTokenizer:
    """Decodes tokens to 'media' the way Griffin-Lim does: with a seeded draw whose value for an
    item depends on the item's row in the batch (so batch composition would leak into targets)."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, seg: Segment) -> torch.Tensor:
        self.decoded += seg.batch_size
        g = torch.Generator().manual_seed(0)
        return seg.tokens + 0.01 * torch.rand(seg.tokens.shape, generator=g)


class SumReference:
    token_feature_dim = 3

    def token_features(self, media: torch.Tensor, seg: Segment) -> torch.Tensor:
        return media[..., :3] * 2.0


def _segment(items: list[int], n: int = 5, c: int = 4) -> Segment:
    tokens = torch.stack([torch.full((n, c), float(i)) + torch.arange(n * c).view(n, c) / 100 for i in items])
    return Segment(modality="audio", tokens=tokens, positions=grid_positions(n, 1, 1, batch=len(items)))


def _encoder(cache_mb: float = 1.0):
    tok = CountingTokenizer()
    encode, _dim = alignment_encoder({"audio": SumReference()}, {"audio": tok}, cache_mb=cache_mb)
    return encode, tok


def test_seen_items_are_not_decoded_again_and_get_the_same_targets():
    encode, tok = _encoder()
    first = encode(TokenBatch(segments=(_segment([0, 1, 2]),)))
    assert tok.decoded == 3
    again = encode(TokenBatch(segments=(_segment([2, 0, 1]),)))  # the same items, shuffled
    assert tok.decoded == 3  # nothing decoded
    assert torch.equal(again, first[[2, 0, 1]])
    mixed = encode(TokenBatch(segments=(_segment([1, 7, 0]),)))
    assert tok.decoded == 4  # only item 7
    assert torch.equal(mixed[[0, 2]], first[[1, 0]])
    cache = encode.cache
    assert (cache.hits, cache.misses) == (5, 4)


def test_a_target_depends_on_its_item_alone_so_a_fresh_cache_recomputes_it_bit_exactly():
    """A resumed run starts with an empty cache: it must recompute the targets the first run kept,
    whatever batches the items come in now."""
    run, _ = _encoder()
    kept = run(TokenBatch(segments=(_segment([0, 1, 2, 3]),)))
    resumed, _ = _encoder()
    again = resumed(TokenBatch(segments=(_segment([3, 2]),)))
    assert torch.equal(again, kept[[3, 2]])
    # without the cache the whole batch is decoded at once, as before (targets follow batch rows)
    plain, tok = _encoder(cache_mb=0)
    out = plain(TokenBatch(segments=(_segment([0, 1, 2, 3]),)))
    assert tok.decoded == 4 and out.shape == kept.shape
    assert not torch.equal(plain(TokenBatch(segments=(_segment([3, 2]),))), out[[3, 2]])
    assert plain.cache.hits == plain.cache.misses == 0


def test_the_cache_keeps_the_most_recently_used_items_under_its_budget():
    row_bytes = 5 * 3 * 4  # (N, E) float32
    cache = TokenFeatureCache(max_bytes=2 * row_bytes)
    calls = []

    def compute(seg: Segment) -> torch.Tensor:
        calls.append(int(seg.tokens[0, 0, 0]))
        return seg.tokens[..., :3].clone()

    cache.features(_segment([0, 1]), compute)
    cache.features(_segment([0]), compute)  # 0 is now the most recent
    cache.features(_segment([2]), compute)  # evicts 1, the least recently used
    assert cache.bytes == 2 * row_bytes and len(cache.store) == 2
    cache.features(_segment([0, 1]), compute)
    assert calls == [0, 1, 2, 1]


def test_positions_and_padding_are_part_of_an_items_identity():
    cache = TokenFeatureCache(max_bytes=2**20)
    seg = _segment([0])
    cache.features(seg, lambda s: s.tokens[..., :3])
    shifted = Segment(modality="audio", tokens=seg.tokens, positions=seg.positions + 48)
    cache.features(shifted, lambda s: s.tokens[..., :3])
    padded = Segment(
        modality="audio", tokens=seg.tokens, positions=seg.positions, valid=torch.tensor([[True] * 4 + [False]])
    )
    cache.features(padded, lambda s: s.tokens[..., :3])
    assert cache.misses == 3 and cache.hits == 0


def test_a_negative_budget_is_a_config_error():
    from selfflow.registry.config import ObjectiveSection

    with pytest.raises(ValueError, match="alignment_cache_mb"):
        ObjectiveSection(alignment_cache_mb=-1)
