"""The video reference feature network: a small 3-D CNN trained on the run's real clips.

No pretrained I3D can be downloaded here, so the Fréchet distance and KID of videos (an
**FVD-style** metric: the same statistic in *this* network's feature space — never compare
it with published I3D FVD numbers), class accuracy and REPA-style alignment of videos use
this network. It has one classification head per **label factor** (``dataset.label_factors``,
e.g. ``(("digit", 10), ("direction", 4))`` for ``video/moving-digits``: the digit and the
motion direction), or one head over the plain label when the dataset has no factors. It is
trained once per (data fingerprint, eval fingerprint, config) and cached as safetensors
weights + JSON metadata; its held-out accuracy, per factor and joint, goes into the
``details`` of every number it produces (``describe()``).

Inputs follow the video convention: ``(B, C, T, H, W)`` float in [-1, 1], at the shape it was
trained on. Outputs:

- ``features``: the penultimate layer ``(B, F)`` (post-ReLU), times one constant fixed at
  training time so that its RMS over the training clips is 1 (as the image network does);
- ``factor_logits``: ``{factor: (B, n_factor)}``;
- ``logits``: ``(B, num_classes)`` over the **joint** label, the sum of the factors' log
  probabilities at each mixed-radix class id (``label = digit * 4 + direction``), so the
  generic ``class-accuracy`` scores the joint label unchanged (its argmax is the pair of
  per-factor argmaxes);
- ``token_features(media, segment)``: the last 3-D conv stage ``(B, widths[-1], T/2, H/4,
  W/4)`` pooled to the segment's ``(t', h, w)`` token grid, ``(B, N, widths[-1])``.
"""

from __future__ import annotations

import json
import math
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
from selfflow.plugins.protocols import ReferenceContext

NAME = "video/classifier"
_FORMAT = 1  # bump when the architecture or training changes: old caches are then ignored
_WEIGHTS = "weights.safetensors"


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"reference.{attribute.name} must be positive, got {value}")


def _widths(value: Any) -> tuple[int, ...]:
    widths = tuple(int(w) for w in value)
    if len(widths) != 3 or min(widths) <= 0:
        raise ValueError(
            f"reference.widths must be three positive channel counts (stem, stage 1, stage 2), got {value!r}"
        )
    return widths


@attrs.frozen(kw_only=True)
class VideoReferenceConfig:
    """The 3-D CNN and its training.

    ``widths``: channels of the stem (3x3x3, stride 2 in space), stage 1 (then 2x max-pool in
    time and space) and stage 2 (two convs; its output is the token feature map);
    ``features``: width of the penultimate layer (the metric feature space); ``shift``: random
    translation of whole clips by up to this many pixels while training; ``eval_fraction``:
    share held out to measure accuracy when no separate eval dataset is given. Every field is
    part of the cache key.
    """

    widths: tuple[int, ...] = attrs.field(default=(16, 32, 64), converter=_widths)
    features: int = attrs.field(default=128, validator=_positive)
    epochs: int = attrs.field(default=6, validator=_positive)
    batch_size: int = attrs.field(default=32, validator=_positive)
    lr: float = attrs.field(default=3e-3, validator=attrs.validators.gt(0))
    weight_decay: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0))
    dropout: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    shift: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    seed: int = 0


def _conv(cin: int, cout: int, stride: tuple[int, int, int] = (1, 1, 1)) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


