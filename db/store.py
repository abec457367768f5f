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
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    TypeDecorator,
    create_engine,
    distinct,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

from db.models import (
    APP,
    BASELINE_KEY,
    INDIVIDUAL_STATUSES,
    RUN_STATUSES,
    SCHEMA_VERSION,
    SPLITS,
    UPGRADABLE_FROM,
    Base,
    Baseline,
    Claim,
    Evaluation,
    Individual,
    Meta,
    Run,
    StoredValueError,
    TimestepStat,
    baseline_key_index,
    check_stored,
    utcnow,
)

T = TypeVar("T")

SQLITE_HEADER = b"SQLite format 3\x00"
# Statuses whose hash means "this genome was already judged": find_hash may point at them.
JUDGED_STATUSES = ("evaluated", "rejected_integrity", "invalid", "error")
FINAL_RUN_STATUSES = ("finished", "interrupted", "failed")
MAX_ID = 2**63 - 1  # SQLite INTEGER (and PostgreSQL BIGINT) ids are signed 64-bit
# Bulk INSERTs send None as NULL instead of dropping the key, so rows with and without
# a value keep one key set and stay one statement (see _complete).
BULK = {"render_nulls": True}


class StoreError(Exception):
    """A database problem, described in one line a user can act on."""


class SlotTakenError(StoreError):
    """``add_individuals`` found a slot of the batch already stored (nothing was written).

    With several processes on one run this is not a fault: slots are deterministic, so the
    other process stored the same candidate first and the caller can read it back.
    """


def resolve_url(db: str | os.PathLike[str]) -> str:
    """A plain path becomes an absolute SQLite URL; anything with ``://`` is a URL already."""
    db = os.fspath(db)
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


