"""selfflow: Self-Flow generators (self-supervised flow matching with dual timesteps and an
EMA teacher) on token sequences from any modality.

Importing this package is cheap: it re-exports the core value types only. First it sets one
process default that must precede torch's import: OpenMP threads that wait spin briefly
before they sleep (``GOMP_SPINCOUNT=10000`` unless the user set a wait policy), so they waste
less of a CPU that other processes share (``core/runtime.py``).
"""

from selfflow.core.runtime import shorten_spin_wait as _shorten_spin_wait

_shorten_spin_wait()  # every selfflow module imports this package first, so this runs before torch loads

from selfflow.core.types import LossBreakdown, Role, Segment, Timesteps, TokenBatch  # noqa: E402

__all__ = ["LossBreakdown", "Role", "Segment", "Timesteps", "TokenBatch"]
__version__ = "0.1.0"
