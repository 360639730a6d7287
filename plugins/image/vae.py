"""``image/vae``: a small convolutional KL autoencoder that the run trains on its own data.

Image ``(B, C, H, W)`` in [-1, 1] -> posterior mean ``(B, L, H/f, W/f)`` -> tokens
``(B, (H/f)(W/f), L)`` standardised per channel, ``(z - shift) / scale``, with ``shift`` and
``scale`` the mean and std of the posterior means over the training data, so a flow model
sees roughly unit-variance latents. ``decode`` inverts that and clamps to [-1, 1].

``fit`` picks the first of:
1. ``checkpoint`` in the config: load that local file (a ``.safetensors`` this module wrote);
2. ``cache_dir``: the entry ``<cache_dir>/image-vae/<key>/`` (``core/files.CacheEntry``,
   written atomically), where the key hashes the dataset's ``fingerprint()`` and every
   config field that changes the weights;
3. train (AdamW, MSE + ``kl_weight`` * KL, tqdm progress bar), then measure the
   reconstruction on held-out items and write the cache.

Weights, latent statistics and metadata live in one safetensors file (tensors + a JSON
header), ``weights.safetensors``, which also serves as a ``checkpoint``; the entry's
``meta.json`` is a readable copy. Nothing is ever unpickled. A cache file
that cannot be read is **retrained with a warning** naming the file (a cache can always be
rebuilt); an unreadable ``checkpoint`` is an error naming the file (it cannot).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from selfflow.core.files import CacheEntry, content_key
from selfflow.core.types import Segment
from selfflow.plugins.image import latents
from selfflow.plugins.image.patch import check_image_batch

FORMAT = 1  # bump when the network or the file layout changes: old caches stop matching
_WEIGHTS = ("image_channels", "base_channels", "downsample", "latent_channels", "blocks")
_RUNTIME = {"checkpoint", "sample", "device", "progress"}  # fields that never change the weights
_CACHE, _FILE = "image-vae", "weights.safetensors"  # <cache_dir>/image-vae/<key>/weights.safetensors


def _multiple_of_8(inst, attribute, value) -> None:
    if value % 8:
        raise ValueError(f"image/vae {attribute.name} must be a multiple of 8 (GroupNorm groups), got {value}")


@attrs.frozen(kw_only=True)
class ImageVAEConfig:
    """Architecture: ``image_channels`` 1 or 3; ``base_channels`` width of the first level
    (doubling per level, at most 4x); ``downsample`` factor f in {2, 4, 8}; ``latent_channels``
    the token width; ``blocks`` resblocks per level.
    Training: ``steps``, ``batch_size``, ``lr`` (AdamW, cosine decay), ``kl_weight`` (on the
    per-element KL next to the per-pixel MSE), ``seed`` (of the VAE's own training; ``None``:
    drawn from the run's generator, so each run seed gets its own VAE), ``holdout`` items kept
    out of training to measure reconstruction, ``stats_items`` items for the latent statistics.
    Runtime: ``checkpoint`` a local ``.safetensors`` to load instead of training; ``sample``
    encode with a posterior sample instead of the mean; ``device`` for training (``None``:
    CUDA when available); ``progress`` shows the progress bar.
    """

    image_channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))
    base_channels: int = attrs.field(default=32, validator=[attrs.validators.ge(8), _multiple_of_8])
    downsample: int = attrs.field(default=4, validator=attrs.validators.in_((2, 4, 8)))
    latent_channels: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    blocks: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    steps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=2e-3, validator=attrs.validators.gt(0))
    kl_weight: float = attrs.field(default=1e-3, validator=attrs.validators.ge(0))
    seed: int | None = attrs.field(default=0)
    holdout: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    stats_items: int = attrs.field(default=4096, validator=attrs.validators.ge(2))
    checkpoint: str | None = None
    sample: bool = False
    device: str | None = None
    progress: bool = True


class FitSource(enum.Enum):
    """Where the fitted weights came from."""

    TRAINED = "trained"
    CACHE = "cache"
    CHECKPOINT = "checkpoint"


@attrs.frozen(kw_only=True)
class ReconstructionMetrics:
    """Held-out reconstruction of ``decode(encode(x))``: ``mse`` in [-1, 1] pixel units,
    ``psnr`` in dB from that mean MSE (peak-to-peak 2), over ``items`` images, for weights
    trained ``steps`` steps."""

    mse: float
    psnr: float
    items: int
    steps: int


# ---------------------------------------------------------------- the network


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Upsample(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class KLAutoencoder(nn.Module):
    """Encoder to a diagonal Gaussian posterior ``(mean, logvar)`` and a decoder back."""

    def __init__(self, c: ImageVAEConfig) -> None:
        super().__init__()
        levels = int(math.log2(c.downsample))
        chs = [c.base_channels * min(2**i, 4) for i in range(levels + 1)]
        enc: list[nn.Module] = [nn.Conv2d(c.image_channels, chs[0], 3, padding=1)]
        for i in range(levels):
            enc += [_ResBlock(chs[i], chs[i]) for _ in range(c.blocks)]
            enc.append(nn.Conv2d(chs[i], chs[i + 1], 3, stride=2, padding=1))
        enc += [
            _ResBlock(chs[-1], chs[-1]),
            _norm(chs[-1]),
            nn.SiLU(),
            nn.Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1),
        ]
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, chs[-1], 3, padding=1), _ResBlock(chs[-1], chs[-1])]
        for i in reversed(range(levels)):
            dec.append(_Upsample(chs[i + 1], chs[i]))
            dec += [_ResBlock(chs[i], chs[i]) for _ in range(c.blocks)]
        dec += [_norm(chs[0]), nn.SiLU(), nn.Conv2d(chs[0], c.image_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


# ---------------------------------------------------------------- the tokenizer


class ImageVAETokenizer:
    """Image ``(B, C, H, W)`` in [-1, 1] <-> tokens ``(B, (H/f)(W/f), latent_channels)``.

    After ``fit``: ``metrics`` (``ReconstructionMetrics``), ``source`` (``FitSource``) and
    ``path`` (the file the weights were read from or written to, ``None`` when uncached).
    """

    modality = "image"
    mask_ratio = 0.25  # the paper's image mask ratio

    def __init__(self, config: ImageVAEConfig | None = None) -> None:
        self.config = config or ImageVAEConfig()
        self._weights_key: str | None = None
        with torch.random.fork_rng(devices=[]):  # placeholder weights must not move the run's RNG
            self.net = KLAutoencoder(self.config).eval().requires_grad_(False)
        self.shift = torch.zeros(self.config.latent_channels)
        self.scale = torch.ones(self.config.latent_channels)
        self.metrics: ReconstructionMetrics | None = None
        self.source: FitSource | None = None
        self.path: Path | None = None

    @classmethod
    def from_config(cls, config: ImageVAEConfig | None, **context) -> ImageVAETokenizer:
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides) -> ImageVAETokenizer:
        """A fitted tokenizer straight from a file this module wrote (no data needed);
        ``overrides`` change runtime fields such as ``sample`` or ``device``."""
        tensors, meta = _read(Path(path))
        config = attrs.evolve(ImageVAEConfig(**meta["config"]), checkpoint=str(path), **overrides)
        tok = cls(config)
        tok._load(tensors, meta, Path(path), FitSource.CHECKPOINT)
        return tok

    @property
    def channels(self) -> int:
        return self.config.latent_channels

    @property
    def fitted(self) -> bool:
        return self.source is not None

    def cache_key(self) -> str | None:
        """What ``encode`` computes once fitted: the fitted weights' key (``None`` before
        ``fit``, and when latents are sampled: every encoding then differs)."""
        if self.config.sample or self._weights_key is None:
            return None
        return content_key("image/vae", self._weights_key)

    def fit_key(self, dataset) -> str:
        """Hash of the data fingerprint, the file format and every field that changes the weights."""
        fields = {f.name: getattr(self.config, f.name) for f in attrs.fields(ImageVAEConfig) if f.name not in _RUNTIME}
        return content_key({"format": FORMAT, "data": dataset.fingerprint(), "config": fields})

    # -- fit

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Load the checkpoint, or the cache, or train and write the cache (module docstring)."""
        c = self.config
        _check_dataset(dataset, c)
        seed = c.seed
        if seed is None:  # drawn before the cache lookup, so the run's stream never depends on the cache
            seed = (
                0
                if generator is None
                else int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            )
            self.config = c = attrs.evolve(c, seed=seed)
        if c.checkpoint is not None:
            path = Path(c.checkpoint)
            tensors, meta = _read(path)
            _check_compatible(meta["config"], c, path)
            self._load(tensors, meta, path, FitSource.CHECKPOINT)
            self._weights_key = content_key("checkpoint", hashlib.sha256(path.read_bytes()).hexdigest())
            return
        self._weights_key = self.fit_key(dataset)
        entry = CacheEntry(cache_dir, _CACHE, self._weights_key) if cache_dir else None
        path = entry.path / _FILE if entry is not None else None
        if entry is not None and entry.exists():
            try:
                tensors, meta = _read(path)
                self._load(tensors, meta, path, FitSource.CACHE)
                return
            except (ValueError, OSError) as err:
                warnings.warn(
                    f"image/vae: ignoring the unreadable cache file {path} ({err}); retraining and overwriting it",
                    stacklevel=2,
                )
        self._train(dataset, seed)
        if entry is not None:
            _write(entry, self._tensors(), self._meta(dataset))
        self.path = path

    def _train(self, dataset, seed: int) -> None:
        c = self.config
        device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG left as it was
            torch.manual_seed(seed)
            net = KLAutoencoder(c).to(device).train()
        order = torch.randperm(len(dataset), generator=g)
        n_hold = max(1, min(c.holdout, len(dataset) // 5))
        held, train = order[:n_hold], order[n_hold:]
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, betas=(0.9, 0.99), weight_decay=0.0)
        warmup = max(1, c.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(i, c.steps) / c.steps))
        )
        bar = tqdm(range(c.steps), desc="fit image/vae", unit="step", disable=not c.progress, mininterval=1.0)
        for step in bar:
            x = _gather(dataset, train[torch.randint(len(train), (c.batch_size,), generator=g)], device)
            mean, logvar = net.encode(x)
            eps = torch.randn(mean.shape, generator=g).to(device)
            recon = net.decode(mean + (0.5 * logvar).exp() * eps)
            mse = F.mse_loss(recon, x)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
            loss = mse + c.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 25 == 0 or step == c.steps - 1:
                bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
        bar.close()
        self.net = net.eval().requires_grad_(False)
        self.shift, self.scale = _latent_stats(self.net, dataset, train[: c.stats_items], device)
        mse = _reconstruction_mse(self.net, dataset, held, device)
        self.metrics = ReconstructionMetrics(mse=mse, psnr=_psnr(mse), items=len(held), steps=c.steps)
        self.source = FitSource.TRAINED

    def _load(self, tensors: dict[str, Tensor], meta: dict, path: Path, source: FitSource) -> None:
        try:
            self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            self.shift, self.scale = tensors["latent.shift"], tensors["latent.scale"]
            self.metrics = ReconstructionMetrics(**meta["metrics"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: weights or metadata do not match this image/vae ({err})") from err
        self.net.eval().requires_grad_(False)
        self.source, self.path = source, path

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return out | {"latent.shift": self.shift.cpu(), "latent.scale": self.scale.cpu()}

    def _meta(self, dataset) -> dict:
        return {
            "format": FORMAT,
            "tokenizer": "image/vae",
            "config": {k: v for k, v in attrs.asdict(self.config).items() if k not in _RUNTIME},
            "data_fingerprint": dataset.fingerprint(),
            "cache_key": self.fit_key(dataset),
            "metrics": attrs.asdict(self.metrics),
        }

    # -- encode / decode

    def _ready(self, device: torch.device) -> None:
        if not self.fitted:
            raise RuntimeError(
                "image/vae is not fitted: call fit(dataset, cache_dir=...) first, or set checkpoint in its config"
            )
        if self.shift.device != device:
            self.net.to(device)
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)

    @torch.no_grad()
    def encode(self, media: Tensor) -> Segment:
        check_image_batch(media, self.config.image_channels, self.config.downsample)
        self._ready(media.device)
        mean, logvar = self.net.encode(media.float())
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.config.sample else mean
        return latents.to_segment(z, self.shift, self.scale, modality=self.modality)

    @torch.no_grad()
    def decode(self, segment: Segment) -> Tensor:
        self._ready(segment.tokens.device)
        z = latents.to_latents(segment, self.shift, self.scale, channels=self.channels, name="image/vae")
        return self.net.decode(z).clamp(-1.0, 1.0)


# ---------------------------------------------------------------- helpers


def _check_dataset(dataset, c: ImageVAEConfig) -> None:
    if "image" not in getattr(dataset, "modalities", ()):
        raise ValueError(f"image/vae fits on images, the dataset has {getattr(dataset, 'modalities', None)!r}")
    if len(dataset) < 2:
        raise ValueError(f"image/vae needs at least 2 images to fit (train + held out), got {len(dataset)}")
    check_image_batch(torch.as_tensor(dataset[0].media["image"])[None], c.image_channels, c.downsample)


def _gather(dataset, idx: Tensor, device: torch.device) -> Tensor:
    return torch.stack([torch.as_tensor(dataset[int(i)].media["image"], dtype=torch.float32) for i in idx]).to(device)


@torch.no_grad()
def _latent_stats(net: KLAutoencoder, dataset, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the posterior means (float64 sums over all pixels)."""
    total, sq, count = 0.0, 0.0, 0
    for part in idx.split(256):
        mean = net.encode(_gather(dataset, part, device))[0].double()
        total = total + mean.sum((0, 2, 3))
        sq = sq + mean.square().sum((0, 2, 3))
        count += mean.shape[0] * mean.shape[2] * mean.shape[3]
    mu = total / count
    std = (sq / count - mu.square()).clamp_min(1e-12).sqrt()
    return mu.float(), std.float()


@torch.no_grad()
def _reconstruction_mse(net: KLAutoencoder, dataset, idx: Tensor, device: torch.device) -> float:
    """Of the posterior mean, decoded and clamped like ``decode`` (standardising is exact)."""
    err, count = 0.0, 0
    for part in idx.split(256):
        x = _gather(dataset, part, device)
        err += float((net.decode(net.encode(x)[0]).clamp(-1.0, 1.0) - x).square().sum())
        count += x.numel()
    return err / count


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak of [-1, 1] is 2


def _check_compatible(saved: dict, c: ImageVAEConfig, path: Path) -> None:
    for name in _WEIGHTS:
        if saved.get(name) != getattr(c, name):
            raise ValueError(
                f"{path} was trained with {name}={saved.get(name)!r} but the image/vae config says "
                f"{name}={getattr(c, name)!r}; set {name}={saved.get(name)!r} or use a matching checkpoint"
            )


def _write(entry: CacheEntry, tensors: dict[str, Tensor], meta: dict) -> None:
    """The cache entry, atomically: the weights file (metadata in its header, so it is a
    ``checkpoint`` on its own) and ``meta.json``, renamed into place together."""
    with entry.write() as w:
        w.save_tensors(_FILE, tensors, metadata={"selfflow": json.dumps(meta, indent=2, sort_keys=True)})
        w.set_meta(meta)


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a file ``_write`` wrote; ``ValueError`` naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(
            f"image/vae checkpoint {path} does not exist; point checkpoint at a .safetensors written by image/vae"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("selfflow")
        tensors = load_file(str(path))
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads format {FORMAT}")
    except Exception as err:  # safetensors raises its own error types; the file name is what matters
        raise ValueError(f"{path} is not a readable image/vae file ({type(err).__name__}: {err})") from err
    return tensors, meta
