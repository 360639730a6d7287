"""Modality-agnostic metrics: Fréchet distance, KID, class accuracy, linear probe.

The first three compare media through a **reference feature network** (``FeatureNetwork``
below), an object the modality provides — for images ``plugins/image/reference.py``, a
classifier trained on the run's real data because no pretrained Inception can be downloaded.
Every result carries that network's held-out accuracy and the sample counts in its
``details``: a distance means little without them.

The linear probe measures the generator itself: logistic regression on mean-pooled block-l
hidden states of *clean* inputs (``t = 0``), trained on one dataset and scored on another.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.types import Timesteps, TokenBatch
from selfflow.plugins.batching import media_of
from selfflow.plugins.protocols import FeatureNetwork, MetricContext, MetricResult


def _need_reference(metric: str, reference: Any) -> FeatureNetwork:
    if not isinstance(reference, FeatureNetwork):
        raise TypeError(
            f"metric {metric!r} needs a reference feature network (protocols.FeatureNetwork), got "
            f"{type(reference).__name__}; a modality provides one through the selfflow_register_references hook"
        )
    return reference


# ----------------------------------------------------------------------------- distances


class _FeatureDistance:
    """Shared by FD and KID: a torchmetrics metric (``self._metric``) over the reference's
    features, fed real and fake media; its ``reset()`` keeps the real features."""

    reference: FeatureNetwork
    _metric: Any

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        device = self.reference.device
        if real is not None:
            self._metric.update(real.to(device), real=True)
        if fake is not None:
            self._metric.update(fake.to(device), real=False)

    def reset(self) -> None:
        self._metric.reset()


class FrechetDistance(_FeatureDistance):
    """Fréchet distance between Gaussians fitted to reference features of real and fake
    media (torchmetrics' ``FrechetInceptionDistance`` with ``feature=`` the reference).

    ``reset()`` forgets the fake media only, so one real set serves several checkpoints.
    """

    name = "fd"

    def __init__(self, reference: FeatureNetwork) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.reference = _need_reference(self.name, reference)
        self._metric = FrechetInceptionDistance(feature=reference.feature_module(), reset_real_features=False).to(
            reference.device
        )

    @classmethod
    def from_config(cls, config: None, *, context: MetricContext) -> FrechetDistance:
        return cls(context.reference())

    def compute(self) -> list[MetricResult]:
        n_real = int(self._metric.real_features_num_samples)
        n_fake = int(self._metric.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise ValueError(
                f"Fréchet distance needs at least 2 real and 2 fake samples, got {n_real} real and {n_fake} fake"
            )
        value = float(self._metric.compute())
        details = {"real_samples": n_real, "fake_samples": n_fake, **self.reference.describe()}
        return [MetricResult(name=self.name, value=value, details=details)]


@attrs.frozen(kw_only=True)
class KIDConfig:
    """Kernel inception distance: the unbiased polynomial-kernel MMD² averaged over
    ``subsets`` random subsets of ``subset_size`` samples. The subset size is clipped to
    half the smaller sample count, so small evaluations work and the subsets still differ
    (their spread is reported as ``std``); ``seed`` makes the subset draws repeatable."""

    subsets: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    subset_size: int = attrs.field(default=1000, validator=attrs.validators.ge(2))
    degree: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    seed: int = 0


class KernelDistance(_FeatureDistance):
    """KID through torchmetrics' ``KernelInceptionDistance`` with ``feature=`` the
    reference: results ``kid_mean`` (the mean over subsets) and ``kid_std`` (their spread,
    also in ``details["std"]``). ``reset()`` forgets the fake media only."""

    name = "kid"

    def __init__(self, reference: FeatureNetwork, config: KIDConfig | None = None) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance

        self.reference = _need_reference(self.name, reference)
        self.config = config or KIDConfig()
        with warnings.catch_warnings():  # "will save all extracted features": that is the point
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            self._metric = KernelInceptionDistance(
                feature=reference.feature_module(),
                subsets=self.config.subsets,
                subset_size=self.config.subset_size,
                degree=self.config.degree,
                reset_real_features=False,
            ).to(reference.device)

    @classmethod
    def from_config(cls, config: KIDConfig | None, *, context: MetricContext) -> KernelDistance:
        return cls(context.reference(), config)

    def compute(self) -> list[MetricResult]:
        n_real = sum(len(f) for f in self._metric.real_features)
        n_fake = sum(len(f) for f in self._metric.fake_features)
        if n_real < 4 or n_fake < 4:
            raise ValueError(f"KID needs at least 4 real and 4 fake samples, got {n_real} real and {n_fake} fake")
        subset_size = min(self.config.subset_size, max(2, min(n_real, n_fake) // 2))
        self._metric.subset_size = subset_size
        with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global RNG
            torch.manual_seed(self.config.seed)
            mean, std = self._metric.compute()
        details = {
            "std": float(std),
            "real_samples": n_real,
            "fake_samples": n_fake,
            "subsets": self.config.subsets,
            "subset_size": subset_size,
            "degree": self.config.degree,
            "seed": self.config.seed,
            **self.reference.describe(),
        }
        return [
            MetricResult(name="kid_mean", value=float(mean), details=details),
            MetricResult(name="kid_std", value=float(std), details=details),
        ]


# ----------------------------------------------------------------------------- class accuracy


class ClassAccuracy:
    """Share of class-conditional samples that the reference classifier assigns to the
    requested class: ``update(fake=samples, labels=requested)``; ``real`` is ignored.

    Read it against ``details["reference_accuracy"]`` (the ceiling on real data) and
    ``details["chance"]``.
    """

    name = "class_accuracy"

    def __init__(self, reference: FeatureNetwork) -> None:
        self.reference = _need_reference(self.name, reference)
        k = reference.num_classes
        self._correct = torch.zeros(k, dtype=torch.long)
        self._total = torch.zeros(k, dtype=torch.long)

    @classmethod
    def from_config(cls, config: None, *, context: MetricContext) -> ClassAccuracy:
        return cls(context.reference())

    def update(self, *, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if fake is None:
            return
        if labels is None:
            raise ValueError(
                "class accuracy needs the labels the samples were generated for: update(fake=..., labels=...)"
            )
        labels = labels.detach().long().cpu()
        if labels.shape != (len(fake),):
            raise ValueError(
                f"labels must have shape ({len(fake)},) for {len(fake)} samples, got {tuple(labels.shape)}"
            )
        k = self.reference.num_classes
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"labels must be class ids in [0, {k}), got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        pred = self.reference.logits(fake).argmax(dim=-1).cpu()
        self._total += torch.bincount(labels, minlength=k)
        self._correct += torch.bincount(labels[pred == labels], minlength=k)

    def reset(self) -> None:
        self._correct.zero_()
        self._total.zero_()

    def compute(self) -> list[MetricResult]:
        n = int(self._total.sum())
        if n == 0:
            raise ValueError("class accuracy has no samples: call update(fake=..., labels=...) first")
        per_class = [round(c / t, 4) if t else None for c, t in zip(self._correct.tolist(), self._total.tolist())]
        details = {
            "samples": n,
            "per_class": per_class,
            "chance": 1.0 / self.reference.num_classes,
            **self.reference.describe(),
        }
        return [MetricResult(name=self.name, value=int(self._correct.sum()) / n, details=details)]


# ----------------------------------------------------------------------------- linear probe


@attrs.frozen(kw_only=True)
class LinearProbeConfig:
    """``layer``: block whose output is probed (1-indexed; ``None``: the middle block,
    ``depth // 2``, at least 1); ``max_train`` / ``max_eval``: seeded subsets of the
    datasets (``None``: all); ``weight_decay``: L2 penalty of the logistic regression on
    standardised features; ``max_iter``: L-BFGS iterations."""

    layer: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    batch_size: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    max_train: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(2)))
    max_eval: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    weight_decay: float = attrs.field(default=1e-3, validator=attrs.validators.ge(0))
    max_iter: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    seed: int = 0


@attrs.frozen(kw_only=True)
class ProbeFit:
    """A fitted linear probe's accuracies on the data it was fitted on and on held-out data."""

    train_accuracy: float
    eval_accuracy: float


def fit_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> ProbeFit:
    """Multinomial logistic regression (full-batch L-BFGS, float64) on features
    standardised with the training mean and std."""
    train_x, eval_x = train_x.double().cpu(), eval_x.double().cpu()
    train_y, eval_y = train_y.long().cpu(), eval_y.long().cpu()
    k = num_classes or int(max(train_y.max(), eval_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std

    w = torch.zeros(train_x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():

        def acc(x, y):
            return float(((x @ w + b).argmax(-1) == y).double().mean()) if len(y) else float("nan")

        return ProbeFit(train_accuracy=acc(train_x, train_y), eval_accuracy=acc(eval_x, eval_y))


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


@torch.no_grad()
def probe_features(
    model: nn.Module, tokenizer, dataset, *, modality: str, layer: int, indices: Sequence[int], batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Mean-pooled block-``layer`` hidden states ``(M, D)`` of clean items and their labels.

    Clean: every generated token at ``t = 0``; only the ``modality`` segment is given. The
    label is *not* given to the model (it sees the null label when class-conditional), or
    the probe would read the label embedding back. Pooling is over non-padding tokens.
    """
    device = next(model.parameters()).device
    feats, labels = [], []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        ys = [dataset[i].label for i in chunk]
        if any(y is None for y in ys):
            raise ValueError("the linear probe needs a labelled dataset; found an item without a label")
        media = media_of(dataset, modality, chunk)
        if isinstance(media, Tensor):
            media = media.to(device)
        batch = TokenBatch(segments=(tokenizer.encode(media).to(device),))
        t = torch.zeros(batch.batch_size, device=device)
        hidden = model(batch, Timesteps.uniform(t, batch), return_hidden=(layer,), stop_after=layer).hidden[layer]
        mask = batch.generate_mask().to(hidden.dtype)[..., None]  # (B, N, 1)
        feats.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())
        labels.append(torch.tensor(ys))
    return torch.cat(feats), torch.cat(labels)


class LinearProbe:
    """Linear-probe accuracy of a generator's representations of one modality (a model
    probe, ``protocols.ModelProbe``): ``probe(model)`` -> ``[MetricResult("linear_probe",
    held-out accuracy)]``, fitted on the context's training data, scored on its eval data."""

    name = "linear_probe"

    def __init__(self, config: LinearProbeConfig | None, context: MetricContext) -> None:
        self.config = config or LinearProbeConfig()
        self.context = context

    @classmethod
    def from_config(cls, config: LinearProbeConfig | None, *, context: MetricContext) -> LinearProbe:
        return cls(config, context)

    def __call__(self, model: nn.Module) -> list[MetricResult]:
        cfg, ctx = self.config, self.context
        train_dataset, eval_dataset = ctx.train_dataset, ctx.eval_dataset
        depth = model.depth
        layer = cfg.layer if cfg.layer is not None else max(1, depth // 2)
        if not 1 <= layer <= depth:
            raise ValueError(
                f"linear probe layer {layer} is outside the model's blocks 1..{depth} (blocks are 1-indexed)"
            )
        num_classes = int(train_dataset.num_classes)
        if num_classes < 2:
            raise ValueError(f"the linear probe needs a labelled dataset, got num_classes={num_classes}")

        was_training = model.training
        model.eval()
        try:
            train_idx = _subset(len(train_dataset), cfg.max_train, cfg.seed)
            eval_idx = _subset(len(eval_dataset), cfg.max_eval, cfg.seed + 1)
            common = {"modality": ctx.modality, "layer": layer, "batch_size": cfg.batch_size}
            tx, ty = probe_features(model, ctx.tokenizer, train_dataset, indices=train_idx, **common)
            ex, ey = probe_features(model, ctx.tokenizer, eval_dataset, indices=eval_idx, **common)
        finally:
            model.train(was_training)
        fit = fit_linear_probe(
            tx, ty, ex, ey, num_classes=num_classes, weight_decay=cfg.weight_decay, max_iter=cfg.max_iter
        )
        details = {
            "layer": layer,
            "depth": depth,
            "width": int(tx.shape[1]),
            "t": 0.0,
            "pooling": "mean over generated tokens",
            "labels_given_to_model": False,
            "train_samples": len(ty),
            "eval_samples": len(ey),
            "train_accuracy": fit.train_accuracy,
            "chance": 1.0 / num_classes,
            "weight_decay": cfg.weight_decay,
            "max_iter": cfg.max_iter,
            "seed": cfg.seed,
        }
        return [MetricResult(name=self.name, value=fit.eval_accuracy, details=details)]


def linear_probe(
    model: nn.Module,
    tokenizer,
    train_dataset,
    eval_dataset,
    config: LinearProbeConfig | None = None,
    *,
    modality: str | None = None,
    **overrides: Any,
) -> MetricResult:
    """One-call form: ``linear_probe(model, tokenizer, train, eval, layer=2).value``."""
    config = attrs.evolve(config or LinearProbeConfig(), **overrides)

    def no_reference() -> FeatureNetwork:
        raise ValueError("the linear probe needs no reference network")

    context = MetricContext(
        modality=modality or tokenizer.modality,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        device=next(model.parameters()).device,
        cache_dir=Path("."),
        reference=no_reference,
    )
    return LinearProbe(config, context)(model)[0]


# ----------------------------------------------------------------------------- plugin hooks

from selfflow.plugins.hookspecs import hookimpl  # noqa: E402


@hookimpl
def selfflow_register_metrics(register) -> None:
    register.add(
        "fd",
        FrechetDistance.from_config,
        None,
        "Fréchet distance in the modality's reference-network feature space (torchmetrics)",
    )
    register.add(
        "kid",
        KernelDistance.from_config,
        KIDConfig,
        "kernel (MMD) distance in the reference feature space: kid_mean, kid_std (torchmetrics)",
    )
    register.add(
        "class-accuracy",
        ClassAccuracy.from_config,
        None,
        "share of class-conditional samples the reference classifier assigns to the requested class",
    )


@hookimpl
def selfflow_register_probes(register) -> None:
    register.add(
        "linear-probe",
        LinearProbe.from_config,
        LinearProbeConfig,
        "held-out logistic-regression accuracy on mean-pooled block-l features of clean inputs (t=0)",
    )
