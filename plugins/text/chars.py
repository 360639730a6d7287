"""``text/chars``: strings -> a condition segment of character tokens.

Each character becomes one token: a one-hot vector over ``alphabet`` plus one *unknown*
entry (or, with ``dim``, a fixed seeded unit vector of that width). A batch is padded to
``max_len`` tokens with zeros and a ``valid`` mask; token ``i`` sits at
``core.types.sequence_positions`` (``t = 0``, ``h = w = i - max_len``: a 1-D sequence that
never shares a position with an image token). A run gives text as a condition (a stream's
``condition = ["text"]``): never noised, no loss, it only steers the generated segments
through attention.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from selfflow.core.types import Segment, sequence_positions

UNKNOWN = "\ufffd"  # what ``decode`` writes for the unknown token
DEFAULT_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " "


def _check_alphabet(instance, attribute, value: str) -> None:
    if not value:
        raise ValueError("alphabet is empty: give the characters to encode, e.g. 'abc...xyz0123456789'")
    dupes = sorted({c for c in value if value.count(c) > 1})
    if dupes:
        raise ValueError(f"alphabet repeats {dupes}: each character must appear once")
    if UNKNOWN in value:
        raise ValueError(f"alphabet must not contain {UNKNOWN!r}, which stands for unknown characters")


@attrs.frozen(kw_only=True)
class CharsConfig:
    """``alphabet``: the known characters (token ids in this order, then unknown);
    ``max_len``: tokens per string, the batch's padded length; ``on_unknown``: ``"map"``
    characters outside the alphabet to the unknown token, or ``"raise"`` an error;
    ``dim``: token width; ``None`` gives one-hot tokens (``len(alphabet) + 1`` wide), an int
    gives fixed unit vectors of that width (orthonormal when ``dim > len(alphabet)``) drawn
    from ``seed``."""

    alphabet: str = attrs.field(default=DEFAULT_ALPHABET, validator=_check_alphabet)
    max_len: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    on_unknown: str = attrs.field(default="map", validator=attrs.validators.in_(("map", "raise")))
    dim: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(2)))
    seed: int = 0


def _table(config: CharsConfig) -> Tensor:
    """``(V + 1, channels)``: one row per character, the last for unknown; unit rows."""
    vocab = len(config.alphabet) + 1
    if config.dim is None:
        return torch.eye(vocab)
    g = torch.Generator().manual_seed(config.seed)
    x = torch.randn(max(config.dim, vocab), config.dim, generator=g, dtype=torch.float64)
    if config.dim >= vocab:
        q, _ = torch.linalg.qr(x)  # (dim, dim) orthogonal: exactly separable rows
        rows = q[:vocab]
    else:  # fewer dimensions than characters: random directions, told apart by the largest dot product
        rows = x[:vocab] / x[:vocab].norm(dim=1, keepdim=True)
    return rows.float().contiguous()


class CharTokenizer:
    """A list of strings <-> ``Segment(tokens (B, max_len, channels), valid (B, max_len))``."""

    modality = "text"
    mask_ratio = 0.25  # used only if a run generates text

    def __init__(self, config: CharsConfig | None = None) -> None:
        self.config = config or CharsConfig()
        self.index = {c: i for i, c in enumerate(self.config.alphabet)}
        self.unknown_id = len(self.config.alphabet)
        self.table = _table(self.config)

    @classmethod
    def from_config(cls, config: CharsConfig | None, **context) -> CharTokenizer:
        return cls(config)

    @property
    def channels(self) -> int:
        return self.table.shape[1]

    def fit(self, dataset, *, cache_dir: str | None = None, generator: torch.Generator | None = None) -> None:
        """Nothing to learn."""

    def cache_key(self) -> str:
        c = self.config
        return f"text/chars:{c.alphabet!r}:{c.max_len}:{c.on_unknown}:{c.dim}:{c.seed}"

    def ids(self, text: str) -> list[int]:
        """Token ids of one string; unknown characters per ``on_unknown``."""
        if len(text) > self.config.max_len:
            raise ValueError(
                f"text {text!r} has {len(text)} characters but max_len is {self.config.max_len}; set "
                f"max_len = {len(text)} or more in the text/chars tokenizer_options ([modalities.{self.modality}]), "
                "or shorten the text"
            )
        ids = [self.index.get(c, self.unknown_id) for c in text]
        if self.config.on_unknown == "raise" and self.unknown_id in ids:
            missing = sorted({c for c in text if c not in self.index})
            raise ValueError(
                f"text {text!r} has characters {missing} outside the alphabet; add them to alphabet in the "
                f'text/chars tokenizer_options ([modalities.{self.modality}]), or set on_unknown = "map" there'
            )
        return ids

    def encode(self, media: Sequence[str]) -> Segment:
        if isinstance(media, str) or not all(isinstance(t, str) for t in media):
            raise TypeError(
                f"text/chars encodes a list of strings, got {type(media).__name__}; wrap one string as [text]"
            )
        b, n = len(media), self.config.max_len
        if media and max(map(len, media)) > n:  # name the longest, so one fix covers the whole batch
            self.ids(max(media, key=len))
        ids = torch.zeros(b, n, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        for row, text in enumerate(media):
            row_ids = self.ids(text)
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            valid[row, : len(row_ids)] = True
        tokens = self.table[ids] * valid[..., None]  # padding is all zeros
        positions = sequence_positions(n, batch=b)
        return Segment(modality=self.modality, tokens=tokens, positions=positions, valid=valid)

    def decode(self, segment: Segment) -> list[str]:
        """The strings: each valid token's nearest character (largest dot product)."""
        ids = (segment.tokens.float() @ self.table.to(segment.tokens.device).T).argmax(-1).cpu()
        valid = segment.valid_mask().cpu()
        chars = self.config.alphabet + UNKNOWN
        return ["".join(chars[i] for i in row[keep].tolist()) for row, keep in zip(ids, valid)]
