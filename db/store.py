"""The store: the only code in nos that talks SQL.

Every public method is one transaction and speaks plain dicts, so callers never hold
ORM objects across transactions. Opening a database is careful: a file or server that
is not a nos database of this schema version is refused before anything is written
to it, and so is an SQLite file that fails SQLite's ``PRAGMA quick_check``. A store
opened ``readonly`` never writes and leaves no files behind (SQLite ``mode=ro``, or
``immutable`` when no writer has the file open). Values read back are checked like
input (types, finite floats, JSON); transient failures ("database is locked", a dropped
connection) are retried a bounded number of times; every failure reaches the caller as
a one-line StoreError.

`Store` implements `db.storage.Storage` from parts, one module per concern: plumbing
(`db.sql_engine`), SQLite file checks (`db.sqlite_file`), runs (`db.sql_runs`), candidates
(`db.sql_candidates`), baselines and timestep stats (`db.sql_baselines`), claims
(`db.claims`). This module opens the database and re-exports the names callers import
from ``db.store``.
"""

from __future__ import annotations

import os

from sqlalchemy import insert, inspect, select
from sqlalchemy.orm import sessionmaker

from db.claims import SQLClaims
from db.errors import FINAL_RUN_STATUSES, JUDGED_STATUSES, MAX_ID, SlotTakenError, StoreError
from db.models import APP, SCHEMA_VERSION, UPGRADABLE_FROM, Base, Meta
from db.rows import cut as _cut
from db.rows import one_line as _one_line
from db.sql_baselines import SQLBaselines
from db.sql_candidates import SQLCandidates
from db.sql_engine import BULK, parse_url, resolve_url
from db.sql_runs import SQLRuns
from db.sqlite_file import SQLITE_HEADER, check_sqlite_file, quick_check
from db.storage import Storage

_parse_url = parse_url  # the old private name (db.migrate)

__all__ = [
    "BULK",
    "FINAL_RUN_STATUSES",
    "JUDGED_STATUSES",
    "MAX_ID",
    "SQLITE_HEADER",
    "SlotTakenError",
    "Storage",
    "Store",
    "StoreError",
    "_cut",
    "_one_line",
    "_parse_url",
    "resolve_url",
    "schema_mismatch",
    "schema_version_number",
]