class Store:
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
    ) -> None:
        self.url = resolve_url(db)
        self.readonly = readonly
        create = create and not readonly
        self._retries = max(0, retries)
        self._retry_wait = retry_wait
        self._busy_timeout = busy_timeout
        self._wal = False  # switched on once the file is known to be ours

        url = _parse_url(self.url)
        self._label = os.fspath(db) if url.get_backend_name() == "sqlite" else url.render_as_string()
        self._sqlite = url.get_backend_name() == "sqlite"
        self._memory = self._sqlite and (url.database or ":memory:") == ":memory:"
        self._path: Path | None = None  # the SQLite file, when given as a path
        if self._sqlite and not self._memory:
            self._path = self._check_sqlite_file(url, create)
        self._engine = self._make_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            if check and self._sqlite and not self._memory:
                self._quick_check()
            self._retry("open", lambda: self._prepare(create))
            if self._sqlite and not self._memory and not readonly:  # ours: WAL (_on_sqlite_connect)
                self._wal = True
                self._engine.dispose()
                self._retry("enable WAL", lambda: self._engine.connect().close())
        except BaseException:
            self._engine.dispose()
            raise

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _check_sqlite_file(self, url: URL, create: bool) -> Path | None:
        """Refuse, before SQLite touches it, a missing or empty file (create=False) or a
        non-database; the file's path (None for an SQLite ``file:`` URI)."""
        database = url.database or ""
        if database.startswith("file:"):  # an SQLite URI: the caller knows what they do
            return None
        path = Path(database)
        try:
            exists = path.exists()
        except (OSError, ValueError) as exc:  # NUL byte, name too long, ...
            raise StoreError(f"bad database path {self._label}: {exc}") from exc
        if not exists:
            if not create:
                raise StoreError(f"{self._label} does not exist (opened with create=False)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self._label}: {exc.strerror or exc}") from exc
            return path
        try:
            with path.open("rb") as fh:
                header = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"cannot read {self._label}: {exc.strerror or exc}") from exc
        if header and header != SQLITE_HEADER:
            raise StoreError(f"{self._label} is not an SQLite database; refusing to modify it")
        if not header and not create:
            raise StoreError(f"{self._label} is an empty database (opened with create=False)")
        return path

    def _quick_check(self) -> None:
        """Refuse an SQLite file that fails ``PRAGMA quick_check`` (before any write)."""

        def run() -> list[str]:
            with self._engine.connect() as conn:
                return [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]

        try:
            result = self._retry("open", run)
        except StoreError as exc:
            cause = exc.__cause__  # OperationalError: locked, unreadable, read-only: not damage
            if isinstance(cause, DatabaseError) and not isinstance(cause, OperationalError):
                raise StoreError(
                    f"{self._label} is damaged or not a database ({_one_line(cause)}); "
                    "refusing to use it"
                ) from cause
            raise
        if result != ["ok"]:
            more = f" (+{len(result) - 1} more)" if len(result) > 1 else ""
            raise StoreError(
                f"{self._label} is damaged: SQLite's quick_check reports "
                f"{_cut(' '.join((result or ['nothing'])[0].split()))!r}{more}; refusing to use it"
            )

    def _readonly_connect(self) -> sqlite3.Connection:
        """A read-only SQLite connection that writes nothing beside the file: ``mode=ro``
        while a ``-wal`` file exists (a writer may be active: read its log too), else
        ``immutable=1`` (no -wal / -shm is created, read-only directories work)."""
        assert self._path is not None
        name = os.fspath(self._path)
        live = any(os.path.exists(name + suffix) for suffix in ("-wal", "-journal"))
        uri = f"file:{urllib.parse.quote(name)}?mode=ro" + ("" if live else "&immutable=1")
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

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
                kwargs["creator"], kwargs["poolclass"] = self._readonly_connect, NullPool
            engine = create_engine(url, **kwargs)
        except ImportError as exc:
            raise StoreError(
                f"no driver for {url.drivername} ({exc}); for PostgreSQL install "
                "'nos[postgres]' and use a postgresql+psycopg:// URL"
            ) from exc
        except ArgumentError as exc:
            raise StoreError(f"bad database URL {self._label}: {_one_line(exc)}") from exc
        if self._sqlite:
            event.listen(engine, "connect", self._on_sqlite_connect)
            event.listen(engine, "begin", _on_sqlite_begin)
        return engine

    def _on_sqlite_connect(self, dbapi_connection: Any, _record: Any) -> None:
        """Per-connection SQLite settings; WAL only once the file is known to be ours."""
        # We emit BEGIN ourselves (see _on_sqlite_begin): sqlite3's own transaction
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

    def _prepare(self, create: bool) -> None:
        """Create the schema in an empty database, or check an existing one is ours."""
        tables, meta = self._read_schema()
        if not tables:
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

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient errors with backoff; any failure -> StoreError."""
        attempt = 0
        while True:
            try:
                return fn()
            except OperationalError as exc:
                if not self._is_transient(exc):
                    raise StoreError(f"{self._label}: {what} failed: {_one_line(exc)}") from exc
                if attempt >= self._retries:
                    raise StoreError(
                        f"{self._label}: {what} failed after {attempt + 1} attempts: "
                        f"{_one_line(exc)}"
                    ) from exc
                time.sleep(self._retry_wait * 2**attempt)
                attempt += 1
            except SQLAlchemyError as exc:
                raise StoreError(f"{self._label}: {what} failed: {_one_line(exc)}") from exc
            except StoredValueError as exc:
                raise StoreError(f"{self._label}: {what}: damaged stored value: {exc}") from exc
            except (ValueError, OverflowError, RecursionError) as exc:  # raised reading a value
                raise StoreError(
                    f"{self._label}: {what}: unreadable stored value ({_cut(str(exc) or type(exc).__name__)})"
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

    # ------------------------------------------------------------------ runs

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
            return None if run is None else _row(run)

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
                {**_row(run), "n_individuals": n, "n_evaluated": n_eval, "best_fitness": best}
                for run, n, n_eval, best in session.execute(stmt)
            ]

        return self._transaction("list_runs", read)

    def set_run_status(self, run_id: int, status: str) -> None:
        """Record how a run stands; a final status stamps finished_at, ``running`` clears it."""
        _check_choice("run status", status, RUN_STATUSES)

        def write(session: Session) -> None:
            run = session.get(Run, run_id)
            if run is None:
                raise StoreError(f"no run with id {run_id} in {self._label}")
            run.status = status
            run.finished_at = utcnow() if status in FINAL_RUN_STATUSES else None

        self._transaction("set_run_status", write, write=True)

    # ------------------------------------------------------------------ individuals

    def add_individuals(self, rows: list[dict]) -> list[int]:
        """Insert candidates (with nested ``evaluations``) all-or-nothing; ids in order.

        Besides column values a row may carry ``evaluations`` (list of dicts) and, instead
        of ``parent_id``, ``parent_slot``: the slot of a parent in the same run, stored
        already or earlier in this batch. Rows go in as bulk INSERTs, split only where a
        row needs the id of a parent from the same batch.
        """
        prepared = [_individual_values(row, f"individual row {i}") for i, row in enumerate(rows)]

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
                    f"({_one_line(cause)})"
                ) from cause
            raise

    def add_evaluations(self, by_individual: dict[int, list[dict]]) -> int:
        """Attach more evaluations to stored individuals, all-or-nothing; returns the count."""
        values = [
            {**_complete(Evaluation, _fields(Evaluation, e, f"evaluation of {ind_id}")), "individual_id": ind_id}
            for ind_id, evals in by_individual.items()
            for e in evals
        ]
        if not values:
            return 0

        def write(session: Session) -> int:
            session.execute(insert(Evaluation), values, execution_options=BULK)
            return len(values)

        return self._transaction("add_evaluations", write, write=True)

    def individuals(self, run_id: int) -> list[dict]:
        """All individuals of a run, by id, without evaluations."""
        if not _fits_id(run_id):
            return []
        stmt = select(Individual).where(Individual.run_id == run_id).order_by(Individual.id)
        return self._transaction("individuals", lambda s: [_row(i) for i in s.scalars(stmt)])

    def individual_by_slot(self, run_id: int, slot: str) -> dict | None:
        """The individual made in ``slot`` (how a resumed run knows what is done)."""
        stmt = select(Individual).where(Individual.run_id == run_id, Individual.slot == slot)
        return self._transaction("individual_by_slot", lambda s: _row_or_none(s.scalar(stmt)))

    def individuals_by_slots(self, run_id: int, slots: list[str]) -> list[dict]:
        """The individuals stored in any of ``slots`` (by id): what another process judged."""
        if not slots:
            return []
        stmt = (
            select(Individual)
            .where(Individual.run_id == run_id, Individual.slot.in_(slots))
            .order_by(Individual.id)
        )
        return self._transaction("individuals_by_slots", lambda s: [_row(i) for i in s.scalars(stmt)])

    def heldout_evaluations(self, run_id: int, task: str) -> list[tuple[int, dict]]:
        """(individual id, evaluation) of a run's validation and test evaluations on ``task``."""
        stmt = (select(Evaluation).join(Individual, Evaluation.individual_id == Individual.id)
                .where(Individual.run_id == run_id, Evaluation.task == task, Evaluation.split != "search")
                .order_by(Evaluation.id))
        return self._transaction("heldout_evaluations",
                                 lambda s: [(e.individual_id, _row(e)) for e in s.scalars(stmt)])

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

        if not _fits_id(ind_id):
            return None

        def read(session: Session) -> dict | None:
            ind = session.get(Individual, ind_id)
            if ind is None:
                return None
            run_name = check_stored("runs", Run.__table__.c.name,
                                    session.scalar(select(Run.name).where(Run.id == ind.run_id)))
            return {
                **_row(ind),
                "run_name": run_name,
                "evaluations": [_row(e) for e in ind.evaluations],
            }

        return self._transaction("get_individual", read)

    def lineage(self, ind_id: int) -> list[dict]:
        """``[individual, parent, grandparent, ..., initial]``; empty if no such id."""
        if not _fits_id(ind_id):
            return []

        def read(session: Session) -> list[dict]:
            chain: list[dict] = []
            seen: set[int] = set()
            ind = session.get(Individual, ind_id)
            while ind is not None and ind.id not in seen:  # `seen` guards hand-edited cycles
                seen.add(ind.id)
                chain.append(_row(ind))
                ind = None if ind.parent_id is None else session.get(Individual, ind.parent_id)
            return chain

        return self._transaction("lineage", read)

    def top(self, run_id: int, n: int = 10) -> list[dict]:
        """The ``n`` best evaluated individuals: full-fidelity first, then lower fitness, then id."""
        if not _fits_id(run_id):
            return []
        n = max(0, min(int(n), MAX_ID))
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
        return self._transaction("top", lambda s: [_row(i) for i in s.scalars(stmt)])

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
        return self._transaction("find_hash", lambda s: _row_or_none(s.scalar(stmt)))

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

    # ------------------------------------------------------------------ baselines / stats

    def add_baselines(self, rows: list[dict]) -> list[int]:
        """Insert baseline results all-or-nothing; the rows' ids, in order.

        Idempotent per key (`db.models.BASELINE_KEY`): a row of a protocol whose key is stored
        already -- another process computed the same protocol at the same moment, or the batch
        holds it twice -- is not stored again, and its id is the stored row's. Rows without a
        protocol (a run's own) are always inserted.
        """
        values = [
            _complete(Baseline, _fields(Baseline, row, f"baseline row {i}"))
            for i, row in enumerate(rows)
        ]
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
                    key = _baseline_key(values[i], dialect)
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
        return self._transaction("baselines", lambda s: [_row(b) for b in s.scalars(stmt)])

    def put_timestep_stats(self, run_id: int, row: dict) -> None:
        """Insert or replace the stats of ``row["timestep"]`` (a resumed run rewrites them)."""
        values = {**_fields(TimestepStat, row, "timestep stats"), "run_id": run_id}
        values.pop("id", None)
        if "timestep" not in values:
            raise StoreError("timestep stats need a 'timestep'")
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

    # ------------------------------------------------------------------ claims

    def claim(self, run_id: int, key: str, owner: str) -> bool:
        """Try to become the process that judges ``key`` of the run; True if ``owner`` holds it.

        Exactly one of several concurrent callers wins (unique ``(run_id, key)``); a
        process asking again for its own claim gets True.
        """

        def write(session: Session) -> bool:
            try:
                with session.begin_nested():
                    session.execute(insert(Claim), [{"run_id": run_id, "key": key, "owner": owner,
                                                     "heartbeat": 0, "claimed_at": utcnow()}])
                return True
            except IntegrityError:
                holder = session.scalar(
                    select(Claim.owner).where(Claim.run_id == run_id, Claim.key == key)
                )
                return holder == owner

        return self._transaction("claim", write, write=True)

    def claim_state(self, run_id: int, key: str) -> tuple[str, int] | None:
        """``(owner, heartbeat)`` of a claim, or None when nobody claimed ``key``."""
        stmt = select(Claim.owner, Claim.heartbeat).where(Claim.run_id == run_id, Claim.key == key)

        def read(session: Session) -> tuple[str, int] | None:
            row = session.execute(stmt).first()
            if row is None:
                return None
            c = Claim.__table__.c
            return check_stored("claims", c.owner, row[0]), check_stored("claims", c.heartbeat, row[1])

        return self._transaction("claim_state", read)

    def take_over(self, run_id: int, key: str, owner: str, seen: tuple[str, int]) -> bool:
        """Take a stale claim: succeeds only if it is still exactly as ``seen`` (owner, heartbeat).

        The stale owner's other claims in the run come along: `heartbeat` bumps all of an
        owner's claims at once, so they are just as stale, and taking them one by one would
        cost a waiting process ``--claim-timeout`` per chunk the dead process held (a resumed
        run after a crash waited minutes)."""
        stmt = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.key == key, Claim.owner == seen[0],
                   Claim.heartbeat == seen[1])
            .values(owner=owner, heartbeat=0, claimed_at=utcnow())
        )
        rest = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.owner == seen[0])
            .values(owner=owner, heartbeat=0, claimed_at=utcnow())
        )

        def write(session: Session) -> bool:
            if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
                return False
            session.execute(rest)
            return True

        return self._transaction("take_over", write, write=True)

    def heartbeat(self, run_id: int, owner: str) -> None:
        """Show that ``owner`` is alive: bump the heartbeat of all its claims in the run."""
        stmt = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.owner == owner)
            .values(heartbeat=Claim.heartbeat + 1)
        )
        self._transaction("heartbeat", lambda s: s.execute(stmt) and None, write=True)

    def timestep_stats(self, run_id: int) -> list[dict]:
        """A run's per-timestep stats, by timestep."""
        stmt = (
            select(TimestepStat)
            .where(TimestepStat.run_id == run_id)
            .order_by(TimestepStat.timestep)
        )
        return self._transaction("timestep_stats", lambda s: [_row(t) for t in s.scalars(stmt)])


