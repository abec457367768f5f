"""The SQL store's candidates: individuals with their evaluations, and the queries on them."""

from __future__ import annotations

from sqlalchemy import distinct, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import JUDGED_STATUSES, SlotTakenError, StoreError
from db.models import INDIVIDUAL_STATUSES, Evaluation, Individual, Run, check_stored
from db.rows import evaluation_values, fits_id, individual_values, one_line, top_limit
from db.sql_engine import BULK, SQLBase, row, row_or_none


class SQLCandidates(SQLBase):
    """`db.storage.Storage`'s individual and evaluation methods on SQL."""

    def add_individuals(self, rows: list[dict]) -> list[int]:
        """Insert candidates (with nested ``evaluations``) all-or-nothing; ids in order.

        Besides column values a row may carry ``evaluations`` (list of dicts) and, instead
        of ``parent_id``, ``parent_slot``: the slot of a parent in the same run, stored
        already or earlier in this batch. Rows go in as bulk INSERTs, split only where a
        row needs the id of a parent from the same batch.
        """
        prepared = [individual_values(r, f"individual row {i}") for i, r in enumerate(rows)]

        def write(session: Session) -> list[int]:
            ids: list[int] = []
            by_slot: dict[tuple[int, str], int] = {}  # ids of this batch's rows, once inserted
            pending: list[dict] = []
            pending_slots: set[tuple[int, str]] = set()

            def insert_pending() -> None:
                if not pending:
                    return
                # Matched back by (run_id, slot), which is unique: a RETURNING that must
                # keep parameter order would make SQLite insert row by row.
                stmt = insert(Individual).returning(
                    Individual.run_id, Individual.slot, Individual.id
                )
                result = session.execute(stmt, pending, execution_options=BULK)
                by_slot.update(((r, slot), i) for r, slot, i in result)
                ids.extend(by_slot[(v["run_id"], v["slot"])] for v in pending)
                pending.clear()
                pending_slots.clear()

            for i, (values, parent_slot, _) in enumerate(prepared):
                if parent_slot is not None:
                    key = (values["run_id"], parent_slot)
                    if key in pending_slots:
                        insert_pending()
                    parent_id = by_slot.get(key) or session.scalar(
                        select(Individual.id).where(
                            Individual.run_id == key[0], Individual.slot == key[1]
                        )
                    )
                    if parent_id is None:
                        raise StoreError(
                            f"individual row {i}: no parent with slot {parent_slot!r} "
                            f"in run {key[0]}"
                        )
                    values = {**values, "parent_id": parent_id}
                pending.append(values)
                pending_slots.add((values["run_id"], values["slot"]))
            insert_pending()

            evaluations = [
                {**e, "individual_id": ind_id}
                for ind_id, (_, _, evals) in zip(ids, prepared)
                for e in evals
            ]
            if evaluations:
                session.execute(insert(Evaluation), evaluations, execution_options=BULK)
            return ids

        try:
            return self._transaction("add_individuals", write, write=True)
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, IntegrityError) and _is_slot_conflict(cause):
                raise SlotTakenError(
                    f"{self._label}: add_individuals: a slot of this batch is already stored "
                    f"({one_line(cause)})"
                ) from cause
            raise

    def add_evaluations(self, by_individual: dict[int, list[dict]]) -> int:
        """Attach more evaluations to stored individuals, all-or-nothing; returns the count."""
        values = evaluation_values(by_individual)
        if not values:
            return 0

        def write(session: Session) -> int:
            session.execute(insert(Evaluation), values, execution_options=BULK)
            return len(values)

        return self._transaction("add_evaluations", write, write=True)

    def individuals(self, run_id: int) -> list[dict]:
        """All individuals of a run, by id, without evaluations."""
        if not fits_id(run_id):
            return []
        stmt = select(Individual).where(Individual.run_id == run_id).order_by(Individual.id)
        return self._transaction("individuals", lambda s: [row(i) for i in s.scalars(stmt)])

    def individual_by_slot(self, run_id: int, slot: str) -> dict | None:
        """The individual made in ``slot`` (how a resumed run knows what is done)."""
        stmt = select(Individual).where(Individual.run_id == run_id, Individual.slot == slot)
        return self._transaction("individual_by_slot", lambda s: row_or_none(s.scalar(stmt)))

    def individuals_by_slots(self, run_id: int, slots: list[str]) -> list[dict]:
        """The individuals stored in any of ``slots`` (by id): what another process judged."""
        if not slots:
            return []
        stmt = (
            select(Individual)
            .where(Individual.run_id == run_id, Individual.slot.in_(slots))
            .order_by(Individual.id)
        )
        return self._transaction("individuals_by_slots", lambda s: [row(i) for i in s.scalars(stmt)])

    def heldout_evaluations(self, run_id: int, task: str) -> list[tuple[int, dict]]:
        """(individual id, evaluation) of a run's validation and test evaluations on ``task``."""
        stmt = (select(Evaluation).join(Individual, Evaluation.individual_id == Individual.id)
                .where(Individual.run_id == run_id, Evaluation.task == task, Evaluation.split != "search")
                .order_by(Evaluation.id))
        return self._transaction("heldout_evaluations",
                                 lambda s: [(e.individual_id, row(e)) for e in s.scalars(stmt)])

    def heldout_counts(self) -> dict[int, int]:
        """run id -> how many of its individuals have held-out (validation / test) evaluations:
        the size of each run's funnel, in one grouped query."""
        stmt = (select(Individual.run_id, func.count(distinct(Evaluation.individual_id)))
                .join(Individual, Evaluation.individual_id == Individual.id)
                .where(Evaluation.split != "search")
                .group_by(Individual.run_id))
        return self._transaction("heldout_counts", lambda s: {int(r): int(n) for r, n in s.execute(stmt)})

    def get_individual(self, ind_id: int) -> dict | None:
        """One individual with its ``evaluations`` and its ``run_name``."""

        if not fits_id(ind_id):
            return None

        def read(session: Session) -> dict | None:
            ind = session.get(Individual, ind_id)
            if ind is None:
                return None
            run_name = check_stored("runs", Run.__table__.c.name,
                                    session.scalar(select(Run.name).where(Run.id == ind.run_id)))
            return {
                **row(ind),
                "run_name": run_name,
                "evaluations": [row(e) for e in ind.evaluations],
            }

        return self._transaction("get_individual", read)

    def lineage(self, ind_id: int) -> list[dict]:
        """``[individual, parent, grandparent, ..., initial]``; empty if no such id."""
        if not fits_id(ind_id):
            return []

        def read(session: Session) -> list[dict]:
            chain: list[dict] = []
            seen: set[int] = set()
            ind = session.get(Individual, ind_id)
            while ind is not None and ind.id not in seen:  # `seen` guards hand-edited cycles
                seen.add(ind.id)
                chain.append(row(ind))
                ind = None if ind.parent_id is None else session.get(Individual, ind.parent_id)
            return chain

        return self._transaction("lineage", read)

    def top(self, run_id: int, n: int = 10) -> list[dict]:
        """The ``n`` best evaluated individuals: full-fidelity first, then lower fitness, then id."""
        if not fits_id(run_id):
            return []
        n = top_limit(n)
        stmt = (
            select(Individual)
            .where(
                Individual.run_id == run_id,
                Individual.status == "evaluated",
                Individual.fitness.is_not(None),
            )
            .order_by(Individual.fidelity.desc(), Individual.fitness, Individual.id)
            .limit(n)
        )
        return self._transaction("top", lambda s: [row(i) for i in s.scalars(stmt)])

    def find_hash(self, run_id: int, genome_hash: str) -> dict | None:
        """The earliest already-judged individual with this hash (the one a duplicate points to)."""
        stmt = (
            select(Individual)
            .where(
                Individual.run_id == run_id,
                Individual.genome_hash == genome_hash,
                Individual.status.in_(JUDGED_STATUSES),
            )
            .order_by(Individual.id)
            .limit(1)
        )
        return self._transaction("find_hash", lambda s: row_or_none(s.scalar(stmt)))

    def status_counts(self, run_id: int) -> dict[str, int]:
        """How many individuals of a run have each status (every status present, maybe 0)."""
        stmt = (
            select(Individual.status, func.count())
            .where(Individual.run_id == run_id)
            .group_by(Individual.status)
        )

        def read(session: Session) -> dict[str, int]:
            counts = dict.fromkeys(INDIVIDUAL_STATUSES, 0)
            status = Individual.__table__.c.status
            counts.update((check_stored("individuals", status, s), n) for s, n in session.execute(stmt).all())
            return counts

        return self._transaction("status_counts", read)


def _is_slot_conflict(exc: IntegrityError) -> bool:
    """Is this the unique (run_id, slot) of individuals (SQLite or PostgreSQL wording)?"""
    message = str(exc.orig)
    return "uq_individuals_run_slot" in message or "individuals.run_id, individuals.slot" in message
