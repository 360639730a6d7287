"""Shared fixtures: seeded generators, a small ``TokenBatch`` builder, a global-RNG guard.

Helpers are handed out as fixtures (pytest runs with ``--import-mode=importlib``, so test
modules cannot import from this file).
"""

from __future__ import annotations

import selfflow  # noqa: F401 - first: it sets OpenMP's spin count before torch loads (core/runtime.py)

# isort: split

import contextlib
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from selfflow.core.types import Role, Segment, TokenBatch, grid_positions

# (modality, tokens, channels, role); a role may be given as "generate" / "condition"
SegmentSpec = tuple[str, int, int, Role | str]


def _build_batch(
    specs: Sequence[SegmentSpec] = (("image", 6, 3, Role.GENERATE),),
    *,
    batch: int = 4,
    num_classes: int | None = None,
    padded: dict[str, int] | None = None,
    seed: int = 0,
) -> TokenBatch:
    """A seeded batch. ``padded`` maps a modality to how many trailing tokens of the *last*
    sample are padding (``valid = False``); ``num_classes`` adds labels ``b % num_classes``."""
    g = torch.Generator().manual_seed(seed)
    segments = []
    for modality, n, c, role in specs:
        valid = None
        if padded and modality in padded:
            valid = torch.ones(batch, n, dtype=torch.bool)
            valid[-1, n - padded[modality] :] = False
        segments.append(
            Segment(
                modality=modality,
                tokens=torch.randn(batch, n, c, generator=g),
                positions=grid_positions(1, 1, n, batch=batch),
                role=Role(role) if isinstance(role, str) else role,
                valid=valid,
            )
        )
    labels = None if num_classes is None else torch.arange(batch) % num_classes
    return TokenBatch(segments=segments, labels=labels)


@pytest.fixture
def make_batch() -> Callable[..., TokenBatch]:
    """``make_batch(specs, batch=4, num_classes=None, padded=None, seed=0)``."""
    return _build_batch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@contextlib.contextmanager
def _global_rng_untouched() -> Iterator[None]:
    """Fails if the code inside draws from torch's global generator (every draw must take
    the explicit ``torch.Generator``)."""
    before = torch.get_rng_state()
    yield
    after = torch.get_rng_state()
    assert torch.equal(before, after), "torch's global RNG was used: a random draw ignored the explicit generator"


@pytest.fixture
def global_rng_untouched() -> Callable[[], contextlib.AbstractContextManager[None]]:
    return _global_rng_untouched


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores run several times faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """``single_thread`` for a whole module (use with ``pytestmark = pytest.mark.usefixtures(...)``),
    so module-scoped fixtures that train small networks also run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Subset:
    """The first ``n`` items of a dataset, with its own fingerprint (so caches keyed by the
    data hash tell it apart from the whole dataset)."""

    def __init__(self, base, n: int) -> None:
        self.base, self.n = base, n
        self.modalities = getattr(base, "modalities", ("image",))
        self.num_classes, self.class_names = base.num_classes, base.class_names

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}[:{self.n}]"


@pytest.fixture(scope="session")
def subset() -> type[_Subset]:
    """``subset(dataset, n)``: the first ``n`` items of ``dataset``."""
    return _Subset
