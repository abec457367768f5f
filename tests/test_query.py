"""`python -m nos.query` against a real database written by a real tiny `python -m nos.evolve` run."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from db.models import Individual
from db.store import Store

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"

# A search small enough for a test (~20 s on a 2-core CPU) that still has a lineage two
# timesteps deep. No funnel: its held-out horizons run to t_max = 20 (see test_report.py).
TINY_EVOLVE = [
    "--initial", "6", "--particles", "2", "--timesteps", "2", "--mutations", "2", "--funnel", "0",
    "--sine-pretrain-steps", "50", "--sine-width", "8", "--horizons", "1", "--budget", "60",
    "--device", "cpu",
]


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def evolve_once(base: Path, name: str, extra: list[str]) -> Path:
    """Run ``nos.evolve`` into ``base/nos.sqlite`` once per test session (reused if done)."""
    db = base / "nos.sqlite"
    done = base / "done"
    if not done.exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = run_module("nos.evolve", "--db", str(db), "--cache-dir", str(base / "cache"), "--name", name,
                          *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done.write_text("ok")
    return db


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real database from a real tiny search (run once per session)."""
    return evolve_once(tmp_path_factory.getbasetemp() / "tiny_search", RUN, TINY_EVOLVE)


@pytest.fixture(scope="session")
def store(tiny_db: Path) -> Store:
    s = Store(tiny_db, create=False)
    yield s
    s.close()


