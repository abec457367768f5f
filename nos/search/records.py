"""Typed frozen records that travel between a search strategy and the run (cf. Optuna's FrozenTrial).

A strategy *asks* the run to judge a `Batch` of `Proposal`s and is *told* the judged
`Candidate`s; it never sees the database. When a strategy finishes a generation it hands back a
`Generation`, whose statistics the run stores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from search_space.genome import Genome

# make(rng) -> (genome, mutation kind or None); raises search_space.mutation.MutationError
Maker = Callable[[random.Random], "tuple[Genome, str | None]"]


@dataclass(frozen=True)
class Proposal:
    """One candidate to create and judge. `slot` names it deterministically within the run
    ("init:17", "t2:p3:m5:a1"); its genome is `make(random.Random(f"{seed}:{slot}"))`, so a
    resumed run regenerates exactly the same candidate."""

    slot: str
    make: Maker
    timestep: int = 0
    attempt: int = 0
    parent_id: int | None = None
    particle: int | None = None
    mutation: int | None = None

    def columns(self) -> dict[str, Any]:
        """The proposal's fixed database columns (lineage: parent, particle, timestep, ...)."""
        cols: dict[str, Any] = {"timestep": self.timestep, "attempt": self.attempt}
        if self.parent_id is not None:
            cols.update(parent_id=self.parent_id, particle=self.particle, mutation=self.mutation)
        return cols


@dataclass(frozen=True)
class Batch:
    """Proposals judged together; `label` is what the progress bar shows meanwhile."""

    label: str
    proposals: tuple[Proposal, ...]


@dataclass(frozen=True)
class Candidate:
    """A judged candidate, as stored (read-only)."""

    id: int
    slot: str
    status: str
    genome: Mapping[str, Any]
    genome_hash: str | None
    fitness: float | None
    fidelity: int  # 1: full search fitness; 0: a cheap first stage's only (ranks below every full one)
    lr: float | None
    timestep: int
    parent_id: int | None
    expression: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Candidate:
        return cls(
            id=row["id"], slot=row["slot"], status=row["status"], genome=row["genome"],
            genome_hash=row.get("genome_hash"), fitness=row.get("fitness"), fidelity=int(row.get("fidelity", 1)),
            lr=row.get("lr"),
            timestep=row.get("timestep") or 0, parent_id=row.get("parent_id"),
            expression=row.get("expression"),
        )

    @property
    def evaluated(self) -> bool:
        return self.status == "evaluated"

    def rank(self) -> tuple[int, float, int]:
        """Sort key of evaluated candidates, best first: full fidelity, lower fitness, older."""
        assert self.fitness is not None
        return (-self.fidelity, self.fitness, self.id)


@dataclass(frozen=True)
class Generation:
    """A finished generation (the initial population is timestep 0) and its statistics."""

    timestep: int
    candidates: int
    passed: int
    duplicates: int
    invalid: int
    errors: int
    best_fitness: float | None
    median_fitness: float | None

    def row(self) -> dict[str, Any]:
        return {
            "timestep": self.timestep, "candidates": self.candidates, "passed": self.passed,
            "duplicates": self.duplicates, "invalid": self.invalid, "errors": self.errors,
            "best_fitness": self.best_fitness, "median_fitness": self.median_fitness,
        }
