"""The SQL store's plumbing: engine and connection settings, retries, transactions.

`SQLBase` holds what every part of `db.store.Store` shares (the engine, the label errors
name the database by, the retry policy); the parts (`db.sql_runs`, `db.sql_candidates`,
`db.sql_baselines`, `db.claims`) are mixins over it. Every public method is one
`SQLBase._transaction`; transient failures ("database is locked", a dropped connection) are
retried a bounded number of times; every failure reaches the caller as a one-line StoreError.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

from db.errors import StoreError
from db.models import Base, StoredValueError, check_stored
from db.rows import cut, one_line
from db.sqlite_file import on_sqlite_begin, readonly_connect
from db.storage import Storage

T = TypeVar("T")

# Bulk INSERTs send None as NULL instead of dropping the key, so rows with and without
# a value keep one key set and stay one statement (see db.rows.complete).
BULK = {"render_nulls": True}


def resolve_url(db: str | os.PathLike[str]) -> str:
    """A plain path becomes an absolute SQLite URL; anything with ``://`` is a URL already."""
    db = os.fspath(db)
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"bad database URL {url!r}: {one_line(exc)}") from exc


class SQLBase(Storage):
    """The state and plumbing the SQL store's parts share (set up by `db.store.Store`)."""

    url: str
    readonly: bool
    _label: str  # how errors name the database: the path as given, or the URL
    _sqlite: bool
    _memory: bool  # an SQLite :memory: database
    _path: Path | None  # the SQLite file, when given as a path
    _retries: int
    _retry_wait: float
    _busy_timeout: float
    _wal: bool  # switched on once the file is known to be ours
    _engine: Engine
    _sessions: sessionmaker[Session]

    def __repr__(self) -> str:
        return f"Store({self._label!r})"

    def close(self) -> None:
        """Release pooled connections (and SQLite file handles)."""
        self._engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session for ad-hoc queries: commits on success, rolls back on exception."""
        with self._sessions.begin() as session:
            yield session

    def _make_engine(self, url: URL) -> Engine:
        kwargs: dict[str, Any] = {}
        if self._memory:  # one shared connection, or every checkout gets an empty database
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        try:
            if not self._sqlite:
                kwargs["pool_pre_ping"] = True
                driver = url.get_driver_name()
                connect_args: dict[str, Any] = {}
                if driver in ("psycopg", "psycopg2") and "connect_timeout" not in url.query:
                    connect_args["connect_timeout"] = 10
                if driver in ("psycopg", "psycopg2") and self.readonly:
                    connect_args["options"] = "-c default_transaction_read_only=on"
                if connect_args:
                    kwargs["connect_args"] = connect_args
            elif self.readonly and self._path is not None:
                # a fresh connection per transaction: mode=ro vs immutable is decided anew
                kwargs["creator"] = functools.partial(readonly_connect, self._path)
                kwargs["poolclass"] = NullPool
            engine = create_engine(url, **kwargs)
        except ImportError as exc:
            raise StoreError(
                f"no driver for {url.drivername} ({exc}); for PostgreSQL install "
                "'nos[postgres]' and use a postgresql+psycopg:// URL"
            ) from exc
        except ArgumentError as exc:
            raise StoreError(f"bad database URL {self._label}: {one_line(exc)}") from exc
        if self._sqlite:
            event.listen(engine, "connect", self._on_sqlite_connect)
            event.listen(engine, "begin", on_sqlite_begin)
        return engine

    def _on_sqlite_connect(self, dbapi_connection: Any, _record: Any) -> None:
        """Per-connection SQLite settings; WAL only once the file is known to be ours."""
        # We emit BEGIN ourselves (see on_sqlite_begin): sqlite3's own transaction
        # handling skips BEGIN before SELECT and DDL, which breaks atomicity.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if self.readonly:  # also for SQLite URIs the caller opened read-write
                cursor.execute("PRAGMA query_only = ON")
            if self._wal and cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
        finally:
            cursor.close()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient errors with backoff; any failure -> StoreError."""
        attempt = 0
        while True:
            try:
                return fn()
            except OperationalError as exc:
                if not self._is_transient(exc):
                    raise StoreError(f"{self._label}: {what} failed: {one_line(exc)}") from exc
                if attempt >= self._retries:
                    raise StoreError(
                        f"{self._label}: {what} failed after {attempt + 1} attempts: "
                        f"{one_line(exc)}"
                    ) from exc
                time.sleep(self._retry_wait * 2**attempt)
                attempt += 1
            except SQLAlchemyError as exc:
                raise StoreError(f"{self._label}: {what} failed: {one_line(exc)}") from exc
            except StoredValueError as exc:
                raise StoreError(f"{self._label}: {what}: damaged stored value: {exc}") from exc
            except (ValueError, OverflowError, RecursionError) as exc:  # raised reading a value
                raise StoreError(
                    f"{self._label}: {what}: unreadable stored value ({cut(str(exc) or type(exc).__name__)})"
                ) from exc

    def _is_transient(self, exc: OperationalError) -> bool:
        """SQLite: only lock contention. Servers: any OperationalError (connection,
        deadlock, serialization) is worth another try."""
        if not self._sqlite:
            return True
        message = str(exc.orig).lower()
        return "locked" in message or "busy" in message

    def _transaction(self, what: str, fn: Callable[[Session], T], *, write: bool = False) -> T:
        """Run ``fn(session)`` in one transaction (retried as a whole)."""

        if write and self.readonly:
            raise StoreError(f"{self._label}: {what} refused: the database is open read-only")

        def attempt() -> T:
            with self._sessions.begin() as session:
                if write:  # SQLite: take the write lock up front (BEGIN IMMEDIATE)
                    session.connection(execution_options={"nos_write": True})
                return fn(session)

        return self._retry(what, attempt)


def row(obj: Base) -> dict[str, Any]:
    """All column values of a model instance (JSON parsed, datetimes aware UTC), each
    checked against its column's type: a tampered row is a StoredValueError."""
    mapper = inspect(obj).mapper
    return {
        attr.key: check_stored(str(obj.__tablename__), attr.columns[0], getattr(obj, attr.key))
        for attr in mapper.column_attrs
    }


def row_or_none(obj: Base | None) -> dict[str, Any] | None:
    return None if obj is None else row(obj)
