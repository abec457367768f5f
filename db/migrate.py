"""Upgrade a nos database of an older schema in place (`nos db upgrade`), with Alembic.

Each schema change is one Alembic revision in ``db/migrations/versions`` whose revision id is
the ``meta.schema_version`` it produces; revision "2" is the base. ``meta.schema_version`` is
the truth about a database (nos never writes an ``alembic_version`` table when it creates one):
an upgrade stamps Alembic at that version, then runs every later revision, each of which also
moves the ``meta`` stamp, all in one transaction.

An SQLite file is checked before anything touches it (the SQLite header, ``PRAGMA
quick_check`` and the ``meta`` stamps, read through a read-only connection): a damaged file,
a file that is not a nos database and one of a newer schema are refused with one line and
left byte-identical. Before migrating, a byte-identical copy is written beside the file
(`backup_path`); a file some other process has open is refused rather than backed up while it
changes. A server database (PostgreSQL) gets no backup: take a ``pg_dump`` first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from db.models import APP, SCHEMA_VERSION, UPGRADABLE_FROM
from db.store import (
    SQLITE_HEADER,
    StoreError,
    _cut,
    _one_line,
    _parse_url,
    resolve_url,
    schema_version_number,
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"  # Alembic's script_location
NEEDED_TABLES = ("meta", "runs", "individuals", "evaluations", "baselines", "timestep_stats")
IN_USE_TIMEOUT = 2.0  # seconds to wait for other processes to let go of an SQLite file
CHUNK = 1 << 20


def backup_path(path: str | os.PathLike[str], version: str | int) -> Path:
    """Where the copy of an SQLite file at schema ``version`` goes: ``FILE.schemaN.bak``."""
    return Path(f"{os.fspath(path)}.schema{version}.bak")


def upgrade(db: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> str:
    """Bring the nos database ``db`` (a path or an SQLAlchemy URL) to the current schema.

    Returns one line saying what was done (and where the backup is); raises StoreError (one
    line) when the database cannot or must not be upgraded, leaving it as it was.
    """
    url = _parse_url(resolve_url(db))
    if url.get_backend_name() == "sqlite":
        return _upgrade_sqlite(os.fspath(db), url, busy_timeout)
    return _upgrade_server(url.render_as_string(), url)


# ---------------------------------------------------------------------- deciding


def _from_version(label: str, tables: set[str], meta: dict[str, str]) -> int | None:
    """The schema to migrate from, or None when ``label`` is current; StoreError (nothing
    changed) for anything else."""
    if not tables:
        raise StoreError(f"{label} is an empty database, not a nos database: nothing to upgrade")
    if meta.get("app") != APP:
        shown = ", ".join(sorted(tables)[:12]) + (", ..." if len(tables) > 12 else "")
        raise StoreError(f"{label} is not a nos database (tables: {shown}); nothing changed")
    raw = meta.get("schema_version")
    version, current = schema_version_number(raw), int(SCHEMA_VERSION)
    if version is None:
        raise StoreError(f"{label} has an unknown nos schema_version {_cut(repr(raw), 40)}; nothing changed")
    if version == current:
        return None
    if version > current:
        raise StoreError(f"{label} has nos schema {version}, written by a newer nos (this one reads "
                         f"{current}): use that nos; nothing changed")
    if version < int(UPGRADABLE_FROM):
        raise StoreError(f"{label} has nos schema {version}; `nos db upgrade` migrates schema "
                         f"{UPGRADABLE_FROM} and later only; nothing changed")
    missing = [t for t in NEEDED_TABLES if t not in tables]
    if missing:
        raise StoreError(f"{label} is a nos database without tables {', '.join(missing)}; nothing changed")
    return version


def _changes(version: int) -> str:
    """The first lines of the revisions after ``version``, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config(None))
    docs = [(s.doc or s.revision).strip() for s in script.iterate_revisions("heads", str(version))]
    return "; ".join(reversed(docs))


