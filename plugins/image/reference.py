"""The image reference feature network: a small CNN classifier trained on the run's real data.

No pretrained Inception can be downloaded here, so Fréchet distance, KID and class accuracy
of images use this network instead (``plugins/metrics.py`` takes it as an object). It is
trained once per (data fingerprint, config) and cached as safetensors weights + JSON
metadata; its held-out accuracy is recorded in the metadata and goes into the ``details``
of every metric that uses it, because a distance in a weak network's feature space means
little.

Inputs follow the image media convention: ``(B, C, H, W)`` float in [-1, 1], at the size the
network was trained on. ``features`` is the penultimate layer ``(B, F)`` (post-ReLU, as
Inception's pool features are), times one constant fixed at training time so that its RMS
over the training data is 1: a trained layer's scale is arbitrary, and KID's polynomial
kernel ``(x.y / F + 1)^3`` assumes features of order one. ``logits`` is the classifier
output ``(B, num_classes)``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.files import META, CacheEntry, content_key, write_entry
from selfflow.core.types import Segment
from selfflow.plugins.image.latents import grid_of
from selfflow.plugins.protocols import ReferenceContext

NAME = "image/classifier"
_FORMAT = 1  # bump when the architecture or training changes: old caches are then ignored
_WEIGHTS, _META = "weights.safetensors", META


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"reference.{attribute.name} must be positive, got {value}")


def _widths(value: Any) -> tuple[int, ...]:
    widths = tuple(int(w) for w in value)
    if not widths or min(widths) <= 0:
        raise ValueError(f"reference.widths must be a non-empty list of positive channel counts, got {value!r}")
    return widths


@attrs.frozen(kw_only=True)
class ImageReferenceConfig:
    """The classifier and how it is trained.

    ``widths``: channels of the conv stages (two 3x3 convs + 2x2 max-pool each);
    ``features``: width of the penultimate layer (the metric feature space);
    ``shift``: random translation of up to this many pixels while training (0: none);
    ``eval_fraction``: share of the data held out to measure accuracy when no separate eval
    dataset is given. Every field is part of the cache key.
    """

    widths: tuple[int, ...] = attrs.field(default=(16, 32), converter=_widths)
    features: int = attrs.field(default=128, validator=_positive)
    epochs: int = attrs.field(default=8, validator=_positive)
    batch_size: int = attrs.field(default=128, validator=_positive)
    lr: float = attrs.field(default=3e-3, validator=attrs.validators.gt(0))
    weight_decay: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0))
    dropout: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    shift: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    seed: int = 0


class ImageClassifierNet(nn.Module):
    """conv stages (2x2 max-pool between and after) -> adaptive 4x4 pool -> Linear(F) + ReLU
    (features) -> Linear(classes)."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...], features: int, dropout: float
    ) -> None:
        super().__init__()
        stages, c = [], in_channels
        for w in widths:
            layers: list[nn.Module] = []
            for c_in in (c, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.ModuleList(stages)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, features), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output before its max-pool: ``(B, widths[-1], H / 2^(S-1), W / 2^(S-1))``."""
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.embed(F.adaptive_avg_pool2d(F.max_pool2d(self.feature_map(x), 2), 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


class ReferenceFeatures(nn.Module):
    """The ``nn.Module`` view torchmetrics' ``feature=`` argument expects.

    torchmetrics passes a custom module the images unchanged (its ``normalize`` flag only
    applies to the built-in Inception), reads ``num_features`` instead of probing with a
    dummy 299x299 image, and sums the returned ``(B, F)`` features in float64. The network
    stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, reference: ImageReference) -> None:
        super().__init__()
        self.net = reference.net
        self.num_features = reference.num_features
        self.scale = reference.feature_scale
        self._check = reference.check_images

    def train(self, mode: bool = True) -> ReferenceFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        self._check(images)
        self.net.eval()
        device = next(self.net.parameters()).device
        return self.net.features(images.to(device=device, dtype=torch.float32)) * self.scale