class Store(SQLRuns, SQLCandidates, SQLBaselines, SQLClaims):
    """Read and write nos runs, individuals, evaluations, baselines and timestep stats.

    ``db`` is a path (SQLite) or any SQLAlchemy URL. ``create=False`` only opens an
    existing nos database: a missing path or an empty file is a StoreError, and nothing
    is created. ``readonly=True`` (implies ``create=False``) opens it for reading only:
    writes are refused, SQLite opens the file with ``mode=ro`` (``immutable=1`` when
    no ``-wal`` file shows a writer), so read-only files and directories work and no
    ``-wal``/``-shm`` files are left behind; PostgreSQL sessions are read-only. With
    ``check`` (the default) an SQLite file must pass ``PRAGMA quick_check`` before
    anything else touches it: a damaged file is refused with one line, unmodified.
    A transient failure is retried up to ``retries`` more times, waiting ``retry_wait``
    seconds, doubled each time; SQLite writers first wait up to ``busy_timeout``
    seconds for the lock.
    """

    def __init__(
        self,
        db: str | os.PathLike[str],
        *,
        create: bool = True,
        readonly: bool = False,
        check: bool = True,
        retries: int = 5,
        retry_wait: float = 0.2,
        busy_timeout: float = 10.0,
        empty_ok: bool = False,
    ) -> None:
        self.url = resolve_url(db)
        self._empty_ok = empty_ok  # read-only probe of a writer that will create the schema
        self.readonly = readonly
        create = create and not readonly
        self._retries = max(0, retries)
        self._retry_wait = retry_wait
        self._busy_timeout = busy_timeout
        self._wal = False  # switched on once the file is known to be ours

        url = parse_url(self.url)
        self._label = os.fspath(db) if url.get_backend_name() == "sqlite" else url.render_as_string()
        self._sqlite = url.get_backend_name() == "sqlite"
        self._memory = self._sqlite and (url.database or ":memory:") == ":memory:"
        self._path = None  # the SQLite file, when given as a path
        if self._sqlite and not self._memory:
            self._path = check_sqlite_file(url, self._label, create)
            if not readonly and self._path is not None and self._path.exists() and self._path.stat().st_size:
                # An existing file is checked read-only before a writer opens it: a file this nos
                # refuses is never opened for writing, whose -wal / -shm files a read-only reader
                # at the same moment could leave behind (it cannot delete them when it closes last).
                Store(db, readonly=True, check=check, retries=retries, retry_wait=retry_wait,
                      busy_timeout=busy_timeout, empty_ok=create).close()
                check = False  # the probe ran PRAGMA quick_check
        self._engine = self._make_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            if check and self._sqlite and not self._memory:
                quick_check(self._label, self._engine, self._retry)
            self._retry("open", lambda: self._prepare(create))
            if self._sqlite and not self._memory and not readonly:  # ours: WAL (_on_sqlite_connect)
                self._wal = True
                self._engine.dispose()
                self._retry("enable WAL", lambda: self._engine.connect().close())
        except BaseException:
            self._engine.dispose()
            raise

    def _prepare(self, create: bool) -> None:
        """Create the schema in an empty database, or check an existing one is ours."""
        tables, meta = self._read_schema()
        if not tables:
            if self._empty_ok:
                return  # a writer's probe: the writer creates the schema
            if not create:
                raise StoreError(f"{self._label} is an empty database (opened with create=False)")
            self._create_schema()
            tables, meta = self._read_schema()
        if meta.get("app") != APP:
            shown = ", ".join(sorted(tables)[:12]) + (", ..." if len(tables) > 12 else "")
            raise StoreError(
                f"{self._label} is not a nos database (tables: {shown}); refusing to modify it"
            )
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(schema_mismatch(self._label, version))
        missing = sorted(set(Base.metadata.tables) - tables)
        if missing == ["claims"]:
            # Databases written before cooperating processes existed lack only this table;
            # it is new and empty, so adding it changes nothing already stored.
            if create:
                Base.metadata.tables["claims"].create(self._engine, checkfirst=True)
            missing = []
        if missing:
            raise StoreError(
                f"{self._label} is a nos database without tables {', '.join(missing)}; "
                "refusing to modify it"
            )

    def _read_schema(self) -> tuple[set[str], dict[str, str]]:
        """Table names and the meta stamps, read without writing anything."""
        with self._engine.connect() as conn:
            inspector = inspect(conn)
            tables = set(inspector.get_table_names())
            meta: dict[str, str] = {}
            if "meta" in tables and {"key", "value"} <= {
                c["name"] for c in inspector.get_columns("meta")
            }:
                meta = dict(conn.execute(select(Meta.key, Meta.value)).all())
        return tables, meta

    def _create_schema(self) -> None:
        """All tables and the meta stamps in one transaction, so no one sees half a schema."""
        with self._engine.connect().execution_options(nos_write=True) as conn, conn.begin():
            if inspect(conn).get_table_names():
                return  # another process created it meanwhile; the caller re-checks
            Base.metadata.create_all(conn)
            conn.execute(
                insert(Meta),
                [{"key": "app", "value": APP}, {"key": "schema_version", "value": SCHEMA_VERSION}],
            )


def schema_version_number(version: str | None) -> int | None:
    """A ``meta.schema_version`` stamp as a number (None: missing or not a plain number)."""
    if version is None or not (version.isascii() and version.isdigit()) or len(version) > 9:
        return None
    return int(version)


def schema_mismatch(label: str, version: str | None) -> str:
    """The one line for a nos database whose schema this nos does not read: an older one
    names the command that upgrades it, a newer one is left to the nos that wrote it."""
    have, want = schema_version_number(version), int(SCHEMA_VERSION)
    if have is not None and int(UPGRADABLE_FROM) <= have < want:
        return (f"{label} has nos schema {have}, this nos reads {want}: run "
                f"`nos db upgrade --db {label}` (a backup is written first)")
    if have is not None and have < want:
        return (f"{label} has nos schema {have}, this nos reads {want}; `nos db upgrade` migrates "
                f"schema {UPGRADABLE_FROM} and later only: open it with the older nos that wrote "
                "it, or use a new --db")
    shown = _cut(repr(version), 40)
    return (f"{label} has nos schema_version {shown}, this nos reads {want}; refusing to modify "
            "it (written by a newer nos? use that nos, or a new --db)")