def _config(connection: Connection | None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _migrate(conn: Connection, version: int) -> int:
    """Stamp Alembic at ``version`` and run every later revision, in ``conn``'s transaction;
    how many baseline rows went (the duplicates revision 4 removes), so the user hears of it."""
    from alembic import command
    from alembic.util import CommandError

    cfg = _config(conn)
    count = text("SELECT count(*) FROM baselines")
    before = int(conn.execute(count).scalar_one())
    try:
        command.stamp(cfg, str(version), purge=True)
        command.upgrade(cfg, "heads")
    except CommandError as exc:
        raise StoreError(f"migration failed: {_one_line(exc)}") from exc
    return before - int(conn.execute(count).scalar_one())


def _read_stamp(conn: Connection, *, lock: bool = False) -> dict[str, str]:
    sql = "SELECT key, value FROM meta" + (" FOR UPDATE" if lock else "")
    return {str(k): str(v) for k, v in conn.execute(text(sql)).all()}


def _done(label: str, version: int, removed: int) -> str:
    gone = f"; {removed} duplicate baseline row{'' if removed == 1 else 's'} removed" if removed else ""
    return f"upgraded {label} from nos schema {version} to {SCHEMA_VERSION} ({_changes(version)}){gone}"


# ---------------------------------------------------------------------- SQLite


def _upgrade_sqlite(label: str, url: URL, busy_timeout: float) -> str:
    database = url.database or ""
    if database in ("", ":memory:"):
        raise StoreError("an in-memory SQLite database has nothing to upgrade")
    if database.startswith("file:"):
        raise StoreError(f"give {label} as a path or sqlite:///PATH, so a backup can be written beside it")
    path = Path(database)
    _check_file(label, path)
    tables, meta = _inspect_readonly(label, path)
    version = _from_version(label, tables, meta)
    if version is None:
        return f"{label} is at nos schema {SCHEMA_VERSION} already: nothing to do, no backup written"
    _settle(label, path, version)
    backup, seen = _backup(label, path, version)
    engine = _sqlite_engine(url, busy_timeout)
    try:
        with engine.connect() as conn, conn.begin():
            # the write lock is ours now: the file must be exactly what was backed up
            if _file_state(path) != seen or _size(Path(f"{path}-wal")) > 0:
                raise StoreError(f"{label} changed while it was backed up (another process writes "
                                 "to it): stop it and retry; nothing changed")
            if _from_version(label, tables, _read_stamp(conn)) != version:
                raise StoreError(f"{label} changed while it was backed up; retry")
            removed = _migrate(conn, version)
    except SQLAlchemyError as exc:
        raise StoreError(f"upgrading {label} failed, nothing changed: {_one_line(exc)}") from exc
    finally:
        engine.dispose()  # the last connection: the WAL is written back into the file
    return f"{_done(label, version, removed)}; backup of the schema-{version} file: {backup}"


def _check_file(label: str, path: Path) -> None:
    try:
        if not path.exists():
            raise StoreError(f"{label} does not exist")
        if path.is_dir():
            raise StoreError(f"{label} is a directory, not a database")
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {label}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not header:
        raise StoreError(f"{label} is an empty file, not a nos database: nothing to upgrade")
    if header != SQLITE_HEADER:
        raise StoreError(f"{label} is not an SQLite database; nothing changed")


def _inspect_readonly(label: str, path: Path) -> tuple[set[str], dict[str, str]]:
    """Tables and meta stamps of a file that passes ``quick_check``, read without writing
    anything (``immutable`` when no other process shows a log)."""
    name = os.fspath(path)
    live = any(os.path.exists(name + suffix) for suffix in ("-wal", "-journal"))
    uri = f"file:{urllib.parse.quote(name)}?mode=ro" + ("" if live else "&immutable=1")
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                more = f" (+{len(check) - 1} more)" if len(check) > 1 else ""
                first = " ".join((check or ["nothing"])[0].split())
                raise StoreError(f"{label} is damaged: SQLite's quick_check reports "
                                 f"{_cut(first, 120)!r}{more}; nothing changed")
            tables = {str(r[0]) for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
            meta: dict[str, str] = {}
            if "meta" in tables:
                columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(meta)")}
                if {"key", "value"} <= columns:
                    meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.OperationalError as exc:  # locked, unreadable: not damage
        raise StoreError(f"cannot read {label}: {_one_line(exc)}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{label} is damaged or not a database ({_one_line(exc)}); nothing changed") from exc
    return tables, meta


def _settle(label: str, path: Path, version: int) -> None:
    """Make sure no other process has the file open, and that every committed write is in
    the file itself (an SQLite write-ahead log written back), so the backup is complete."""
    try:
        conn = sqlite3.connect(os.fspath(path), timeout=IN_USE_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {label}: {_one_line(exc)}") from exc
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")  # held from the first read to close
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreError(f"{label} is in use by another process (a running nos?): stop it and "
                             "retry; nothing changed") from exc
        raise StoreError(f"cannot use {label}: {_one_line(exc)}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{label} is damaged or not a database ({_one_line(exc)})") from exc
    finally:
        conn.close()
    if busy is not None and busy[0]:
        raise StoreError(f"{label} is in use by another process: stop it and retry; nothing changed")
    if _from_version(label, {"meta", *NEEDED_TABLES}, meta) != version:
        raise StoreError(f"{label} changed meanwhile; retry")


def _backup(label: str, path: Path, version: int) -> tuple[Path, tuple[int, int, int]]:
    """Copy ``path`` to `backup_path` (an identical copy already there is kept) and check
    the copy byte for byte; (backup, the file's (inode, size, mtime) when copied)."""
    backup = backup_path(path, version)
    try:
        seen = _file_state(path)
        if backup.exists():
            if not _same_bytes(path, backup):
                raise StoreError(f"{backup} exists and differs from {label}: move it away first; "
                                 "nothing changed")
        else:
            partial = backup.with_name(f"{backup.name}.partial-{os.getpid()}")
            try:
                shutil.copyfile(path, partial)
                with partial.open("rb+") as fh:
                    os.fsync(fh.fileno())
                if not _same_bytes(path, partial):
                    raise StoreError(f"the backup {partial} differs from {label}; nothing changed")
                os.replace(partial, backup)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
        if _file_state(path) != seen:
            raise StoreError(f"{label} changed while it was backed up: retry; nothing changed")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise StoreError(f"cannot write the backup {backup}: {where}{exc.strerror or exc}") from exc
    return backup, seen


def _same_bytes(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _file_state(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # no open(): closing a descriptor would drop SQLite's locks
    return st.st_ino, st.st_size, st.st_mtime_ns


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _sqlite_engine(url: URL, busy_timeout: float) -> Engine:
    engine = create_engine(url, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN is ours (below): DDL inside it too
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")

    @event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before anything is read

    return engine


# ---------------------------------------------------------------------- servers


def _upgrade_server(label: str, url: URL) -> str:
    kwargs: dict[str, Any] = {"poolclass": NullPool}
    if url.get_driver_name() in ("psycopg", "psycopg2") and "connect_timeout" not in url.query:
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(url, **kwargs)
    except ImportError as exc:
        raise StoreError(f"no driver for {url.drivername} ({exc}); for PostgreSQL install "
                         "'nos[postgres]' and use a postgresql+psycopg:// URL") from exc
    except ArgumentError as exc:
        raise StoreError(f"bad database URL {label}: {_one_line(exc)}") from exc
    try:
        with engine.connect() as conn:
            tables, meta = _server_schema(conn)
            conn.rollback()
        version = _from_version(label, tables, meta)
        if version is None:
            return f"{label} is at nos schema {SCHEMA_VERSION} already: nothing to do"
        with engine.connect() as conn, conn.begin():
            # one upgrader at a time: the second waits here, then finds the schema current
            locked = _read_stamp(conn, lock=engine.dialect.name == "postgresql")
            if _from_version(label, tables, locked) != version:
                return f"{label} is at nos schema {SCHEMA_VERSION} already: nothing to do"
            removed = _migrate(conn, version)
    except SQLAlchemyError as exc:
        raise StoreError(f"upgrading {label} failed, nothing changed: {_one_line(exc)}") from exc
    finally:
        engine.dispose()
    return f"{_done(label, version, removed)}; no backup written (a server database: take a pg_dump first)"


def _server_schema(conn: Connection) -> tuple[set[str], dict[str, str]]:
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    meta: dict[str, str] = {}
    if "meta" in tables and {"key", "value"} <= {c["name"] for c in inspector.get_columns("meta")}:
        meta = _read_stamp(conn)
    return tables, meta

