"""The SQL store's baselines (reference optimizers' results) and per-timestep stats."""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy import Insert, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import StoreError
from db.models import BASELINE_KEY, Baseline, TimestepStat, baseline_key_index
from db.rows import baseline_key, baseline_values, timestep_values
from db.sql_engine import BULK, SQLBase
from db.sql_engine import row as row_dict


class SQLBaselines(SQLBase):
    """`db.storage.Storage`'s baseline and timestep-stats methods on SQL."""

    def add_baselines(self, rows: list[dict]) -> list[int]:
        """Insert baseline results all-or-nothing; the rows' ids, in order.

        Idempotent per key (`db.models.BASELINE_KEY`): a row of a protocol whose key is stored
        already -- another process computed the same protocol at the same moment, or the batch
        holds it twice -- is not stored again, and its id is the stored row's. Rows without a
        protocol (a run's own) are always inserted.
        """
        values = baseline_values(rows)
        if not values:
            return []
        plain = insert(Baseline).returning(Baseline.id, sort_by_parameter_order=True)

        def write(session: Session) -> list[int]:
            dialect = session.get_bind().dialect
            ids: dict[int, int] = {}
            keyed: list[int] = []
            # runs of keyed / unkeyed rows in order, so new rows get ids in the order given
            for has_key, run in itertools.groupby(range(len(values)), lambda i: values[i]["protocol"] is not None):
                batch = list(run)
                if has_key:
                    keyed += batch
                    _insert_new_baselines(session, [values[i] for i in batch])
                else:
                    got = session.scalars(plain, [values[i] for i in batch], execution_options=BULK)
                    ids.update(zip(batch, got))
            if keyed:  # the id of each key, whoever stored it (one read per batch, not per row)
                stored: dict[tuple, int] = {}
                protocols = sorted({values[i]["protocol"] for i in keyed})
                cols = [getattr(Baseline, c) for c in BASELINE_KEY]
                found = session.execute(select(Baseline.id, *cols).where(Baseline.protocol.in_(protocols))
                                        .order_by(Baseline.id))
                for row_id, *columns in found:
                    stored.setdefault(tuple(columns), row_id)
                for i in keyed:
                    key = baseline_key(values[i], dialect)
                    if key not in stored:
                        raise StoreError(f"baseline row {i}: stored, but not found again by its key")
                    ids[i] = stored[key]
            return [ids[i] for i in range(len(values))]

        return self._transaction("add_baselines", write, write=True)

    def baselines(self, run_id: int | None = None, task: str | None = None,
                  protocol: str | None = None, task_key: str | None = None) -> list[dict]:
        """Baseline results by id, optionally only those of one run, one task, one protocol
        and/or one task key (``name@hash``; rows written before schema 3 have none)."""
        stmt = select(Baseline).order_by(Baseline.id)
        if task_key is not None:
            stmt = stmt.where(Baseline.task_key == task_key)
        if run_id is not None:
            stmt = stmt.where(Baseline.run_id == run_id)
        if task is not None:
            stmt = stmt.where(Baseline.task == task)
        if protocol is not None:
            stmt = stmt.where(Baseline.protocol == protocol)
        return self._transaction("baselines", lambda s: [row_dict(b) for b in s.scalars(stmt)])

    def put_timestep_stats(self, run_id: int, row: dict) -> None:
        """Insert or replace the stats of ``row["timestep"]`` (a resumed run rewrites them)."""
        values = timestep_values(run_id, row)
        where = (TimestepStat.run_id == run_id, TimestepStat.timestep == values["timestep"])

        def write(session: Session) -> None:
            if session.scalar(select(TimestepStat.id).where(*where)) is None:
                try:  # another process may insert the same timestep meanwhile: then update
                    with session.begin_nested():
                        session.execute(insert(TimestepStat), [values])
                    return
                except IntegrityError:
                    pass
            session.execute(update(TimestepStat).where(*where).values(values))

        self._transaction("put_timestep_stats", write, write=True)

    def timestep_stats(self, run_id: int) -> list[dict]:
        """A run's per-timestep stats, by timestep."""
        stmt = (
            select(TimestepStat)
            .where(TimestepStat.run_id == run_id)
            .order_by(TimestepStat.timestep)
        )
        return self._transaction("timestep_stats", lambda s: [row_dict(t) for t in s.scalars(stmt)])


def _insert_new_baselines(session: Session, values: list[dict[str, Any]]) -> None:
    """INSERT the rows whose key (unique index uq_baselines_key) is not stored yet, in one
    statement: ON CONFLICT DO NOTHING on SQLite and PostgreSQL, so of two processes that store
    one key at the same moment the second stores nothing and fails nothing."""
    dialect = session.get_bind().dialect
    stmt: Insert
    if dialect.name in ("sqlite", "postgresql"):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        stmt = dialect_insert(Baseline).on_conflict_do_nothing(
            index_elements=list(baseline_key_index.expressions),
            index_where=baseline_key_index.dialect_options[dialect.name]["where"],
        )
    else:  # another server: the rows whose key is not stored, found first (no upsert there)
        cols = [getattr(Baseline, c) for c in BASELINE_KEY]
        have = {tuple(k) for k in session.execute(
            select(*cols).where(Baseline.protocol.in_({v["protocol"] for v in values})))}
        new: dict[tuple, dict[str, Any]] = {}
        for v in values:
            if (key := baseline_key(v, dialect)) not in have:
                new.setdefault(key, v)  # a key twice in the batch: once
        values, stmt = list(new.values()), insert(Baseline)
    if values:
        session.execute(stmt, values, execution_options=BULK)