# ---------------------------------------------------------------------- helpers


def _on_sqlite_begin(conn: Connection) -> None:
    """Emit BEGIN ourselves; writers take the write lock at once, so a busy database
    makes them wait (busy_timeout) instead of failing halfway through."""
    immediate = conn.get_execution_options().get("nos_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


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


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"bad database URL {url!r}: {_one_line(exc)}") from exc


def _is_slot_conflict(exc: IntegrityError) -> bool:
    """Is this the unique (run_id, slot) of individuals (SQLite or PostgreSQL wording)?"""
    message = str(exc.orig)
    return "uq_individuals_run_slot" in message or "individuals.run_id, individuals.slot" in message


def _one_line(exc: BaseException) -> str:
    """The first line of the driver's message (SQLAlchemy appends SQL and links), cut short."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return _cut(lines[0]) if lines else type(orig).__name__


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _columns(model: type[Base]) -> set[str]:
    return {attr.key for attr in inspect(model).column_attrs}


def _fields(model: type[Base], row: dict, what: str) -> dict[str, Any]:
    """The row as column values; an unknown key is an error, never silently dropped."""
    unknown = set(row) - _columns(model)
    if unknown:
        raise StoreError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    if "split" in row:
        _check_choice(f"split in {what}", row["split"], SPLITS)
    return dict(row)


def _complete(model: type[Base], values: dict[str, Any]) -> dict[str, Any]:
    """Fill absent columns (NULL or their scalar default) so every row of a batch has the
    same keys and the batch stays one INSERT statement. Callable defaults (timestamps)
    are left to SQLAlchemy, which fills them per row."""
    values = dict(values)
    for column in model.__table__.columns:
        if column.key in values or column.primary_key:
            continue
        if column.default is None:
            values[column.key] = None
        elif column.default.is_scalar:
            values[column.key] = column.default.arg
    return values


def _baseline_key(values: dict[str, Any], dialect: Any) -> tuple:
    """A baseline row's `BASELINE_KEY` as stored and read back (a non-finite float is NULL)."""
    types = {c: Baseline.__table__.c[c].type for c in BASELINE_KEY}
    return tuple(kind.process_bind_param(values[c], dialect) if isinstance(kind, TypeDecorator) else values[c]
                 for c, kind in types.items())


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
            if (key := _baseline_key(v, dialect)) not in have:
                new.setdefault(key, v)  # a key twice in the batch: once
        values, stmt = list(new.values()), insert(Baseline)
    if values:
        session.execute(stmt, values, execution_options=BULK)


