"""The ``points`` reference network: a small PointNet classifier trained on the run's sets.

A shared per-point MLP lifts every point to ``token_feature_dim`` features (what REPA-style
alignment sees, one vector per token), a max over the points pools them (order-free), and a
head MLP maps the pooled vector to ``num_features`` features (what FD and KID compare) and
then to class logits. It trains on ``context.train_dataset`` on the CPU in seconds, measures
its accuracy on ``context.eval_dataset``, and is cached under
``cache_dir/points-reference/<key>`` (safetensors weights, ``meta.json`` written last; key:
the data fingerprints and the config). ``features`` are scaled by one constant fixed at
training time so their RMS over the training sets is 1 (KID's kernel assumes order-one
features).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.files import CacheEntry, content_key
from selfflow.core.types import Segment
from selfflow.plugins.protocols import ReferenceContext

NAME = "points/pointnet"
KIND = "points-reference"  # the cache directory under context.cache_dir
_FORMAT = 1  # bump when the architecture or training changes: old cache entries are then ignored
_WEIGHTS = "weights.safetensors"
_v = attrs.validators


def _widths(value: Any) -> tuple[int, ...]:
    widths = tuple(int(w) for w in value)
    if not widths or min(widths) <= 0:
        raise ValueError(f"widths must be a non-empty list of positive layer widths, got {value!r}")
    return widths


@attrs.frozen(kw_only=True)
class PointNetConfig:
    """``widths``: the shared per-point MLP (the last is ``token_feature_dim``);
    ``features``: the head's hidden width (the metric feature space); training: ``epochs``
    of AdamW at ``lr`` with a one-cycle schedule, ``batch_size``, ``weight_decay``,
    ``seed``. Every field is part of the cache key."""

    widths: tuple[int, ...] = attrs.field(default=(64, 128), converter=_widths)
    features: int = attrs.field(default=64, validator=_v.ge(1))
    epochs: int = attrs.field(default=12, validator=_v.ge(1))
    batch_size: int = attrs.field(default=64, validator=_v.ge(1))
    lr: float = attrs.field(default=3e-3, validator=_v.gt(0))
    weight_decay: float = attrs.field(default=1e-4, validator=_v.ge(0))
    seed: int = 0


class PointNet(nn.Module):
    """``(B, N, 2)`` -> per-point MLP ``(B, N, widths[-1])`` -> max over N -> Linear + ReLU
    ``(B, features)`` -> Linear ``(B, num_classes)``."""

    def __init__(self, widths: tuple[int, ...], features: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 2
        for w in widths:
            layers += [nn.Linear(c, w), nn.LayerNorm(w), nn.ReLU()]
            c = w
        self.point_mlp = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def per_point(self, points: Tensor) -> Tensor:
        return self.point_mlp(points)

    def features(self, points: Tensor) -> Tensor:
        return self.embed(self.per_point(points).amax(dim=1))

    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.features(points))


class PointFeatures(nn.Module):
    """The ``nn.Module`` torchmetrics' ``feature=`` takes: media ``(B, N, 2)`` -> scaled
    features ``(B, num_features)``; it stays in eval mode whatever ``train()`` is called with."""

    def __init__(self, reference: PointReference) -> None:
        super().__init__()
        self.net = reference.net
        self.num_features = reference.num_features
        self.scale = reference.feature_scale
        self._check = reference.check_media

    def train(self, mode: bool = True) -> PointFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, media: Tensor) -> Tensor:
        self._check(media)
        device = next(self.net.parameters()).device
        return self.net.features(media.to(device=device, dtype=torch.float32)) * self.scale


class PointReference:
    """A trained ``PointNet`` and its metadata (``meta``: accuracy, on what it was measured,
    the cache key, ...). ``from_cache``: whether it was loaded rather than trained."""

    name = NAME

    def __init__(self, net: PointNet, meta: dict[str, Any], *, from_cache: bool = False) -> None:
        self.net = net.eval()
        self.meta = meta
        self.from_cache = from_cache

    @property
    def accuracy(self) -> float:
        return float(self.meta["accuracy"])

    @property
    def num_features(self) -> int:
        return int(self.meta["arch"]["features"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["arch"]["num_classes"])

    @property
    def token_feature_dim(self) -> int:
        return int(self.meta["arch"]["widths"][-1])

    @property
    def feature_scale(self) -> float:
        return float(self.meta["feature_scale"])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def check_media(self, media: object) -> None:
        if not isinstance(media, Tensor) or media.ndim != 3 or media.shape[-1] != 2:
            shape = tuple(media.shape) if isinstance(media, Tensor) else type(media).__name__
            raise ValueError(f"the points reference network takes point sets (B, N, 2) in [-1, 1], got {shape}")

    @torch.no_grad()
    def _run(self, fn, media: Tensor, chunk: int = 1024) -> Tensor:
        self.check_media(media)
        self.net.eval()
        return torch.cat([fn(part.to(device=self.device, dtype=torch.float32)) for part in media.split(chunk)])

    def features(self, media: Tensor) -> Tensor:
        """``(B, N, 2)`` -> ``(B, num_features)``, RMS about 1 on the training sets."""
        return self._run(self.net.features, media) * self.feature_scale

    def logits(self, media: Tensor) -> Tensor:
        return self._run(self.net, media)

    def feature_module(self) -> PointFeatures:
        return PointFeatures(self)

    def token_features(self, media: Tensor, segment: Segment) -> Tensor:
        """The per-point features before the max-pool, ``(B, N, token_feature_dim)``: the
        ``points/xy`` tokenizer makes one token per point, in the same order."""
        self.check_media(media)
        if segment.num_tokens != media.shape[1] or segment.batch_size != media.shape[0]:
            raise ValueError(
                f"token_features: the segment has {segment.batch_size} x {segment.num_tokens} tokens, the media "
                f"{media.shape[0]} sets x {media.shape[1]} points; the points reference needs one token per point "
                "(tokenizer points/xy)"
            )
        return self._run(self.net.per_point, media)

    def describe(self) -> dict[str, Any]:
        return {
            "reference": self.name,
            "reference_accuracy": self.accuracy,
            "reference_eval": self.meta["eval"],
            "reference_eval_samples": self.meta["eval_samples"],
            "reference_train_samples": self.meta["train_samples"],
            "reference_features": self.num_features,
            "reference_key": self.meta["key"],
        }

    # -- construction

    @classmethod
    def from_config(cls, config: PointNetConfig | None, *, context: ReferenceContext) -> PointReference:
        """The registry factory: load the cached network for this data and config, or train
        it and cache it."""
        config = config or PointNetConfig()
        key = content_key(
            NAME,
            _FORMAT,
            context.modality,
            context.train_dataset.fingerprint(),
            context.eval_dataset.fingerprint(),
            config,
        )
        entry = CacheEntry(context.cache_dir, KIND, key)
        if entry.exists():
            meta = entry.read_meta()
            if meta.get("format") == _FORMAT:
                arch = meta["arch"]
                net = PointNet(tuple(arch["widths"]), arch["features"], arch["num_classes"])
                net.load_state_dict(entry.load_tensors(_WEIGHTS))
                return cls(net.to(context.device), meta, from_cache=True)
        ref = _train(context, config, key=key)
        with entry.write() as w:
            w.save_tensors(_WEIGHTS, ref.net.state_dict(), metadata={"format": str(_FORMAT), "name": NAME})
            w.set_meta(ref.meta)
        ref.net.to(context.device)
        return ref


# ----------------------------------------------------------------------------- training


def _stack(dataset, modality: str) -> tuple[Tensor, Tensor]:
    sets, labels = [], []
    for i in range(len(dataset)):
        ex = dataset[i]
        if ex.label is None:
            raise ValueError(
                f"the points reference network is a classifier: item {i} of {type(dataset).__name__} has no label"
            )
        if modality not in ex.media:
            raise ValueError(
                f"item {i} of {type(dataset).__name__} has no {modality!r} media (it has {sorted(ex.media)})"
            )
        sets.append(torch.as_tensor(ex.media[modality], dtype=torch.float32))
        labels.append(int(ex.label))
    return torch.stack(sets), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    return float((torch.cat([net(xb) for xb in x.split(1024)]).argmax(-1) == y).float().mean())


def _train(context: ReferenceContext, config: PointNetConfig, *, key: str) -> PointReference:
    from tqdm.auto import tqdm

    train, held_out = context.train_dataset, context.eval_dataset
    num_classes = int(train.num_classes)
    if num_classes < 2:
        raise ValueError(
            f"the points reference network is a classifier: it needs labelled data, got num_classes={num_classes}"
        )
    x_train, y_train = _stack(train, context.modality)
    x_eval, y_eval = _stack(held_out, context.modality)
    if x_train.ndim != 3 or x_train.shape[-1] != 2:
        raise ValueError(f"points media must be (N, 2) per item, got {tuple(x_train.shape[1:])}")

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(y_train) // config.batch_size)
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is untouched
        torch.manual_seed(config.seed)
        net = PointNet(config.widths, config.features, num_classes)  # CPU: small enough to train in seconds
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
        bar = tqdm(total=steps, desc=f"fit {NAME}", unit="step", disable=not context.progress)
        for _ in range(config.epochs):
            net.train()
            for idx in torch.randperm(len(y_train), generator=gen).split(config.batch_size):
                loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
        bar.close()
    accuracy = _accuracy(net, x_eval, y_eval)
    with torch.no_grad():
        rms = torch.cat([net.features(xb) for xb in x_train.split(1024)]).square().mean().sqrt()
    meta = {
        "format": _FORMAT,
        "name": NAME,
        "key": key,
        "modality": context.modality,
        "accuracy": accuracy,
        "feature_scale": 1.0 / max(float(rms), 1e-12),
        "eval": f"the run's eval split ({type(held_out).__name__} {held_out.fingerprint()})",
        "eval_samples": len(y_eval),
        "train_samples": len(y_train),
        "train_fingerprint": train.fingerprint(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "config": attrs.asdict(config),
        "arch": {"widths": list(config.widths), "features": config.features, "num_classes": num_classes},
        "torch": torch.__version__,
    }
    return PointReference(net.eval(), meta)
