"""``audio/frames``: exact round trip, time positions on the shared axis, valid masks."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.types import TIME_RATE
from selfflow.plugins.audio.frames import FramesConfig, FramesTokenizer
from selfflow.plugins.audio.tones import TonesConfig, tones
from selfflow.plugins.protocols import Tokenizer


def test_round_trip_is_exact_and_positions_are_ticks() -> None:
    tok = FramesTokenizer()
    assert isinstance(tok, Tokenizer) and tok.mask_ratio == 0.5 and tok.channels == 320 and tok.frame_rate == 50
    x = torch.rand(3, 1, 16000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seg = tok.encode(x)
    assert seg.tokens.shape == (3, 50, 320) and seg.valid is None and seg.modality == "audio"
    assert torch.equal(seg.tokens[1, 7], x[1, 0, 7 * 320 : 8 * 320])
    assert torch.equal(seg.positions[0, :, 0], torch.arange(50) * (TIME_RATE // 50))  # 60 ticks per frame
    assert bool((seg.positions[..., 1:] == 0).all())
    assert torch.equal(tok.decode(seg), x)  # bit-exact
    assert tok.cache_key() == "audio/frames:16000:320"


def test_ragged_batches_get_valid_masks_and_silent_padding() -> None:
    tok = FramesTokenizer(FramesConfig(sample_rate=8000, frame=100))
    clips = [torch.full((1, 1000), 0.5), torch.full((1, 250), -0.5)]
    seg = tok.encode(clips)
    assert seg.tokens.shape == (2, 10, 100)
    assert seg.valid[0].all() and seg.valid[1].tolist() == [True] * 3 + [False] * 7  # 250 samples: 3 frames
    assert float(seg.tokens[1, 2, 49]) == -0.5 and float(seg.tokens[1, 2, 50]) == 0.0  # last frame zero-padded
    out = tok.decode(seg.with_tokens(seg.tokens + 0.25))
    assert out.shape == (2, 1, 1000) and float(out[1, 0, 300:].abs().max()) == 0.0  # invalid frames silent
    assert torch.equal(tok.decode(seg)[1, 0, :250], clips[1][0])
    assert float(tok.decode(seg.with_tokens(seg.tokens * 4)).max()) == 1.0  # clamped to [-1, 1]


def test_bad_inputs_say_what_was_expected() -> None:
    tok = FramesTokenizer()
    with pytest.raises(ValueError, match="mix down to mono"):
        tok.encode(torch.zeros(2, 2, 320))
    with pytest.raises(ValueError, match="add a batch dimension"):
        tok.encode(torch.zeros(1, 320))
    with pytest.raises(TypeError, match="int16 PCM"):
        tok.encode(torch.zeros(2, 1, 320, dtype=torch.int16))
    seg = tok.encode(torch.zeros(1, 1, 640))
    with pytest.raises(ValueError, match="320-sample frames"):
        tok.decode(seg.with_tokens(torch.zeros(1, 2, 100)))
    data = tones(TonesConfig(sample_rate=8000, train_per_class=1, eval_per_class=1, octaves=(3, 4)))
    with pytest.raises(ValueError, match="sample_rate = 16000 Hz but the dataset's clips are 8000 Hz"):
        tok.fit(data)
