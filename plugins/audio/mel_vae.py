"""``audio/mel-vae``: a small 1-D convolutional KL autoencoder over standardised log-mel frames.

Audio ``(B, 1, samples)`` -> ``audio/mel`` tokens ``(B, N, n_mels)`` (its own ``mel`` options;
fitted on the same data) -> channels-first ``(B, n_mels, N)``, padded at the end (edge frame
repeated) to a multiple of ``downsample`` -> encoder (conv over time, ``hidden`` channels,
residual blocks, stride-2 convs) -> posterior mean ``(B, latent_channels, ceil(N / f))`` ->
tokens ``(B, ceil(N / f), latent_channels)`` standardised per channel by the posterior means'
mean and std over the training data. Latent frame ``j`` covers mel frames ``[j f, (j + 1) f)``
and sits at ``t = time_ticks(j, sample_rate / (hop f))``: 31.25 latents/s (96 ticks apart)
at the defaults (16 kHz, hop 256, ``downsample`` 2). ``decode``: the decoder's mel frames
-> ``audio/mel``'s Griffin-Lim -> ``(B, 1, ceil(N / f) f hop)`` in [-1, 1].

``fit`` (like ``image/vae``): 1. ``checkpoint``: a local ``.safetensors`` this module wrote;
2. the cache entry ``<cache_dir>/audio-mel-vae/<key>/`` (key: data fingerprint + every option
that changes the weights); 3. train (AdamW, masked MSE on standardised mel + ``kl_weight`` KL,
tqdm progress), measure the held-out reconstruction (``metrics``: MSE of standardised mel,
mean absolute log-mel error in nats and dB), print it, and write the cache. Weights, mel
statistics, latent statistics and metadata live in one safetensors file; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
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
from selfflow.plugins.audio.clips import audio_batch, check_rate, with_rate
from selfflow.plugins.audio.frames import MASK_RATIO, frame_positions, frame_valid, frames_of
from selfflow.plugins.audio.mel import MelConfig, MelTokenizer, mel_to_audio

FORMAT = 1
_CACHE = "audio-mel-vae"
_FILE = "weights.safetensors"
_WEIGHTS = ("latent_channels", "downsample", "hidden", "blocks")
_RUNTIME = {"checkpoint", "device", "progress"}  # fields that never change the weights


def _mel(value) -> MelConfig:
    return value if isinstance(value, MelConfig) else MelConfig(**dict(value))


@attrs.frozen(kw_only=True)
class MelVAEConfig:
    """``mel``: the ``audio/mel`` front end's options; ``latent_channels``: token width;
    ``downsample``: mel frames per latent frame (1, 2 or 4); ``hidden``: conv channels;
    ``blocks``: residual blocks per level; ``steps`` / ``batch_size`` / ``lr``: training;
    ``kl_weight``: weight of the KL term; ``holdout``: items held out to measure the
    reconstruction; ``stats_items``: items for the latent statistics; ``seed``: training seed
    (default: drawn from the run's generator); ``checkpoint``: a local ``.safetensors`` written
    by this tokenizer (skips training); ``device``: where to train (default cuda if present);
    ``progress``: tqdm bar and a printed summary."""

    mel: MelConfig = attrs.field(factory=MelConfig, converter=_mel)
    latent_channels: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    downsample: int = attrs.field(default=2, validator=attrs.validators.in_((1, 2, 4)))
    hidden: int = attrs.field(default=96, validator=attrs.validators.ge(8))
    blocks: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    steps: int = attrs.field(default=1200, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    lr: float = attrs.field(default=2e-3, validator=attrs.validators.gt(0))
    kl_weight: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0))
    holdout: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    stats_items: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    seed: int | None = None
    checkpoint: str | None = None
    device: str | None = None
    progress: bool = True

    def __attrs_post_init__(self) -> None:
        if self.hidden % 8:
            raise ValueError(f"audio/mel-vae hidden must be a multiple of 8 (GroupNorm groups), got {self.hidden}")


@attrs.frozen(kw_only=True)
class MelVAEMetrics:
    """Held-out reconstruction: ``mse`` of standardised mel frames, ``log_mel_l1`` mean absolute
    log-mel error (nats) and the same in dB (``db_l1``), over ``items`` clips after ``steps``."""

    mse: float
    log_mel_l1: float
    db_l1: float
    items: int
    steps: int


# ---------------------------------------------------------------- the network


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(ch), nn.Conv1d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(ch), nn.Conv1d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class MelAutoencoder(nn.Module):
    """``(B, n_mels, T)`` -> posterior ``(mean, logvar)`` ``(B, L, T / f)`` -> ``(B, n_mels, T)``."""

    def __init__(self, n_mels: int, c: MelVAEConfig) -> None:
        super().__init__()
        levels, h = int(math.log2(c.downsample)), c.hidden
        enc: list[nn.Module] = [nn.Conv1d(n_mels, h, 3, padding=1)]
        for _ in range(levels):
            enc += [_ResBlock(h) for _ in range(c.blocks)]
            enc.append(nn.Conv1d(h, h, 4, stride=2, padding=1))
        enc += [_ResBlock(h), _norm(h), nn.SiLU(), nn.Conv1d(h, 2 * c.latent_channels, 3, padding=1)]
        dec: list[nn.Module] = [nn.Conv1d(c.latent_channels, h, 3, padding=1), _ResBlock(h)]
        for _ in range(levels):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv1d(h, h, 3, padding=1)]
            dec += [_ResBlock(h) for _ in range(c.blocks)]
        dec += [_norm(h), nn.SiLU(), nn.Conv1d(h, n_mels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


# ---------------------------------------------------------------- the tokenizer


class MelVAETokenizer:
    """Audio ``(B, 1, samples)`` <-> tokens ``(B, ceil(N / downsample), latent_channels)``.

    After ``fit``: ``metrics`` (``MelVAEMetrics``), ``source`` (``"checkpoint"``, ``"cache"``
    or ``"trained"``) and ``path`` (the weights file read or written; ``None`` when uncached).
    """

    modality = "audio"
    mask_ratio = MASK_RATIO

    def __init__(self, config: MelVAEConfig | None = None) -> None:
        self.config = c = config or MelVAEConfig()
        self.mel = MelTokenizer(c.mel)
        with torch.random.fork_rng(devices=[]):  # placeholder weights must not move the run's RNG
            self.net = MelAutoencoder(c.mel.n_mels, c).eval().requires_grad_(False)
        self.shift = torch.zeros(c.latent_channels)
        self.scale = torch.ones(c.latent_channels)
        self.metrics: MelVAEMetrics | None = None
        self.source: str | None = None
        self.path: Path | None = None
        self._weights_key: str | None = None

    @classmethod
    def from_config(cls, config: MelVAEConfig | None, **context) -> MelVAETokenizer:
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides) -> MelVAETokenizer:
        """A fitted tokenizer straight from a file this module wrote (no data needed)."""
        tensors, meta = _read(Path(path))
        saved = dict(meta["config"])
        saved["mel"] = MelConfig(**saved["mel"])
        tok = cls(attrs.evolve(MelVAEConfig(**saved), checkpoint=str(path), **overrides))
        tok._load(tensors, meta, Path(path), "checkpoint")
        return tok

    @property
    def channels(self) -> int:
        return self.config.latent_channels

    @property
    def frame_rate(self) -> float:
        return self.config.mel.sample_rate / (self.config.mel.hop * self.config.downsample)

    @property
    def fitted(self) -> bool:
        return self.source is not None

    def fit_key(self, dataset) -> str:
        fields = {f.name: getattr(self.config, f.name) for f in attrs.fields(MelVAEConfig) if f.name not in _RUNTIME}
        return content_key({"format": FORMAT, "data": dataset.fingerprint(), "config": fields})

    def cache_key(self) -> str | None:
        return None if self._weights_key is None else content_key("audio/mel-vae", self._weights_key)

    # -- fit

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Load the checkpoint, or the cache, or train and write the cache (module docstring)."""
        c = self.config
        check_rate(dataset, c.mel.sample_rate, "audio/mel-vae")
        if "audio" not in getattr(dataset, "modalities", ()):
            raise ValueError(f"audio/mel-vae fits on audio, the dataset has {getattr(dataset, 'modalities', None)!r}")
        if len(dataset) < 2:
            raise ValueError(f"audio/mel-vae needs at least 2 clips to fit (train + held out), got {len(dataset)}")
        if c.seed is None:  # drawn before the cache lookup, so the run's stream never depends on the cache
            seed = 0 if generator is None else int(torch.randint(2**62, (1,), generator=generator))
            self.config = c = attrs.evolve(c, seed=seed)
        if c.checkpoint is not None:
            path = Path(c.checkpoint)
            tensors, meta = _read(path)
            for name in (*_WEIGHTS, "mel"):
                saved, want = meta["config"].get(name), getattr(c, name)
                want = attrs.asdict(want) if name == "mel" else want
                if saved != want:
                    raise ValueError(
                        f"{path} was trained with {name}={saved!r} but the audio/mel-vae config says {name}={want!r}; "
                        f"set {name} to match or use a matching checkpoint"
                    )
            self._load(tensors, meta, path, "checkpoint")
            self._weights_key = content_key("checkpoint", hashlib.sha256(path.read_bytes()).hexdigest())
            return
        self._weights_key = self.fit_key(dataset)
        entry = CacheEntry(cache_dir, _CACHE, self._weights_key) if cache_dir else None
        path = entry.path / _FILE if entry is not None else None
        if entry is not None and entry.exists():
            try:
                tensors, meta = _read(path)
                self._load(tensors, meta, path, "cache")
                return
            except (ValueError, OSError) as err:
                warnings.warn(f"audio/mel-vae: ignoring the unreadable cache {path} ({err}); retraining", stacklevel=2)
        self.mel.fit(dataset, cache_dir=cache_dir)
        self._train(dataset, c.seed)
        if entry is not None:
            meta = self._meta(dataset)
            with entry.write() as w:
                w.save_tensors(_FILE, self._tensors(), metadata={"selfflow": json.dumps(meta, sort_keys=True)})
                w.set_meta(meta)
        self.path = path

    def _mel_batch(self, dataset, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Standardised mel ``(B, n_mels, T)`` padded to a multiple of ``downsample``, and its
        ``(B, T)`` mask of real frames."""
        seg = self.mel.encode([dataset[int(i)].media["audio"] for i in idx])
        x, valid = self._pad(seg.tokens.transpose(1, 2), seg.valid_mask())
        return x.to(device), valid.to(device)

    def _pad(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        extra = -x.shape[2] % self.config.downsample
        if extra:
            x = F.pad(x, (0, extra), mode="replicate")
            valid = F.pad(valid, (0, extra), value=False)
        return x, valid

    def _train(self, dataset, seed: int) -> None:
        c = self.config
        device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MelAutoencoder(c.mel.n_mels, c).to(device).train()
        order = torch.randperm(len(dataset), generator=g)
        n_hold = max(1, min(c.holdout, len(dataset) // 5))
        held, train = order[:n_hold], order[n_hold:]
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, betas=(0.9, 0.99), weight_decay=0.0)
        warmup = max(1, c.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(i, c.steps) / c.steps))
        )
        bar = tqdm(range(c.steps), desc="fit audio/mel-vae", unit="step", disable=not c.progress, mininterval=1.0)
        for step in bar:
            x, valid = self._mel_batch(dataset, train[torch.randint(len(train), (c.batch_size,), generator=g)], device)
            mean, logvar = net.encode(x)
            eps = torch.randn(mean.shape, generator=g).to(device)
            recon = net.decode(mean + (0.5 * logvar).exp() * eps)
            w = valid[:, None].float()
            mse = ((recon - x).square() * w).sum() / (w.sum() * x.shape[1])
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
        self.shift, self.scale = self._latent_stats(dataset, train[: c.stats_items], device)
        self.metrics = self._heldout(dataset, held, device)
        self.source = "trained"
        if c.progress:
            m = self.metrics
            print(
                f"audio/mel-vae: held-out reconstruction over {m.items} clips after {m.steps} steps: standardised-mel "
                f"MSE {m.mse:.4f}, log-mel L1 {m.log_mel_l1:.3f} nats ({m.db_l1:.2f} dB)",
                file=sys.stderr,
            )

    @torch.no_grad()
    def _latent_stats(self, dataset, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        total, sq, count = 0.0, 0.0, 0
        for part in idx.split(128):
            x, valid = self._mel_batch(dataset, part, device)
            mean = self.net.encode(x)[0].double()
            keep = valid[:, :: self.config.downsample]  # a latent frame is real when its first mel frame is
            z = mean.transpose(1, 2)[keep]
            total, sq, count = total + z.sum(0), sq + z.square().sum(0), count + z.shape[0]
        mu = total / count
        return mu.float().cpu(), (sq / count - mu.square()).clamp_min(1e-12).sqrt().float().cpu()

    @torch.no_grad()
    def _heldout(self, dataset, idx: Tensor, device: torch.device) -> MelVAEMetrics:
        se, ae, count = 0.0, 0.0, 0
        std = self.mel.std.to(device)[None, :, None]
        for part in idx.split(128):
            x, valid = self._mel_batch(dataset, part, device)
            diff = (self.net.decode(self.net.encode(x)[0]) - x) * valid[:, None]
            se += float(diff.square().sum())
            ae += float((diff * std).abs().sum())  # standardised -> nats
            count += int(valid.sum()) * x.shape[1]
        l1 = ae / count
        return MelVAEMetrics(
            mse=se / count, log_mel_l1=l1, db_l1=l1 * 20.0 / math.log(10.0), items=len(idx), steps=self.config.steps
        )

    def _load(self, tensors: dict[str, Tensor], meta: dict, path: Path, source: str) -> None:
        try:
            self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            self.shift, self.scale = tensors["latent.shift"], tensors["latent.scale"]
            self.mel.mean, self.mel.std, self.mel.fitted = tensors["mel.mean"], tensors["mel.std"], True
            self.metrics = MelVAEMetrics(**meta["metrics"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: weights or metadata do not match this audio/mel-vae ({err})") from err
        self.net.eval().requires_grad_(False)
        self.source, self.path = source, path

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return out | {
            "latent.shift": self.shift,
            "latent.scale": self.scale,
            "mel.mean": self.mel.mean,
            "mel.std": self.mel.std,
        }

    def _meta(self, dataset) -> dict:
        return {
            "format": FORMAT,
            "tokenizer": "audio/mel-vae",
            "config": {k: v for k, v in attrs.asdict(self.config).items() if k not in _RUNTIME},
            "data_fingerprint": dataset.fingerprint(),
            "cache_key": self.fit_key(dataset),
            "metrics": attrs.asdict(self.metrics),
        }

    # -- encode / decode

    def _ready(self, device: torch.device) -> None:
        if not self.fitted:
            raise RuntimeError(
                "audio/mel-vae is not fitted: call fit(dataset, cache_dir=...) first, or set checkpoint in its config"
            )
        if self.shift.device != device:
            self.net.to(device)
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)

    @torch.no_grad()
    def encode(self, media) -> Segment:
        x, lengths = audio_batch(media, who="audio/mel-vae")
        self._ready(x.device)
        ragged = bool((lengths != lengths[0]).any())
        seg = self.mel.encode([x[i : i + 1, : int(n)] for i, n in enumerate(lengths)] if ragged else x[:, None])
        mel = self._pad(seg.tokens.transpose(1, 2), seg.valid_mask())[0]
        z = self.net.encode(mel)[0]
        tokens = ((z - self.shift[:, None]) / self.scale[:, None]).transpose(1, 2)
        b, n, _ = tokens.shape
        f = self.config.downsample * self.config.mel.hop
        return Segment(
            modality=self.modality,
            tokens=tokens.contiguous(),
            positions=frame_positions(n, self.frame_rate, batch=b, device=x.device),
            valid=frame_valid(lengths, n, f),
        )

    @torch.no_grad()
    def decode(self, segment: Segment) -> Tensor:
        """``(B, 1, N * downsample * hop)`` float in [-1, 1]; invalid latent frames silent."""
        self._ready(segment.tokens.device)
        if segment.channels != self.channels:
            raise ValueError(f"audio/mel-vae decodes {self.channels}-channel tokens, got {segment.channels}")
        frames_of(segment, "audio/mel-vae")
        z = segment.tokens.float().transpose(1, 2) * self.scale[:, None] + self.shift[:, None]
        mel = self.net.decode(z).transpose(1, 2)  # standardised mel (B, N f, n_mels)
        logmel = mel * self.mel.std.to(mel.device) + self.mel.mean.to(mel.device)
        audio = mel_to_audio(logmel, self.config.mel)
        if segment.valid is not None:
            f = self.config.downsample * self.config.mel.hop
            audio = audio * segment.valid.repeat_interleave(f, dim=1)
        return with_rate(audio[:, None].clamp(-1.0, 1.0), self.config.mel.sample_rate)


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a file this module wrote; ``ValueError`` naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(
            f"audio/mel-vae checkpoint {path} does not exist; "
            "point checkpoint at a .safetensors written by audio/mel-vae"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("selfflow")
        tensors = load_file(str(path))
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads format {FORMAT}")
    except Exception as err:  # safetensors raises its own error types; the file name is what matters
        raise ValueError(f"{path} is not a readable audio/mel-vae file ({type(err).__name__}: {err})") from err
    return tensors, meta
