"""The tables every nos run is recorded in.

Column names are a contract with outside tools (the `runs`, `individuals`, `evaluations`
and `baselines` columns the README's queries name): add columns freely, never rename one.
Three storage rules live in the column types (`db.types`), so no caller can forget them:
datetimes are UTC, floats are finite or NULL, JSON is canonical text nested at most
``MAX_JSON_DEPTH`` deep, checked on the way back too (`check_stored`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# the column types and their checks, re-exported: the store and the memory backend import them from here
from db.types import (  # noqa: F401
    MAX_JSON_DEPTH,
    FiniteFloat,
    Int,
    JSONText,
    StoredValueError,
    UTCDateTime,
    check_stored,
    dump_json,
    load_json,
    utcnow,
)

APP = "nos"
# 2: evaluations.split, baselines.split and .protocol, individuals.fidelity
# 3: evaluations.task_key and baselines.task_key
# 4: one baselines row per key (`BASELINE_KEY`, unique index uq_baselines_key): concurrent
#    writers of one protocol's rows store one copy (duplicates removed by the upgrade)
SCHEMA_VERSION = "4"
# The oldest schema `nos db upgrade` (db.migrate) migrates: its Alembic base revision.
UPGRADABLE_FROM = "2"

RUN_STATUSES = ("running", "finished", "interrupted", "failed")
INDIVIDUAL_STATUSES = ("evaluated", "rejected_integrity", "invalid", "error", "duplicate")
SPLITS = ("search", "validation", "test")  # disjoint seed sets: fitness / every choice / reported only


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
    config: Mapped[Any] = mapped_column(JSONText("runs.config", object_only=True))
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
    genome: Mapped[Any] = mapped_column(JSONText("individuals.genome", object_only=True))
    expression: Mapped[str | None] = mapped_column(Text)
    latex: Mapped[str | None] = mapped_column(Text)
    genome_hash: Mapped[str | None] = mapped_column(String(128), index=True)
    # hash before the integrity check flipped the update's sign (same candidate, other spelling)
    unflipped_hash: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(32))
    fitness: Mapped[float | None]
    # which fitness this is: 1 = the full search fitness, 0 = only the cheap first stage of a
    # multi-fidelity search (not promoted); a full fitness always ranks above a cheap one
    fidelity: Mapped[int] = mapped_column(default=1)
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
    split: Mapped[str] = mapped_column(String(16), default="search")  # search / validation / test
    # the task's identity ``name@hash`` (schema 3); NULL on rows written before schema 3, which
    # all belong to the sine task of their run's config
    task_key: Mapped[str | None] = mapped_column(String(96))

    individual: Mapped[Individual] = relationship(back_populates="evaluations")


class Baseline(Base):
    """A reference optimizer's result (Adam, RandOpt, ...); ``hparam`` is its lr or sigma."""

    __tablename__ = "baselines"
    __table_args__ = (Index("ix_baselines_task_horizon", "task", "horizon"),
                      Index("ix_baselines_protocol", "protocol"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(64))
    horizon: Mapped[float]
    seed: Mapped[int]
    loss: Mapped[float | None]
    hparam: Mapped[float | None]
    budget: Mapped[int]
    split: Mapped[str] = mapped_column(String(16), default="search")  # search / validation / test
    # the evaluation protocol whose results these are (nos.evaluation.protocol.Protocol.key);
    # rows of a protocol are computed once and reused by every run and command with that key
    protocol: Mapped[str | None] = mapped_column(String(64))
    # the task's identity ``name@hash`` (schema 3); NULL on rows written before schema 3, which
    # all belong to the sine task of their run's config
    task_key: Mapped[str | None] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# What identifies a stored baseline result of a protocol (schema 4): the protocol key names the
# task, seeds, grids and budget; the method carries RandOpt's layer variant ("randopt_first");
# hparam is the lr or sigma, NULL for the "before" rows. Rows with protocol NULL (a run's own Adam
# reference, and rows written before schema 2) are per run and not covered.
BASELINE_KEY = ("protocol", "method", "horizon", "seed", "split", "hparam")
# A unique index treats NULLs as distinct (SQLite and PostgreSQL alike), so a NULL hparam is
# indexed as this value instead: lrs and sigmas are positive, so no real hparam is ever -1.
NULL_HPARAM = "-1.0"
baseline_key_index = Index(
    "uq_baselines_key",
    *(func.coalesce(Baseline.hparam, literal_column(NULL_HPARAM)) if c == "hparam" else getattr(Baseline, c)
      for c in BASELINE_KEY),
    unique=True,
    sqlite_where=Baseline.protocol.is_not(None),
    postgresql_where=Baseline.protocol.is_not(None),
)


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
