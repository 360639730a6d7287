"""``video/patch``: exact round trip, token counts and positions on the shared time axis."""

from __future__ import annotations

import pytest
import torch

from selfflow.core.types import TIME_RATE
from selfflow.plugins.protocols import Tokenizer
from selfflow.plugins.video.patch import VideoPatchConfig, VideoPatchTokenizer


@pytest.mark.parametrize(("pt", "p", "c"), [(1, 4, 1), (2, 4, 3), (1, 8, 1), (3, 2, 3)])
def test_round_trip_is_exact(pt, p, c):
    tok = VideoPatchTokenizer(VideoPatchConfig(frames_per_patch=pt, patch=p, video_channels=c))
    x = torch.rand(2, c, 6, 16, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seg = tok.encode(x)
    assert isinstance(tok, Tokenizer) and seg.modality == "video" and tok.mask_ratio == 0.10
    assert seg.tokens.shape == (2, (6 // pt) * (16 // p) * (8 // p), c * pt * p * p) and tok.channels == c * pt * p * p
    assert torch.equal(tok.decode(seg), x)


def test_tokens_are_time_major_patches_and_positions_are_ticks():
    tok = VideoPatchTokenizer(VideoPatchConfig(frames_per_patch=1, patch=2, fps=10))
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 1, 3, 4, 4)
    seg = tok.encode(x)
    assert seg.tokens.shape == (1, 12, 4)
    # token 5 = frame 1, row 0, column 1: pixels (1, 0:2, 2:4)
    assert seg.tokens[0, 5].tolist() == x[0, 0, 1, 0:2, 2:4].flatten().tolist()
    assert seg.positions[0, 5].tolist() == [TIME_RATE // 10, 0, 1]  # frame 1 at 0.1 s = 300 ticks
    assert seg.positions[0, :, 0].unique().tolist() == [0, 300, 600] and seg.positions.dtype == torch.long


def test_time_positions_use_the_first_frame_of_a_patch():
    tok = VideoPatchTokenizer(VideoPatchConfig(frames_per_patch=4, patch=4, fps=25))
    seg = tok.encode(torch.zeros(1, 1, 8, 4, 4))
    assert seg.positions[0, :, 0].tolist() == [0, 480]  # frame 4 at 25 fps = 0.16 s = 480 ticks


def test_an_image_is_a_one_frame_video():
    tok = VideoPatchTokenizer()
    img = torch.rand(3, 1, 8, 8) * 2 - 1
    seg = tok.encode(img)
    assert seg.tokens.shape == (3, 4, 16) and (seg.positions[..., 0] == 0).all()
    assert torch.equal(tok.decode(seg), img[:, :, None])


def test_bad_media_say_what_was_expected():
    tok = VideoPatchTokenizer(VideoPatchConfig(frames_per_patch=2))
    with pytest.raises(ValueError, match="3 channels.*video_channels = 3"):
        tok.encode(torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="frames_per_patch = 2"):
        tok.encode(torch.zeros(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible by patch = 4"):
        tok.encode(torch.zeros(1, 1, 2, 6, 8))
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(torch.zeros(1, 1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got shape \(1, 8\)"):
        tok.encode(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="fps"):
        VideoPatchConfig(fps=0)


def test_cache_key_names_every_option():
    keys = {
        VideoPatchTokenizer(VideoPatchConfig(**kw)).cache_key()
        for kw in ({}, {"patch": 8}, {"frames_per_patch": 2}, {"video_channels": 3}, {"fps": 25})
    }
    assert len(keys) == 5


def test_the_plugin_registers_its_entries():
    from selfflow.plugins import video

    added = {}

    class Register:
        def add(self, name, factory, config_cls=None, doc=""):
            added[name] = (factory, config_cls, doc)

    for hook in ("tokenizers", "datasets", "writers"):
        getattr(video, f"selfflow_register_{hook}")(register=Register())
    assert {"video/patch", "video/moving-digits", "video/folder", "video"} <= set(added)
    factory, config_cls, doc = added["video/patch"]
    assert isinstance(factory(config_cls(patch=8)), VideoPatchTokenizer) and doc


def test_fit_refuses_clips_at_another_frame_rate():
    from types import SimpleNamespace

    tok = VideoPatchTokenizer(VideoPatchConfig(fps=10))
    tok.fit(SimpleNamespace(fps=10.0))  # the same rate, and a dataset that states none (fps 0), pass
    tok.fit(SimpleNamespace(fps=0.0))
    with pytest.raises(ValueError, match="fps = 10 but the dataset's clips are 25 fps.*fps = 25"):
        tok.fit(SimpleNamespace(fps=25.0))
