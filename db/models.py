"""The tables every nos run is recorded in.

Column names are a contract with outside tools (DESIGN.md, "Database"): add columns
freely, never rename one. Three storage rules live here, in the column types, so no
caller can forget them: datetimes are UTC, floats are finite or NULL, JSON is
canonical text (``json.dumps(sort_keys=True)``).
"""

from __future__ import annotations

import json
import math
import operator
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

APP = "nos"
SCHEMA_VERSION = "1"

RUN_STATUSES = ("running", "finished", "interrupted", "failed")
INDIVIDUAL_STATUSES = ("evaluated", "rejected_integrity", "invalid", "error", "duplicate")


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (the only clock the database sees)."""
    return datetime.now(timezone.utc)


def plain_json(value: Any) -> Any:
    """Turn ``value`` into plain JSON data: non-finite floats become None, numpy-like
    scalars become Python numbers, tuples become lists.

    Raises TypeError for anything else, so an object never slips in as its repr.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return plain_json(value.item())
    raise TypeError(f"{type(value).__name__} is not JSON data")


def dump_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no NaN/inf.

    A ``str`` is taken to be JSON text already; it is parsed (so garbage is refused)
    and re-dumped canonically.
    """
    if isinstance(value, str):
        value = json.loads(value)
    return json.dumps(plain_json(value), sort_keys=True, allow_nan=False)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (portable across SQLite and PostgreSQL), read back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # naive means UTC already
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class FiniteFloat(TypeDecorator[float]):
    """A float column that stores NaN and +-inf as NULL (a non-finite loss is "no loss")."""

    impl = Float
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> float | None:
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None


class Int(TypeDecorator[int]):
    """An integer column that accepts numpy/torch integers (the GA hands those out)."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else operator.index(value)


class JSONText(TypeDecorator[Any]):
    """JSON stored as canonical text, so hashes and diffs of the raw column are stable."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else dump_json(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


def _one_of(table: str, column: str, values: tuple[str, ...]) -> CheckConstraint:
    """A CHECK constraint, so outside writers cannot invent statuses either."""
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, float: FiniteFloat, int: Int}


class Meta(Base):
    """Key/value stamps that tell a nos database from any other (``app``, ``schema_version``)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Run(Base):
    """One search: its configuration, seed and how it ended."""

    __tablename__ = "runs"
    __table_args__ = (_one_of("runs", "status", RUN_STATUSES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    config: Mapped[Any] = mapped_column(JSONText)
    status: Mapped[str] = mapped_column(String(32), default="running")
    seed: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Individual(Base):
    """Every candidate ever generated, rejected ones included, so lineages are complete.

    ``slot`` is the GA's deterministic name for the place a candidate was made in
    (e.g. ``init:17``, ``p3:t2:m5:a0``); a resumed run skips slots already present.
    ``expression``/``latex``/``genome_hash`` are NULL when the symbolic form could not
    be built (an ``invalid`` or ``error`` genome).
    """

    __tablename__ = "individuals"
    __table_args__ = (
        UniqueConstraint("run_id", "slot", name="uq_individuals_run_slot"),
        Index("ix_individuals_run_status_fitness", "run_id", "status", "fitness"),
        _one_of("individuals", "status", INDIVIDUAL_STATUSES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"), index=True)
    particle: Mapped[int | None]
    timestep: Mapped[int] = mapped_column(default=0)
    mutation: Mapped[int | None]
    attempt: Mapped[int] = mapped_column(default=0)
    slot: Mapped[str] = mapped_column(String(128))
    genome: Mapped[Any] = mapped_column(JSONText)
    expression: Mapped[str | None] = mapped_column(Text)
    latex: Mapped[str | None] = mapped_column(Text)
    genome_hash: Mapped[str | None] = mapped_column(String(128), index=True)
    # hash before the integrity check flipped the update's sign (same candidate, other spelling)
    unflipped_hash: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(32))
    fitness: Mapped[float | None]
    lr: Mapped[float | None]
    sign: Mapped[int | None]
    mutation_kind: Mapped[str | None] = mapped_column(String(64))
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("individuals.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[Individual | None] = relationship(
        remote_side="Individual.id", foreign_keys="Individual.parent_id"
    )
    evaluations: Mapped[list[Evaluation]] = relationship(
        back_populates="individual", cascade="all, delete-orphan", order_by="Evaluation.id"
    )


class Evaluation(Base):
    """One training run of a candidate on one task/horizon/seed; ``loss`` NULL = diverged."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    individual_id: Mapped[int] = mapped_column(
        ForeignKey("individuals.id", ondelete="CASCADE"), index=True
    )
    task: Mapped[str] = mapped_column(String(64))
    horizon: Mapped[float]
    lr: Mapped[float | None]  # None: no lr of the grid gave a finite loss
    seed: Mapped[int]
    loss: Mapped[float | None]
    steps: Mapped[int]
    seconds: Mapped[float]

    individual: Mapped[Individual] = relationship(back_populates="evaluations")


class Baseline(Base):
    """A reference optimizer's result (Adam, RandOpt, ...); ``hparam`` is its lr or sigma."""

    __tablename__ = "baselines"
    __table_args__ = (Index("ix_baselines_task_horizon", "task", "horizon"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(64))
    horizon: Mapped[float]
    seed: Mapped[int]
    loss: Mapped[float | None]
    hparam: Mapped[float | None]
    budget: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TimestepStat(Base):
    """Per-timestep summary of a run, written once per timestep (rewritten on resume)."""

    __tablename__ = "timestep_stats"
    __table_args__ = (UniqueConstraint("run_id", "timestep", name="uq_timestep_stats_run_timestep"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    timestep: Mapped[int]
    candidates: Mapped[int] = mapped_column(default=0)
    passed: Mapped[int] = mapped_column(default=0)
    duplicates: Mapped[int] = mapped_column(default=0)
    invalid: Mapped[int] = mapped_column(default=0)
    errors: Mapped[int] = mapped_column(default=0)
    best_fitness: Mapped[float | None]
    median_fitness: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Claim(Base):
    """Which process is judging which chunk of a run, so cooperating processes split the work.

    Several coordinators may share one run (PostgreSQL). Before judging a chunk a process
    inserts ``(run_id, key)``; the unique constraint makes exactly one of them the owner.
    The owner refreshes ``heartbeat`` while it works; a claim whose heartbeat stops moving
    belongs to a dead process and may be taken over.
    """

    __tablename__ = "claims"
    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_claims_run_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(200))
    heartbeat: Mapped[int] = mapped_column(default=0)
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
