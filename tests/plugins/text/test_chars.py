"""``text/chars``: strings <-> a padded segment of character tokens (a condition through the
stream's ``ConditionRule``)."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.conditioning import ConditionRule
from selfflow.core.types import Role, Segment, TokenBatch, grid_positions, sequence_positions
from selfflow.plugins.protocols import Tokenizer
from selfflow.plugins.text.chars import DEFAULT_ALPHABET, UNKNOWN, CharsConfig, CharTokenizer

TEXTS = ["cat", "Hello World 42", "", "z"]


def test_round_trip_padding_mask_positions_role() -> None:
    tok = CharTokenizer(CharsConfig(max_len=16))
    assert isinstance(tok, Tokenizer)
    assert tok.mask_ratio == 0.25 and isinstance(tok.cache_key(), str)
    seg = tok.encode(TEXTS)
    # the tokenizer gives the default role; the stream's ConditionRule makes text a condition
    assert seg.modality == "text" and seg.role is Role.GENERATE
    image = Segment(modality="image", tokens=torch.zeros(4, 4, 3), positions=grid_positions(1, 2, 2, batch=4))
    conditioned = ConditionRule(always={"text"})(TokenBatch(segments=(image, seg)))
    text_seg = conditioned.segments[1]
    assert text_seg.modality == "text" and text_seg.role is Role.CONDITION and not text_seg.generated
    assert torch.equal(text_seg.tokens, seg.tokens) and conditioned.segments[0].generated
    assert seg.tokens.shape == (4, 16, len(DEFAULT_ALPHABET) + 1) == (4, 16, tok.channels)
    assert seg.valid.dtype == torch.bool and seg.valid.sum(1).tolist() == [3, 14, 0, 1]
    assert seg.tokens[~seg.valid].abs().sum() == 0  # padding is zeros
    assert torch.equal(seg.tokens[seg.valid].sum(-1), torch.ones(int(seg.valid.sum())))  # one-hot
    assert seg.positions.dtype == torch.long
    # positions changed deliberately from (i, 0, 0) to core.types.sequence_positions:
    # t = 0 and h = w = i - max_len (a 1-D sequence that never meets an image token)
    assert seg.positions[:, :, 0].abs().sum() == 0
    assert torch.equal(seg.positions[:, :, 1], (torch.arange(16) - 16).expand(4, 16))
    assert torch.equal(seg.positions[:, :, 2], seg.positions[:, :, 1])
    assert torch.equal(seg.positions, sequence_positions(16, batch=4))
    assert tok.decode(seg) == TEXTS
    c = seg.tokens[0, 0].argmax()
    assert int(c) == DEFAULT_ALPHABET.index("c")


def test_fixed_vectors_round_trip_at_any_width() -> None:
    for dim in (8, 32, 128):
        tok = CharTokenizer(CharsConfig(dim=dim, max_len=16))
        seg = tok.encode(TEXTS)
        assert seg.channels == dim == tok.channels
        assert torch.allclose(seg.tokens[seg.valid].norm(dim=-1), torch.ones(int(seg.valid.sum())), atol=1e-5)
        assert tok.decode(seg) == TEXTS
    a = CharTokenizer(CharsConfig(dim=32, seed=1)).encode(["ab"]).tokens
    assert torch.equal(a, CharTokenizer(CharsConfig(dim=32, seed=1)).encode(["ab"]).tokens)
    assert not torch.equal(a, CharTokenizer(CharsConfig(dim=32, seed=2)).encode(["ab"]).tokens)


def test_decode_tolerates_noise_on_tokens() -> None:
    tok = CharTokenizer(CharsConfig(max_len=16))
    seg = tok.encode(TEXTS)
    g = torch.Generator().manual_seed(0)
    noisy = seg.with_tokens(seg.tokens + 0.1 * torch.randn(seg.tokens.shape, generator=g))
    assert tok.decode(noisy) == TEXTS


def test_unknown_characters_map_or_raise() -> None:
    cfg = CharsConfig(alphabet="abc", max_len=6)
    seg = CharTokenizer(cfg).encode(["abé!", "cab"])
    assert seg.tokens[0, 2, 3] == 1 and seg.tokens[0, 3, 3] == 1  # the unknown slot, last
    assert CharTokenizer(cfg).decode(seg) == [f"ab{UNKNOWN}{UNKNOWN}", "cab"]
    strict = CharTokenizer(CharsConfig(alphabet="abc", max_len=6, on_unknown="raise"))
    with pytest.raises(ValueError, match=r"\['!', 'é'\].*alphabet"):
        strict.encode(["abé!"])
    assert strict.decode(strict.encode(["cab"])) == ["cab"]


def test_clear_errors() -> None:
    tok = CharTokenizer(CharsConfig(max_len=4))
    with pytest.raises(ValueError, match="max_len is 4"):
        tok.encode(["toolong"])
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("cat")
    with pytest.raises(ValueError, match="repeats"):
        CharsConfig(alphabet="aab")
    with pytest.raises(ValueError, match="unknown"):
        CharsConfig(alphabet="ab" + UNKNOWN)
    with pytest.raises(ValueError):
        CharsConfig(on_unknown="drop")
