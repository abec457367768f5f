"""One row per key in `baselines` (schema 4), and `nos baselines` that only reads when it can.

Two real `python -m nos.baselines` processes compute one protocol at the same moment on one
database (SQLite; PostgreSQL too when NOS_TEST_POSTGRES_URL is set): each really computes every
row -- a real other writer holds the write lock until both have looked and found nothing
stored -- and the database ends with exactly one row per key. Then the same command, with
everything stored, runs on a 0444 file in a 0555 folder with file modes enforced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import Store
from db.models import BASELINE_KEY

from .conftest import REPO, assert_one_line_error
from .test_readonly import _as_user, _state

# the smallest protocol that still has two horizons and every baseline (about 3 s a process)
PROTOCOL = ["--horizons", "1,2", "--validation-seeds", "1", "--test-seeds", "2", "--budget", "60",
            "--sine-pretrain-steps", "50", "--sine-width", "8", "--device", "cpu", "--threads", "1"]
STARTED = "baselines (validation): started"  # printed once a process found no stored rows
KEY_SQL = ", ".join("coalesce(hparam, -1.0)" if c == "hparam" else c for c in BASELINE_KEY)
DUPLICATES = (f"SELECT count(*) FROM (SELECT count(*) AS n FROM baselines WHERE protocol IS NOT NULL "
              f"GROUP BY {KEY_SQL}) AS per_key WHERE n > 1")
KEYS = f"SELECT count(*) FROM (SELECT 1 FROM baselines WHERE protocol IS NOT NULL GROUP BY {KEY_SQL}) AS k"


def baselines_cmd(db: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nos.baselines", "--db", db, "--cache-dir", str(cache), *PROTOCOL, *extra,
            "--format", "json"]


class Watched:
    """A process whose stderr is read as it comes, so a test can wait for one of its lines."""

    def __init__(self, cmd: list[str]) -> None:
        self.popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.err: list[str] = []
        self.seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.err.append(line)
            if STARTED in line:
                self.seen.set()
        self.seen.set()  # it ended: nobody waits in vain

    def result(self, timeout: float = 300) -> tuple[int, str, str]:
        assert self.popen.stdout is not None
        out = self.popen.stdout.read()
        code = self.popen.wait(timeout)
        self._reader.join(timeout)
        return code, out, "".join(self.err)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


@contextlib.contextmanager
def writes_held(db: str) -> Iterator[None]:
    """Another writer holds the baselines table: readers go on, every insert waits until the
    block ends (then the transaction is rolled back: nothing of it is stored)."""
    if "://" not in db:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock (WAL: readers are not blocked)
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        with engine.connect() as pg:
            pg.execute(text("LOCK TABLE baselines IN EXCLUSIVE MODE"))  # SELECT yes, INSERT waits
            yield
            pg.rollback()
    finally:
        engine.dispose()


def two_at_once(db: str, tmp: Path) -> list[tuple[int, str, str]]:
    """Two `nos baselines` of one protocol on `db`, both computing: each has looked for stored
    rows and found none (its STARTED line) before either may store a row."""
    with Store(db):
        pass  # the schema exists, so both processes see a nos database at once
    procs: list[Watched] = []
    try:
        with writes_held(db):
            # separate weight caches: the two must share nothing but the database
            procs = [Watched(baselines_cmd(db, tmp / f"cache{i}")) for i in (1, 2)]
            for p in procs:
                assert p.seen.wait(240), "".join(p.err)[-2000:]
                assert p.popen.poll() is None, "".join(p.err)[-2000:]  # still running: waiting to store
        results = [p.result() for p in procs]
    finally:
        for p in procs:
            p.stop()
    for code, _, err in results:
        assert code == 0, err[-3000:]
        assert STARTED in err and "reusing stored validation" not in err, err[-3000:]
    return results


def counts(db: str) -> tuple[int, int, int]:
    """(duplicate keys, distinct keys, protocol rows) of the baselines table."""
    if "://" not in db:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            return one(DUPLICATES), one(KEYS), one("SELECT count(*) FROM baselines WHERE protocol IS NOT NULL")
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        with engine.connect() as pg:
            one = lambda sql: pg.execute(text(sql)).scalar_one()  # noqa: E731
            return one(DUPLICATES), one(KEYS), one("SELECT count(*) FROM baselines WHERE protocol IS NOT NULL")
    finally:
        engine.dispose()


def check_one_row_per_key(db: str, results: list[tuple[int, str, str]]) -> None:
    duplicates, keys, rows = counts(db)
    assert duplicates == 0 and rows == keys > 0, (duplicates, keys, rows)
    first, second = (json.loads(out) for _, out, _ in results)
    for doc in (first, second):
        doc.pop("seconds"), doc.pop("stage_seconds")
    assert first == second  # the one stored copy is what both computed


# ---------------------------------------------------------------------- SQLite


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, str, str]]]:
    tmp = tmp_path_factory.mktemp("keys")
    db = tmp / "nos.sqlite"
    return db, two_at_once(str(db), tmp)


def test_two_processes_one_protocol_leave_one_row_per_key(computed: tuple[Path, list]) -> None:
    db, results = computed
    check_one_row_per_key(str(db), results)
    with Store(db, readonly=True) as store:  # nothing else was stored: no run, no run's rows
        assert store.list_runs() == [] and all(b["protocol"] for b in store.baselines())


def test_add_baselines_twice_stores_one_copy(tmp_path: Path) -> None:
    with Store(tmp_path / "nos.sqlite") as store:
        check_idempotent(store)


def check_idempotent(store: Store) -> None:
    key = f"validation:{uuid.uuid4().hex[:16]}"  # a protocol of its own (PostgreSQL is shared)
    row = {"run_id": None, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 100, "loss": 0.25,
           "hparam": 1e-3, "budget": 60, "split": "validation", "protocol": key}
    rows = [row, {**row, "hparam": 3e-3}, {**row, "method": "randopt_first", "hparam": 0.02},
            {**row, "method": "before", "hparam": None}, {**row, "method": "before", "horizon": 2.0, "hparam": None},
            {**row, "split": "test", "protocol": key.replace("validation", "test")}]
    ids = store.add_baselines(rows)
    assert ids == sorted(ids) and len(set(ids)) == len(rows)  # new rows: in the order given
    again = store.add_baselines(rows)
    assert again == ids  # the stored rows' ids, nothing new
    assert store.add_baselines([rows[3], {**rows[1], "loss": 0.5}, rows[3]]) == [ids[3], ids[1], ids[3]]
    stored = store.baselines(protocol=key) + store.baselines(protocol=rows[-1]["protocol"])
    assert sorted(b["id"] for b in stored) == ids  # one copy of each, the first one's numbers
    assert next(b for b in stored if b["id"] == ids[1])["loss"] == 0.25
    # a run's own rows (no protocol) have no key: each call stores them
    own = {**row, "protocol": None, "split": "search", "method": f"adam-{key}"}
    first, second = store.add_baselines([own]), store.add_baselines([own])
    assert first != second
    # a batch that mixes both: ids in order, the keyed ones found again
    mixed = store.add_baselines([own, rows[0], own])
    assert mixed[1] == ids[0] and mixed[0] < mixed[2]


# ---------------------------------------------------------------------- read-only


def test_baselines_reads_a_readonly_database(computed: tuple[Path, list], tmp_path: Path) -> None:
    src, results = computed
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "nos.sqlite"
    shutil.copyfile(src, db)
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        before = _state(folder)
        # everything stored: read, never written (the networks are not even needed)
        proc = subprocess.run(_as_user(baselines_cmd(str(db), tmp_path / "cache")), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "reusing stored validation" in proc.stderr and "reusing stored test" in proc.stderr
        assert STARTED not in proc.stderr and "pretraining" not in proc.stderr
        assert _state(folder) == before  # no byte changed, no -wal / -shm / journal
        assert not (tmp_path / "cache").exists()
        doc, stored = json.loads(proc.stdout), json.loads(results[0][1])
        for d in (doc, stored):
            d.pop("seconds"), d.pop("stage_seconds")
        assert doc == stored
        # a protocol with rows still to compute needs to write: refused in one line, up front
        other = subprocess.run(_as_user(baselines_cmd(str(db), tmp_path / "cache", "--test-seeds", "3")),
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        line = assert_one_line_error(other.returncode, other.stdout, other.stderr)
        assert "rows of this protocol are not stored yet" in line, line
        assert _state(folder) == before
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A database of its own on the NOS_TEST_POSTGRES_URL server (a protocol's rows are shared
    by every run of a database: other tests must not have stored these), dropped afterwards."""
    url = os.environ.get("NOS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set NOS_TEST_POSTGRES_URL=postgresql+psycopg://... (.ci/run does)")
    from sqlalchemy import create_engine, make_url, text

    name = f"nos_keys_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # unreachable, or no right to create databases
        admin.dispose()
        pytest.skip(f"cannot create a database at NOS_TEST_POSTGRES_URL: {str(exc).splitlines()[0]}")
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_two_processes_one_protocol_on_postgres(postgres_db: str, tmp_path: Path) -> None:
    results = two_at_once(postgres_db, tmp_path)
    check_one_row_per_key(postgres_db, results)
    with Store(postgres_db, create=False) as store:
        check_idempotent(store)
