"""The SQL store's runs: create, find, list, and record how they end."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.errors import FINAL_RUN_STATUSES, StoreError
from db.models import RUN_STATUSES, Individual, Run, utcnow
from db.rows import check_choice, digits_id, run_lookup
from db.sql_engine import SQLBase, row


class SQLRuns(SQLBase):
    """`db.storage.Storage`'s run methods on SQL."""

    def create_run(self, name: str, config: dict, seed: int) -> int:
        """Register a new run (status ``running``); names are unique."""

        def write(session: Session) -> int:
            if session.scalar(select(Run.id).where(Run.name == name)) is not None:
                raise StoreError(f"a run named {name!r} already exists in {self._label}")
            run = Run(name=name, config=config, seed=seed, status="running", started_at=utcnow())
            session.add(run)
            session.flush()
            return run.id

        return self._transaction("create_run", write, write=True)

    def get_run(self, name_or_id: str | int) -> dict | None:
        """A run by name, or by id (an int, or a digit string that is not a run name)."""

        def read(session: Session) -> dict | None:
            run = _find_run(session, name_or_id)
            return None if run is None else row(run)

        return self._transaction("get_run", read)

    def list_runs(self) -> list[dict]:
        """All runs, oldest first, each with n_individuals, n_evaluated and best_fitness."""
        evaluated = Individual.status == "evaluated"
        stmt = (
            select(
                Run,
                func.count(Individual.id),
                func.count(Individual.id).filter(evaluated),
                func.min(Individual.fitness).filter(evaluated, Individual.fidelity == 1),
            )
            .outerjoin(Individual, Individual.run_id == Run.id)
            .group_by(Run.id)
            .order_by(Run.id)
        )

        def read(session: Session) -> list[dict]:
            return [
                {**row(run), "n_individuals": n, "n_evaluated": n_eval, "best_fitness": best}
                for run, n, n_eval, best in session.execute(stmt)
            ]

        return self._transaction("list_runs", read)

    def set_run_status(self, run_id: int, status: str) -> None:
        """Record how a run stands; a final status stamps finished_at, ``running`` clears it."""
        check_choice("run status", status, RUN_STATUSES)

        def write(session: Session) -> None:
            run = session.get(Run, run_id)
            if run is None:
                raise StoreError(f"no run with id {run_id} in {self._label}")
            run.status = status
            run.finished_at = utcnow() if status in FINAL_RUN_STATUSES else None

        self._transaction("set_run_status", write, write=True)


def _find_run(session: Session, name_or_id: str | int) -> Run | None:
    name, run_id = run_lookup(name_or_id)
    if name is None:
        return None if run_id is None else session.get(Run, run_id)
    run = session.scalar(select(Run).where(Run.name == name))
    if run is None and (run_id := digits_id(name)) is not None:
        run = session.get(Run, run_id)
    return run
