"""Typed frozen records that travel between a search strategy and the run (cf. Optuna's FrozenTrial).

A strategy *asks* the run to judge a `Batch` of `Proposal`s and is *told* the judged
`Candidate`s; it never sees the database. When a strategy finishes a generation it hands back a
`Generation`, whose statistics the run stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from search_space.genome import Genome


@dataclass(frozen=True)
class Proposal:
    """One candidate to judge, made by the strategy. `slot` names it deterministically within the
    run ("init:17", "t2:p3:m5:a1"); the strategy makes its genome with `random.Random(f"{seed}:{slot}")`,
    so a resumed run regenerates exactly the same candidate. The judge runs no strategy code."""

    slot: str
    genome: Genome | None  # None: the mutation could not make a child; `invalid` says why
    kind: str | None = None  # the mutation's kind (None for a fresh random or builtin genome)
    invalid: str | None = None  # the MutationError text (stored as the row's error; its kind = text before ':')
    timestep: int = 0  # the strategy's generation (the `timestep` column; 0 = initial)
    attempt: int = 0  # the try of this slot
    parent_id: int | None = None
    lineage: Mapping[str, int] = field(default_factory=dict)  # the strategy's own columns (GA: particle, mutation)

    def columns(self) -> dict[str, Any]:
        """The proposal's fixed database columns: timestep and attempt, and for a child its parent
        and the strategy's lineage columns."""
        cols: dict[str, Any] = {"timestep": self.timestep, "attempt": self.attempt}
        if self.parent_id is not None:
            cols.update(parent_id=self.parent_id, **self.lineage)
        return cols


@dataclass(frozen=True)
class Batch:
    """Proposals judged together; `label` is what the progress bar shows meanwhile. `initial`: the
    initial population (judged in chunks of `chunk`; later batches in chunks of `timestep_chunk`)."""

    label: str
    proposals: tuple[Proposal, ...]
    initial: bool = False


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
    attempt: int = 0  # the try of its slot

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Candidate:
        """From a stored row (or `to_json`'s dict)."""
        return cls(
            id=row["id"], slot=row["slot"], status=row["status"], genome=row["genome"],
            genome_hash=row.get("genome_hash"), fitness=row.get("fitness"), fidelity=int(row.get("fidelity", 1)),
            lr=row.get("lr"),
            timestep=row.get("timestep") or 0, parent_id=row.get("parent_id"),
            expression=row.get("expression"), attempt=row.get("attempt") or 0,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_row` reads it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["genome"] = dict(self.genome)
        return d

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
