"""DEAP's `creator` classes for nos, registered on first use (not when a module is imported)."""

from __future__ import annotations

from typing import Any


def candidate_class() -> Any:
    """DEAP individual wrapping a judged `Candidate`: `.candidate` and `.fitness` = (fidelity, fitness)."""
    from deap import base, creator

    if not hasattr(creator, "NosCandidate"):
        # (fidelity, fitness): a full-fidelity fitness beats any cheap one, then lower is better
        creator.create("NosFitness", base.Fitness, weights=(1.0, -1.0))
        creator.create("NosCandidate", _Wrapped, fitness=creator.NosFitness)
    return creator.NosCandidate


class _Wrapped:
    """Holds a candidate; DEAP's hall of fame deep-copies individuals, which this keeps cheap."""

    def __init__(self, candidate: Any) -> None:
        self.candidate = candidate

    @property
    def genome_hash(self) -> str | None:
        return self.candidate.genome_hash

    def __deepcopy__(self, memo: dict) -> Any:
        new = type(self)(self.candidate)
        new.fitness.values = self.fitness.values  # type: ignore[attr-defined]
        return new
