"""Video metrics beside the generic ``fd`` / ``kid`` / ``class-accuracy`` (``plugins/metrics.py``,
which take the video reference network unchanged: ``fd`` and ``kid`` of videos are an
**FVD-style** metric in that small 3-D CNN's feature space, never comparable with published
I3D FVD numbers).

- ``video/frame-fd``: Fréchet distance over **individual frames** in the feature space of an
  *image* reference network (``plugins/image/reference.ImageReference``) trained on frames of
  the run's clips (the paper reports a frame-wise FID beside FVD). Every frame of every clip
  counts as one image.
- ``video/factor-accuracy``: the share of class-conditional samples whose requested label
  factors (digit and motion direction for ``video/moving-digits``) the video reference
  network reads back, per factor and jointly.
- ``video/temporal``: temporal consistency. For a clip ``x`` of ``T`` frames in [-1, 1],
  ``d(x) = mean_{t=1..T-1} mean_{c,h,w} |x_t - x_{t-1}|`` (mean absolute frame-to-frame
  change, in [0, 2]). Over the generated and the real clips it reports ``temporal_ratio =
  mean d(fake) / mean d(real)`` (1: as much motion as the data; below: too static; above:
  flicker), ``temporal_w1``, the 1-D Wasserstein distance between the two empirical
  distributions of ``d``, and ``temporal_ks``, their Kolmogorov-Smirnov statistic.

``selfflow eval --real`` scores held-out real clips in place of samples (the ceiling);
``selfflow eval --reconstructions`` scores ``decode(encode(x))`` of held-out clips (the
tokenizer's floor).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from selfflow.core.files import content_key
from selfflow.plugins.image.reference import ImageReferenceConfig
from selfflow.plugins.protocols import Example, MetricContext, MetricResult

# ----------------------------------------------------------------------------- frames of clips


def frames_of(videos: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` -> ``(B * T, C, H, W)``, clip by clip."""
    if not isinstance(videos, Tensor) or videos.ndim != 5:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"video metrics take clip batches (B, C, T, H, W), got {shape}")
    b, c, t, h, w = videos.shape
    return videos.transpose(1, 2).reshape(b * t, c, h, w)


