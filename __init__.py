"""selfflow: Self-Flow generators (self-supervised flow matching with dual timesteps and an
EMA teacher) on token sequences from any modality.

Importing this package is cheap: it re-exports the core value types only.
"""

from selfflow.core.types import LossBreakdown, Role, Segment, Timesteps, TokenBatch

__all__ = ["LossBreakdown", "Role", "Segment", "Timesteps", "TokenBatch"]
__version__ = "0.1.0"