class ImageReference:
    """A trained ``ImageClassifierNet`` with its metadata.

    ``accuracy``: held-out accuracy (see ``meta["eval"]`` for on what); ``from_cache``: True
    when it was loaded rather than trained. Build it with ``fit`` (train or load from the
    cache), ``load(path)`` or ``from_config`` (the registry factory).
    """

    name = NAME

    def __init__(self, net: ImageClassifierNet, meta: dict[str, Any], *, from_cache: bool = False) -> None:
        self.net = net.eval()
        self.meta = meta
        self.from_cache = from_cache

    # -- what metrics read

    @property
    def accuracy(self) -> float:
        return float(self.meta["accuracy"])

    @property
    def num_features(self) -> int:
        return int(self.meta["arch"]["features"])

    @property
    def feature_scale(self) -> float:
        return float(self.meta["feature_scale"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["arch"]["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["arch"]["image_shape"])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> ImageReference:
        self.net.to(device)
        return self

    def check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"the image reference network was trained on (B, {', '.join(map(str, self.image_shape))}) images "
                f"in [-1, 1], got {shape}; resize the samples or fit a reference network on data of this size"
            )

    @torch.no_grad()
    def _run(self, fn, images: Tensor, chunk: int = 512) -> Tensor:
        self.check_images(images)
        self.net.eval()
        device = self.device
        out = [fn(part.to(device=device, dtype=torch.float32)) for part in images.split(chunk)]
        return torch.cat(out)

    def features(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [-1, 1] -> scaled penultimate features ``(B, F)``."""
        return self._run(self.net.features, images) * self.feature_scale

    def logits(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [-1, 1] -> class logits ``(B, num_classes)``."""
        return self._run(self.net, images)

    def predict(self, images: Tensor) -> Tensor:
        return self.logits(images).argmax(dim=-1)

    def feature_module(self) -> ReferenceFeatures:
        return ReferenceFeatures(self)

    @property
    def token_feature_dim(self) -> int:
        return int(self.meta["arch"]["widths"][-1])

    def token_features(self, images: Tensor, segment: Segment) -> Tensor:
        """One frozen feature vector per token of ``segment`` (the raster grid an image
        tokenizer made of ``images``): ``(B, gh * gw, token_feature_dim)`` from the last conv
        stage, average-pooled to the grid (bilinearly resized where the grid is finer). The
        encoder of REPA-style external alignment."""
        gh, gw = grid_of(segment)

        def per_token(x: Tensor) -> Tensor:
            m = self.net.feature_map(x)
            if gh <= m.shape[-2] and gw <= m.shape[-1]:
                m = F.adaptive_avg_pool2d(m, (gh, gw))
            else:
                m = F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False)
            return m.flatten(2).transpose(1, 2)

        return self._run(per_token, images)

    def describe(self) -> dict[str, Any]:
        """The protocol written next to every metric computed with this network."""
        return {
            "reference": self.name,
            "reference_accuracy": self.accuracy,
            "reference_eval": self.meta["eval"],
            "reference_eval_samples": self.meta["eval_samples"],
            "reference_features": self.num_features,
            "reference_key": self.meta["key"],
        }

    # -- construction

    @classmethod
    def from_config(cls, config: ImageReferenceConfig | None, *, context: ReferenceContext) -> ImageReference:
        """Registry factory (``selfflow_register_references``): trains on the context's
        training data, scored on its eval data (cached)."""
        if context.modality != "image" and "image" not in getattr(context.train_dataset, "modalities", ()):
            raise ValueError(f"the image reference network reads images; modality {context.modality!r} has none")
        return cls.fit(
            context.train_dataset,
            config,
            eval_dataset=context.eval_dataset,
            cache_dir=context.cache_dir,
            device=context.device,
            progress=context.progress,
        )

    @classmethod
    def fit(
        cls,
        dataset,
        config: ImageReferenceConfig | None = None,
        *,
        eval_dataset=None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> ImageReference:
        """Train on ``dataset`` (or load the cached network trained on the same data and
        config). Accuracy is measured on ``eval_dataset`` or, without one, on a seeded
        ``eval_fraction`` of ``dataset`` that is left out of training."""
        config = config or ImageReferenceConfig()
        device = torch.device(device or "cpu")
        key = cache_key(dataset, config, eval_dataset)
        entry = CacheEntry(cache_dir, "reference", f"image-{key}") if cache_dir is not None else None
        if entry is not None and entry.exists():
            return cls.load(entry.path, device=device, from_cache=True)

        ref = _train(dataset, config, eval_dataset=eval_dataset, key=key, device=device, progress=progress)
        if entry is not None:
            ref.save(entry.path)
        return ref

    def save(self, path: str | os.PathLike) -> None:
        """Weights as safetensors + metadata as JSON (written last), in a temporary directory
        renamed into place (``core/files.write_entry``: readers never see half an entry)."""
        with write_entry(path) as w:
            w.save_tensors(_WEIGHTS, self.net.state_dict(), metadata={"format": str(_FORMAT), "name": self.name})
            w.set_meta(self.meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, from_cache: bool = False
    ) -> ImageReference:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / _META).is_file() or not (path / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a reference network directory: it needs {_META} and {_WEIGHTS}")
        meta = json.loads((path / _META).read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{path} holds a reference network of format {meta.get('format')}, "
                f"this version reads {_FORMAT}; delete it to retrain"
            )
        arch = meta["arch"]
        net = ImageClassifierNet(
            arch["image_shape"][0], arch["num_classes"], tuple(arch["widths"]), arch["features"], arch["dropout"]
        )
        net.load_state_dict(load_file(str(path / _WEIGHTS)))
        return cls(net.to(device or "cpu"), meta, from_cache=from_cache)


def cache_key(dataset, config: ImageReferenceConfig, eval_dataset=None) -> str:
    """Hash of what determines the trained network: the data, the held-out data, the config."""
    return content_key(
        {
            "format": _FORMAT,
            "train": dataset.fingerprint(),
            "eval": eval_dataset.fingerprint() if eval_dataset is not None else None,
            "config": config,
        },
        length=16,
    )


# ----------------------------------------------------------------------------- training


def _stack(dataset, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The dataset's media and labels as two tensors (the data is held in memory)."""
    idx = range(len(dataset)) if indices is None else indices.tolist()
    images, labels = [], []
    for i in idx:
        ex = dataset[i]
        if ex.label is None:
            raise ValueError(
                f"the image reference network needs labelled data; item {i} of {type(dataset).__name__} has no label"
            )
        images.append(torch.as_tensor(ex.media["image"], dtype=torch.float32))
        labels.append(ex.label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``max_shift`` pixels per image (background is -1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    net.eval()
    correct = sum(int((net(xb.to(device)).argmax(-1).cpu() == yb).sum()) for xb, yb in zip(x.split(512), y.split(512)))
    return correct / max(len(y), 1)


def _train(
    dataset, config: ImageReferenceConfig, *, eval_dataset, key: str, device: torch.device, progress: bool
) -> ImageReference:
    from tqdm.auto import tqdm

    num_classes = int(dataset.num_classes)
    if num_classes < 2:
        raise ValueError(
            f"the image reference network is a classifier: it needs a labelled dataset, got num_classes={num_classes}"
        )
    if eval_dataset is None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
        n_eval = max(1, round(config.eval_fraction * len(dataset)))
        x_train, y_train = _stack(dataset, order[n_eval:])
        x_eval, y_eval = _stack(dataset, order[:n_eval])
        held_out = f"{config.eval_fraction:g} of the training data, held out (seed {config.seed})"
    else:
        x_train, y_train = _stack(dataset)
        x_eval, y_eval = _stack(eval_dataset)
        held_out = f"eval dataset {eval_dataset.fingerprint()}"
    if x_train.ndim != 4:
        raise ValueError(f"image media must be (C, H, W), got items of shape {tuple(x_train.shape[1:])}")
    if x_eval.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"the eval images are {tuple(x_eval.shape[1:])}, the training images {tuple(x_train.shape[1:])}: "
            "give both datasets the same image size"
        )

    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(y_train) // config.batch_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # init and dropout are seeded, the caller's RNG untouched
        torch.manual_seed(config.seed)
        net = ImageClassifierNet(x_train.shape[1], num_classes, config.widths, config.features, config.dropout).to(
            device
        )
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.25
        )
        bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"fit {NAME}", unit="step", disable=not progress)
        for epoch in range(config.epochs):
            net.train()
            perm = torch.randperm(len(y_train), generator=gen)
            for idx in perm.split(config.batch_size):
                xb = x_train[idx]
                if config.shift:
                    xb = _shift(xb, config.shift, gen)
                loss = F.cross_entropy(net(xb.to(device)), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        accuracy = _accuracy(net, x_eval, y_eval, device)
        with torch.no_grad():
            rms = torch.cat([net.features(xb.to(device)).cpu() for xb in x_train.split(512)]).square().mean().sqrt()
        bar.set_postfix(held_out_accuracy=f"{accuracy:.4f}")
        bar.close()

    meta = {
        "format": _FORMAT,
        "name": NAME,
        "key": key,
        "accuracy": accuracy,
        "feature_scale": 1.0 / max(float(rms), 1e-12),
        "eval": held_out,
        "eval_samples": len(y_eval),
        "train_samples": len(y_train),
        "train_fingerprint": dataset.fingerprint(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "config": attrs.asdict(config),
        "arch": {
            "image_shape": list(x_train.shape[1:]),
            "num_classes": num_classes,
            "widths": list(config.widths),
            "features": config.features,
            "dropout": config.dropout,
        },
        "torch": torch.__version__,
    }
    return ImageReference(net.eval(), meta)
