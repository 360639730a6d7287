"""``audio/encodec``: the continuous latents of an EnCodec (SEANet) autoencoder as tokens.

Audio ``(B, 1, samples)`` in [-1, 1] at ``sample_rate`` -> the encoder's output **before
quantisation** ``(B, D, T)`` (as JASCO does for flow matching; no codebooks are used) ->
tokens ``(B, T, D)`` standardised per channel, ``(z - shift) / scale``, with ``shift`` and
``scale`` the mean and std of the latents over the training data (stored with the weights).
``T = ceil(samples / hop)`` frames at ``frame_rate = sample_rate / hop`` Hz (75 Hz at 24 kHz,
hop 320), token ``i`` at ``t = time_ticks(i, frame_rate)`` on the shared time axis (75 Hz is
40 ticks a frame, 50 Hz is 60), ``h = w = 0``. ``decode`` inverts the standardisation, runs the
decoder and clamps to [-1, 1]: ``T * hop`` samples (the input is zero-padded to a whole number
of frames when it is not one).

The sample rate is the dataset's (``sample_rate`` of the tokenizer's config may pin it): the
tokenizer never resamples, because a rate mismatch is a configuration mistake that a silent
resampler would hide; the error names the fix (``dataset_options = {sample_rate = 24000}``).

Where the weights come from (``fit`` picks the first that applies):

1. ``checkpoint = "/path/encodec_24khz-d7cc33bc.th"``: the official 24 kHz model from a local
   file. Verified as the ``encodec`` package verifies its downloads (the sha256 prefix of the
   file, ``encodec.utils._check_checksum``), but against the **official** checksum only (the
   name alone proves nothing); then read with ``torch.load(weights_only=True)``. Any other
   ``.th`` / ``.pt`` is refused: a pickle from elsewhere is never opened. The latent statistics
   are computed on the run's data and cached by (checkpoint checksum, data fingerprint).
2. ``checkpoint = "x.safetensors"``: a file this module wrote (``save``), the weights, the
   latent statistics and the architecture in one safetensors file with a JSON header; the
   architecture comes from the file.
3. Neither: train a small SEANet autoencoder (``encodec.modules.SEANetEncoder/Decoder``, no
   quantiser) on the run's data: L1 on the waveform plus multi-scale STFT log-magnitude and
   log-mel L1 losses, AdamW, tqdm progress; held-out reconstruction SNR (dB) and mel-spectral
   distance (dB) are measured at the end and written to the entry's ``fit_log.jsonl`` and
   ``meta.json`` and printed. Cached under ``<cache_dir>/audio-encodec/<key>/`` with ``key``
   hashing the data fingerprint and every field that changes the weights. Resumable: every
   ``partial_every`` steps (and on Ctrl-C) the weights, optimizer, step and data RNG go to
   ``<cache_dir>/audio-encodec/<key>-partial/``; the next fit with the same key continues
   from there (bit-identical to an uninterrupted fit on one thread), so a long fit can run
   across sittings.

This is the only module that imports ``encodec`` (``import_encodec``): see there for why the
``torchaudio`` import is guarded.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib
import json
import math
import os
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.core.files import CacheEntry, content_key
from selfflow.core.types import Segment, time_ticks

FORMAT = 2  # bump when the network, its training or the file layout changes: old caches stop matching
NAME = "audio/encodec"
# From encodec/model.py (encodec 0.1.1): the official file is 'encodec_24khz-d7cc33bc.th' and the
# package checks the first 8 hex digits of its sha256 against the part of the name after '-'.
OFFICIAL_CHECKSUMS = {"encodec_24khz": "d7cc33bc"}
OFFICIAL_RATE = 24_000
_CACHE, _FILE, _LOG = "audio-encodec", "weights.safetensors", "fit_log.jsonl"
_RUNTIME = {"checkpoint", "partial_every", "device", "progress"}  # fields that never change the weights
_EXTRA = "pip install 'selfflow[audio]'"


# ----------------------------------------------------------------------------- the one encodec import


class _TorchaudioStub(types.ModuleType):
    """Stands in for ``torchaudio`` while ``encodec`` is imported (see ``import_encodec``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"torchaudio.{name}: selfflow imports encodec without torchaudio (its wheels here are CUDA builds "
            "that fail to load); selfflow reads, writes and resamples audio with soundfile, PyAV and soxr instead"
        )


