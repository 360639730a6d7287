"""Roles chosen per batch: which whole segments are clean conditions.

A tokenizer encodes media into ``Segment``s with the default role; a stream of the run says
which of its modalities are always conditions (text for text-to-image) and with which
probability each generated modality is instead *given* clean (any-to-any training: with
probability p the video segment is a condition and the model learns audio from video). A
``ConditionRule`` applies both to a batch before the timestep scheduler runs, so condition
tokens sit at level 0 and carry no loss (``DualTimestepScheduler`` and the objectives read
the roles; nothing else changes).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from selfflow.core.types import Role, TokenBatch


def _check_probabilities(instance: ConditionRule, attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
    for name, p in value.items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"condition probability of {name!r} is {p}; it must be in [0, 1]")
    both = sorted(set(value) & set(instance.always))
    if both:
        raise ValueError(f"{both} are always conditions and also have a condition probability; give one or the other")


@attrs.frozen(kw_only=True)
class ConditionRule:
    """``always``: modalities that are conditions in every batch; ``probability``: generated
    modality -> probability that its whole segment is a condition in a batch.

    One draw per segment per batch (all samples of a batch share the roles, since a role is
    a segment's). When the draws would leave no generated segment, one of the drawn
    segments, chosen uniformly, stays generated: every batch trains something. The draws
    come from ``generator`` only, so a source that seeds it from (seed, draw index) gives
    every rank the same roles and repeats them exactly on resume.
    """

    always: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    probability: Mapping[str, float] = attrs.field(factory=dict, converter=dict, validator=_check_probabilities)

    @property
    def is_random(self) -> bool:
        return any(p > 0 for p in self.probability.values())

    def roles(self, modalities: tuple[str, ...], generator: torch.Generator | None = None) -> tuple[Role, ...]:
        """The role of each segment (``modalities`` in batch order)."""
        roles = [Role.CONDITION if m in self.always else Role.GENERATE for m in modalities]
        if not any(r is Role.GENERATE for r in roles):
            raise ValueError(f"every segment of the batch ({list(modalities)}) is a condition: nothing to generate")
        if not self.is_random:
            return tuple(roles)
        if generator is None:
            raise ValueError("a ConditionRule with condition probabilities needs a generator")
        drawn = []
        for i, m in enumerate(modalities):
            p = float(self.probability.get(m, 0.0))
            # a fixed number of draws per batch (one per segment) keeps the generator's position
            # independent of the outcome
            u = float(torch.rand((), generator=generator))
            if roles[i] is Role.GENERATE and u < p:
                drawn.append(i)
        pick = float(torch.rand((), generator=generator))
        if len(drawn) == sum(r is Role.GENERATE for r in roles):
            drawn.pop(min(int(pick * len(drawn)), len(drawn) - 1))
        for i in drawn:
            roles[i] = Role.CONDITION
        return tuple(roles)

    def __call__(self, batch: TokenBatch, *, generator: torch.Generator | None = None) -> TokenBatch:
        roles = self.roles(batch.modalities, generator)
        if all(seg.role is r for seg, r in zip(batch.segments, roles)):
            return batch
        segments = tuple(attrs.evolve(seg, role=r) for seg, r in zip(batch.segments, roles))
        return TokenBatch(segments=segments, labels=batch.labels)
