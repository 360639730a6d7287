"""``audio/frames``: plain waveform frames as tokens (exact round trip), for baselines and tests.

Audio ``(B, 1, samples)`` in [-1, 1] -> tokens ``(B, N, frame)`` with ``N = ceil(samples /
frame)`` (hop = frame length: frames do not overlap; the last frame is zero-padded). Token
``k`` holds samples ``[k * frame, (k + 1) * frame)`` and sits at ``t = time_ticks(k,
sample_rate / frame)`` on the shared time axis (``h = w = 0``): 320 samples at 16 kHz are 50
frames/s, 60 ticks apart. A list of clips of different lengths (``pad = "none"`` data) gives
``valid[b, k] = k * frame < length_b``. ``decode`` concatenates the frames back, zeroes
invalid ones and clamps to [-1, 1]; on clips whose length is a multiple of ``frame`` it
returns the input exactly.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment, time_ticks
from selfflow.plugins.audio.clips import audio_batch, check_rate, with_rate

MASK_RATIO = 0.50  # the paper's audio mask ratio, for every audio tokenizer


@attrs.frozen(kw_only=True)
class FramesConfig:
    """``sample_rate``: Hz of the clips it encodes; ``frame``: samples per token (and hop)."""

    sample_rate: int = attrs.field(default=16000, validator=attrs.validators.ge(1000))
    frame: int = attrs.field(default=320, validator=attrs.validators.ge(1))


def frame_positions(n: int, rate_hz: float, *, batch: int, device) -> Tensor:
    """``(batch, n, 3)`` long positions of ``n`` audio frames at ``rate_hz``: ``(time_ticks(k), 0, 0)``."""
    pos = torch.zeros(n, 3, dtype=torch.long, device=device)
    pos[:, 0] = time_ticks(torch.arange(n), rate_hz).to(device)
    return pos[None].expand(batch, -1, -1)


def frame_valid(lengths: Tensor, n: int, hop: int) -> Tensor | None:
    """``(B, n)`` bool, True for frames that start inside each clip; ``None`` when all are."""
    valid = torch.arange(n, device=lengths.device)[None] * hop < lengths[:, None]
    return None if bool(valid.all()) else valid


def frames_of(segment: Segment, who: str) -> int:
    """The number of frames ``N`` of an audio segment, after checking its positions are 1-D in time."""
    if segment.positions.shape[1] and bool((segment.positions[..., 1:] != 0).any()):
        raise ValueError(f"{who} decodes audio segments (h = w = 0), got positions with spatial coordinates")
    return segment.num_tokens


class FramesTokenizer:
    """Audio ``(B, 1, samples)`` <-> tokens ``(B, ceil(samples / frame), frame)``."""

    modality = "audio"
    mask_ratio = MASK_RATIO

    def __init__(self, config: FramesConfig | None = None) -> None:
        self.config = config or FramesConfig()

    @classmethod
    def from_config(cls, config: FramesConfig | None, **context) -> FramesTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        return self.config.frame

    @property
    def frame_rate(self) -> float:
        """Tokens per second."""
        return self.config.sample_rate / self.config.frame

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Nothing to learn; checks the dataset's sample rate matches."""
        check_rate(dataset, self.config.sample_rate, "audio/frames")

    def cache_key(self) -> str:
        return f"audio/frames:{self.config.sample_rate}:{self.config.frame}"

    def encode(self, media) -> Segment:
        x, lengths = audio_batch(media, who="audio/frames")
        f = self.config.frame
        b, s = x.shape
        n = -(-s // f)
        x = torch.nn.functional.pad(x, (0, n * f - s))
        return Segment(
            modality=self.modality,
            tokens=x.reshape(b, n, f).contiguous(),
            positions=frame_positions(n, self.frame_rate, batch=b, device=x.device),
            valid=frame_valid(lengths, n, f),
        )

    def decode(self, segment: Segment) -> Tensor:
        """``(B, 1, N * frame)`` float in [-1, 1] (tagged with its rate, ``clips.with_rate``);
        invalid frames are silence."""
        b, n, c = segment.tokens.shape
        if c != self.config.frame:
            raise ValueError(f"audio/frames decodes {self.config.frame}-sample frames, got {c}-channel tokens")
        frames_of(segment, "audio/frames")
        tokens = segment.tokens.float()
        if segment.valid is not None:
            tokens = tokens * segment.valid[..., None]
        return with_rate(tokens.reshape(b, 1, n * c).clamp(-1.0, 1.0), self.config.sample_rate)
