"""The video reference network: factor heads and the joint label, the FeatureNetwork protocol,
feature scale, token features on token grids, cache, and the generic FD/KID/class-accuracy
metrics working on clips through it. Trained for a few epochs on tiny synthetic clips."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow.core.types import Segment, grid_positions
from selfflow.plugins.metrics import ClassAccuracy, FrechetDistance, KernelDistance, KIDConfig
from selfflow.plugins.protocols import Example, FeatureNetwork, ReferenceContext
from selfflow.plugins.video.reference import (
    VideoReference,
    VideoReferenceConfig,
    joint_logits,
    split_label,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")

MOVES = ((1, 1), (1, -1), (-1, 1), (-1, -1))


class Blocks:
    """Clips ``(1, 5, 8, 8)``: a 2x2 or 3x3 bright block moving diagonally one pixel per frame.
    ``label = size * 4 + direction`` with ``label_factors = (("size", 2), ("direction", 4))``."""

    modalities = ("video",)
    num_classes = 8
    label_factors = (("size", 2), ("direction", 4))
    fps = 10.0

    def __init__(self, n: int = 64, seed: int = 0, factors: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.clips, self.labels = [], []
        for i in range(n):
            size, d = (i // 4) % 2, i % 4
            s = 2 + size
            y, x = (int(v) for v in torch.randint(2, 8 - s - 1, (2,), generator=g))
            clip = -torch.ones(1, 5, 8, 8)
            for f in range(5):
                yy = min(max(y + MOVES[d][0] * (f - 2), 0), 8 - s)
                xx = min(max(x + MOVES[d][1] * (f - 2), 0), 8 - s)
                clip[0, f, yy : yy + s, xx : xx + s] = 1.0
            self.clips.append(clip)
            self.labels.append(size * 4 + d)
        self.class_names = tuple(f"{s}{d}" for s in range(2) for d in range(4))
        if not factors:
            self.label_factors = None
        self.tag = f"blocks-{n}-{seed}-{factors}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"video": self.clips[i]}, label=self.labels[i])

    def fingerprint(self) -> str:
        return self.tag


TINY = VideoReferenceConfig(widths=(8, 16, 16), features=32, epochs=6, batch_size=16, lr=1e-2, shift=1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> VideoReference:
    cache = tmp_path_factory.mktemp("cache")
    return VideoReference.fit(Blocks(), TINY, eval_dataset=Blocks(32, seed=1), cache_dir=cache, progress=False)


def test_it_is_a_feature_network_with_factor_heads(ref: VideoReference) -> None:
    assert isinstance(ref, FeatureNetwork)
    assert ref.factors == (("size", 2), ("direction", 4)) and ref.num_classes == 8
    assert ref.num_features == 32 and ref.token_feature_dim == 16
    assert set(ref.factor_accuracy) == {"size", "direction"}
    assert ref.accuracy <= min(ref.factor_accuracy.values())  # joint hits are hits of every factor
    assert ref.accuracy > 1 / 8  # it learned something in 6 tiny epochs
    d = ref.describe()
    assert d["reference_accuracy"] == ref.accuracy and d["reference_factor_accuracy"] == ref.factor_accuracy
    assert "not comparable with I3D FVD" in d["reference_note"]


def test_joint_logits_are_the_mixed_radix_product() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    j = joint_logits([a, b])
    assert j.shape == (5, 12)
    assert torch.allclose(j.logsumexp(-1), torch.zeros(5), atol=1e-5)  # a distribution over the joint label
    assert torch.equal(j.argmax(-1), a.argmax(-1) * 4 + b.argmax(-1))
    assert torch.allclose(j[2, 1 * 4 + 3], a.log_softmax(-1)[2, 1] + b.log_softmax(-1)[2, 3])
    labels = torch.arange(12)
    hi, lo = split_label(labels, (("a", 3), ("b", 4)))
    assert torch.equal(hi * 4 + lo, labels)


def test_outputs_and_feature_scale(ref: VideoReference) -> None:
    data = Blocks()
    x = torch.stack([data[i].media["video"] for i in range(len(data))])
    feats = ref.features(x)
    assert feats.shape == (64, 32)
    assert math.isclose(float(feats.square().mean().sqrt()), 1.0, rel_tol=1e-4)  # RMS 1 on the training clips
    assert ref.logits(x).shape == (64, 8)
    fl = ref.factor_logits(x)
    assert fl["size"].shape == (64, 2) and fl["direction"].shape == (64, 4)
    assert torch.equal(ref.predict(x), fl["size"].argmax(-1) * 4 + fl["direction"].argmax(-1))
    assert torch.allclose(ref.feature_module()(x), feats)
    with pytest.raises(ValueError, match=r"trained on \(B, 1, 5, 8, 8\) clips"):
        ref.features(torch.zeros(2, 1, 9, 8, 8))


@pytest.mark.parametrize("grid", [(2, 2, 2), (3, 1, 1), (5, 4, 4), (1, 2, 2)])
def test_token_features_follow_the_token_grid(ref: VideoReference, grid) -> None:
    t, h, w = grid
    x = torch.stack([Blocks()[i].media["video"] for i in range(3)])
    pos = grid_positions(t, h, w, batch=3).clone()
    pos[..., 0] *= 1200  # ticks, not indices: only their order matters
    seg = Segment(modality="video", tokens=torch.zeros(3, t * h * w, 4), positions=pos)
    out = ref.token_features(x, seg)
    assert out.shape == (3, t * h * w, 16)
    if grid == (1, 2, 2):  # one time bin: the mean over time of the 2x2 spatial pooling
        m = torch.nn.functional.adaptive_avg_pool3d(ref.net.feature_map(x), (1, 2, 2))
        assert torch.allclose(out, m.flatten(2).transpose(1, 2), atol=1e-6)
    n = t * h * w + 1  # one token too many for the grid its positions span
    bad = Segment(modality="video", tokens=torch.zeros(3, n, 4), positions=torch.cat([pos, pos[:, :1]], dim=1))
    with pytest.raises(ValueError, match=f"grid but the segment has {n} tokens"):
        ref.token_features(x, bad)


def test_cache_and_registry_factory(ref: VideoReference, tmp_path) -> None:
    a = VideoReference.fit(Blocks(), TINY, eval_dataset=Blocks(32, seed=1), cache_dir=tmp_path, progress=False)
    assert not a.from_cache
    context = ReferenceContext(
        modality="video",
        train_dataset=Blocks(),
        eval_dataset=Blocks(32, seed=1),
        cache_dir=tmp_path,
        device=torch.device("cpu"),
    )
    b = VideoReference.from_config(TINY, context=context)
    assert b.from_cache and b.accuracy == a.accuracy
    x = torch.stack([Blocks()[i].media["video"] for i in range(4)])
    assert torch.equal(a.features(x), b.features(x))


def test_plain_labels_get_one_head(tmp_path) -> None:
    r = VideoReference.fit(Blocks(32, factors=False), TINY, progress=False, cache_dir=tmp_path)
    assert r.factors == (("label", 8),) and r.num_classes == 8 and set(r.factor_accuracy) == {"label"}


def test_bad_factors_and_unlabelled_data_are_refused() -> None:
    data = Blocks(16)
    data.label_factors = (("size", 3), ("direction", 4))
    with pytest.raises(ValueError, match="multiply to 12, but num_classes is 8"):
        VideoReference.fit(data, TINY, progress=False)
    data = Blocks(16)
    data.num_classes = 0
    with pytest.raises(ValueError, match="needs a labelled dataset"):
        VideoReference.fit(data, TINY, progress=False)
    with pytest.raises(ValueError, match="three positive channel counts"):
        VideoReferenceConfig(widths=(8, 16))


def test_generic_metrics_work_on_clips(ref: VideoReference) -> None:
    """fd / kid / class-accuracy of plugins/metrics.py take the video network unchanged; class
    accuracy of real eval clips is the network's held-out joint accuracy."""
    ev = Blocks(32, seed=1)
    x = torch.stack([ev[i].media["video"] for i in range(len(ev))])
    y = torch.tensor(ev.labels)
    acc = ClassAccuracy(ref)
    acc.update(fake=x, labels=y)
    assert math.isclose(acc.compute()[0].value, ref.accuracy)
    fd = FrechetDistance(ref)
    fd.update(real=x, fake=x)
    assert abs(fd.compute()[0].value) < 1e-3  # identical sets
    fd.reset()
    fd.update(fake=-torch.ones_like(x))
    result = fd.compute()[0]
    assert result.value > 1.0 and result.details["reference_factor_accuracy"] == ref.factor_accuracy
    kid = KernelDistance(ref, KIDConfig(subsets=5, subset_size=8))
    kid.update(real=x, fake=torch.flip(x, dims=(2,)))
    assert {r.name for r in kid.compute()} == {"kid_mean", "kid_std"}
