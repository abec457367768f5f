"""`nos db upgrade` on a real schema-2 file made by the previous release (tests/data/README.md),
as real subprocesses; PostgreSQL too when NOS_TEST_POSTGRES_URL is set."""

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
from db.models import SCHEMA_VERSION
from nos.__main__ import main as nos_main
from nos.db import main as db_main

from .conftest import Proc, assert_one_line_error, run_entry

FIXTURE = Path(__file__).resolve().parent / "data" / "schema2.sqlite"
NEW_COLUMNS = {"evaluations": ["task_key"], "baselines": ["task_key"]}


def upgrade_cmd(db: str | Path) -> Proc:
    return Proc(["-m", "nos", "db", "upgrade", "--db", str(db)])


def copy_fixture(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURE, path)
    return path


def tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def rows(conn: sqlite3.Connection, table: str, cols: list[str]) -> list[tuple]:
    return conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid").fetchall()


def stamp(path: Path, version: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the schema-2 fixture (the fixture itself is never opened for writing)."""
    assert FIXTURE.stat().st_size < 1_000_000
    return copy_fixture(tmp_path / "runs" / "nos.sqlite")


def readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the file and leaves nothing beside it."""
    return sqlite3.connect(f"file:{urllib.parse.quote(os.fspath(path))}?mode=ro&immutable=1", uri=True)


def test_fixture_is_a_schema2_nos_database() -> None:
    with contextlib.closing(readonly(FIXTURE)) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta")) == {"app": "nos", "schema_version": "2"}
        assert "task_key" not in columns(conn, "evaluations")
        assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM baselines").fetchone()[0] > 0


def test_upgrade_keeps_every_row(old: Path) -> None:
    original = FIXTURE.read_bytes()
    code, out, err = upgrade_cmd(old).result()
    assert code == 0, err[-2000:]
    backup = backup_path(old, 2)
    assert out == (f"upgraded {old} from nos schema 2 to {SCHEMA_VERSION} (evaluations.task_key and "
                   f"baselines.task_key); backup of the schema-2 file: {backup}\n")
    assert backup.read_bytes() == original  # byte-identical copy of the file as it was

    with contextlib.closing(readonly(backup)) as before, contextlib.closing(sqlite3.connect(old)) as after:
        assert after.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert set(tables(after)) == set(tables(before)) | {"alembic_version"}
        for table in tables(before):
            cols = columns(before, table)
            assert columns(after, table) == cols + NEW_COLUMNS.get(table, []), table
            if table != "meta":  # its schema_version stamp moves (checked below)
                assert rows(after, table, cols) == rows(before, table, cols), table
            for new in NEW_COLUMNS.get(table, []):
                assert after.execute(f"SELECT count(*) FROM {table} WHERE {new} IS NOT NULL").fetchone()[0] == 0
        assert dict(after.execute("SELECT key, value FROM meta")) == {"app": "nos", "schema_version": SCHEMA_VERSION}
        assert after.execute("SELECT version_num FROM alembic_version").fetchall() == [(SCHEMA_VERSION,)]

    # a second run: nothing to do, no new backup
    listing = sorted(p.name for p in old.parent.iterdir())
    code, out, err = upgrade_cmd(old).result()
    assert code == 0, err[-2000:]
    assert out == f"{old} is at nos schema {SCHEMA_VERSION} already: nothing to do, no backup written\n"
    assert sorted(p.name for p in old.parent.iterdir()) == listing
    assert backup.read_bytes() == original

    # every command reads the upgraded file
    runs = Proc(["-m", "nos", "query", "runs", "--db", str(old), "--format", "json"])
    top = Proc(["-m", "nos", "query", "top", "old", "--db", str(old)])
    code, out, err = runs.result()
    assert code == 0, err[-2000:]
    assert [r["name"] for r in json.loads(out)] == ["old"]
    code, out, err = top.result()
    assert code == 0, err[-2000:]
    assert "fitness" in out and len(out.splitlines()) >= 3
    with Store(old, create=False) as store:
        run = store.get_run("old")
        assert run is not None and run["status"] == "finished"
        assert all(b["task_key"] is None for b in store.baselines(run["id"]))
        assert store.baselines(task_key="sine@x") == []
        (ind, *_) = store.top(run["id"], 1)
        store.add_evaluations({ind["id"]: [{"task": "sine", "horizon": 1.0, "lr": 1e-3, "seed": 0, "loss": 0.5,
                                            "steps": 10, "seconds": 0.1, "task_key": "sine@abc"}]})
        assert store.get_individual(ind["id"])["evaluations"][-1]["task_key"] == "sine@abc"


def test_store_on_an_older_file_names_the_upgrade(old: Path) -> None:
    before = old.read_bytes()
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(StoreError, match=r"schema 2, this nos reads 3: run `nos db upgrade --db .*` \(a backup"):
            Store(old, **kwargs)
    code, out, err = Proc(["-m", "nos", "query", "runs", "--db", str(old)]).result()
    assert "nos db upgrade --db" in assert_one_line_error(code, out, err)
    assert old.read_bytes() == before


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
    assert "from nos schema 2 to 3" in upgrade(old)
    assert backup.read_bytes() == FIXTURE.read_bytes()
    with contextlib.closing(readonly(old)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)


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


def test_postgres_upgrade() -> None:
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
    try:
        with Store(scoped) as store:  # today's schema, made schema 2 by hand
            rid = store.create_run("pg-old", {"horizons": [1.0]}, seed=0)
            store.add_baselines([{"run_id": rid, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 0,
                                  "loss": 0.25, "hparam": 1e-3, "budget": 60}])
        engine = create_engine(scoped)
        with engine.begin() as conn:
            for table in NEW_COLUMNS:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN task_key"))
            conn.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
        with pytest.raises(StoreError, match="nos db upgrade"):
            Store(scoped)

        code, out, err = upgrade_cmd(scoped).result()
        assert code == 0, err[-2000:]
        assert out.count("\n") == 1 and "from nos schema 2 to 3" in out and "pg_dump" in out, out
        with engine.connect() as conn:
            for table in NEW_COLUMNS:
                assert "task_key" in {c["name"] for c in inspect(conn).get_columns(table)}
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "3"
        with Store(scoped, create=False) as store:
            (row,) = store.baselines(rid)
            assert row["loss"] == 0.25 and row["task_key"] is None
        code, out, err = upgrade_cmd(scoped).result()
        assert code == 0 and "already" in out, err[-2000:]
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
