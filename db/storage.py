"""What nos asks of its storage: the `Storage` interface every backend implements.

Two backends exist: `db.store.Store`, the SQL store (SQLite files, PostgreSQL; the one every
command uses), and `db.memory.MemoryStorage`, which holds everything in the process (unit
tests). Both speak plain dicts: a returned row is the caller's copy, its keys the table's
columns (`db.models`), with JSON parsed, datetimes timezone-aware UTC and non-finite floats
read back as None. Both check incoming rows with `db.rows`, so bad input is refused with the
same one-line `StoreError` by either. Every method is all-or-nothing: when it raises, nothing
of that call was stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

from db.errors import (
    FINAL_RUN_STATUSES,
    JUDGED_STATUSES,
    MAX_ID,
    SlotTakenError,
    StoreError,
)

S = TypeVar("S", bound="Storage")

__all__ = ["FINAL_RUN_STATUSES", "JUDGED_STATUSES", "MAX_ID", "SlotTakenError", "Storage", "StoreError"]


class Storage(ABC):
    """Runs, individuals (candidates) with their evaluations, baselines, timestep stats and
    the claims through which cooperating processes split a run's work.

    Ids are integers handed out by the storage (1, 2, ... per table); an id that cannot be
    one (not an int in 1 .. `MAX_ID`) finds nothing. Any failure is a `StoreError` (one line).
    A storage is a context manager that `close`\\ s on exit.
    """

    url: str
    """Where the data lives: an SQLAlchemy URL, or ``memory://``."""
    readonly: bool
    """True when every write is refused (StoreError) and nothing is ever changed."""

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Release what the storage holds open (connections, file handles)."""

    # ------------------------------------------------------------------ runs

    @abstractmethod
    def create_run(self, name: str, config: dict, seed: int) -> int:
        """Register a new run with status ``running`` and ``started_at`` now; its id.

        Names are unique: a taken name is a StoreError ("a run named ... already exists").
        """

    @abstractmethod
    def get_run(self, name_or_id: str | int) -> dict | None:
        """A run (its columns) by name, or by id: an int is an id, a string is a name, or an id
        when it is plain digits and no run has that name. None when there is no such run."""

    @abstractmethod
    def list_runs(self) -> list[dict]:
        """All runs, oldest (lowest id) first, each with ``n_individuals``, ``n_evaluated``
        (status ``evaluated``) and ``best_fitness`` (the lowest fitness of an evaluated
        full-fidelity individual, or None)."""

    @abstractmethod
    def set_run_status(self, run_id: int, status: str) -> None:
        """Record how a run stands; a final status (`FINAL_RUN_STATUSES`) stamps
        ``finished_at`` now, ``running`` clears it. StoreError for a status not in
        `db.models.RUN_STATUSES` ("unknown run status") or a missing run ("no run with id")."""

    # ------------------------------------------------------------------ individuals

    @abstractmethod
    def add_individuals(self, rows: list[dict]) -> list[int]:
        """Store candidates all-or-nothing; their ids, in the order given (ascending).

        A row holds column values (``run_id``, ``slot``, ``genome``, ``status`` required) and
        may carry ``evaluations`` (a list of evaluation rows, stored with it) and, instead of
        ``parent_id``, ``parent_slot``: the slot of a parent in the same run, stored already
        or earlier in this batch ("no parent with slot" otherwise). A ``(run_id, slot)``
        stored already, or twice in the batch, raises `SlotTakenError` and stores nothing.
        """

    @abstractmethod
    def add_evaluations(self, by_individual: dict[int, list[dict]]) -> int:
        """Attach more evaluations to stored individuals, all-or-nothing; how many."""

    @abstractmethod
    def individuals(self, run_id: int) -> list[dict]:
        """All individuals of a run by id, without evaluations ([] for no such run)."""

    @abstractmethod
    def individual_by_slot(self, run_id: int, slot: str) -> dict | None:
        """The individual made in ``slot`` of the run, or None (how a resumed run knows what
        is done)."""

    @abstractmethod
    def individuals_by_slots(self, run_id: int, slots: list[str]) -> list[dict]:
        """The individuals of the run stored in any of ``slots``, by id."""

    @abstractmethod
    def heldout_evaluations(self, run_id: int, task: str) -> list[tuple[int, dict]]:
        """``(individual id, evaluation)`` of the run's validation and test (not ``search``)
        evaluations on ``task``, by evaluation id."""

    @abstractmethod
    def heldout_counts(self) -> dict[int, int]:
        """run id -> how many of its individuals have held-out (validation / test)
        evaluations; runs without any are absent."""

    @abstractmethod
    def get_individual(self, ind_id: int) -> dict | None:
        """One individual with ``run_name`` and its ``evaluations`` (by id), or None."""

    @abstractmethod
    def lineage(self, ind_id: int) -> list[dict]:
        """``[individual, parent, grandparent, ..., initial]`` following ``parent_id`` (a
        cycle is cut where it repeats); [] if there is no such id."""

    @abstractmethod
    def top(self, run_id: int, n: int = 10) -> list[dict]:
        """The ``n`` best evaluated individuals with a fitness: higher ``fidelity`` first, then
        lower fitness, then lower id."""

    @abstractmethod
    def find_hash(self, run_id: int, genome_hash: str) -> dict | None:
        """The lowest-id individual of the run with this hash and a judged status
        (`JUDGED_STATUSES`: the one a duplicate points to), or None."""

    @abstractmethod
    def status_counts(self, run_id: int) -> dict[str, int]:
        """How many individuals of the run have each status: every status of
        `db.models.INDIVIDUAL_STATUSES`, in that order, 0 when none."""

    # ------------------------------------------------------------------ baselines / stats

    @abstractmethod
    def add_baselines(self, rows: list[dict]) -> list[int]:
        """Store baseline results all-or-nothing; the rows' ids, in order.

        Idempotent per key (`db.models.BASELINE_KEY`, a NULL hparam counting as -1): a row
        with a protocol whose key is stored already, or earlier in the batch, is not stored
        again and its id is the stored row's. Rows without a protocol are always stored.
        """

    @abstractmethod
    def baselines(self, run_id: int | None = None, task: str | None = None,
                  protocol: str | None = None, task_key: str | None = None) -> list[dict]:
        """Baseline rows by id, only those matching every filter given (None: any)."""

    @abstractmethod
    def put_timestep_stats(self, run_id: int, row: dict) -> None:
        """Insert the stats of ``row["timestep"]`` (StoreError without one), or, when the run
        has them already, overwrite the columns ``row`` gives (the others keep their values)."""

    @abstractmethod
    def timestep_stats(self, run_id: int) -> list[dict]:
        """A run's per-timestep stats, by timestep."""

    # ------------------------------------------------------------------ claims

    @abstractmethod
    def claim(self, run_id: int, key: str, owner: str) -> bool:
        """Try to become the process that judges ``key`` of the run (heartbeat 0); True if
        ``owner`` holds it now. Exactly one of several concurrent callers wins; asking again
        for one's own claim gives True."""

    @abstractmethod
    def claim_state(self, run_id: int, key: str) -> tuple[str, int] | None:
        """``(owner, heartbeat)`` of a claim, or None when nobody claimed ``key``."""

    @abstractmethod
    def take_over(self, run_id: int, key: str, owner: str, seen: tuple[str, int]) -> bool:
        """Take a stale claim: only if it is still exactly ``seen`` (owner, heartbeat). Then
        all of the stale owner's claims in the run pass to ``owner`` (heartbeat 0) and the
        result is True; False (nothing changed) otherwise."""

    @abstractmethod
    def heartbeat(self, run_id: int, owner: str) -> None:
        """Show that ``owner`` is alive: add 1 to the heartbeat of all its claims in the run."""
