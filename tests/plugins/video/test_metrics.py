"""Video metrics: frame-wise FD (an image reference trained on frames of the clips), per-factor
accuracy, temporal consistency (analytic values, W1 and KS against scipy), their registration
and their options through the registry."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from selfflow.plugins.image.reference import ImageReferenceConfig
from selfflow.plugins.protocols import Example, MetricContext
from selfflow.plugins.video.metrics import (
    FactorAccuracy,
    FrameFD,
    FrameFDConfig,
    FramesView,
    TemporalConsistency,
    frame_change,
    frames_of,
    ks_statistic,
    wasserstein_1d,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Clips:
    """``(1, 9, 8, 8)`` clips: digit-like blocks (4 sizes/positions -> "digit") drifting right or
    left (-> "direction"); ``label = digit * 2 + direction``."""

    modalities = ("video",)
    num_classes = 8
    label_factors = (("digit", 4), ("direction", 2))
    class_names = tuple(str(i) for i in range(8))
    fps = 10.0

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.clips, self.labels = [], []
        for i in range(n):
            digit, d = (i // 2) % 4, i % 2
            row = 1 + 2 * (digit // 2) + int(torch.randint(0, 2, (1,), generator=g))
            h = 2 + digit % 2
            clip = -torch.ones(1, 9, 8, 8)
            for f in range(9):
                x = 2 + (f // 3) * (1 if d == 0 else -1) + 1
                clip[0, f, row : row + h, x : x + 2] = 1.0
            self.clips.append(clip)
            self.labels.append(digit * 2 + d)
        self.tag = f"clips-{n}-{seed}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"video": self.clips[i]}, label=self.labels[i])

    def fingerprint(self) -> str:
        return self.tag


def _stack(data) -> torch.Tensor:
    return torch.stack([data[i].media["video"] for i in range(len(data))])


def _context(tmp_path: Path, reference=None) -> MetricContext:
    def no_reference():
        raise AssertionError("not needed")

    return MetricContext(
        modality="video",
        train_dataset=Clips(),
        eval_dataset=Clips(16, seed=1),
        tokenizer=None,
        device=torch.device("cpu"),
        cache_dir=tmp_path,
        reference=reference or no_reference,
    )


# ---------------------------------------------------------------- frames


def test_frames_of_and_the_frames_view() -> None:
    x = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 1, 3, 2, 2)
    f = frames_of(x)
    assert f.shape == (6, 1, 2, 2) and torch.equal(f[4], x[1, :, 1])
    with pytest.raises(ValueError, match=r"clip batches \(B, C, T, H, W\)"):
        frames_of(torch.zeros(2, 1, 8, 8))
    data = Clips(4)
    view = FramesView(data, frames_per_clip=3, label_factor="digit")
    assert view.frames == [0, 4, 8] and len(view) == 12 and view.num_classes == 4
    ex = view[5]  # clip 1, frame 8
    assert torch.equal(ex.media["image"], data[1].media["video"][:, 8]) and ex.label == data.labels[1] // 2
    plain = FramesView(data, frames_per_clip=2, label_factor="missing")
    assert plain.frames == [0, 8] and plain.num_classes == 8 and plain[1].label == data.labels[0]
    assert plain.fingerprint() != view.fingerprint()
    assert FramesView(data, frames_per_clip=40, label_factor=None).frames == list(range(9))


# ---------------------------------------------------------------- temporal consistency


def test_frame_change_is_the_mean_absolute_difference() -> None:
    static = torch.zeros(2, 1, 5, 4, 4)
    assert torch.equal(frame_change(static), torch.zeros(2, dtype=torch.float64))
    flicker = torch.ones(1, 1, 5, 4, 4)
    flicker[:, :, 1::2] = -1  # every step changes every pixel by 2
    assert float(frame_change(flicker)[0]) == 2.0
    half = torch.zeros(1, 2, 3, 2, 2)
    half[0, 0, 2] = 1.0  # one channel changes by 1 in the last step: (0 + 0.5) / 2
    assert math.isclose(float(frame_change(half)[0]), 0.25)
    with pytest.raises(ValueError, match="T >= 2"):
        frame_change(torch.zeros(1, 1, 1, 4, 4))


def test_w1_and_ks_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, generator=g).double(), (torch.randn(23, generator=g) * 2 + 0.5).double()
    assert math.isclose(wasserstein_1d(a, b), stats.wasserstein_distance(a.numpy(), b.numpy()), rel_tol=1e-9)
    assert math.isclose(ks_statistic(a, b), stats.ks_2samp(a.numpy(), b.numpy()).statistic, rel_tol=1e-9)
    assert wasserstein_1d(a, a) == 0.0 and ks_statistic(a, a) == 0.0
    assert math.isclose(wasserstein_1d(a, a + 0.3), 0.3, rel_tol=1e-9)  # a shift moves W1 by the shift


def test_temporal_metric_values() -> None:
    real = _stack(Clips(16))
    m = TemporalConsistency()
    m.update(real=real, fake=real)
    out = {r.name: r.value for r in m.compute()}
    assert out == {"temporal_ratio": 1.0, "temporal_w1": 0.0, "temporal_ks": 0.0}
    m.reset()
    m.update(fake=real[:, :, :1].expand_as(real))  # frozen first frames: no motion at all
    out = {r.name: r for r in m.compute()}
    assert out["temporal_ratio"].value == 0.0 and out["temporal_ks"].value == 1.0
    assert math.isclose(out["temporal_w1"].value, out["temporal_w1"].details["real_mean"])
    assert out["temporal_w1"].details["real_clips"] == 16


# ---------------------------------------------------------------- factor accuracy


class StubReference:
    """Reads the digit from the top-left pixel's sign and always answers direction 0."""

    factors = (("digit", 4), ("direction", 2))
    accuracy = 0.5
    factor_accuracy: ClassVar[dict[str, float]] = {"digit": 1.0, "direction": 0.5}

    def factor_logits(self, videos):
        b = len(videos)
        digit = torch.nn.functional.one_hot((videos[:, 0, 0, 0, 0] > 0).long() * 3, 4).float()
        return {"digit": digit, "direction": torch.tensor([[1.0, 0.0]]).expand(b, 2)}

    def describe(self):
        return {"reference": "stub"}