class VideoClassifierNet(nn.Module):
    """stem (stride 2 in H, W) -> stage 1 -> 2x max-pool -> stage 2 (the token feature map) ->
    2x max-pool -> adaptive 2x2x2 average -> Linear(F) + ReLU (features) -> one Linear per factor."""

    def __init__(
        self, in_channels: int, factors: tuple[tuple[str, int], ...], widths: tuple[int, ...], features: int, dropout
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Sequential(*_conv(in_channels, w0, (1, 2, 2)))
        self.stage1 = nn.Sequential(*_conv(w0, w1))
        self.stage2 = nn.Sequential(*_conv(w1, w2), *_conv(w2, w2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(w2 * 8, features), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(dropout)
        self.factors = tuple((str(n), int(k)) for n, k in factors)
        self.heads = nn.ModuleList(nn.Linear(features, k) for _, k in self.factors)

    def feature_map(self, x: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` -> ``(B, widths[-1], ceil(T/2), H/4, W/4)``."""
        x = self.stage1(self.stem(x))
        return self.stage2(F.max_pool3d(x, 2, ceil_mode=True))

    def features(self, x: Tensor) -> Tensor:
        m = F.max_pool3d(self.feature_map(x), 2, ceil_mode=True)
        return self.embed(F.adaptive_avg_pool3d(m, 2))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Per-factor logits, in ``factors`` order."""
        h = self.drop(self.features(x))
        return [head(h) for head in self.heads]


def joint_logits(factor_logits: list[Tensor]) -> Tensor:
    """Log-probabilities of the mixed-radix joint label (most significant factor first):
    ``(B, prod(n_i))`` with entry ``((f1 * n2 + f2) * n3 + f3 ...)`` = ``sum_i log p_i(f_i)``."""
    out = F.log_softmax(factor_logits[0].float(), dim=-1)
    for logits in factor_logits[1:]:
        lp = F.log_softmax(logits.float(), dim=-1)
        out = (out[:, :, None] + lp[:, None, :]).reshape(len(out), -1)
    return out


def split_label(labels: Tensor, factors: tuple[tuple[str, int], ...]) -> list[Tensor]:
    """Mixed-radix class ids -> one tensor of factor values per factor (most significant first)."""
    parts, rest = [], labels.long()
    for _, k in reversed(factors):
        parts.append(rest % k)
        rest = rest // k
    return parts[::-1]


def _factors_of(dataset) -> tuple[tuple[str, int], ...]:
    """``dataset.label_factors`` checked against ``num_classes``, else one factor ``("label", num_classes)``."""
    k = int(dataset.num_classes)
    factors = getattr(dataset, "label_factors", None)
    if not factors:
        return (("label", k),)
    factors = tuple((str(n), int(s)) for n, s in factors)
    if math.prod(s for _, s in factors) != k:
        raise ValueError(
            f"{type(dataset).__name__}.label_factors {factors} multiply to {math.prod(s for _, s in factors)}, "
            f"but num_classes is {k}; the factors must split the class id exactly"
        )
    return factors


class ReferenceFeatures(nn.Module):
    """The ``nn.Module`` view torchmetrics' ``feature=`` argument expects: clips -> scaled
    features ``(B, F)`` (``num_features`` read by torchmetrics); always in eval mode."""

    def __init__(self, reference: VideoReference) -> None:
        super().__init__()
        self.net = reference.net
        self.num_features = reference.num_features
        self.scale = reference.feature_scale
        self._check = reference.check_videos

    def train(self, mode: bool = True) -> ReferenceFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, videos: Tensor) -> Tensor:
        self._check(videos)
        self.net.eval()
        device = next(self.net.parameters()).device
        return self.net.features(videos.to(device=device, dtype=torch.float32)) * self.scale


class VideoReference:
    """A trained ``VideoClassifierNet`` with its metadata (``meta``): ``accuracy`` is the
    held-out joint accuracy, ``factor_accuracy`` per factor. Build it with ``fit`` (train or
    load from the cache), ``load(path)`` or ``from_config`` (the registry factory)."""

    name = NAME

    def __init__(self, net: VideoClassifierNet, meta: dict[str, Any], *, from_cache: bool = False) -> None:
        self.net = net.eval()
        self.meta = meta
        self.from_cache = from_cache

    # -- what metrics read

    @property
    def accuracy(self) -> float:
        return float(self.meta["accuracy"])

    @property
    def factor_accuracy(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.meta["factor_accuracy"].items()}

    @property
    def factors(self) -> tuple[tuple[str, int], ...]:
        return self.net.factors

    @property
    def num_features(self) -> int:
        return int(self.meta["arch"]["features"])

    @property
    def feature_scale(self) -> float:
        return float(self.meta["feature_scale"])

    @property
    def num_classes(self) -> int:
        return math.prod(k for _, k in self.factors)

    @property
    def video_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["arch"]["video_shape"])

    @property
    def token_feature_dim(self) -> int:
        return int(self.meta["arch"]["widths"][-1])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> VideoReference:
        self.net.to(device)
        return self

    def check_videos(self, videos: Tensor) -> None:
        if not isinstance(videos, Tensor) or videos.ndim != 5 or tuple(videos.shape[1:]) != self.video_shape:
            shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            raise ValueError(
                f"the video reference network was trained on (B, {', '.join(map(str, self.video_shape))}) clips "
                f"in [-1, 1], got {shape}; generate clips of that shape or fit a reference network on such data"
            )

    @torch.no_grad()
    def _run(self, fn, videos: Tensor, chunk: int = 64) -> Tensor:
        self.check_videos(videos)
        self.net.eval()
        device = self.device
        return torch.cat([fn(part.to(device=device, dtype=torch.float32)) for part in videos.split(chunk)])

    def features(self, videos: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` in [-1, 1] -> scaled penultimate features ``(B, F)``."""
        return self._run(self.net.features, videos) * self.feature_scale

    def factor_logits(self, videos: Tensor) -> dict[str, Tensor]:
        """``{factor: (B, n_factor)}`` logits of each head."""
        out = self._run(lambda x: torch.cat(self.net(x), dim=-1), videos)
        return dict(zip((n for n, _ in self.factors), out.split([k for _, k in self.factors], dim=-1)))

    def logits(self, videos: Tensor) -> Tensor:
        """``(B, num_classes)``: joint-label log-probabilities (``joint_logits``)."""
        return self._run(lambda x: joint_logits(self.net(x)), videos)

    def predict(self, videos: Tensor) -> Tensor:
        return self.logits(videos).argmax(dim=-1)

    def feature_module(self) -> ReferenceFeatures:
        return ReferenceFeatures(self)

    def token_features(self, videos: Tensor, segment: Segment) -> Tensor:
        """One frozen feature vector per token of ``segment`` (the raster ``(t', h, w)`` grid a
        video tokenizer made of ``videos``): ``(B, t' h w, token_feature_dim)`` from the last
        conv stage, average-pooled to the grid (trilinearly resized where the grid is finer).
        The encoder of REPA-style external alignment."""
        grid = _grid(segment)

        def per_token(x: Tensor) -> Tensor:
            m = self.net.feature_map(x)
            if all(g <= s for g, s in zip(grid, m.shape[-3:])):
                m = F.adaptive_avg_pool3d(m, grid)
            else:
                m = F.interpolate(m, size=grid, mode="trilinear", align_corners=False)
            return m.flatten(2).transpose(1, 2)

        return self._run(per_token, videos)

    def describe(self) -> dict[str, Any]:
        """The protocol written next to every metric computed with this network."""
        return {
            "reference": self.name,
            "reference_accuracy": self.accuracy,
            "reference_factor_accuracy": self.factor_accuracy,
            "reference_eval": self.meta["eval"],
            "reference_eval_samples": self.meta["eval_samples"],
            "reference_features": self.num_features,
            "reference_key": self.meta["key"],
            "reference_note": "FVD-style: distances in this 3-D CNN's feature space, not comparable with I3D FVD",
        }

    # -- construction

    @classmethod
    def from_config(cls, config: VideoReferenceConfig | None, *, context: ReferenceContext) -> VideoReference:
        """Registry factory (``selfflow_register_references``): trains on the context's training
        clips, scored on its eval clips (cached)."""
        if "video" not in getattr(context.train_dataset, "modalities", ()):
            raise ValueError(f"the video reference network reads videos; modality {context.modality!r} has none")
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
        config: VideoReferenceConfig | None = None,
        *,
        eval_dataset=None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> VideoReference:
        """Train on ``dataset`` (or load the cached network trained on the same data and config).
        Accuracy is measured on ``eval_dataset`` or, without one, on a seeded ``eval_fraction``
        of ``dataset`` left out of training."""
        config = config or VideoReferenceConfig()
        device = torch.device(device or "cpu")
        key = cache_key(dataset, config, eval_dataset)
        entry = CacheEntry(cache_dir, "reference", f"video-{key}") if cache_dir is not None else None
        if entry is not None and entry.exists():
            return cls.load(entry.path, device=device, from_cache=True)
        ref = _train(dataset, config, eval_dataset=eval_dataset, key=key, device=device, progress=progress)
        if entry is not None:
            ref.save(entry.path)
        return ref

    def save(self, path: str | os.PathLike) -> None:
        """Weights as safetensors + metadata as JSON (written last), atomically."""
        with write_entry(path) as w:
            w.save_tensors(_WEIGHTS, self.net.state_dict(), metadata={"format": str(_FORMAT), "name": self.name})
            w.set_meta(self.meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, from_cache: bool = False
    ) -> VideoReference:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META).is_file() or not (path / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a reference network directory: it needs {META} and {_WEIGHTS}")
        meta = json.loads((path / META).read_text())
        if meta.get("format") != _FORMAT or meta.get("name") != NAME:
            raise ValueError(
                f"{path} holds a reference network {meta.get('name')!r} of format {meta.get('format')}, "
                f"this version reads {NAME} format {_FORMAT}; delete it to retrain"
            )
        arch = meta["arch"]
        factors = tuple((n, k) for n, k in arch["factors"])
        net = VideoClassifierNet(arch["video_shape"][0], factors, tuple(arch["widths"]), arch["features"], 0.0)
        net.load_state_dict(load_file(str(path / _WEIGHTS)))
        return cls(net.to(device or "cpu"), meta, from_cache=from_cache)


def _grid(segment: Segment) -> tuple[int, int, int]:
    """``(t', h, w)`` of a raster-ordered video segment: distinct ``t`` positions, max ``h``, ``w`` + 1."""
    pos = segment.positions[0]
    grid = (int(torch.unique(pos[:, 0]).numel()), int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1)
    if math.prod(grid) != segment.num_tokens:
        raise ValueError(
            f"video token features: positions span a {grid} grid but the segment has {segment.num_tokens} tokens"
        )
    return grid


def cache_key(dataset, config: VideoReferenceConfig, eval_dataset=None) -> str:
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
    """The dataset's clips and labels as two tensors (held in memory)."""
    idx = range(len(dataset)) if indices is None else indices.tolist()
    clips, labels = [], []
    for i in idx:
        ex = dataset[i]
        if ex.label is None:
            raise ValueError(
                f"the video reference network needs labelled clips; item {i} of {type(dataset).__name__} has no label"
            )
        clips.append(torch.as_tensor(ex.media["video"], dtype=torch.float32))
        labels.append(ex.label)
    shapes = sorted({tuple(c.shape) for c in clips})
    if len(shapes) > 1:
        raise ValueError(f"the video reference network needs clips of one shape (C, T, H, W), got {shapes[:3]}")
    return torch.stack(clips), torch.tensor(labels, dtype=torch.long)


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each clip (all its frames alike) by up to ``max_shift`` pixels (background -1)."""
    b, _, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@torch.no_grad()
def _accuracies(net: VideoClassifierNet, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, dict[str, float]]:
    net.eval()
    parts = split_label(y, net.factors)
    joint = 0
    per = [0] * len(parts)
    for start in range(0, len(y), 64):
        out = net(x[start : start + 64].to(device))
        hits = torch.ones(len(out[0]), dtype=torch.bool)
        for k, logits in enumerate(out):
            ok = logits.argmax(-1).cpu() == parts[k][start : start + 64]
            per[k] += int(ok.sum())
            hits &= ok
        joint += int(hits.sum())
    n = max(len(y), 1)
    return joint / n, {name: per[k] / n for k, (name, _) in enumerate(net.factors)}


def _train(
    dataset, config: VideoReferenceConfig, *, eval_dataset, key: str, device: torch.device, progress: bool
) -> VideoReference:
    from tqdm.auto import tqdm

    if int(dataset.num_classes) < 2:
        raise ValueError(
            "the video reference network is a classifier: it needs a labelled dataset, "
            f"got num_classes={dataset.num_classes}"
        )
    factors = _factors_of(dataset)
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
    if x_train.ndim != 5:
        raise ValueError(f"video media must be (C, T, H, W), got items of shape {tuple(x_train.shape[1:])}")
    if x_eval.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"the eval clips are {tuple(x_eval.shape[1:])}, the training clips {tuple(x_train.shape[1:])}: "
            "give both datasets the same clip shape"
        )
    train_parts = split_label(y_train, factors)

    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(y_train) // config.batch_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # init and dropout are seeded, the caller's RNG untouched
        torch.manual_seed(config.seed)
        net = VideoClassifierNet(x_train.shape[1], factors, config.widths, config.features, config.dropout).to(device)
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
                out = net(xb.to(device))
                loss = sum(F.cross_entropy(o, p[idx].to(device)) for o, p in zip(out, train_parts))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        accuracy, factor_accuracy = _accuracies(net, x_eval, y_eval, device)
        with torch.no_grad():
            rms = torch.cat([net.features(xb.to(device)).cpu() for xb in x_train.split(64)]).square().mean().sqrt()
        bar.set_postfix(held_out_accuracy=f"{accuracy:.4f}")
        bar.close()

    meta = {
        "format": _FORMAT,
        "name": NAME,
        "key": key,
        "accuracy": accuracy,
        "factor_accuracy": factor_accuracy,
        "feature_scale": 1.0 / max(float(rms), 1e-12),
        "eval": held_out,
        "eval_samples": len(y_eval),
        "train_samples": len(y_train),
        "train_fingerprint": dataset.fingerprint(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "config": attrs.asdict(config),
        "arch": {
            "video_shape": list(x_train.shape[1:]),
            "factors": [list(f) for f in factors],
            "widths": list(config.widths),
            "features": config.features,
        },
        "torch": torch.__version__,
    }
    return VideoReference(net.eval(), meta)