class FramesView:
    """A video dataset seen as images: ``frames_per_clip`` evenly spaced frames of every clip
    (first and last included), each an ``Example(media={"image": (C, H, W)})``.

    Label: the clip label's factor ``label_factor`` (a single frame shows the digit, not the
    motion) when the dataset has ``label_factors`` with that name, else the clip's label.
    """

    modalities = ("image",)

    def __init__(self, dataset, *, frames_per_clip: int, label_factor: str | None) -> None:
        self.dataset = dataset
        t = int(torch.as_tensor(dataset[0].media["video"]).shape[1])
        n = min(frames_per_clip, t)
        self.frames = sorted({round(i * (t - 1) / max(n - 1, 1)) for i in range(n)})
        factors = tuple(getattr(dataset, "label_factors", None) or ())
        names = [name for name, _ in factors]
        if label_factor is not None and label_factor in names:
            k = names.index(label_factor)
            self._radix = math.prod(size for _, size in factors[k + 1 :])
            self._size = int(factors[k][1])
            self.label_factor: str | None = label_factor
        else:
            self._radix, self._size, self.label_factor = 1, int(dataset.num_classes), None
        self.num_classes = self._size
        self.class_names = tuple(str(i) for i in range(self._size))
        self._key = content_key("frames", dataset.fingerprint(), self.frames, self.label_factor, length=16)

    def __len__(self) -> int:
        return len(self.dataset) * len(self.frames)

    def __getitem__(self, i: int) -> Example:
        clip, f = divmod(i, len(self.frames))
        ex = self.dataset[clip]
        label = None if ex.label is None else (int(ex.label) // self._radix) % self._size
        return Example(media={"image": torch.as_tensor(ex.media["video"])[:, self.frames[f]]}, label=label)

    def fingerprint(self) -> str:
        return self._key


# ----------------------------------------------------------------------------- video/frame-fd


@attrs.frozen(kw_only=True)
class FrameFDConfig:
    """``frames_per_clip``: evenly spaced frames of each training clip the image reference
    network is trained on (its eval set: as many of each eval clip); ``label_factor``: the
    label factor a single frame shows (``None`` or absent from the data: the clip label);
    ``reference``: the image network's own options (``plugins/image/reference``)."""

    frames_per_clip: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    label_factor: str | None = "digit"
    reference: ImageReferenceConfig = attrs.field(factory=ImageReferenceConfig)


class FrameFD:
    """Frame-wise Fréchet distance: every frame of every real and fake clip through the frame
    image reference network's features (torchmetrics' FID with ``feature=`` it). ``reset()``
    forgets the fake clips only."""

    name = "frame_fd"

    def __init__(self, reference, *, trained_on: str) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.reference = reference
        self.trained_on = trained_on
        self._metric = FrechetInceptionDistance(feature=reference.feature_module(), reset_real_features=False).to(
            reference.device
        )
        self._clips = {True: 0, False: 0}

    @classmethod
    def from_config(cls, config: FrameFDConfig | None, *, context: MetricContext) -> FrameFD:
        from selfflow.plugins.image.reference import ImageReference

        config = config or FrameFDConfig()
        view = {"frames_per_clip": config.frames_per_clip, "label_factor": config.label_factor}
        train = FramesView(context.train_dataset, **view)
        evals = FramesView(context.eval_dataset, **view)
        ref = ImageReference.fit(
            train,
            config.reference,
            eval_dataset=evals,
            cache_dir=context.cache_dir,
            device=context.device,
            progress=context.progress,
        )
        what = train.label_factor or "clip label"
        return cls(ref, trained_on=f"frames {train.frames} of each training clip, labelled by {what}")

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        device = self.reference.device
        for is_real, clips in ((True, real), (False, fake)):
            if clips is not None:
                self._metric.update(frames_of(clips).to(device), real=is_real)
                self._clips[is_real] += len(clips)

    def reset(self) -> None:
        self._metric.reset()
        self._clips[False] = 0

    def compute(self) -> list[MetricResult]:
        n_real = int(self._metric.real_features_num_samples)
        n_fake = int(self._metric.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"frame-wise FD needs at least 2 real and 2 fake frames, got {n_real} and {n_fake}")
        details = {
            "real_clips": self._clips[True],
            "fake_clips": self._clips[False],
            "real_frames": n_real,
            "fake_frames": n_fake,
            "frames": "every frame of every clip",
            "image_reference_trained_on": self.trained_on,
            **self.reference.describe(),
        }
        return [MetricResult(name=self.name, value=float(self._metric.compute()), details=details)]


# ----------------------------------------------------------------------------- video/factor-accuracy


class FactorAccuracy:
    """Per-factor and joint accuracy of class-conditional samples read by the video reference
    network: ``update(fake=, labels=)`` (``labels``: the mixed-radix class ids the samples were
    generated for); results ``{factor}_accuracy`` per factor and ``joint_accuracy``."""

    name = "factor_accuracy"

    def __init__(self, reference) -> None:
        if not callable(getattr(reference, "factor_logits", None)):
            raise TypeError(
                f"video/factor-accuracy needs a reference network with per-factor heads (factor_logits), got "
                f"{type(reference).__name__}; use the default video reference ([modalities.video] reference = 'video')"
            )
        self.reference = reference
        self.factors = tuple(reference.factors)
        self._correct = torch.zeros(len(self.factors) + 1, dtype=torch.long)
        self._total = 0

    @classmethod
    def from_config(cls, config: None, *, context: MetricContext) -> FactorAccuracy:
        return cls(context.reference())

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        from selfflow.plugins.video.reference import split_label

        if fake is None:
            return
        if labels is None:
            raise ValueError("video/factor-accuracy needs the labels the samples were made for: update(fake=, labels=)")
        labels = labels.detach().long().cpu()
        k = math.prod(size for _, size in self.factors)
        if labels.shape != (len(fake),) or (len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k)):
            raise ValueError(f"labels must be ({len(fake)},) class ids in [0, {k}), got {tuple(labels.shape)}")
        wanted = split_label(labels, self.factors)
        logits = self.reference.factor_logits(fake)
        joint = torch.ones(len(labels), dtype=torch.bool)
        for i, (name, _) in enumerate(self.factors):
            hit = logits[name].argmax(-1).cpu() == wanted[i]
            self._correct[i] += int(hit.sum())
            joint &= hit
        self._correct[-1] += int(joint.sum())
        self._total += len(labels)

    def reset(self) -> None:
        self._correct.zero_()
        self._total = 0

    def compute(self) -> list[MetricResult]:
        if self._total == 0:
            raise ValueError("video/factor-accuracy has no samples: call update(fake=..., labels=...) first")
        base = {"samples": self._total, **self.reference.describe()}
        out = []
        for i, (name, size) in enumerate(self.factors):
            ceiling = self.reference.factor_accuracy.get(name)
            details = {**base, "chance": 1.0 / size, "reference_held_out": ceiling}
            value = int(self._correct[i]) / self._total
            out.append(MetricResult(name=f"{name}_accuracy", value=value, details=details))
        chance = 1.0 / math.prod(size for _, size in self.factors)
        details = {**base, "chance": chance, "reference_held_out": self.reference.accuracy}
        out.append(MetricResult(name="joint_accuracy", value=int(self._correct[-1]) / self._total, details=details))
        return out


