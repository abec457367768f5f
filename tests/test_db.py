"""The db package against real SQLite files (and PostgreSQL when NOS_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from db import Store, StoreError, resolve_url
from db.models import SCHEMA_VERSION, Evaluation, Individual

CONFIG = {"particles": 2, "initial": 4, "lr_grid": [1e-3, 1e-2]}


def evaluation(loss: float | None = 0.5, horizon: float = 1.0) -> dict:
    return {"task": "sine", "horizon": horizon, "lr": 1e-3, "seed": 0, "loss": loss,
            "steps": 100, "seconds": 0.25}


def individual(run_id: int, slot: str, **values) -> dict:
    row = {"run_id": run_id, "slot": slot, "genome": {"op": "sign", "args": ["g"]},
           "expression": "sign(g)", "latex": r"\operatorname{sign}(g)", "genome_hash": slot,
           "status": "evaluated", "fitness": 1.0}
    return {**row, **values}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "nos.sqlite"


@pytest.fixture
def store(path: Path):
    with Store(str(path)) as s:
        yield s


@pytest.fixture
def run_id(store: Store) -> int:
    return store.create_run("r1", CONFIG, seed=7)


# ---------------------------------------------------------------------- opening


def test_resolve_url(tmp_path: Path) -> None:
    assert resolve_url(str(tmp_path / "a.sqlite")) == f"sqlite:///{tmp_path}/a.sqlite"
    assert resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert resolve_url("sqlite:///rel.db") == "sqlite:///rel.db"


def test_create_and_reopen_keeps_data(path: Path) -> None:
    with Store(str(path)) as s:
        rid = s.create_run("keep", CONFIG, seed=1)
        (iid,) = s.add_individuals([individual(rid, "init:0", evaluations=[evaluation()])])
    with Store(str(path), create=False) as s:
        assert s.get_run("keep")["config"] == CONFIG
        assert s.get_individual(iid)["evaluations"][0]["loss"] == 0.5


def test_path_objects_and_in_memory(path: Path) -> None:
    with Store(path) as s:
        assert s.url == f"sqlite:///{path}"
    with Store("sqlite://") as s:  # one shared in-memory database for the Store's lifetime
        rid = s.create_run("mem", {}, seed=0)
        assert s.get_run(rid)["name"] == "mem"


def test_sqlite_settings(store: Store, path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert dict(conn.execute("SELECT key, value FROM meta")) == {
            "app": "nos", "schema_version": SCHEMA_VERSION}
    with store.session() as session:
        assert session.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_create_false_on_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(missing), create=False)
    assert not missing.exists()


def test_foreign_sqlite_database_is_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE foo (x INTEGER)")
        conn.execute("CREATE TABLE bar (y TEXT)")
        conn.execute("INSERT INTO foo VALUES (1)")
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match=r"not a nos database \(tables: bar, foo\); refusing") as err:
        Store(str(foreign))
    assert "\n" not in str(err.value)
    assert foreign.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all\n" * 100, b"SQLite format 3\x00" + bytes(range(256)) * 20],
    ids=["garbage", "corrupt-after-header"],
)
def test_non_database_file_is_untouched(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(content)
    with pytest.raises(StoreError) as err:
        Store(str(bad))
    assert "\n" not in str(err.value)
    assert bad.read_bytes() == content


def test_wrong_schema_version_is_refused(path: Path) -> None:
    Store(str(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")  # an older nos
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"schema 1, this nos reads {SCHEMA_VERSION}.*older nos"):
        Store(str(path))
    assert path.read_bytes() == before
    for old in range(2, int(SCHEMA_VERSION)):  # every upgradable schema names the upgrade
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(old),))
        conn.close()
        before = path.read_bytes()
        for kwargs in ({}, {"readonly": True}):
            with pytest.raises(StoreError, match=rf"schema {old}, this nos reads {SCHEMA_VERSION}: run `nos db "
                                                 r"upgrade --db "):
                Store(str(path), **kwargs)
        assert path.read_bytes() == before
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")  # a newer nos
    conn.close()
    with pytest.raises(StoreError, match="schema_version '99'.*newer nos"):
        Store(str(path))


def test_empty_file_is_a_new_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(StoreError, match="empty database"):
        Store(str(empty), create=False)
    with Store(str(empty)) as s:
        assert s.list_runs() == []


def test_locked_database_gives_up_after_bounded_retries(store: Store, path: Path) -> None:
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
    try:
        impatient = Store(str(path), retries=2, retry_wait=0.01, busy_timeout=0.05)
        with pytest.raises(StoreError, match="after 3 attempts: database is locked"):
            impatient.create_run("blocked", {}, seed=0)
        assert impatient.list_runs() == []  # readers are not blocked (WAL)
        impatient.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_unreachable_server_gives_up(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'nos[postgres]')")
    with pytest.raises(StoreError, match="after 2 attempts") as err:
        Store("postgresql+psycopg://nos:secret@127.0.0.1:1/nos", retries=1, retry_wait=0.01)
    assert "secret" not in str(err.value)
    assert "\n" not in str(err.value)


def test_db_is_a_leaf_package() -> None:
    code = ("import sys, db; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('nos', 'search_space')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------------- runs


def test_runs(store: Store) -> None:
    a = store.create_run("alpha", CONFIG, seed=1)
    b = store.create_run("beta", {"z": 1, "a": 2}, seed=np.int64(2))
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("alpha", {}, seed=3)

    run = store.get_run("alpha")
    assert run["id"] == a and run["status"] == "running" and run["seed"] == 1
    assert run["config"] == CONFIG and run["finished_at"] is None
    assert run["started_at"].tzinfo is not None
    assert store.get_run(b)["name"] == "beta"
    assert store.get_run(str(b))["name"] == "beta"
    assert store.get_run("nope") is None

    store.add_individuals([individual(a, "init:0", fitness=0.3),
                           individual(a, "init:1", fitness=0.1),
                           individual(a, "init:2", status="invalid", fitness=None)])
    listed = {r["name"]: r for r in store.list_runs()}
    assert [r["name"] for r in store.list_runs()] == ["alpha", "beta"]
    assert (listed["alpha"]["n_individuals"], listed["alpha"]["n_evaluated"]) == (3, 2)
    assert listed["alpha"]["best_fitness"] == 0.1
    assert (listed["beta"]["n_individuals"], listed["beta"]["best_fitness"]) == (0, None)

    store.set_run_status(a, "finished")
    done = store.get_run(a)
    assert done["status"] == "finished" and done["finished_at"] >= done["started_at"]
    store.set_run_status(a, "running")
    assert store.get_run(a)["finished_at"] is None
    with pytest.raises(StoreError, match="unknown run status"):
        store.set_run_status(a, "exploded")
    with pytest.raises(StoreError, match="no run with id 999"):
        store.set_run_status(999, "failed")


def test_json_is_canonical_text(store: Store, path: Path) -> None:
    store.create_run("json", {"b": [1, 2], "a": {"y": 1, "x": np.float32(0.5)}}, seed=0)
    with sqlite3.connect(path) as conn:
        raw = conn.execute("SELECT config FROM runs WHERE name = 'json'").fetchone()[0]
    assert raw == json.dumps({"a": {"x": 0.5, "y": 1}, "b": [1, 2]}, sort_keys=True)


def test_concurrent_writers(path: Path) -> None:
    """Several Stores on one file (as parallel workers would be) all get their writes in."""
    Store(path).close()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with Store(path) as s:
                rid = s.create_run(f"w{k}", {}, seed=k)
                for b in range(10):
                    s.add_individuals([individual(rid, f"{b}:{i}", evaluations=[evaluation()])
                                       for i in range(5)])
                    s.put_timestep_stats(rid, {"timestep": b, "candidates": 5})
        except BaseException as exc:  # surfaced below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store(path) as s:
        assert sorted(r["n_individuals"] for r in s.list_runs()) == [50] * 4


# ---------------------------------------------------------------------- individuals


def test_add_individuals_with_evaluations(store: Store, run_id: int) -> None:
    ids = store.add_individuals([
        individual(run_id, "init:0", evaluations=[evaluation(0.5), evaluation(0.7, 2.0)]),
        individual(run_id, "init:1", particle=np.int64(1), timestep=0, lr=np.float64(3e-3)),
    ])
    assert ids == sorted(ids) and len(ids) == 2

    first = store.get_individual(ids[0])
    assert first["run_name"] == "r1" and first["genome"] == {"op": "sign", "args": ["g"]}
    assert [(e["horizon"], e["loss"]) for e in first["evaluations"]] == [(1.0, 0.5), (2.0, 0.7)]
    assert store.get_individual(ids[1])["lr"] == pytest.approx(3e-3)
    assert store.get_individual(12345) is None

    listed = store.individuals(run_id)
    assert [i["id"] for i in listed] == ids and "evaluations" not in listed[0]
    assert store.individual_by_slot(run_id, "init:1")["id"] == ids[1]
    assert store.individual_by_slot(run_id, "init:9") is None


def test_failing_row_rolls_back_the_whole_batch(store: Store, run_id: int) -> None:
    rows = [individual(run_id, "init:0", evaluations=[evaluation()]),
            individual(run_id, "init:1", evaluations=[evaluation()]),
            individual(run_id, "p0:t1:m0:a0", parent_id=999)]  # no such parent (FK)
    with pytest.raises(StoreError, match="add_individuals failed"):
        store.add_individuals(rows)
    assert store.individuals(run_id) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 0
        assert session.scalar(select(func.count()).select_from(Individual)) == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"status": "great"}, "unknown status"), ({"colour": "red"}, "unknown field"),
     ({"genome": None}, "missing genome")],
)
def test_bad_rows_are_refused(store: Store, run_id: int, bad: dict, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        store.add_individuals([individual(run_id, "init:0"), individual(run_id, "init:1", **bad)])
    assert store.individuals(run_id) == []


def test_non_json_genome_is_refused(store: Store, run_id: int) -> None:
    with pytest.raises(StoreError, match="set is not JSON data"):
        store.add_individuals([individual(run_id, "init:0", genome={"ops": {1, 2}})])
    (iid,) = store.add_individuals([individual(run_id, "init:0", genome='{"b": 1, "a": [2]}')])
    assert store.get_individual(iid)["genome"] == {"a": [2], "b": 1}  # JSON text is parsed


def test_duplicate_slot_rejected(store: Store, run_id: int) -> None:
    store.add_individuals([individual(run_id, "init:0")])
    with pytest.raises(StoreError, match="UNIQUE"):
        store.add_individuals([individual(run_id, "init:1"), individual(run_id, "init:0")])
    with pytest.raises(StoreError, match="UNIQUE"):
        store.add_individuals([individual(run_id, "init:2"), individual(run_id, "init:2")])
    assert [i["slot"] for i in store.individuals(run_id)] == ["init:0"]
    other = store.create_run("r2", {}, seed=0)
    store.add_individuals([individual(other, "init:0")])  # slots are per run


def test_lineage_walks_to_the_root(store: Store, run_id: int) -> None:
    (root,) = store.add_individuals([individual(run_id, "init:0")])
    child, grandchild = store.add_individuals([
        individual(run_id, "p0:t1:m0:a0", timestep=1, parent_id=root, mutation_kind="swap"),
        individual(run_id, "p0:t2:m0:a0", timestep=2, parent_slot="p0:t1:m0:a0"),
    ])
    (great,) = store.add_individuals(
        [individual(run_id, "p0:t3:m0:a0", timestep=3, parent_slot="p0:t2:m0:a0")])
    assert [i["id"] for i in store.lineage(great)] == [great, grandchild, child, root]
    assert store.lineage(root)[0]["parent_id"] is None
    assert store.lineage(424242) == []
    with pytest.raises(StoreError, match="no parent with slot"):
        store.add_individuals([individual(run_id, "p1:t1:m0:a0", parent_slot="init:404")])


def test_top_orders_by_fitness_then_id(store: Store, run_id: int) -> None:
    ids = store.add_individuals([
        individual(run_id, "a", fitness=0.5),
        individual(run_id, "b", fitness=0.1),
        individual(run_id, "c", fitness=0.5),
        individual(run_id, "d", fitness=0.01, status="rejected_integrity"),
        individual(run_id, "e", fitness=None),
        individual(run_id, "f", fitness=float("inf")),
    ])
    assert [i["id"] for i in store.top(run_id)] == [ids[1], ids[0], ids[2]]
    assert [i["id"] for i in store.top(run_id, n=1)] == [ids[1]]


def test_find_hash(store: Store, run_id: int) -> None:
    other = store.create_run("r2", {}, seed=0)
    store.add_individuals([individual(other, "x", genome_hash="h1")])
    ids = store.add_individuals([
        individual(run_id, "a", genome_hash="h0"),
        individual(run_id, "b", genome_hash="h1", status="duplicate"),
        individual(run_id, "c", genome_hash="h1", status="rejected_integrity"),
        individual(run_id, "d", genome_hash="h1"),
    ])
    assert store.find_hash(run_id, "h1")["id"] == ids[2]
    assert store.find_hash(run_id, "h0")["id"] == ids[0]
    assert store.find_hash(run_id, "missing") is None


def test_status_counts(store: Store, run_id: int) -> None:
    store.add_individuals([individual(run_id, "a"), individual(run_id, "b", status="error",
                                                                  error="boom")])
    assert store.status_counts(run_id) == {"evaluated": 1, "rejected_integrity": 0,
                                           "invalid": 0, "error": 1, "duplicate": 0}


def test_non_finite_floats_are_stored_as_null(store: Store, run_id: int, path: Path) -> None:
    (iid,) = store.add_individuals([individual(
        run_id, "a", fitness=float("nan"), lr=float("-inf"),
        evaluations=[evaluation(loss=float("nan")), evaluation(loss=np.float32("inf"))])])
    ind = store.get_individual(iid)
    assert ind["fitness"] is None and ind["lr"] is None
    assert [e["loss"] for e in ind["evaluations"]] == [None, None]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT loss FROM evaluations").fetchall() == [(None,), (None,)]


# ---------------------------------------------------------------------- baselines / stats


def test_baselines(store: Store, run_id: int) -> None:
    rows = [{"run_id": run_id, "method": "adam", "task": "sine", "horizon": 1, "seed": 0,
             "loss": 0.2, "hparam": 1e-3, "budget": 100},
            {"run_id": None, "method": "randopt", "task": "sine:last", "horizon": 5, "seed": 0,
             "loss": float("nan"), "hparam": 0.01, "budget": 50}]
    ids = store.add_baselines(rows)
    assert [b["id"] for b in store.baselines()] == ids
    assert [b["method"] for b in store.baselines(run_id=run_id)] == ["adam"]
    (randopt,) = store.baselines(task="sine:last")
    assert randopt["loss"] is None and randopt["run_id"] is None
    with pytest.raises(StoreError, match="unknown field"):
        store.add_baselines([{**rows[0], "lr": 1.0}])


def test_a_new_database_has_one_baseline_row_per_key(store: Store, path: Path) -> None:
    """Schema 4: the unique index over a protocol's key, as `nos db upgrade` creates it too."""
    with sqlite3.connect(path) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'uq_baselines_key'").fetchone()
    conn.close()
    assert sql == ("CREATE UNIQUE INDEX uq_baselines_key ON baselines (protocol, method, horizon, seed, split, "
                   "coalesce(hparam, -1.0)) WHERE protocol IS NOT NULL")
    row = {"run_id": None, "method": "before", "task": "sine", "horizon": 1.0, "seed": 100, "loss": 0.3,
           "hparam": None, "budget": 60, "split": "validation", "protocol": "validation:abc"}
    assert store.add_baselines([row]) == store.add_baselines([row])
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute("INSERT INTO baselines (method, task, horizon, seed, budget, split, protocol, created_at) "
                     "VALUES ('before', 'sine', 1.0, 100, 60, 'validation', 'validation:abc', '2026-01-01')")
    conn.close()


