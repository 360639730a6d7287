"""Resampling with soxr (the SoX resampler: band-limited, linear phase), imported here lazily.

``resample(x, from_rate, to_rate)``: ``(samples,)`` or ``(channels, samples)`` float32 ->
the same at ``to_rate``, ``round(samples * to_rate / from_rate)`` samples long (soxr's own
length rule), quality ``"HQ"`` (soxr's default) unless told otherwise. Nothing here is
hand-written: a resampler is easy to get subtly wrong (aliasing, phase, edge effects).
"""

from __future__ import annotations

import numpy as np

QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")


def _soxr():
    try:
        import soxr
    except ImportError as err:
        raise ImportError("resampling audio needs the 'soxr' package: pip install 'selfflow[audio]'") from err
    return soxr


def resample(x: np.ndarray, from_rate: int, to_rate: int, *, quality: str = "HQ") -> np.ndarray:
    """``x`` (``(samples,)`` or ``(channels, samples)``) from ``from_rate`` to ``to_rate`` Hz, float32."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {from_rate} -> {to_rate}")
    if quality not in QUALITIES:
        raise ValueError(f"resample: quality must be one of {QUALITIES}, got {quality!r}")
    x = np.asarray(x, dtype=np.float32)
    if from_rate == to_rate:
        return x
    soxr = _soxr()
    if x.ndim == 1:
        return soxr.resample(x, from_rate, to_rate, quality=quality).astype(np.float32, copy=False)
    if x.ndim == 2:  # soxr wants (samples, channels)
        y = soxr.resample(np.ascontiguousarray(x.T), from_rate, to_rate, quality=quality)
        return np.ascontiguousarray(y.T, dtype=np.float32)
    raise ValueError(f"resample takes (samples,) or (channels, samples), got shape {x.shape}")