def _individual_values(row: dict, what: str) -> tuple[dict[str, Any], str | None, list[dict]]:
    """Split an add_individuals row into (column values, parent_slot, evaluations)."""
    row = dict(row)
    evaluations = row.pop("evaluations", None) or []
    parent_slot = row.pop("parent_slot", None)
    values = _fields(Individual, row, what)
    missing = [k for k in ("run_id", "slot", "genome", "status") if values.get(k) is None]
    if missing:
        raise StoreError(f"{what}: missing {', '.join(missing)}")
    _check_choice(f"status in {what}", values["status"], INDIVIDUAL_STATUSES)
    if parent_slot is not None and values.get("parent_id") is not None:
        raise StoreError(f"{what}: give parent_id or parent_slot, not both")
    evaluations = [
        _complete(Evaluation, _fields(Evaluation, e, f"{what}, evaluation {j}"))
        for j, e in enumerate(evaluations)
    ]
    return _complete(Individual, values), parent_slot, evaluations


def _fits_id(value: Any) -> bool:
    """Could ``value`` be a stored id (an int in 1 .. 2**63 - 1)?"""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def _find_run(session: Session, name_or_id: str | int) -> Run | None:
    if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        return session.get(Run, name_or_id) if _fits_id(name_or_id) else None
    name = str(name_or_id)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from a command line: no stored name
        return None
    run = session.scalar(select(Run).where(Run.name == name))
    if run is None and name.isascii() and name.isdigit() and _fits_id(int(name)):
        run = session.get(Run, int(name))
    return run


def _row(obj: Base) -> dict[str, Any]:
    """All column values of a model instance (JSON parsed, datetimes aware UTC), each
    checked against its column's type: a tampered row is a StoredValueError."""
    mapper = inspect(obj).mapper
    return {
        attr.key: check_stored(str(obj.__tablename__), attr.columns[0], getattr(obj, attr.key))
        for attr in mapper.column_attrs
    }


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_or_none(obj: Base | None) -> dict[str, Any] | None:
    return None if obj is None else _row(obj)