# ----------------------------------------------------------------------------- video/temporal


def frame_change(videos: Tensor) -> Tensor:
    """``d(x)`` per clip, ``(B,)`` float64: the mean absolute frame-to-frame difference
    ``mean_{t>=1} mean_{c,h,w} |x_t - x_{t-1}|`` of ``(B, C, T, H, W)`` clips in [-1, 1]."""
    if not isinstance(videos, Tensor) or videos.ndim != 5 or videos.shape[2] < 2:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"video/temporal needs clips (B, C, T, H, W) with T >= 2 frames, got {shape}")
    x = videos.detach().double().cpu()
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))


def _cdfs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    points = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, points, right=True).double() / len(a)
    fb = torch.searchsorted(b.sort().values, points, right=True).double() / len(b)
    return points, fa, fb


def wasserstein_1d(a: Tensor, b: Tensor) -> float:
    """The exact 1-D Wasserstein-1 distance of two empirical distributions: ``∫ |F_a - F_b|``."""
    points, fa, fb = _cdfs(a.double(), b.double())
    return float(((fa - fb).abs()[:-1] * points.diff()).sum())


def ks_statistic(a: Tensor, b: Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic ``max |F_a - F_b|``."""
    _, fa, fb = _cdfs(a.double(), b.double())
    return float((fa - fb).abs().max())


class TemporalConsistency:
    """``video/temporal`` (module docstring): compares ``frame_change`` of generated and real clips."""

    name = "temporal"

    def __init__(self) -> None:
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []

    @classmethod
    def from_config(cls, config: None, *, context: MetricContext) -> TemporalConsistency:
        return cls()

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if real is not None:
            self._real.append(frame_change(real))
        if fake is not None:
            self._fake.append(frame_change(fake))

    def reset(self) -> None:
        self._fake.clear()

    def compute(self) -> list[MetricResult]:
        if not self._real or not self._fake:
            raise ValueError("video/temporal needs real and generated clips: update(real=..., fake=...)")
        real, fake = torch.cat(self._real), torch.cat(self._fake)
        details = {
            "definition": "d(x) = mean over t>=1 and pixels of |x_t - x_(t-1)|, clips in [-1, 1]",
            "real_clips": len(real),
            "fake_clips": len(fake),
            "real_mean": float(real.mean()),
            "fake_mean": float(fake.mean()),
            "real_std": float(real.std()) if len(real) > 1 else 0.0,
            "fake_std": float(fake.std()) if len(fake) > 1 else 0.0,
        }
        ratio = float(fake.mean() / real.mean()) if float(real.mean()) > 0 else float("inf")
        return [
            MetricResult(name="temporal_ratio", value=ratio, details=details),
            MetricResult(name="temporal_w1", value=wasserstein_1d(fake, real), details=details),
            MetricResult(name="temporal_ks", value=ks_statistic(fake, real), details=details),
        ]
