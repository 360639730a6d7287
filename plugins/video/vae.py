"""``video/vae``: a causal 3-D convolutional KL autoencoder that the run trains on its own clips.

Video ``(B, C, T, H, W)`` in [-1, 1] with ``T = 1 + 4k`` (an image ``(B, C, H, W)`` is a
one-frame video) -> posterior mean ``(B, L, 1 + k, H/f, W/f)`` (``vae_net`` states the
causal structure) -> tokens ``(B, (1 + k)(H/f)(W/f), L)`` in raster order ``(t', h, w)``,
standardised per channel as ``(z - shift) / scale`` with the mean and std of the posterior
means over the training clips. ``decode`` inverts that and clamps to [-1, 1]; it returns
``(B, C, 1 + 4k, H, W)``.

Positions: latent frame ``j`` stands for video frame ``4j`` (the last frame of its chunk,
the first moment all it encodes has been seen; latent frame 0 is frame 0), so its token
sits at ``t = time_ticks(4j, fps)`` on the shared time axis; ``h, w`` are latent grid
coordinates. ``fps`` comes from the config or, when unset, from the dataset's ``fps``.

``fit`` picks the first of:
1. ``checkpoint`` in the config: load that local file (a ``.safetensors`` this module wrote);
2. ``cache_dir``: the complete entry ``<cache_dir>/video-vae/<key>/`` (``core/files``), where
   the key hashes the dataset's ``fingerprint()`` and every config field that changes the
   weights;
3. train (AdamW, ``reconstruction_loss`` (MSE unless weighted) + ``kl_weight`` * KL, tqdm
   bar), **resuming** from the partial
   checkpoint ``<entry>/partial/state.safetensors`` when an earlier attempt was interrupted
   (weights, optimiser moments, step and the data generator's state, written atomically every
   ``partial_every`` steps; the resumed fit is bit-identical to an uninterrupted one); then
   measure the reconstruction on held-out clips against two baselines (all-black and a 4x
   spatial down-up), print it, and write the entry (which drops the partial checkpoint).

Weights, latent statistics and metadata live in one safetensors file (tensors + a JSON
header), ``weights.safetensors``, which also serves as a ``checkpoint``; ``meta.json`` is a
readable copy. Nothing is ever unpickled. An unreadable cache is retrained with a warning; an
unreadable ``checkpoint`` is an error naming the file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from selfflow.core.files import CacheEntry, content_key, save_tensors
from selfflow.core.types import Segment, grid_positions, time_ticks
from selfflow.plugins.video.vae_net import CONVS, TIME_DOWN, CausalVideoAutoencoder, frame_of_latent, latent_frames

FORMAT = 1  # bump when the network or the file layout changes: old caches stop matching
NAME = "video/vae"
_WEIGHTS = (
    "video_channels",
    "base_channels",
    "downsample",
    "latent_channels",
    "blocks",
    "mid_blocks",
    "conv",
    "pixel_patch",
)
# fields that never change the weights (a resumed fit is identical to an uninterrupted one)
_RUNTIME = {"checkpoint", "sample", "device", "progress", "fps", "patch", "partial_every", "log_every"}
# weight fields added after FORMAT 1 with the value files that predate them were trained with:
# left out of the key at these values (old caches still match) and assumed when a file lacks them
_ADDED = {
    "loss": "mse",
    "conv": "3d",
    "foreground_weight": 0.0,
    "gradient_weight": 0.0,
    "crop_frames": None,
    "pixel_patch": 1,
}
_CACHE, _FILE, _PARTIAL = "video-vae", "weights.safetensors", "partial"


def _multiple_of_8(inst, attribute, value) -> None:
    if value % 8:
        raise ValueError(f"video/vae {attribute.name} must be a multiple of 8 (GroupNorm groups), got {value}")


def _positive_fps(inst, attribute, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"video/vae fps must be positive (frames per second), got {value}")


def _one_plus_4k(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1 or (value - 1) % TIME_DOWN:
        raise ValueError(f"video/vae {attribute.name}={value} must be 1 + {TIME_DOWN}k frames (1, 5, 9, ...)")


@attrs.frozen(kw_only=True)
class VideoVAEConfig:
    """Architecture: ``video_channels`` 1 (gray) or 3 (RGB); ``base_channels`` width at full
    resolution (doubling per level, at most 4x); ``downsample`` spatial factor f in {4, 8}
    (time is always 4x); ``latent_channels`` the token width; ``blocks`` resblocks per level,
    ``mid_blocks`` at the lowest resolution; ``conv`` the resblocks' and upsamplers' kernel,
    ``"3d"`` (full causal 3x3x3) or ``"2+1d"`` (per-frame 3x3 then causal 3x1x1 in time).
    Training: ``steps``, ``batch_size`` (clips), ``lr`` (AdamW, warmup + cosine to 0.1x),
    ``kl_weight`` (per-element KL next to the per-pixel reconstruction loss), ``loss`` the
    reconstruction loss, ``"mse"`` or ``"l1"``, each pixel's weighted by ``1 + foreground_weight *
    brightness`` (strokes over the black background), plus ``gradient_weight`` times the loss of
    the pixel differences (edges; ``reconstruction_loss``), ``seed`` (``None``: drawn from the
    run's generator), ``holdout`` clips kept out of training to measure reconstruction,
    ``stats_items`` clips for the latent statistics.
    Runtime (not part of the cache key): ``fps`` of the clips (positions; ``None``: the
    dataset's ``fps``); ``patch`` p: one token per p x p latent positions of a latent frame
    (``p * p * latent_channels`` channels, DiT's latent patchify; 1: one token per latent
    position); ``checkpoint`` a local ``.safetensors`` to load instead of training;
    ``sample`` encode with a posterior sample instead of the mean; ``device`` for training
    (``None``: CUDA when available); ``progress`` shows the bar; ``partial_every`` steps between
    partial checkpoints (0: none); ``log_every`` steps between held-out PSNR lines (0: none).
    """

    video_channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))
    base_channels: int = attrs.field(default=16, validator=[attrs.validators.ge(8), _multiple_of_8])
    downsample: int = attrs.field(default=4, validator=attrs.validators.in_((4, 8)))
    latent_channels: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    blocks: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    mid_blocks: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    conv: str = attrs.field(default="3d", validator=attrs.validators.in_(CONVS))
    pixel_patch: int = attrs.field(default=1, validator=attrs.validators.in_((1, 2, 4)))
    steps: int = attrs.field(default=400, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=2e-3, validator=attrs.validators.gt(0))
    kl_weight: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0))
    loss: str = attrs.field(default="mse", validator=attrs.validators.in_(("mse", "l1")))
    foreground_weight: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    crop_frames: int | None = attrs.field(default=None, validator=attrs.validators.optional(_one_plus_4k))
    gradient_weight: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    seed: int | None = attrs.field(default=0)
    holdout: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    stats_items: int = attrs.field(default=512, validator=attrs.validators.ge(2))
    fps: float | None = attrs.field(default=None, validator=_positive_fps)
    patch: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    checkpoint: str | None = None
    sample: bool = False
    device: str | None = None
    progress: bool = True
    partial_every: int = attrs.field(default=50, validator=attrs.validators.ge(0))
    log_every: int = attrs.field(default=100, validator=attrs.validators.ge(0))


class FitSource(enum.Enum):
    """Where the fitted weights came from."""

    TRAINED = "trained"
    RESUMED = "resumed"  # trained, continuing an interrupted attempt's partial checkpoint
    CACHE = "cache"
    CHECKPOINT = "checkpoint"


@attrs.frozen(kw_only=True)
class ReconstructionMetrics:
    """Held-out reconstruction of ``decode(encode(x))`` over ``items`` clips: ``mse`` in [-1, 1]
    pixel units and ``psnr`` in dB (peak-to-peak 2) from it; the baselines' PSNR: an all-black
    output (``black_psnr``) and a 4x spatial down-up (area down, bilinear up; ``down_up_psnr``),
    and the MSE ratios ``mse / baseline mse`` (below 1: better than the baseline). ``steps``
    trained, ``seconds`` of training (of this process; 0 when loaded)."""

    mse: float
    psnr: float
    black_psnr: float
    down_up_psnr: float
    mse_ratio_black: float
    mse_ratio_down_up: float
    items: int
    steps: int
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"video/vae held-out reconstruction ({self.items} clips, {self.steps} steps): PSNR {self.psnr:.2f} dB "
            f"(all-black {self.black_psnr:.2f} dB, 4x spatial down-up {self.down_up_psnr:.2f} dB); "
            f"MSE / baseline MSE: {self.mse_ratio_black:.3f} (black), {self.mse_ratio_down_up:.3f} (down-up)"
        )


# ---------------------------------------------------------------- media checks


def as_video_batch(media, c: VideoVAEConfig, *, name: str = NAME) -> Tensor:
    """``(B, C, T, H, W)`` (or an image batch ``(B, C, H, W)``, made ``T = 1``) checked against
    the config: ``C`` channels, ``T = 1 + 4k``, ``H`` and ``W`` multiples of the downsampling."""
    if not isinstance(media, Tensor):
        raise TypeError(f"{name} encodes a tensor batch (B, C, T, H, W) in [-1, 1], got {type(media).__name__}")
    if media.ndim == 4:
        media = media[:, :, None]
    if media.ndim != 5:
        raise ValueError(
            f"{name} encodes video batches (B, C, T, H, W) or images (B, C, H, W), got {tuple(media.shape)}"
        )
    _, ch, t, h, w = media.shape
    if ch != c.video_channels:
        raise ValueError(
            f"{name} was built for video_channels={c.video_channels}, the clips have {ch} channels; "
            f"set tokenizer_options.video_channels = {ch}"
        )
    if (t - 1) % TIME_DOWN:
        lo = 1 + (t - 1) // TIME_DOWN * TIME_DOWN
        raise ValueError(
            f"{name} compresses time 4x with the first frame on its own, so clips need 1 + 4k frames; got {t} "
            f"(use {lo} or {lo + TIME_DOWN} frames)"
        )
    if h % c.downsample or w % c.downsample:
        raise ValueError(
            f"{name} downsample={c.downsample} needs frame sizes divisible by {c.downsample}, got {h}x{w}; "
            "resize the clips or change downsample"
        )
    return media


# ---------------------------------------------------------------- the tokenizer


class VideoVAETokenizer:
    """Video ``(B, C, 1 + 4k, H, W)`` in [-1, 1] <-> tokens ``(B, (1 + k) (H/f) (W/f), latent_channels)``.

    After ``fit``: ``metrics`` (``ReconstructionMetrics``), ``source`` (``FitSource``),
    ``path`` (the file the weights were read from or written to; ``None`` when uncached) and
    ``fps`` (the frame rate positions are computed at).
    """

    modality = "video"
    mask_ratio = 0.10  # the paper's video mask ratio

    def __init__(self, config: VideoVAEConfig | None = None) -> None:
        self.config = config or VideoVAEConfig()
        self._weights_key: str | None = None
        with torch.random.fork_rng(devices=[]):  # placeholder weights must not move the run's RNG
            self.net = self._build().eval().requires_grad_(False)
        self.shift = torch.zeros(self.config.latent_channels)
        self.scale = torch.ones(self.config.latent_channels)
        self.metrics: ReconstructionMetrics | None = None
        self.source: FitSource | None = None
        self.path: Path | None = None
        self.fps: float | None = self.config.fps

    def _build(self) -> CausalVideoAutoencoder:
        c = self.config
        return CausalVideoAutoencoder(
            video_channels=c.video_channels,
            base_channels=c.base_channels,
            downsample=c.downsample,
            latent_channels=c.latent_channels,
            blocks=c.blocks,
            mid_blocks=c.mid_blocks,
            conv=c.conv,
            pixel_patch=c.pixel_patch,
        )

    @classmethod
    def from_config(cls, config: VideoVAEConfig | None, **context) -> VideoVAETokenizer:
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides) -> VideoVAETokenizer:
        """A fitted tokenizer straight from a file this module wrote (no data needed);
        ``overrides`` change runtime fields such as ``sample``, ``device`` or ``fps``."""
        tensors, meta = _read(Path(path))
        config = attrs.evolve(VideoVAEConfig(**(_ADDED | meta["config"])), checkpoint=str(path), **overrides)
        tok = cls(config)
        tok._load(tensors, meta, Path(path), FitSource.CHECKPOINT)
        if tok.fps is None:
            tok.fps = meta.get("fps")
        tok._weights_key = content_key("checkpoint", hashlib.sha256(Path(path).read_bytes()).hexdigest())
        return tok

    @property
    def channels(self) -> int:
        return self.config.latent_channels * self.config.patch**2

    @property
    def fitted(self) -> bool:
        return self.source is not None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def cache_key(self) -> str | None:
        """What ``encode`` computes once fitted: the fitted weights' key and the fps of the
        positions (``None`` before ``fit``, and when latents are sampled)."""
        if self.config.sample or self._weights_key is None:
            return None
        return content_key(NAME, self._weights_key, self.fps, self.config.patch)

    def fit_key(self, dataset) -> str:
        """Hash of the data fingerprint, the file format and every field that changes the weights."""
        fields = {f.name: getattr(self.config, f.name) for f in attrs.fields(VideoVAEConfig) if f.name not in _RUNTIME}
        for name, default in _ADDED.items():  # fields added later: at their default, old caches still match
            if fields[name] == default:
                del fields[name]
        return content_key({"format": FORMAT, "data": dataset.fingerprint(), "config": fields})

    # -- fit

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Load the checkpoint, or the cache, or train (resuming a partial fit) and write the cache."""
        c = self.config
        _check_dataset(dataset, c)
        self.fps = _fps(c, dataset)
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
            _check_compatible(_ADDED | meta["config"], c, path)
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
                    f"video/vae: ignoring the unreadable cache file {path} ({err}); retraining and overwriting it",
                    stacklevel=2,
                )
        partial = entry.path / _PARTIAL / "state.safetensors" if entry is not None else None
        self._train(dataset, seed, partial)
        if entry is not None:
            _write(entry, self._tensors(), self._meta(dataset))
        self.path = path

    def _train(self, dataset, seed: int, partial: Path | None) -> None:
        c = self.config
        device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG left as it was
            torch.manual_seed(seed)
            net = self._build().to(device).train()
        order = torch.randperm(len(dataset), generator=g)
        n_hold = max(1, min(c.holdout, len(dataset) // 5))
        held, train = order[:n_hold], order[n_hold:]
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, betas=(0.9, 0.99), weight_decay=0.0)
        start = 0
        if partial is not None and partial.is_file():
            start = _load_partial(partial, net, opt, g, self.fit_key(dataset))
        self.source = FitSource.RESUMED if start else FitSource.TRAINED
        warmup = max(1, c.steps // 20)

        def lr_at(i: int) -> float:
            return c.lr * min(1.0, (i + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(i, c.steps) / c.steps))

        t0 = time.perf_counter()
        bar = tqdm(
            range(start, c.steps),
            initial=start,
            total=c.steps,
            desc="fit video/vae",
            unit="step",
            disable=not c.progress,
            mininterval=1.0,
        )
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = _gather(dataset, train[torch.randint(len(train), (c.batch_size,), generator=g)], device)
            if c.crop_frames is not None and c.crop_frames < x.shape[2]:  # random 1 + 4k windows
                starts = torch.randint(x.shape[2] - c.crop_frames + 1, (x.shape[0],), generator=g)
                x = torch.stack([clip[:, int(t) : int(t) + c.crop_frames] for clip, t in zip(x, starts)])
            mean, logvar = net.encode(x)
            eps = torch.randn(mean.shape, generator=g).to(device)
            recon = net.decode(mean + (0.5 * logvar).exp() * eps)
            mse = F.mse_loss(recon, x)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
            loss = reconstruction_loss(recon, x, c) + c.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            done = step + 1
            if step % 25 == 0 or done == c.steps:
                bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
            if c.log_every and done % c.log_every == 0 and done < c.steps and c.progress:
                held_mse = _reconstruction_mse(net.eval(), dataset, held[:16], device)
                net.train()
                bar.write(
                    f"video/vae step {done}: held-out PSNR {_psnr(held_mse):.2f} dB ({min(16, len(held))} clips, "
                    f"{time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )
            if partial is not None and c.partial_every and done % c.partial_every == 0 and done < c.steps:
                _save_partial(partial, net, opt, g, done, self.fit_key(dataset))
        bar.close()
        seconds = time.perf_counter() - t0
        self.net = net.eval().requires_grad_(False)
        self.shift, self.scale = _latent_stats(self.net, dataset, train[: c.stats_items], device)
        self.metrics = _measure(self.net, dataset, held, device, steps=c.steps, seconds=seconds)
        if c.progress:
            tqdm.write(self.metrics.line(), file=sys.stderr)

    def _load(self, tensors: dict[str, Tensor], meta: dict, path: Path, source: FitSource) -> None:
        try:
            self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            self.shift, self.scale = tensors["latent.shift"], tensors["latent.scale"]
            self.metrics = ReconstructionMetrics(**meta["metrics"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: weights or metadata do not match this video/vae ({err})") from err
        self.net.eval().requires_grad_(False)
        self.source, self.path = source, path

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return out | {"latent.shift": self.shift.cpu(), "latent.scale": self.scale.cpu()}

    def _meta(self, dataset) -> dict:
        return {
            "format": FORMAT,
            "tokenizer": NAME,
            "config": {k: v for k, v in attrs.asdict(self.config).items() if k not in _RUNTIME},
            "fps": self.fps,
            "parameters": self.num_parameters,
            "data_fingerprint": dataset.fingerprint(),
            "cache_key": self.fit_key(dataset),
            "metrics": attrs.asdict(self.metrics),
        }

    # -- encode / decode

    def _ready(self, device: torch.device) -> None:
        if not self.fitted:
            raise RuntimeError(
                "video/vae is not fitted: call fit(dataset, cache_dir=...) first, or set checkpoint in its config"
            )
        if self.shift.device != device:
            self.net.to(device)
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)

    def encode_latents(self, media: Tensor) -> Tensor:
        """Unstandardised latents ``(B, L, 1 + k, H/f, W/f)`` (posterior mean, or a sample)."""
        x = as_video_batch(media, self.config)
        self._ready(x.device)
        with torch.no_grad():
            mean, logvar = self.net.encode(x.float())
        return mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.config.sample else mean

    @torch.no_grad()
    def encode(self, media: Tensor) -> Segment:
        z = self.encode_latents(media)
        p = self.config.patch
        b, ch, t, h, w = z.shape
        if h % p or w % p:
            raise ValueError(f"{NAME} patch={p} needs latent grids divisible by {p}, got {h}x{w}; change patch")
        z = (z - self.shift[:, None, None, None]) / self.scale[:, None, None, None]
        h, w = h // p, w // p
        # (B, L, t, h, p, w, p) -> (B, t, h, w, p, p, L): token channels are (row, col, channel) in the patch
        tokens = z.reshape(b, ch, t, h, p, w, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * h * w, p * p * ch)
        pos = grid_positions(t, h, w, batch=b, device=z.device).clone()
        pos[..., 0] = time_ticks(frame_of_latent(pos[..., 0]), self._fps()).to(z.device)
        return Segment(modality=self.modality, tokens=tokens.contiguous(), positions=pos)

    @torch.no_grad()
    def decode(self, segment: Segment) -> Tensor:
        self._ready(segment.tokens.device)
        t, h, w = latent_grid(segment, name=NAME)
        tokens = segment.tokens
        b, _, ch = tokens.shape
        if ch != self.channels:
            raise ValueError(f"{NAME} decodes {self.channels}-channel tokens, got {ch}")
        p, lat = self.config.patch, self.config.latent_channels
        z = tokens.float().reshape(b, t, h, w, p, p, lat).permute(0, 6, 1, 2, 4, 3, 5).reshape(b, lat, t, h * p, w * p)
        z = z * self.scale[:, None, None, None] + self.shift[:, None, None, None]
        return self.net.decode(z.contiguous()).clamp(-1.0, 1.0)

    def _fps(self) -> float:
        if self.fps is None:
            raise RuntimeError(f"{NAME}: fps is unknown; set tokenizer_options.fps or fit on a dataset with an fps")
        return float(self.fps)


def latent_grid(segment: Segment, *, name: str = NAME) -> tuple[int, int, int]:
    """``(latent frames, rows, cols)`` of a raster-ordered ``(t', h, w)`` video segment, from its positions."""
    if segment.valid is not None and not bool(segment.valid.all()):
        raise ValueError(f"{name} decodes whole clips; this segment has padding tokens (valid is False somewhere)")
    pos = segment.positions[0]
    t = int(torch.unique(pos[:, 0]).numel())
    h, w = int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1
    if t * h * w != segment.num_tokens:
        raise ValueError(
            f"{name}: positions span {t} latent frames of {h}x{w} but the segment has {segment.num_tokens} tokens"
        )
    return t, h, w


# ---------------------------------------------------------------- helpers


def reconstruction_loss(recon: Tensor, x: Tensor, c: VideoVAEConfig) -> Tensor:
    """``loss`` (MSE or L1) per pixel, weighted by ``1 + foreground_weight * b`` with ``b`` in
    [0, 1] the brighter of target and (detached) output, so the strokes and the blobs around
    them count more than the black background that dominates a plain mean; plus
    ``gradient_weight`` times the same loss of the frames' horizontal and vertical pixel
    differences (edges: a blurred stroke has the right mean but flat gradients)."""
    err = recon - x
    per_pixel = err.square() if c.loss == "mse" else err.abs()
    if c.foreground_weight:
        bright = 0.5 * (torch.maximum(x, recon.detach().clamp(-1.0, 1.0)) + 1.0)
        per_pixel = per_pixel * (1.0 + c.foreground_weight * bright)
    loss = per_pixel.mean()
    if c.gradient_weight:
        dh, dw = err.diff(dim=-2), err.diff(dim=-1)
        edges = (dh.square().mean() + dw.square().mean()) if c.loss == "mse" else (dh.abs().mean() + dw.abs().mean())
        loss = loss + c.gradient_weight * edges
    return loss


def _fps(c: VideoVAEConfig, dataset) -> float:
    fps = c.fps if c.fps is not None else getattr(dataset, "fps", None)
    if fps is None:
        raise ValueError(
            f"{NAME}: token positions need the clips' frame rate; {type(dataset).__name__} has no fps attribute, "
            "so set tokenizer_options.fps"
        )
    return float(fps)


def _check_dataset(dataset, c: VideoVAEConfig) -> None:
    if "video" not in getattr(dataset, "modalities", ()):
        raise ValueError(f"{NAME} fits on videos, the dataset has {getattr(dataset, 'modalities', None)!r}")
    if len(dataset) < 2:
        raise ValueError(f"{NAME} needs at least 2 clips to fit (train + held out), got {len(dataset)}")
    as_video_batch(torch.as_tensor(dataset[0].media["video"])[None], c)


def _gather(dataset, idx: Tensor, device: torch.device) -> Tensor:
    return torch.stack([torch.as_tensor(dataset[int(i)].media["video"], dtype=torch.float32) for i in idx]).to(device)


@torch.no_grad()
def _latent_stats(net: CausalVideoAutoencoder, dataset, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the posterior means (float64 sums over all latent positions)."""
    total, sq, count = 0.0, 0.0, 0
    for part in idx.split(32):
        mean = net.encode(_gather(dataset, part, device))[0].double()
        total = total + mean.sum((0, 2, 3, 4))
        sq = sq + mean.square().sum((0, 2, 3, 4))
        count += mean[:, 0].numel()
    mu = total / count
    std = (sq / count - mu.square()).clamp_min(1e-12).sqrt()
    return mu.float(), std.float()


def down_up(x: Tensor, factor: int = 4) -> Tensor:
    """The spatial baseline: each frame area-downsampled ``factor``x and bilinearly upsampled back."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    small = F.interpolate(frames, scale_factor=1 / factor, mode="area")
    back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return back.reshape(b, t, c, h, w).transpose(1, 2)


@torch.no_grad()
def _reconstruction_mse(net: CausalVideoAutoencoder, dataset, idx: Tensor, device: torch.device) -> float:
    """Of the posterior mean, decoded and clamped like ``decode`` (standardising is exact)."""
    err, count = 0.0, 0
    for part in idx.split(32):
        x = _gather(dataset, part, device)
        err += float((net.decode(net.encode(x)[0]).clamp(-1.0, 1.0) - x).square().sum())
        count += x.numel()
    return err / count


@torch.no_grad()
def _measure(
    net: CausalVideoAutoencoder, dataset, idx: Tensor, device: torch.device, *, steps: int, seconds: float
) -> ReconstructionMetrics:
    err = black = du = 0.0
    count = 0
    for part in idx.split(32):
        x = _gather(dataset, part, device)
        err += float((net.decode(net.encode(x)[0]).clamp(-1.0, 1.0) - x).square().sum())
        black += float((x + 1.0).square().sum())
        du += float((down_up(x) - x).square().sum())
        count += x.numel()
    mse, black, du = err / count, black / count, du / count
    return ReconstructionMetrics(
        mse=mse,
        psnr=_psnr(mse),
        black_psnr=_psnr(black),
        down_up_psnr=_psnr(du),
        mse_ratio_black=mse / max(black, 1e-12),
        mse_ratio_down_up=mse / max(du, 1e-12),
        items=len(idx),
        steps=steps,
        seconds=round(seconds, 1),
    )


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak of [-1, 1] is 2


def _check_compatible(saved: dict, c: VideoVAEConfig, path: Path) -> None:
    for name in _WEIGHTS:
        if saved.get(name) != getattr(c, name):
            raise ValueError(
                f"{path} was trained with {name}={saved.get(name)!r} but the video/vae config says "
                f"{name}={getattr(c, name)!r}; set {name}={saved.get(name)!r} or use a matching checkpoint"
            )


# ---------------------------------------------------------------- partial checkpoints (resumable fits)


def _save_partial(
    path: Path, net: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, step: int, key: str
) -> None:
    """Weights, AdamW moments, the step and the data generator's state, as one safetensors file
    written beside its final name and renamed into place (a crash leaves the previous one)."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value)
    tensors["rng"] = g.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_tensors(tmp, tensors, metadata={"selfflow": json.dumps({"format": FORMAT, "step": step, "fit_key": key})})
    os.replace(tmp, path)


def _load_partial(path: Path, net: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, key: str) -> int:
    """Restore what ``_save_partial`` wrote; returns its step (0, with a warning, when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["selfflow"])
        if meta.get("format") != FORMAT or meta.get("fit_key") != key:
            raise ValueError(f"written for format {meta.get('format')} / fit {meta.get('fit_key')}")
        tensors = load_file(str(path))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for i, _ in enumerate(params):
            entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if entries:
                state[i] = entries
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        g.set_state(tensors["rng"])
        return int(meta["step"])
    except Exception as err:  # noqa: BLE001 - a partial checkpoint is only a shortcut: start over
        warnings.warn(
            f"video/vae: ignoring the unreadable partial checkpoint {path} ({err}); training from step 0", stacklevel=3
        )
        return 0


def _write(entry: CacheEntry, tensors: dict[str, Tensor], meta: dict) -> None:
    """The cache entry, atomically (the weights file carries the metadata in its header, so it
    is a ``checkpoint`` on its own; ``meta.json`` a readable copy); replaces the partial dir."""
    with entry.write() as w:
        w.save_tensors(_FILE, tensors, metadata={"selfflow": json.dumps(meta, indent=2, sort_keys=True)})
        w.set_meta(meta)


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a file ``_write`` wrote; ``ValueError`` naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(
            f"video/vae checkpoint {path} does not exist; point checkpoint at a .safetensors written by video/vae"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("selfflow")
        tensors = load_file(str(path))
        meta = json.loads(header)
        if meta.get("format") != FORMAT or meta.get("tokenizer") != NAME:
            raise ValueError(f"format {meta.get('format')!r} of {meta.get('tokenizer')!r}, this reads {NAME} {FORMAT}")
    except Exception as err:  # safetensors raises its own error types; the file name is what matters
        raise ValueError(f"{path} is not a readable video/vae file ({type(err).__name__}: {err})") from err
    return tensors, meta


__all__ = ["FitSource", "ReconstructionMetrics", "VideoVAEConfig", "VideoVAETokenizer", "latent_frames", "latent_grid"]
