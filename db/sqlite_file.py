"""Checks of an SQLite file before the SQL store uses it, and how SQLite is connected to.

A missing or empty file (opened with create=False) and a file that is not an SQLite database
are refused before SQLite touches them; a file that fails ``PRAGMA quick_check`` is refused
before anything is written to it. A read-only store connects with ``mode=ro`` (or
``immutable=1``) so it writes nothing beside the file.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError, OperationalError

from db.errors import StoreError
from db.rows import cut, one_line

SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(url: URL, label: str, create: bool) -> Path | None:
    """Refuse, before SQLite touches it, a missing or empty file (create=False) or a
    non-database; the file's path (None for an SQLite ``file:`` URI)."""
    database = url.database or ""
    if database.startswith("file:"):  # an SQLite URI: the caller knows what they do
        return None
    path = Path(database)
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # NUL byte, name too long, ...
        raise StoreError(f"bad database path {label}: {exc}") from exc
    if not exists:
        if not create:
            raise StoreError(f"{label} does not exist (opened with create=False)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {label}: {exc.strerror or exc}") from exc
        return path
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"cannot read {label}: {exc.strerror or exc}") from exc
    if header and header != SQLITE_HEADER:
        raise StoreError(f"{label} is not an SQLite database; refusing to modify it")
    if not header and not create:
        raise StoreError(f"{label} is an empty database (opened with create=False)")
    return path


def quick_check(label: str, engine: Engine,
                retry: Callable[[str, Callable[[], list[str]]], list[str]]) -> None:
    """Refuse an SQLite file that fails ``PRAGMA quick_check`` (before any write); ``retry``
    is the store's retry of transient failures."""

    def run() -> list[str]:
        with engine.connect() as conn:
            return [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]

    try:
        result = retry("open", run)
    except StoreError as exc:
        cause = exc.__cause__  # OperationalError: locked, unreadable, read-only: not damage
        if isinstance(cause, DatabaseError) and not isinstance(cause, OperationalError):
            raise StoreError(
                f"{label} is damaged or not a database ({one_line(cause)}); "
                "refusing to use it"
            ) from cause
        raise
    if result != ["ok"]:
        more = f" (+{len(result) - 1} more)" if len(result) > 1 else ""
        raise StoreError(
            f"{label} is damaged: SQLite's quick_check reports "
            f"{cut(' '.join((result or ['nothing'])[0].split()))!r}{more}; refusing to use it"
        )


def readonly_connect(path: Path) -> sqlite3.Connection:
    """A read-only SQLite connection that writes nothing beside the file: ``mode=ro``
    while a ``-wal`` file exists (a writer may be active: read its log too), else
    ``immutable=1`` (no -wal / -shm is created, read-only directories work)."""
    name = os.fspath(path)
    live = any(os.path.exists(name + suffix) for suffix in ("-wal", "-journal"))
    uri = f"file:{urllib.parse.quote(name)}?mode=ro" + ("" if live else "&immutable=1")
    return sqlite3.connect(uri, uri=True, check_same_thread=False)


def on_sqlite_begin(conn: Connection) -> None:
    """Emit BEGIN ourselves; writers take the write lock at once, so a busy database
    makes them wait (busy_timeout) instead of failing halfway through."""
    immediate = conn.get_execution_options().get("nos_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
