"""``image/sd-vae``: a pretrained diffusers ``AutoencoderKL`` loaded from a local directory.

The directory is what ``AutoencoderKL.save_pretrained`` writes (``config.json`` +
``diffusion_pytorch_model.safetensors``), or a pipeline folder with ``subfolder="vae"``.
Nothing is downloaded (``local_files_only=True``) and nothing is unpickled (safetensors only).
``diffusers`` is an optional extra (``selfflow[sd-vae]``), imported only when a model loads,
so importing this module costs nothing.

Tokens are the posterior mean normalised the way diffusers pipelines do it, from the model's
own config: ``(z - shift_factor) * scaling_factor`` (``shift_factor`` 0 when absent), or
``(z - latents_mean) * scaling_factor / latents_std`` when the config has per-channel
statistics (SDXL-style). ``decode`` inverts that and clamps to [-1, 1].
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment
from selfflow.plugins.image import latents
from selfflow.plugins.image.patch import check_image_batch

WEIGHTS = "diffusion_pytorch_model.safetensors"


@attrs.frozen(kw_only=True)
class SDVAEConfig:
    """``path``: local directory of the model; ``subfolder``: e.g. ``"vae"`` inside a full
    pipeline directory; ``sample``: encode with a posterior sample instead of the mean."""

    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    subfolder: str | None = None
    sample: bool = False


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("image/sd-vae needs the 'diffusers' package: pip install 'selfflow[sd-vae]'") from err
    return diffusers


def load_autoencoder(path: str | Path, subfolder: str | None = None):
    """A diffusers ``AutoencoderKL`` from a local directory, in eval mode, frozen, on CPU."""
    where = Path(path) / subfolder if subfolder else Path(path)
    layout = (
        f"a diffusers AutoencoderKL directory holding config.json and {WEIGHTS} "
        "(as written by AutoencoderKL.save_pretrained; for a whole pipeline set subfolder='vae')"
    )
    if not where.is_dir():
        raise FileNotFoundError(f"image/sd-vae: {where} is not a directory; it must be {layout}")
    missing = [name for name in ("config.json", WEIGHTS) if not (where / name).is_file()]
    if missing:
        hint = ""
        if WEIGHTS in missing and (where / "diffusion_pytorch_model.bin").exists():
            hint = "; it has pickled .bin weights, which are never loaded: convert them to safetensors"
        raise FileNotFoundError(f"image/sd-vae: {where} lacks {', '.join(missing)}; it must be {layout}{hint}")
    diffusers = _diffusers()
    vae = diffusers.AutoencoderKL.from_pretrained(
        str(where), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
    )
    return vae.eval().requires_grad_(False)


def latent_normalisation(config) -> tuple[Tensor, Tensor]:
    """``(shift, scale)`` per latent channel such that tokens are ``(z - shift) / scale``."""
    ch = config.latent_channels
    factor = float(config.scaling_factor)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        return torch.tensor(mean, dtype=torch.float32).reshape(ch), torch.tensor(std, dtype=torch.float32).reshape(
            ch
        ) / factor
    shift = getattr(config, "shift_factor", None) or 0.0
    return torch.full((ch,), float(shift)), torch.full((ch,), 1.0 / factor)


class SDVAETokenizer:
    """Image ``(B, C, H, W)`` in [-1, 1] <-> tokens ``(B, (H/f)(W/f), latent_channels)``,
    f = 2 ** (number of encoder blocks - 1) (8 for Stable Diffusion's VAE)."""

    modality = "image"
    mask_ratio = 0.25  # the paper's image mask ratio

    def __init__(self, config: SDVAEConfig) -> None:
        self.config = config
        self.vae = None  # loaded by fit / load: construction touches no file
        self.shift = self.scale = None

    @classmethod
    def from_config(cls, config: SDVAEConfig, **context) -> SDVAETokenizer:
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> SDVAETokenizer:
        """Loaded now; ``options`` are the other ``SDVAEConfig`` fields."""
        tok = cls(SDVAEConfig(path=str(path), **options))
        tok.load()
        return tok

    def load(self) -> None:
        if self.vae is None:
            self.vae = load_autoencoder(self.config.path, self.config.subfolder)
            self.shift, self.scale = latent_normalisation(self.vae.config)

    @property
    def channels(self) -> int:
        self.load()
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        self.load()
        return int(self.vae.config.in_channels)

    @property
    def downsample(self) -> int:
        self.load()
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Pretrained: loads the model and checks the data fits it; nothing is trained."""
        if "image" not in getattr(dataset, "modalities", ()):
            raise ValueError(f"image/sd-vae encodes images, the dataset has {getattr(dataset, 'modalities', None)!r}")
        self.load()
        check_image_batch(torch.as_tensor(dataset[0].media["image"])[None], self.image_channels, self.downsample)

    def cache_key(self) -> str | None:
        """The weights' path and options; ``None`` when latents are sampled (every encoding differs)."""
        if self.config.sample:
            return None
        from selfflow.core.files import content_key

        # the weights' bytes, not just their path: other weights saved at the same path must not
        # reuse stale encodings
        folder = Path(self.config.path) / (self.config.subfolder or "")
        digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*")) if f.is_file()}
        return content_key("image/sd-vae", self.config, digests)

    def _ready(self, device: torch.device) -> None:
        self.load()
        if self.shift.device != device:
            self.vae.to(device)
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)

    @torch.no_grad()
    def encode(self, media: Tensor) -> Segment:
        check_image_batch(media, self.image_channels, self.downsample)
        self._ready(media.device)
        posterior = self.vae.encode(media.float()).latent_dist
        z = posterior.sample() if self.config.sample else posterior.mean
        return latents.to_segment(z, self.shift, self.scale, modality=self.modality)

    @torch.no_grad()
    def decode(self, segment: Segment) -> Tensor:
        self._ready(segment.tokens.device)
        z = latents.to_latents(segment, self.shift, self.scale, channels=self.channels, name="image/sd-vae")
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)