def query(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_module("nos.query", *args, "--db", str(db), timeout=120)


def ok(db: Path, *args: str) -> str:
    proc = query(db, *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def as_json(db: Path, *args: str) -> object:
    return json.loads(ok(db, *args, "--format", "json"))


def as_csv(db: Path, *args: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(ok(db, *args, "--format", "csv"))))


def num(text: str) -> float | None:
    return None if text == "" else float(text)


# ---------------------------------------------------------------------- the subcommands


def test_help() -> None:
    for args in ([], ["runs"], ["top"], ["show"], ["lineage"], ["stats"]):
        proc = run_module("nos.query", *args, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout


def test_runs(tiny_db: Path, store: Store) -> None:
    run = store.get_run(RUN)
    rows = store.individuals(run["id"])
    evaluated = [r["fitness"] for r in rows if r["status"] == "evaluated"]
    (doc,) = as_json(tiny_db, "runs")
    assert (doc["id"], doc["name"], doc["status"]) == (run["id"], RUN, "finished")
    assert doc["candidates"] == len(rows) and doc["evaluated"] == len(evaluated)
    assert doc["best_fitness"] == pytest.approx(min(evaluated))
    assert doc["started_at"] and doc["finished_at"]
    (row,) = as_csv(tiny_db, "runs")
    assert row["name"] == RUN and int(row["candidates"]) == len(rows)
    assert num(row["best_fitness"]) == pytest.approx(min(evaluated))
    table = ok(tiny_db, "runs")
    assert RUN in table and "best_fitness" in table


def test_top(tiny_db: Path, store: Store) -> None:
    run = store.get_run(RUN)
    want = store.top(run["id"], 3)
    assert len(want) == 3
    for ref in (RUN, str(run["id"])):
        doc = as_json(tiny_db, "top", ref, "-n", "3")
        assert [d["id"] for d in doc] == [w["id"] for w in want]
        assert [d["fitness"] for d in doc] == [w["fitness"] for w in want]
        assert [d["expression"] for d in doc] == [w["expression"] for w in want]
    rows = as_csv(tiny_db, "top", RUN, "-n", "3")
    assert list(rows[0]) == ["id", "fitness", "lr", "particle", "timestep", "expression"]
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert [num(r["fitness"]) for r in rows] == [pytest.approx(w["fitness"]) for w in want]
    assert [num(r["lr"]) for r in rows] == [pytest.approx(w["lr"]) for w in want]
    table = ok(tiny_db, "top", RUN, "-n", "3")
    assert all(str(w["id"]) in table for w in want)
    # the default n is 10 (or every evaluated individual, if fewer)
    assert len(as_json(tiny_db, "top", RUN)) == len(store.top(run["id"], 10))


def test_show(tiny_db: Path, store: Store) -> None:
    run = store.get_run(RUN)
    best = store.top(run["id"], 1)[0]
    want = store.get_individual(best["id"])
    doc = as_json(tiny_db, "show", str(best["id"]))
    for key in ("id", "run_id", "run_name", "parent_id", "status", "fitness", "lr", "genome", "expression",
                "latex", "genome_hash", "slot"):
        assert doc[key] == want[key], key
    assert len(doc["evaluations"]) == len(want["evaluations"]) > 0
    assert [e["loss"] for e in doc["evaluations"]] == [e["loss"] for e in want["evaluations"]]
    rows = as_csv(tiny_db, "show", str(best["id"]))
    assert [int(r["id"]) for r in rows] == [e["id"] for e in want["evaluations"]]
    assert {r["task"] for r in rows} == {"sine"}
    assert all(int(r["individual_id"]) == best["id"] for r in rows)
    assert [num(r["horizon"]) for r in rows] == [e["horizon"] for e in want["evaluations"]]
    table = ok(tiny_db, "show", str(best["id"]))
    assert want["expression"] in table and "genome:" in table and "evaluations (" in table
    assert json.dumps(want["genome"], indent=2, sort_keys=True) in table
    # a rejected candidate has no evaluations, and says why
    rejected = next((r for r in store.individuals(run["id"]) if r["status"] != "evaluated"), None)
    if rejected is not None:
        doc = as_json(tiny_db, "show", str(rejected["id"]))
        assert doc["status"] == rejected["status"] and doc["evaluations"] == []


def test_lineage(tiny_db: Path, store: Store) -> None:
    run = store.get_run(RUN)
    deepest = max(store.individuals(run["id"]), key=lambda r: (r["timestep"], r["id"]))
    assert deepest["timestep"] == 2
    want = store.lineage(deepest["id"])
    doc = as_json(tiny_db, "lineage", str(deepest["id"]))
    assert [d["id"] for d in doc] == [w["id"] for w in want]
    assert len(doc) == 3  # timestep 2 -> 1 -> initial
    assert doc[-1]["parent_id"] is None and doc[-1]["timestep"] == 0
    for child, parent in zip(doc, doc[1:]):
        assert child["parent_id"] == parent["id"]
        assert child["timestep"] == parent["timestep"] + 1
        if child["fitness"] is not None and parent["fitness"] is not None:
            assert child["delta"] == pytest.approx(child["fitness"] - parent["fitness"])
    assert doc[-1]["delta"] is None
    rows = as_csv(tiny_db, "lineage", str(deepest["id"]))
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert {"id", "timestep", "particle", "mutation_kind", "fitness", "delta", "expression"} <= set(rows[0])
    assert rows[0]["mutation_kind"] == (want[0]["mutation_kind"] or "")
    table = ok(tiny_db, "lineage", str(deepest["id"]))
    assert f"back to initial genome #{want[-1]['id']}" in table


def test_stats(tiny_db: Path, store: Store) -> None:
    run = store.get_run(RUN)
    want = store.timestep_stats(run["id"])
    assert [w["timestep"] for w in want] == [0, 1, 2]
    doc = as_json(tiny_db, "stats", RUN)
    keys = ("timestep", "candidates", "passed", "duplicates", "invalid", "errors", "best_fitness",
            "median_fitness")
    assert [{k: d[k] for k in keys} for d in doc] == [{k: w[k] for k in keys} for w in want]
    for d in doc:
        assert d["pass_rate"] == pytest.approx(d["passed"] / d["candidates"])
    rows = as_csv(tiny_db, "stats", RUN)
    assert [int(r["candidates"]) for r in rows] == [w["candidates"] for w in want]
    assert [int(r["passed"]) for r in rows] == [w["passed"] for w in want]
    assert [num(r["best_fitness"]) for r in rows] == [pytest.approx(w["best_fitness"]) for w in want]
    # the counts agree with the individuals themselves
    inds = store.individuals(run["id"])
    for w in want:
        at = [r for r in inds if r["timestep"] == w["timestep"]]
        assert w["candidates"] == len(at)
        assert w["passed"] == sum(r["status"] == "evaluated" for r in at)
    assert "pass_rate" in ok(tiny_db, "stats", RUN)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args",
    [
        ["show", "999999"],
        ["lineage", "999999"],
        ["top", "no-such-run"],
        ["stats", "424242"],
        ["show", "abc"],
        ["top", RUN, "-n", "0"],
        ["runs", "--format", "xml"],
        ["frobnicate"],
        [],
    ],
)
def test_user_errors_are_one_line(tiny_db: Path, args: list[str]) -> None:
    proc = query(tiny_db, *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


def test_missing_or_foreign_database(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "nos.sqlite"
    proc = query(missing, "runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
    assert not missing.exists() and not missing.parent.exists()  # nothing created
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n")
    proc = query(foreign, "runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert foreign.read_text() == "not a database\n"


# ---------------------------------------------------------------------- a database in use


class Abort(Exception):
    """Leaves a store.session() block by rolling it back."""


def test_reads_while_another_process_writes(tiny_db: Path, store: Store) -> None:
    """A writer holds the write lock with uncommitted rows: queries still answer at once (WAL)
    and see only committed data."""
    run = store.get_run(RUN)
    before = as_json(tiny_db, "runs")[0]["candidates"]
    with pytest.raises(Abort), store.session() as session:
        session.connection(execution_options={"nos_write": True})  # BEGIN IMMEDIATE: the write lock
        session.add(Individual(run_id=run["id"], slot="test:uncommitted", genome={}, status="invalid"))
        session.flush()
        start = time.perf_counter()
        assert as_json(tiny_db, "runs")[0]["candidates"] == before
        assert len(as_json(tiny_db, "stats", RUN)) == 3
        assert time.perf_counter() - start < 30  # no waiting for the lock (busy_timeout is 10 s)
        raise Abort  # roll the writer back
    assert as_json(tiny_db, "runs")[0]["candidates"] == before