def test_factor_accuracy_per_factor_and_joint() -> None:
    m = FactorAccuracy(StubReference())
    fake = -torch.ones(4, 1, 3, 2, 2)
    fake[2:, 0, 0, 0, 0] = 1.0  # samples 2, 3 read as digit 3; 0, 1 as digit 0
    labels = torch.tensor([0 * 2 + 0, 1 * 2 + 0, 3 * 2 + 1, 3 * 2 + 0])
    m.update(fake=fake, labels=labels)
    out = {r.name: r for r in m.compute()}
    assert out["digit_accuracy"].value == 0.75  # 0, 2, 3 right
    assert out["direction_accuracy"].value == 0.75  # 0, 1, 3 right
    assert out["joint_accuracy"].value == 0.5  # 0 and 3
    assert out["digit_accuracy"].details["chance"] == 0.25 and out["joint_accuracy"].details["chance"] == 0.125
    assert out["direction_accuracy"].details["reference_held_out"] == 0.5
    with pytest.raises(ValueError, match=r"class ids in \[0, 8\)"):
        m.update(fake=fake, labels=torch.tensor([0, 1, 2, 8]))
    with pytest.raises(TypeError, match="per-factor heads"):
        FactorAccuracy(object())


def test_factor_accuracy_of_real_clips_is_the_reference_ceiling(tmp_path) -> None:
    from selfflow.plugins.video.reference import VideoReference, VideoReferenceConfig

    cfg = VideoReferenceConfig(widths=(8, 16, 16), features=32, epochs=4, batch_size=16, lr=1e-2, shift=0)
    ref = VideoReference.fit(Clips(), cfg, eval_dataset=Clips(16, seed=1), cache_dir=tmp_path, progress=False)
    m = FactorAccuracy.from_config(None, context=_context(tmp_path, lambda: ref))
    ev = Clips(16, seed=1)
    m.update(fake=_stack(ev), labels=torch.tensor(ev.labels))
    out = {r.name: r.value for r in m.compute()}
    assert out["joint_accuracy"] == ref.accuracy
    assert out["digit_accuracy"] == ref.factor_accuracy["digit"]
    assert out["direction_accuracy"] == ref.factor_accuracy["direction"]


# ---------------------------------------------------------------- frame-wise FD


def test_frame_fd_trains_a_cached_frame_reference(tmp_path) -> None:
    config = FrameFDConfig(reference=ImageReferenceConfig(widths=(8,), features=16, epochs=2, batch_size=32))
    m = FrameFD.from_config(config, context=_context(tmp_path))
    assert not m.reference.from_cache and m.reference.num_classes == 4  # labelled by the digit factor
    assert m.reference.meta["train_samples"] == 48 * 3
    real = _stack(Clips(16, seed=1))
    m.update(real=real, fake=real)
    (result,) = m.compute()
    assert result.name == "frame_fd" and abs(result.value) < 1e-3
    assert result.details["real_frames"] == 16 * 9 and result.details["fake_clips"] == 16
    assert "frames [0, 4, 8]" in result.details["image_reference_trained_on"]
    m.reset()
    m.update(fake=-torch.ones_like(real))
    assert m.compute()[0].value > 0.1
    again = FrameFD.from_config(config, context=_context(tmp_path))
    assert again.reference.from_cache


def test_video_metrics_are_registered_with_their_options() -> None:
    from selfflow.registry.compose import load_registries

    regs, _ = load_registries()
    for name in ("video/frame-fd", "video/factor-accuracy", "video/temporal"):
        assert regs.measure(name)[0] == "metrics"
    built = regs.metrics.get("video/frame-fd").config_cls
    assert built is FrameFDConfig
    assert regs.references.get("video").plugin == "video"