def import_encodec() -> types.ModuleType:
    """The ``encodec`` package, imported without ``torchaudio``.

    Why the guard: ``encodec/utils.py`` does ``import torchaudio`` at module level, and
    ``import encodec`` reaches it through ``encodec.model``. torchaudio is only used there by
    ``convert_audio`` / ``save_audio`` (file I/O and resampling, which selfflow does with
    soundfile, PyAV and soxr) and by ``encodec.msstftd`` (the GAN discriminator, never
    imported here). On machines like this one the torchaudio wheel is a CUDA build whose
    ``_torchaudio.so`` fails to load (``OSError``), and it may be absent altogether. So while
    encodec is imported, and only then, ``sys.modules["torchaudio"]`` is a stub whose
    attributes raise a clear ``ImportError``; afterwards the entry is removed again, so any
    other code that imports torchaudio sees the real thing (or its real failure). A
    torchaudio that is already imported is left alone.
    """
    if "encodec" in sys.modules:
        return sys.modules["encodec"]
    stubbed = "torchaudio" not in sys.modules
    if stubbed:
        sys.modules["torchaudio"] = _TorchaudioStub("torchaudio")
    try:
        module = importlib.import_module("encodec")
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] == "encodec":
            raise ImportError(f"audio/encodec needs the encodec package: {_EXTRA}") from err
        raise
    finally:
        if stubbed and isinstance(sys.modules.get("torchaudio"), _TorchaudioStub):
            del sys.modules["torchaudio"]
    return module


@contextlib.contextmanager
def _quiet_weight_norm() -> Iterator[None]:
    # encodec builds its convolutions with torch.nn.utils.weight_norm, deprecated but working
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=UserWarning)
        yield


# ----------------------------------------------------------------------------- config


def _ratios(value: Any) -> tuple[int, ...]:
    ratios = tuple(int(r) for r in value)
    if not ratios or min(ratios) < 2:
        raise ValueError(f"audio/encodec ratios must be a non-empty list of strides >= 2, got {value!r}")
    return ratios


def _scales(value: Any) -> tuple[int, ...]:
    scales = tuple(int(s) for s in value)
    if not scales or any(s < 16 or s & (s - 1) for s in scales):
        raise ValueError(f"audio/encodec stft_scales must be FFT sizes that are powers of two >= 16, got {value!r}")
    return scales


def _optional_positive(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"audio/encodec {attribute.name} must be positive or unset, got {value!r}")


@attrs.frozen(kw_only=True)
class EncodecConfig:
    """Weights: ``checkpoint`` a local official ``.th`` or a ``.safetensors`` this module
    wrote (``None``: fit on the run's data); ``sample_rate`` in Hz (``None``: the dataset's;
    the official checkpoint is 24000).
    In-run fit architecture (a checkpoint brings its own): ``n_filters`` SEANet base width,
    ``dimension`` the latent (token) width, ``ratios`` the decoder's upsampling strides
    (hop = their product: 320 gives 75 Hz at 24 kHz, 50 Hz at 16 kHz), ``residual_layers``
    per stage, ``lstm`` layers at the bottleneck (0: none; slow on a CPU), ``causal``.
    Training: ``steps``, ``batch_size``, ``crop_seconds`` random crops per item (``None``:
    whole items), ``lr`` (AdamW, warm-up then cosine to 10 %), ``wave_weight`` on the L1
    waveform loss, ``spectral_weight`` on the multi-scale STFT + mel loss over FFT sizes
    ``stft_scales``, ``seed``, ``holdout`` items kept out to measure SNR and mel distance,
    ``stats_items`` items for the latent statistics.
    Runtime: ``partial_every`` steps between resumable partial checkpoints (0: never),
    ``device`` (``None``: CUDA when available), ``progress`` bar.
    """

    checkpoint: str | None = None
    sample_rate: int | None = attrs.field(default=None, validator=_optional_positive)
    n_filters: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    dimension: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    ratios: tuple[int, ...] = attrs.field(default=(8, 5, 4, 2), converter=_ratios)
    residual_layers: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    lstm: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    causal: bool = False
    steps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    crop_seconds: float | None = attrs.field(default=0.5, validator=_optional_positive)
    lr: float = attrs.field(default=1e-3, validator=attrs.validators.gt(0))
    wave_weight: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    spectral_weight: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    stft_scales: tuple[int, ...] = attrs.field(default=(128, 256, 512, 1024, 2048), converter=_scales)
    seed: int = 0
    holdout: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    stats_items: int = attrs.field(default=512, validator=attrs.validators.ge(2))
    partial_every: int = attrs.field(default=100, validator=attrs.validators.ge(0))
    device: str | None = None
    progress: bool = True

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)


class FitSource(enum.Enum):
    """Where the fitted weights came from."""

    TRAINED = "trained"
    CACHE = "cache"
    CHECKPOINT = "checkpoint"
    OFFICIAL = "official"


