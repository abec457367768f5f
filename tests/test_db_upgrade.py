"""`nos db upgrade` on real files made by the previous releases (schema 2 and schema 3, see
tests/data/README.md), as real subprocesses; PostgreSQL too when NOS_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import urllib.parse
import uuid
from pathlib import Path

import pytest

from db import Store, StoreError
from db.migrate import backup_path, upgrade
from db.models import BASELINE_KEY, SCHEMA_VERSION, Run
from nos.__main__ import main as nos_main
from nos.db import main as db_main

from .conftest import Proc, assert_one_line_error, run_entry

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = {2: DATA / "schema2.sqlite", 3: DATA / "schema3.sqlite"}  # each made by its own release
FIXTURE = FIXTURES[2]
# what each upgrade adds to the tables of an older file, by the schema it starts from
NEW_COLUMNS: dict[int, dict[str, list[str]]] = {2: {"evaluations": ["task_key"], "baselines": ["task_key"]}, 3: {}}
# the first line of each revision, as `nos db upgrade` lists them
CHANGES = {3: "evaluations.task_key and baselines.task_key",
           4: "one baselines row per key: duplicates removed, unique index uq_baselines_key"}
KEY_INDEX = ("CREATE UNIQUE INDEX uq_baselines_key ON baselines (protocol, method, horizon, seed, split, "
             "coalesce(hparam, -1.0)) WHERE protocol IS NOT NULL")
RUN = "old"  # the run in both fixtures: a finished search with its funnel
# `nos baselines` with the fixtures' protocol (tests/data/README.md)
PROTOCOL = ["--horizons", "1,2", "--validation-seeds", "1", "--test-seeds", "2", "--budget", "60",
            "--sine-pretrain-steps", "50", "--sine-width", "8", "--device", "cpu", "--threads", "1"]


def upgrade_cmd(db: str | Path) -> Proc:
    return Proc(["-m", "nos", "db", "upgrade", "--db", str(db)])


def nos(*args: str | Path) -> Proc:
    return Proc(["-m", "nos", *map(str, args)])


def changes(version: int) -> str:
    return "; ".join(CHANGES[v] for v in range(version + 1, int(SCHEMA_VERSION) + 1))


def copy_fixture(path: Path, version: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES[version], path)
    return path


def tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def rows(conn: sqlite3.Connection, table: str, cols: list[str]) -> list[tuple]:
    return conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid").fetchall()


def schema(conn: sqlite3.Connection) -> dict[str, tuple[str, str | None]]:
    return {name: (kind, sql) for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master")}


def first_of_each_key(conn: sqlite3.Connection) -> set[int]:
    """The ids the upgrade keeps: every row without a protocol, and the lowest id of each key
    (worked out here in Python, not by the migration's SQL; None == None: one key)."""
    keep: dict[tuple, int] = {}
    ids = set()
    for row_id, *key in conn.execute(f"SELECT id, {', '.join(BASELINE_KEY)} FROM baselines ORDER BY id"):
        if key[0] is None:
            ids.add(row_id)
        else:
            keep.setdefault(tuple(key), row_id)
    return ids | set(keep.values())


def duplicate_keys(conn: sqlite3.Connection) -> int:
    return conn.execute(f"SELECT count(*) FROM (SELECT count(*) AS n FROM baselines WHERE protocol IS NOT NULL "
                        f"GROUP BY {', '.join(BASELINE_KEY)}) WHERE n > 1").fetchone()[0]


def stamp(path: Path, version: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the schema-2 fixture (the fixture itself is never opened for writing)."""
    assert FIXTURE.stat().st_size < 1_000_000
    return copy_fixture(tmp_path / "runs" / "nos.sqlite")


@pytest.fixture(params=sorted(FIXTURES), ids=lambda v: f"schema{v}")
def older(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[int, Path]:
    """(version, a copy of the fixture of that schema) for every schema an upgrade starts from."""
    version = request.param
    assert FIXTURES[version].stat().st_size < 1_000_000
    return version, copy_fixture(tmp_path / "runs" / "nos.sqlite", version)


def readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the file and leaves nothing beside it."""
    return sqlite3.connect(f"file:{urllib.parse.quote(os.fspath(path))}?mode=ro&immutable=1", uri=True)


def test_fixture_is_a_schema2_nos_database() -> None:
    with contextlib.closing(readonly(FIXTURE)) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta")) == {"app": "nos", "schema_version": "2"}
        assert "task_key" not in columns(conn, "evaluations")
        assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM baselines").fetchone()[0] > 0


def test_fixture_is_a_schema3_nos_database_with_duplicates() -> None:
    """What schema 4 repairs, as the schema-3 release really wrote it: two processes computed one
    protocol at once, so every row of it is there twice; and a run with its funnel."""
    with contextlib.closing(readonly(FIXTURES[3])) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta")) == {"app": "nos", "schema_version": "3"}
        assert "task_key" in columns(conn, "evaluations") and "task_key" in columns(conn, "baselines")
        assert "uq_baselines_key" not in schema(conn)
        assert duplicate_keys(conn) > 0
        total = conn.execute("SELECT count(*) FROM baselines WHERE protocol IS NOT NULL").fetchone()[0]
        assert total == 2 * conn.execute("SELECT count(*) FROM baselines WHERE protocol IS NOT NULL AND id IN "
                                         f"({', '.join(map(str, first_of_each_key(conn)))})").fetchone()[0]
        assert conn.execute("SELECT name, status FROM runs").fetchall() == [(RUN, "finished")]
        assert conn.execute("SELECT count(*) FROM evaluations WHERE split = 'test'").fetchone()[0] > 0


def test_upgrade_keeps_every_row(older: tuple[int, Path], tmp_path: Path) -> None:
    version, db = older
    original = FIXTURES[version].read_bytes()
    with contextlib.closing(readonly(FIXTURES[version])) as conn:
        kept = first_of_each_key(conn)
        removed = conn.execute("SELECT count(*) FROM baselines").fetchone()[0] - len(kept)
    assert (removed > 0) == (version == 3)  # the schema-3 file holds duplicates, the schema-2 one none
    code, out, err = upgrade_cmd(db).result()
    assert code == 0, err[-2000:]
    backup = backup_path(db, version)
    assert backup.name == f"nos.sqlite.schema{version}.bak"
    gone = f"; {removed} duplicate baseline rows removed" if removed else ""
    assert out == (f"upgraded {db} from nos schema {version} to {SCHEMA_VERSION} ({changes(version)}){gone}; "
                   f"backup of the schema-{version} file: {backup}\n")
    assert backup.read_bytes() == original  # byte-identical copy of the file as it was

    with contextlib.closing(readonly(backup)) as before, contextlib.closing(sqlite3.connect(db)) as after:
        assert after.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert set(tables(after)) == set(tables(before)) | {"alembic_version"}
        new_columns = NEW_COLUMNS[version]
        for table in tables(before):
            cols = columns(before, table)
            assert columns(after, table) == cols + new_columns.get(table, []), table
            expected = rows(before, table, cols)
            if table == "baselines":  # the duplicates go, every other row stays as it was
                expected = [r for r in expected if r[cols.index("id")] in kept]
            if table != "meta":  # its schema_version stamp moves (checked below)
                assert rows(after, table, cols) == expected, table
            for new in new_columns.get(table, []):
                assert after.execute(f"SELECT count(*) FROM {table} WHERE {new} IS NOT NULL").fetchone()[0] == 0
        assert duplicate_keys(after) == 0
        # the schema: the old objects as they were (bar the tables that gained a column), plus the
        # key's index and Alembic's table
        old_schema, new_schema = schema(before), schema(after)
        altered = set(new_columns)
        assert {n: v for n, v in new_schema.items() if n not in altered and n in old_schema} == \
            {n: v for n, v in old_schema.items() if n not in altered}
        assert set(new_schema) - set(old_schema) == {"uq_baselines_key", "alembic_version",
                                                     "sqlite_autoindex_alembic_version_1"}
        assert new_schema["uq_baselines_key"] == ("index", KEY_INDEX)
        assert dict(after.execute("SELECT key, value FROM meta")) == {"app": "nos", "schema_version": SCHEMA_VERSION}
        assert after.execute("SELECT version_num FROM alembic_version").fetchall() == [(SCHEMA_VERSION,)]
    if version == 3:  # written by the release before, now exactly what this nos creates
        Store(tmp_path / "new.sqlite").close()
        with contextlib.closing(readonly(tmp_path / "new.sqlite")) as fresh, contextlib.closing(readonly(db)) as up:
            assert {n: v for n, v in schema(up).items() if "alembic" not in n} == schema(fresh)

    # a second run: nothing to do, no new backup
    listing = sorted(p.name for p in db.parent.iterdir())
    code, out, err = upgrade_cmd(db).result()
    assert code == 0, err[-2000:]
    assert out == f"{db} is at nos schema {SCHEMA_VERSION} already: nothing to do, no backup written\n"
    assert sorted(p.name for p in db.parent.iterdir()) == listing
    assert backup.read_bytes() == original

    # every command reads the upgraded file (the readers at once, real subprocesses)
    report = tmp_path / "report"
    procs = {"runs": nos("query", "runs", "--db", db, "--format", "json"),
             "top": nos("query", "top", RUN, "--db", db),
             "compare": nos("query", "compare", RUN, "--db", db, "--format", "json"),
             "report": nos("report", RUN, "--db", db, "--out", report)}
    results = {name: proc.result(300) for name, proc in procs.items()}
    for name, (code, _, err) in results.items():
        assert code == 0, (name, err[-2000:])
    assert [r["name"] for r in json.loads(results["runs"][1])] == [RUN]
    assert "fitness" in results["top"][1] and len(results["top"][1].splitlines()) >= 3
    compared = json.loads(results["compare"][1])
    champion = compared["champion"].lstrip("#")
    assert champion.isdigit() and compared["methods"]
    assert (report / "summary.md").exists()
    code, out, err = nos("export", champion, "--db", db, "-o", tmp_path / "champion.py").result(300)
    assert code == 0, err[-2000:]
    assert f"class NosOptimizer{champion}" in (tmp_path / "champion.py").read_text()

    with Store(db, create=False) as store:
        run = store.get_run(RUN)
        assert run is not None and run["status"] == "finished"
        assert all(b["task_key"] is None for b in store.baselines(run["id"])) == (version == 2)
        assert store.baselines(task_key="sine@x") == []
        (ind, *_) = store.top(run["id"], 1)
        store.add_evaluations({ind["id"]: [{"task": "sine", "horizon": 1.0, "lr": 1e-3, "seed": 0, "loss": 0.5,
                                            "steps": 10, "seconds": 0.1, "task_key": "sine@abc"}]})
        assert store.get_individual(ind["id"])["evaluations"][-1]["task_key"] == "sine@abc"
        n_baselines = len(store.baselines())
        # a run stopped before it finished, resumed by this nos: its pretrained networks go to this
        # test's folder (the config names the folder of the machine that made the fixture)
        store.set_run_status(run["id"], "interrupted")
        with store.session() as session:
            record = session.get(Run, run["id"])
            assert record is not None
            record.config = {**record.config, "cache_dir": str(tmp_path / "cache")}

    code, out, err = nos("evolve", "--resume", RUN, "--db", db, "--device", "cpu").result(300)
    assert code == 0, err[-3000:]
    assert "reusing stored validation rows" in err and "reusing stored test rows" in err, err[-3000:]
    assert "champion" in out
    with Store(db, readonly=True) as store:
        assert store.get_run(RUN)["status"] == "finished"
        assert len(store.baselines()) == n_baselines  # nothing tuned again, nothing stored twice
    with contextlib.closing(readonly(db)) as conn:
        assert duplicate_keys(conn) == 0
    code, out, err = nos("query", "compare", RUN, "--db", db, "--format", "json").result(300)
    assert code == 0, err[-2000:]
    assert json.loads(out) == compared  # the resumed run judged by the same stored rows


def test_store_on_an_older_file_names_the_upgrade(older: tuple[int, Path], tmp_path: Path) -> None:
    version, db = older
    before = db.read_bytes()
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(StoreError, match=rf"schema {version}, this nos reads {SCHEMA_VERSION}: run "
                                             r"`nos db upgrade --db .*` \(a backup"):
            Store(db, **kwargs)
    # every command, readers and writers alike, says so in one line (all started at once)
    procs = [nos("query", "runs", "--db", db),
             nos("query", "compare", RUN, "--db", db),
             nos("report", RUN, "--db", db, "--out", tmp_path / "report"),
             nos("export", "4", "--db", db, "-o", tmp_path / "x.py"),
             nos("baselines", "--db", db, "--cache-dir", tmp_path / "cache", *PROTOCOL),
             nos("evolve", "--resume", RUN, "--db", db, "--device", "cpu")]
    for proc in procs:
        line = assert_one_line_error(*proc.result(300))
        assert f"nos db upgrade --db {db}" in line, (proc.popen.args, line)
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]  # no backup, no -wal left behind


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files the upgrade must refuse: {case: (path, expected text of the error line)}."""
    newer = copy_fixture(tmp_path / "newer.sqlite")
    stamp(newer, "99")
    ancient = copy_fixture(tmp_path / "ancient.sqlite")
    stamp(ancient, "1")
    half = copy_fixture(tmp_path / "half.sqlite")
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    header = copy_fixture(tmp_path / "header.sqlite")
    data = bytearray(header.read_bytes())
    data[:100] = b"\xa5" * 100
    header.write_bytes(bytes(data))
    pages = copy_fixture(tmp_path / "pages.sqlite")
    data = bytearray(pages.read_bytes())
    data[4096:8192] = bytes(range(256)) * 16  # the second page: garbage behind a good header
    pages.write_bytes(bytes(data))
    other = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO things (name) VALUES ('x')")
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 50)
    return {
        "newer": (newer, "written by a newer nos"),
        "ancient": (ancient, "schema 2 and later only"),
        "truncated": (half, "damaged"),
        "header": (header, "not an SQLite database"),
        "pages": (pages, "damaged"),
        "not-nos": (other, "not a nos database"),
        "empty": (empty, "nothing to upgrade"),
        "text": (text, "not an SQLite database"),
        "missing": (tmp_path / "missing.sqlite", "does not exist"),
    }


COMMAND_CASES = ("newer", "truncated", "header", "not-nos")  # the rest through db.migrate.upgrade


def test_refused_files_are_unchanged(tmp_path: Path) -> None:
    cases = _bad_files(tmp_path)
    before = {name: path.read_bytes() if path.exists() else None for name, (path, _) in cases.items()}
    procs = {name: upgrade_cmd(cases[name][0]) for name in COMMAND_CASES}  # all started at once
    for name, (path, expected) in cases.items():
        if name in procs:
            line = assert_one_line_error(*procs[name].result())
        else:
            with pytest.raises(StoreError) as info:
                upgrade(path)
            line = str(info.value)
            assert "\n" not in line
        assert expected in line, (name, line)
        assert (path.read_bytes() if path.exists() else None) == before[name], name
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if n.endswith(".bak") or "-wal" in n or "-journal" in n], left


def test_a_different_backup_is_never_overwritten(old: Path) -> None:
    backup = backup_path(old, 2)
    backup.write_bytes(b"someone else's file")
    before = old.read_bytes()
    with pytest.raises(StoreError, match="exists and differs"):
        upgrade(old)
    assert backup.read_bytes() == b"someone else's file"
    assert old.read_bytes() == before
    backup.write_bytes(before)  # the same bytes: kept, and the upgrade goes ahead
    assert f"from nos schema 2 to {SCHEMA_VERSION}" in upgrade(old)
    assert backup.read_bytes() == FIXTURE.read_bytes()
    with contextlib.closing(readonly(old)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (SCHEMA_VERSION,)


def test_a_file_in_use_is_refused(old: Path) -> None:
    before = old.read_bytes()
    with contextlib.closing(sqlite3.connect(old)) as other:  # another process would hold it like this
        other.execute("SELECT count(*) FROM runs").fetchone()
        line = assert_one_line_error(*upgrade_cmd(old).result())
    assert "in use by another process" in line
    assert old.read_bytes() == before


def test_arguments_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    bogus = Proc(["-m", "nos", "db", "upgrade", "--bogus"])
    helped = Proc(["-m", "nos.db", "upgrade", "--help"])
    for argv in ([], ["downgrade"], ["upgrade", "--db"]):
        assert_one_line_error(*run_entry(db_main, argv))
    assert "unrecognized arguments: --bogus" in assert_one_line_error(*bogus.result())
    code, out, err = helped.result()
    assert code == 0, err
    assert "take a pg_dump first" in out and "--db" in out
    assert nos_main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "upgrade an older database in place (backup first)" in listing and "calibrate" in listing


# ---------------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize("version", sorted(FIXTURES), ids=lambda v: f"schema{v}")
def test_postgres_upgrade(version: int) -> None:
    url = os.environ.get("NOS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set NOS_TEST_POSTGRES_URL=postgresql+psycopg://... to test PostgreSQL")
    from sqlalchemy import create_engine, inspect, text

    schema = f"nos_upgrade_{uuid.uuid4().hex[:10]}"  # a schema of its own: the shared tables stay
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # an unreachable server skips, like test_distributed
        admin.dispose()
        pytest.skip(f"PostgreSQL at NOS_TEST_POSTGRES_URL is unreachable: {exc}")
    sep = "&" if "?" in url else "?"
    scoped = f"{url}{sep}options={urllib.parse.quote(f'-csearch_path={schema}')}"
    key = {"run_id": None, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 100, "loss": 0.5,
           "hparam": 1e-3, "budget": 60, "split": "validation", "protocol": "validation:pg", "task_key": "sine@pg"}
    keyed = [key, {**key, "method": "before", "hparam": None, "loss": 0.75}]
    try:
        with Store(scoped) as store:  # today's schema, made the older one by hand
            rid = store.create_run("pg-old", {"horizons": [1.0]}, seed=0)
            own = {"run_id": rid, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 0, "loss": 0.25,
                   "hparam": 1e-3, "budget": 60}
            first = store.add_baselines([own, *keyed])
            first.append(*store.add_baselines([own]))  # a run's own rows twice: no key, both stay
        engine = create_engine(scoped)
        with engine.begin() as conn:
            # what two processes of the older nos left: each protocol row twice
            conn.execute(text("DROP INDEX uq_baselines_key"))
            cols = "run_id, method, task, task_key, horizon, seed, loss, hparam, budget, split, protocol, created_at"
            conn.execute(text(f"INSERT INTO baselines ({cols}) SELECT {cols} FROM baselines "
                              "WHERE protocol IS NOT NULL ORDER BY id"))
            if version == 2:
                for table in NEW_COLUMNS[2]:
                    conn.execute(text(f"ALTER TABLE {table} DROP COLUMN task_key"))
            conn.execute(text(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'"))
        with pytest.raises(StoreError, match="nos db upgrade"):
            Store(scoped)

        code, out, err = upgrade_cmd(scoped).result()
        assert code == 0, err[-2000:]
        assert out.count("\n") == 1 and f"from nos schema {version} to {SCHEMA_VERSION}" in out, out
        assert "; 2 duplicate baseline rows removed;" in out and "pg_dump" in out, out
        with engine.connect() as conn:
            for table in NEW_COLUMNS[2]:
                assert "task_key" in {c["name"] for c in inspect(conn).get_columns(table)}
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == SCHEMA_VERSION
            index = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE schemaname = :s AND "
                                      "indexname = 'uq_baselines_key'"), {"s": schema}).scalar_one()
            assert "UNIQUE" in index and "COALESCE(hparam" in index and "WHERE (protocol IS NOT NULL)" in index
        with Store(scoped, create=False) as store:
            stored = store.baselines()
            assert [b["id"] for b in stored] == sorted(first)  # the first copies, the run's two rows
            assert [b["loss"] for b in stored] == [0.25, 0.5, 0.75, 0.25]
            assert [b["task_key"] for b in stored] == [None, *[None if version == 2 else "sine@pg"] * 2, None]
            assert store.add_baselines(keyed) == first[1:3]  # one row per key from now on
            assert len(store.baselines()) == len(stored)
        code, out, err = upgrade_cmd(scoped).result()
        assert code == 0 and "already" in out, err[-2000:]
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