def test_timestep_stats_upsert(store: Store, run_id: int) -> None:
    store.put_timestep_stats(run_id, {"timestep": 1, "candidates": 10, "passed": 4,
                                      "best_fitness": 0.3, "median_fitness": 0.6})
    store.put_timestep_stats(run_id, {"timestep": 0, "candidates": 8, "passed": 8})
    store.put_timestep_stats(run_id, {"timestep": 1, "candidates": 12, "passed": 5,
                                      "duplicates": 2, "best_fitness": float("nan")})
    stats = store.timestep_stats(run_id)
    assert [(s["timestep"], s["candidates"]) for s in stats] == [(0, 8), (1, 12)]
    assert stats[1]["passed"] == 5 and stats[1]["duplicates"] == 2
    assert stats[1]["best_fitness"] is None and stats[1]["median_fitness"] == 0.6
    with pytest.raises(StoreError, match="timestep"):
        store.put_timestep_stats(run_id, {"candidates": 1})


# ---------------------------------------------------------------------- PostgreSQL


def test_postgres_round_trip() -> None:
    url = os.environ.get("NOS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set NOS_TEST_POSTGRES_URL=postgresql+psycopg://... to test PostgreSQL")
    with Store(url) as s:
        name = f"pg-{uuid.uuid4().hex[:12]}"
        rid = s.create_run(name, CONFIG, seed=3)
        root, child = s.add_individuals([
            individual(rid, "init:0", fitness=0.4, evaluations=[evaluation(float("nan"))]),
            individual(rid, "p0:t1:m0:a0", timestep=1, parent_slot="init:0", fitness=0.2),
        ])
        with pytest.raises(StoreError):
            s.add_individuals([individual(rid, "init:0")])
        s.put_timestep_stats(rid, {"timestep": 1, "candidates": 1, "passed": 1})
        s.put_timestep_stats(rid, {"timestep": 1, "candidates": 2, "passed": 1})
        s.set_run_status(rid, "finished")
    with Store(url, create=False) as s:
        assert s.get_run(name)["status"] == "finished"
        assert [i["id"] for i in s.top(rid)] == [child, root]
        assert [i["id"] for i in s.lineage(child)] == [child, root]
        assert s.get_individual(root)["evaluations"][0]["loss"] is None
        assert s.find_hash(rid, "init:0")["id"] == root
        assert [t["candidates"] for t in s.timestep_stats(rid)] == [2]
        assert next(r for r in s.list_runs() if r["name"] == name)["n_evaluated"] == 2