@attrs.frozen(kw_only=True)
class ReconstructionMetrics:
    """Held-out ``decode(encode(x))`` against ``x``: ``snr_db`` = 10 log10(sum x^2 / sum
    (x - y)^2) over all samples; ``mel_distance_db`` the mean absolute difference of the
    80-bin log-mel power spectrograms in dB; over ``items`` clips, after ``steps`` steps
    (0 for official weights)."""

    snr_db: float
    mel_distance_db: float
    items: int
    steps: int


# ----------------------------------------------------------------------------- the network


class Codec(nn.Module):
    """An EnCodec encoder and decoder without the quantiser: ``encode (B, 1, S) -> (B, D, T)``,
    ``decode (B, D, T) -> (B, 1, T * hop)``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, hop: int, dimension: int) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.hop, self.dimension = int(hop), int(dimension)

    def encode(self, x: Tensor) -> Tensor:
        pad = -x.shape[-1] % self.hop
        return self.encoder(F.pad(x, (0, pad)) if pad else x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)[..., : z.shape[-1] * self.hop]


def _arch(c: EncodecConfig, sample_rate: int) -> dict[str, Any]:
    return {
        "kind": "seanet",
        "sample_rate": sample_rate,
        "n_filters": c.n_filters,
        "dimension": c.dimension,
        "ratios": list(c.ratios),
        "residual_layers": c.residual_layers,
        "lstm": c.lstm,
        "causal": c.causal,
    }


def build_codec(arch: dict[str, Any]) -> Codec:
    """The network an architecture record describes (``kind`` "seanet" or "encodec_24khz")."""
    encodec = import_encodec()
    with _quiet_weight_norm():
        if arch["kind"] == "encodec_24khz":
            model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
            return Codec(model.encoder, model.decoder, hop=model.encoder.hop_length, dimension=model.encoder.dimension)
        if arch["kind"] != "seanet":
            raise ValueError(f"unknown audio/encodec architecture {arch['kind']!r}")
        common = {
            "channels": 1,
            "dimension": arch["dimension"],
            "n_filters": arch["n_filters"],
            "n_residual_layers": arch["residual_layers"],
            "ratios": list(arch["ratios"]),
            "lstm": arch["lstm"],
            "causal": arch["causal"],
            "norm": "weight_norm",
        }
        enc, dec = encodec.modules.SEANetEncoder(**common), encodec.modules.SEANetDecoder(**common)
    return Codec(enc, dec, hop=math.prod(arch["ratios"]), dimension=arch["dimension"])


def official_arch() -> dict[str, Any]:
    return {"kind": "encodec_24khz", "sample_rate": OFFICIAL_RATE, "dimension": 128, "ratios": [8, 5, 4, 2]}


# ----------------------------------------------------------------------------- the tokenizer


class EncodecTokenizer:
    """Audio ``(B, 1, samples)`` in [-1, 1] <-> tokens ``(B, T, dimension)`` at ``frame_rate``.

    After ``fit``: ``arch`` (the network's description), ``metrics``
    (``ReconstructionMetrics``; ``None`` for official weights until ``measure``), ``source``
    (``FitSource``), ``path`` (the weights file read or written, ``None`` when uncached).
    """

    modality = "audio"
    mask_ratio = 0.50  # the paper's audio mask ratio

    def __init__(self, config: EncodecConfig | None = None) -> None:
        self.config = config or EncodecConfig()
        self.arch: dict[str, Any] | None = None
        self.net: Codec | None = None
        self.shift = torch.zeros(0)
        self.scale = torch.ones(0)
        self.metrics: ReconstructionMetrics | None = None
        self.source: FitSource | None = None
        self.path: Path | None = None
        self._weights_key: str | None = None

    @classmethod
    def from_config(cls, config: EncodecConfig | None, **context: Any) -> EncodecTokenizer:
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides: Any) -> EncodecTokenizer:
        """A fitted tokenizer from a ``.safetensors`` this module wrote (no data needed)."""
        tok = cls(attrs.evolve(EncodecConfig(), checkpoint=str(path), **overrides))
        tensors, meta = _read(Path(path))
        tok._load(tensors, meta, Path(path), FitSource.CHECKPOINT)
        tok._weights_key = content_key("checkpoint", _sha256(Path(path)))
        return tok

    # -- what the run reads

    @property
    def fitted(self) -> bool:
        return self.net is not None and self.shift.numel() > 0

    @property
    def channels(self) -> int:
        if self.arch is not None:
            return int(self.arch["dimension"])
        if self.config.checkpoint is not None and _kind(Path(self.config.checkpoint)) == "official":
            return 128
        return self.config.dimension

    @property
    def sample_rate(self) -> int:
        if self.arch is None:
            raise RuntimeError("audio/encodec: the sample rate is known after fit (it is the dataset's)")
        return int(self.arch["sample_rate"])

    @property
    def hop(self) -> int:
        return math.prod(self.arch["ratios"]) if self.arch is not None else self.config.hop

    @property
    def frame_rate(self) -> float:
        """Latent frames per second: ``sample_rate / hop``."""
        return self.sample_rate / self.hop

    def cache_key(self) -> str | None:
        """What ``encode`` computes once fitted (``None`` before ``fit``)."""
        return None if self._weights_key is None else content_key(NAME, self._weights_key)

    def fit_key(self, dataset: Any) -> str:
        """Hash of the data fingerprint, the file format and every field that changes the weights."""
        rate = self._resolve_rate(dataset)
        fields = {f.name: getattr(self.config, f.name) for f in attrs.fields(EncodecConfig) if f.name not in _RUNTIME}
        fields["sample_rate"] = rate
        return content_key({"format": FORMAT, "data": dataset.fingerprint(), "config": fields})

    def describe(self) -> dict[str, Any]:
        """What the tokenizer is, for reports: architecture, source, frame rate, reconstruction."""
        return {
            "tokenizer": NAME,
            "source": None if self.source is None else self.source.value,
            "arch": self.arch,
            "frame_rate": None if self.arch is None else self.frame_rate,
            "path": None if self.path is None else str(self.path),
            "reconstruction": None if self.metrics is None else attrs.asdict(self.metrics),
        }

    # -- fit

    def fit(self, dataset: Any, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Load the official checkpoint, a selfflow checkpoint, the cache, or train (module docstring)."""
        _check_dataset(dataset)
        rate = self._resolve_rate(dataset)
        c = self.config
        if c.checkpoint is not None:
            path = Path(c.checkpoint)
            if _kind(path) == "official":
                self._fit_official(path, dataset, rate, cache_dir)
                return
            tensors, meta = _read(path)
            if int(meta["arch"]["sample_rate"]) != rate:
                raise ValueError(
                    f"{path} was trained on {meta['arch']['sample_rate']} Hz audio but the dataset is {rate} Hz; "
                    f"set dataset_options = {{sample_rate = {meta['arch']['sample_rate']}}}"
                )
            self._load(tensors, meta, path, FitSource.CHECKPOINT)
            self._weights_key = content_key("checkpoint", _sha256(path))
            return
        key = self.fit_key(dataset)
        self._weights_key = key
        entry = CacheEntry(cache_dir, _CACHE, key) if cache_dir else None
        if entry is not None and entry.exists():
            try:
                tensors, meta = _read(entry.path / _FILE)
                self._load(tensors, meta, entry.path / _FILE, FitSource.CACHE)
                return
            except (ValueError, OSError) as err:
                warnings.warn(
                    f"audio/encodec: ignoring the unreadable cache file {entry.path / _FILE} ({err}); retraining it",
                    stacklevel=2,
                )
        partial = CacheEntry(cache_dir, _CACHE, f"{key}-partial") if cache_dir else None
        net, log = _train(c, dataset, rate=rate, partial=partial)
        held, train = split(c, dataset)
        self.arch, self.net = _arch(c, rate), net.eval().requires_grad_(False)
        self.shift, self.scale = _latent_stats(self.net, dataset, train, c.stats_items)
        self.metrics = measure(self.net, dataset, held, rate=rate, steps=c.steps)
        self.source = FitSource.TRAINED
        log.append({"event": "held_out", **attrs.asdict(self.metrics)})
        _report(self.metrics, c.progress)
        if entry is not None:
            meta = self._meta(dataset, key)
            with entry.write() as w:
                w.save_tensors(_FILE, self._tensors(), metadata={"selfflow": json.dumps(meta, sort_keys=True)})
                (w.directory / _LOG).write_text("".join(json.dumps(r) + "\n" for r in log))
                w.set_meta(meta)
            self.path = entry.path / _FILE
            if partial is not None and partial.path.exists():
                import shutil

                shutil.rmtree(partial.path, ignore_errors=True)

    def _resolve_rate(self, dataset: Any) -> int:
        have = getattr(dataset, "sample_rate", None)
        want = self.config.sample_rate
        official = self.config.checkpoint is not None and _kind(Path(self.config.checkpoint)) == "official"
        if official:
            want = want or OFFICIAL_RATE
            if want != OFFICIAL_RATE:
                raise ValueError(
                    f"audio/encodec: the official checkpoint is a {OFFICIAL_RATE} Hz model; "
                    f"tokenizer_options sample_rate={want} cannot be used with it"
                )
        if have is None:
            if want is None:
                raise ValueError(
                    f"audio/encodec: the dataset {type(dataset).__name__} has no sample_rate attribute; "
                    "set tokenizer_options = {sample_rate = ...} to the rate of its audio"
                )
            return int(want)
        if want is not None and int(have) != int(want):
            raise ValueError(
                f"audio/encodec runs at {want} Hz but the dataset's audio is {have} Hz; the tokenizer does not "
                f"resample: set dataset_options = {{sample_rate = {want}}}"
            )
        return int(have)

    def _fit_official(self, path: Path, dataset: Any, rate: int, cache_dir: str | None) -> None:
        checksum = verify_official(path)
        net = build_codec(official_arch())
        state = torch.load(path, map_location="cpu", weights_only=True)
        model_keys = {f"encoder.{k}" for k in net.encoder.state_dict()} | {
            f"decoder.{k}" for k in net.decoder.state_dict()
        }
        missing = sorted(model_keys - set(state))
        if missing:
            raise ValueError(f"{path}: not an EnCodec 24 kHz state dict (missing {missing[:3]}...)")
        net.load_state_dict({k: v for k, v in state.items() if k in model_keys})
        self.arch, self.net = official_arch(), net.eval().requires_grad_(False)
        self.source, self.path = FitSource.OFFICIAL, path
        self._weights_key = content_key("official", checksum)
        c = self.config
        key = content_key({"format": FORMAT, "official": checksum, "data": dataset.fingerprint(), "n": c.stats_items})
        entry = CacheEntry(cache_dir, _CACHE, f"official-stats-{key}") if cache_dir else None
        if entry is not None and entry.exists():
            stats = entry.load_tensors("stats.safetensors")
            self.shift, self.scale = stats["latent.shift"], stats["latent.scale"]
            return
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(c.seed))
        self.shift, self.scale = _latent_stats(self.net, dataset, idx, c.stats_items)
        if entry is not None:
            with entry.write() as w:
                w.save_tensors("stats.safetensors", {"latent.shift": self.shift, "latent.scale": self.scale})
                w.set_meta({"format": FORMAT, "official_checksum": checksum, "data": dataset.fingerprint()})

    def _load(self, tensors: dict[str, Tensor], meta: dict, path: Path, source: FitSource) -> None:
        try:
            net = build_codec(meta["arch"])
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            self.shift, self.scale = tensors["latent.shift"], tensors["latent.scale"]
            self.metrics = None if meta.get("metrics") is None else ReconstructionMetrics(**meta["metrics"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: weights or metadata do not match audio/encodec ({err})") from err
        self.arch, self.net = dict(meta["arch"]), net.eval().requires_grad_(False)
        self.source, self.path = source, path

    def _tensors(self) -> dict[str, Tensor]:
        assert self.net is not None
        out = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return out | {"latent.shift": self.shift.cpu(), "latent.scale": self.scale.cpu()}

    def _meta(self, dataset: Any, key: str | None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tokenizer": NAME,
            "arch": self.arch,
            "config": {k: v for k, v in attrs.asdict(self.config).items() if k not in _RUNTIME},
            "data_fingerprint": dataset.fingerprint() if dataset is not None else None,
            "cache_key": key,
            "metrics": None if self.metrics is None else attrs.asdict(self.metrics),
            "source": self.source.value if self.source else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted tokenizer (weights, latent statistics, architecture) as one
        ``.safetensors`` file, usable as ``checkpoint`` (also for official weights)."""
        self._ready(torch.device("cpu"))
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"audio/encodec saves .safetensors files, got {path}")
        from selfflow.core.files import save_tensors

        meta = self._meta(None, None)
        save_tensors(path, self._tensors(), metadata={"selfflow": json.dumps(meta, sort_keys=True)})
        return path

    # -- encode / decode

    def _ready(self, device: torch.device) -> Codec:
        if not self.fitted or self.net is None:
            raise RuntimeError(
                "audio/encodec is not fitted: call fit(dataset, cache_dir=...) first, or set checkpoint in its config"
            )
        if self.shift.device != device:
            self.net.to(device)
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self.net

    @torch.no_grad()
    def encode(self, media: Tensor) -> Segment:
        """``(B, 1, samples)`` in [-1, 1] -> ``Segment`` of ``(B, T, D)`` tokens, ``T = ceil(samples / hop)``."""
        check_audio_batch(media)
        net = self._ready(media.device)
        z = net.encode(media.float())  # (B, D, T)
        b, _, t = z.shape
        tokens = ((z - self.shift[:, None]) / self.scale[:, None]).transpose(1, 2).contiguous()
        pos = torch.zeros(b, t, 3, dtype=torch.long, device=media.device)
        pos[..., 0] = time_ticks(torch.arange(t), self.frame_rate).to(media.device)
        return Segment(modality=self.modality, tokens=tokens, positions=pos)

    @torch.no_grad()
    def decode(self, segment: Segment) -> Tensor:
        """``Segment`` of ``(B, T, D)`` tokens -> audio ``(B, 1, T * hop)`` clamped to [-1, 1]."""
        net = self._ready(segment.tokens.device)
        tokens = segment.tokens.float()
        if tokens.shape[-1] != self.channels:
            raise ValueError(f"audio/encodec decodes {self.channels}-channel tokens, got {tokens.shape[-1]}")
        z = tokens.transpose(1, 2) * self.scale[:, None] + self.shift[:, None]
        return net.decode(z).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- checkpoints


def _kind(path: Path) -> str:
    """``"official"`` for ``.th`` / ``.pt``, ``"safetensors"``; anything else is refused."""
    suffix = path.suffix.lower()
    if suffix in (".th", ".pt", ".pth"):
        return "official"
    if suffix == ".safetensors":
        return "safetensors"
    raise ValueError(
        f"audio/encodec checkpoint {path}: only the official EnCodec 24 kHz file (encodec_24khz-d7cc33bc.th) or a "
        ".safetensors written by selfflow can be loaded; other formats may hold pickled code and are never opened"
    )


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify_official(path: str | os.PathLike) -> str:
    """Check that ``path`` is the official EnCodec 24 kHz checkpoint, the way the encodec
    package checks it (``encodec.utils._check_checksum``: the first 8 hex digits of the
    file's sha256) but against ``OFFICIAL_CHECKSUMS`` rather than the file's name. Returns
    the checksum; raises ``ValueError`` naming the file otherwise (the file is never
    unpickled before this passes)."""
    path = Path(path)
    official = OFFICIAL_CHECKSUMS["encodec_24khz"]
    if not path.is_file():
        raise FileNotFoundError(
            f"audio/encodec checkpoint {path} does not exist; download encodec_24khz-{official}.th on a machine "
            "with internet (https://dl.fbaipublicfiles.com/encodec/v0/) and point checkpoint at the local copy"
        )
    parts = path.stem.split("-")
    if len(parts) == 2 and parts[1] != official:
        raise ValueError(
            f"{path}: its name carries checksum {parts[1]!r}, not the official {official!r} of encodec_24khz; only "
            "the official checkpoint is unpickled (weights_only); save other weights as .safetensors"
        )
    utils = importlib.import_module("encodec.utils") if "encodec.utils" in sys.modules else None
    if utils is None:
        import_encodec()
        utils = importlib.import_module("encodec.utils")
    try:
        utils._check_checksum(path, official)
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not the official EnCodec 24 kHz checkpoint ({err}); a .th/.pt file is opened only when its "
            "sha256 is the official one: save other weights as .safetensors"
        ) from err
    return official


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a file ``save`` or the fit wrote; ``ValueError`` naming it otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"audio/encodec checkpoint {path} does not exist; point checkpoint at a .safetensors written by "
            "audio/encodec (or the official encodec_24khz-d7cc33bc.th)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("selfflow")
        if header is None:
            raise ValueError("no selfflow metadata in its header")
        meta = json.loads(header)
        if meta.get("format") != FORMAT or meta.get("tokenizer") != NAME:
            raise ValueError(f"{meta.get('tokenizer')!r} format {meta.get('format')!r}; this reads {NAME} {FORMAT}")
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types; the file name is what matters
        raise ValueError(f"{path} is not a readable audio/encodec file ({type(err).__name__}: {err})") from err
    return tensors, meta


# ----------------------------------------------------------------------------- helpers


def check_audio_batch(media: Any) -> None:
    if not isinstance(media, Tensor) or media.ndim != 3 or media.shape[1] != 1:
        shape = tuple(media.shape) if isinstance(media, Tensor) else type(media).__name__
        raise ValueError(
            f"audio/encodec encodes mono audio batches (B, 1, samples) in [-1, 1], got {shape}; "
            "mix stereo down to mono in the dataset (dataset_options channels = 1)"
        )


def _check_dataset(dataset: Any) -> None:
    if "audio" not in getattr(dataset, "modalities", ()):
        raise ValueError(f"audio/encodec fits on audio, the dataset has {getattr(dataset, 'modalities', None)!r}")
    if len(dataset) < 2:
        raise ValueError(f"audio/encodec needs at least 2 clips to fit (train + held out), got {len(dataset)}")
    check_audio_batch(torch.as_tensor(dataset[0].media["audio"])[None])


def clip(dataset: Any, i: int) -> Tensor:
    return torch.as_tensor(dataset[int(i)].media["audio"], dtype=torch.float32)


def batches(dataset: Any, idx: Tensor, size: int = 16) -> Iterator[Tensor]:
    """Clips of ``idx`` stacked ``(b, 1, S)``, zero-padded to the longest in each batch."""
    for part in idx.split(size):
        clips = [clip(dataset, i) for i in part]
        n = max(c.shape[-1] for c in clips)
        yield torch.stack([F.pad(c, (0, n - c.shape[-1])) for c in clips])


@torch.no_grad()
def _latent_stats(net: Codec, dataset: Any, idx: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the latents (float64 sums over every frame)."""
    device = next(net.parameters()).device
    total = sq = torch.zeros(net.dimension, dtype=torch.float64, device=device)
    count = 0
    for x in batches(dataset, idx[:limit]):
        z = net.encode(x.to(device)).double()
        total, sq = total + z.sum((0, 2)), sq + z.square().sum((0, 2))
        count += z.shape[0] * z.shape[2]
    mu = total / count
    std = (sq / count - mu.square()).clamp_min(1e-12).sqrt()
    return mu.float().cpu(), std.float().cpu()


@torch.no_grad()
def measure(net: Codec, dataset: Any, idx: Tensor, *, rate: int, steps: int) -> ReconstructionMetrics:
    """Held-out SNR and mel distance of ``decode(encode(x))`` (clamped like ``decode``)."""
    from selfflow.plugins.audio.reference import log_mel

    device = next(net.parameters()).device
    signal = noise = dist = 0.0
    frames = 0
    for x in batches(dataset, idx):
        x = x.to(device)
        y = net.decode(net.encode(x))[..., : x.shape[-1]].clamp(-1.0, 1.0)
        signal += float(x.double().square().sum())
        noise += float((x - y).double().square().sum())
        mx, my = log_mel(x[:, 0], rate), log_mel(y[:, 0], rate)  # natural log of mel power
        dist += float((mx - my).abs().sum()) * 10.0 / math.log(10.0)
        frames += mx.numel()
    return ReconstructionMetrics(
        snr_db=10.0 * math.log10(max(signal, 1e-20) / max(noise, 1e-20)),
        mel_distance_db=dist / max(frames, 1),
        items=len(idx),
        steps=steps,
    )


def _report(m: ReconstructionMetrics, progress: bool) -> None:
    line = (
        f"audio/encodec: held-out reconstruction of {m.items} clips after {m.steps} steps: "
        f"SNR {m.snr_db:.2f} dB, mel distance {m.mel_distance_db:.2f} dB"
    )
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)


# ----------------------------------------------------------------------------- the in-run fit


def split(c: EncodecConfig, dataset: Any) -> tuple[Tensor, Tensor]:
    """Seeded (held-out, training) item indices: ``holdout`` clips, at most a fifth of the data."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(c.seed))
    n_hold = max(1, min(c.holdout, len(dataset) // 5))
    return order[:n_hold], order[n_hold:]


def _crops(dataset: Any, idx: Tensor, n: int, crop: int | None, g: torch.Generator) -> Tensor:
    """``n`` random training clips, each cut to ``crop`` samples at a random start (zero-padded when shorter)."""
    pick = idx[torch.randint(len(idx), (n,), generator=g)]
    out = []
    for i in pick:
        x = clip(dataset, i)
        if crop is not None:
            start = int(torch.randint(max(1, x.shape[-1] - crop + 1), (1,), generator=g))
            x = F.pad(x[..., start : start + crop], (0, max(0, crop - x.shape[-1])))
        out.append(x)
    m = max(x.shape[-1] for x in out)
    return torch.stack([F.pad(x, (0, m - x.shape[-1])) for x in out])


def spectral_loss(x: Tensor, y: Tensor, *, rate: int, scales: tuple[int, ...]) -> Tensor:
    """Multi-scale spectral loss of ``y`` against ``x`` (both ``(B, S)``): per FFT size ``n``,
    L1 of log magnitudes, spectral convergence and L1 of log-mel powers (hop n/4, Hann).

    The logs are floored at ``1e-4 n`` in magnitude (about 50 dB below a 0.1-amplitude tone's
    peak): digital silence (the padding around a spoken word) would otherwise dominate the loss,
    since any output noise there is a huge log error (measured: with a 1e-5 floor an 800-step
    fit spent itself on silence, held-out SNR -0.9 dB, digits unrecognisable)."""
    from selfflow.plugins.audio.reference import mel_filterbank

    terms = []
    for n in scales:
        if n > x.shape[-1]:
            continue
        floor = 1e-4 * n
        window = torch.hann_window(n, device=x.device)
        sx = torch.stft(x, n, n // 4, window=window, return_complex=True).abs()
        sy = torch.stft(y, n, n // 4, window=window, return_complex=True).abs()
        log_mag = (torch.log(sx + floor) - torch.log(sy + floor)).abs().mean()
        convergence = torch.linalg.vector_norm(sx - sy) / torch.linalg.vector_norm(sx).clamp_min(1e-8)
        fb = mel_filterbank(rate, n, min(80, n // 8)).to(x.device)
        mx, my = fb @ sx.square(), fb @ sy.square()
        mel = (torch.log(mx + floor**2) - torch.log(my + floor**2)).abs().mean()
        terms.append(log_mag + convergence + mel)
    if not terms:
        raise ValueError(f"audio/encodec: clips of {x.shape[-1]} samples are shorter than every stft_scale {scales}")
    return torch.stack(terms).mean()


def _lr(c: EncodecConfig, step: int) -> float:
    warmup = max(1, c.steps // 20)
    return c.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step, c.steps) / c.steps))


def _save_partial(partial: CacheEntry, net: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, done: int, log):
    state = opt.state_dict()
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()} | {"rng": g.get_state()}
    for i, per in state["state"].items():
        tensors |= {f"opt.{i}.{name}": torch.as_tensor(v) for name, v in per.items()}
    with partial.write() as w:
        w.save_tensors("partial.safetensors", tensors)
        w.set_meta({"format": FORMAT, "step": done, "param_groups": state["param_groups"], "log": log})


def _load_partial(partial: CacheEntry, net: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator):
    meta = partial.read_meta()
    tensors = partial.load_tensors("partial.safetensors")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    per: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            per.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": meta["param_groups"]})
    g.set_state(tensors["rng"])
    return int(meta["step"]), list(meta["log"])


def _train(c: EncodecConfig, dataset: Any, *, rate: int, partial: CacheEntry | None) -> tuple[Codec, list[dict]]:
    """Train the SEANet autoencoder; resumes from and writes ``partial`` (module docstring)."""
    from tqdm.auto import tqdm

    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(c.seed)
    _, train = split(c, dataset)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG left as it was
        torch.manual_seed(c.seed)
        net = build_codec(_arch(c, rate)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=c.lr, betas=(0.8, 0.99), weight_decay=0.0)
    done, log = 0, []
    if partial is not None and partial.exists():
        try:
            done, log = _load_partial(partial, net, opt, g)
        except (ValueError, KeyError, RuntimeError) as err:  # a partial fit is a convenience: start over
            warnings.warn(f"audio/encodec: ignoring the unreadable partial fit {partial.path} ({err})", stacklevel=3)
            done, log = 0, []
    crop = None if c.crop_seconds is None else max(1, round(c.crop_seconds * rate / c.hop)) * c.hop
    bar = tqdm(total=c.steps, initial=done, desc=f"fit {NAME}", unit="step", disable=not c.progress, mininterval=1.0)
    try:
        for step in range(done, c.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(c, step)
            x = _crops(dataset, train, c.batch_size, crop, g).to(device)
            y = net.decode(net.encode(x))[..., : x.shape[-1]]
            wave = (x - y).abs().mean()
            spec = spectral_loss(x[:, 0], y[:, 0], rate=rate, scales=c.stft_scales)
            loss = c.wave_weight * wave + c.spectral_weight * spec
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            done = step + 1
            bar.update()
            if step % 25 == 0 or done == c.steps:
                log.append(
                    {"event": "train", "step": done, "loss": loss.item(), "l1": wave.item(), "spectral": spec.item()}
                )
                bar.set_postfix(l1=f"{wave.item():.4f}", spectral=f"{spec.item():.3f}", refresh=False)
            if partial is not None and c.partial_every and done % c.partial_every == 0 and done < c.steps:
                _save_partial(partial, net, opt, g, done, log)
    except KeyboardInterrupt:
        if partial is not None and partial.exists():
            step_saved = partial.read_meta().get("step")
            bar.write(f"audio/encodec: interrupted; the partial fit at step {step_saved} is kept, fit again to resume")
        raise
    finally:
        bar.close()
    return net, log
