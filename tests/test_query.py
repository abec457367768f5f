"""`python -m nos.query` against a real database written by a real tiny `python -m nos.evolve` run."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from db.models import Individual
from db.store import Store

from .conftest import RUN, assert_one_line_error, in_process, run_module, tiny_search

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_search(tmp_path_factory)


@pytest.fixture(scope="session")
def store(tiny_db: Path) -> Iterator[Store]:
    s = Store(tiny_db, create=False)
    yield s
    s.close()


@pytest.fixture(scope="session")
def ids(store: Store) -> dict[str, int]:
    """Individuals worth querying: the best, the deepest, one that was not evaluated."""
    run = store.get_run(RUN)
    rows = store.individuals(run["id"])
    rejected = [r for r in rows if r["status"] != "evaluated"]
    return {
        "run": run["id"],
        "best": store.top(run["id"], 1)[0]["id"],
        "deepest": max(rows, key=lambda r: (r["timestep"], r["id"]))["id"],
        "rejected": rejected[0]["id"] if rejected else store.top(run["id"], 1)[0]["id"],
    }


class Query:
    """Runs `nos.query ... --db DB` in process (fast: every format of every subcommand)."""

    def __init__(self, db: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.db, self.capsys = db, capsys

    def text(self, *args: str, fmt: str = "table") -> str:
        code, out, err = in_process(self.capsys, *args, "--db", str(self.db), "--format", fmt)
        assert code == 0, err
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.text(*args, fmt="json"))

    def csv(self, *args: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.text(*args, fmt="csv"))))


@pytest.fixture
def q(tiny_db: Path, capsys: pytest.CaptureFixture[str]) -> Query:
    return Query(tiny_db, capsys)


def num(text: str) -> float | None:
    return None if text == "" else float(text)


# ---------------------------------------------------------------------- the subcommands


def test_runs(q: Query, store: Store) -> None:
    run = store.get_run(RUN)
    rows = store.individuals(run["id"])
    evaluated = [r["fitness"] for r in rows if r["status"] == "evaluated"]
    full = [r["fitness"] for r in rows if r["status"] == "evaluated" and r["fidelity"] == 1]
    assert len(full) < len(evaluated)  # the default cheap first stage left some at fidelity 0
    (doc,) = q.json("runs")
    assert (doc["id"], doc["name"], doc["status"]) == (run["id"], RUN, "finished")
    assert doc["candidates"] == len(rows) and doc["evaluated"] == len(evaluated)
    assert doc["best_fitness"] == pytest.approx(min(full))  # the best full-fidelity fitness
    assert doc["started_at"] and doc["finished_at"] and doc["config"]["funnel"] == 1
    (row,) = q.csv("runs")
    assert row["name"] == RUN and int(row["candidates"]) == len(rows)
    assert num(row["best_fitness"]) == pytest.approx(min(full))
    table = q.text("runs")
    assert RUN in table and "best_fitness" in table and "finished" in table


def test_top(q: Query, store: Store, ids: dict[str, int]) -> None:
    want = store.top(ids["run"], 3)
    assert len(want) == 3
    for ref in (RUN, str(ids["run"])):
        doc = q.json("top", ref, "-n", "3")
        assert [d["id"] for d in doc] == [w["id"] for w in want]
        assert [d["fitness"] for d in doc] == [w["fitness"] for w in want]
        assert [d["lr"] for d in doc] == [w["lr"] for w in want]
        assert [d["expression"] for d in doc] == [w["expression"] for w in want]
    rows = q.csv("top", RUN, "-n", "3")
    assert list(rows[0]) == ["id", "fitness", "fidelity", "lr", "particle", "timestep", "expression"]
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert [num(r["fitness"]) for r in rows] == [pytest.approx(w["fitness"]) for w in want]
    assert [num(r["lr"]) for r in rows] == [pytest.approx(w["lr"]) for w in want]
    table = q.text("top", RUN, "-n", "3")
    assert all(f"\n{w['id']} " in table for w in want)
    assert len(q.json("top", RUN)) == len(store.top(ids["run"], 10))  # default n = 10


def test_show(q: Query, store: Store, ids: dict[str, int]) -> None:
    want = store.get_individual(ids["best"])
    doc = q.json("show", str(ids["best"]))
    for key in ("id", "run_id", "run_name", "parent_id", "slot", "status", "fitness", "lr", "genome",
                "expression", "latex", "genome_hash"):
        assert doc[key] == want[key], key
    assert len(doc["evaluations"]) == len(want["evaluations"]) > 0
    assert [(e["task"], e["horizon"], e["lr"], e["seed"], e["loss"]) for e in doc["evaluations"]] == [
        (e["task"], e["horizon"], e["lr"], e["seed"], e["loss"]) for e in want["evaluations"]]
    rows = q.csv("show", str(ids["best"]))
    assert [int(r["id"]) for r in rows] == [e["id"] for e in want["evaluations"]]
    assert all(int(r["individual_id"]) == ids["best"] for r in rows)
    assert [(r["task"], num(r["horizon"]), num(r["loss"])) for r in rows] == [
        (e["task"], e["horizon"], pytest.approx(e["loss"])) for e in want["evaluations"]]
    table = q.text("show", str(ids["best"]))
    assert want["expression"] in table and want["latex"] in table
    assert json.dumps(want["genome"], indent=2, sort_keys=True) in table
    assert f"evaluations ({len(want['evaluations'])})" in table
    rejected = store.get_individual(ids["rejected"])
    doc = q.json("show", str(ids["rejected"]))
    assert doc["status"] == rejected["status"] and len(doc["evaluations"]) == len(rejected["evaluations"])


def eval_lines(table: str) -> list[str]:
    """The evaluation rows `show` printed (each begins with a task name, then its split)."""
    return [line for line in table.splitlines() if re.match(r"\S+ +(search|validation|test) +\S+ +\S+ +\d+ ", line)]


def test_show_summarizes_evaluations(q: Query, store: Store, ids: dict[str, int]) -> None:
    """The table shows a summary per split / task / horizon and at most 20 rows; --all every row;
    csv and json every row whatever."""
    want = store.get_individual(ids["best"])["evaluations"]  # the funnel's candidate: held-out rows too
    assert len(want) > 20
    table = q.text("show", str(ids["best"]))
    assert f"the first 20 of {len(want)} evaluations (--all prints every one" in table
    summary = table[table.index("split "):table.index("the first 20")]
    groups: dict[tuple, list[float]] = {}
    for e in want:
        groups.setdefault((e["split"], e["task"], e["horizon"]), []).append(e["loss"])
    summary_rows = [line.split() for line in summary.splitlines()[2:] if line.strip()]
    assert len(summary_rows) == len(groups)
    for split, task, horizon, n, diverged, best, *_ in summary_rows:
        losses = groups[(split, task, float(horizon))]
        assert int(n) == len(losses) and int(diverged) == sum(x is None for x in losses)
        assert float(best) == pytest.approx(min(x for x in losses if x is not None), rel=1e-3)
    order = ["search", "validation", "test"]
    splits = [row[0] for row in summary_rows]
    assert splits == sorted(splits, key=order.index) and set(splits) == {"search", "validation", "test"}
    assert len(eval_lines(table)) == 20
    every = q.text("show", str(ids["best"]), "--all")
    assert len(eval_lines(every)) == len(want) and "the first 20" not in every
    assert len(q.csv("show", str(ids["best"]))) == len(want) == len(q.json("show", str(ids["best"]))["evaluations"])


def test_lineage(q: Query, store: Store, ids: dict[str, int]) -> None:
    want = store.lineage(ids["deepest"])
    doc = q.json("lineage", str(ids["deepest"]))
    assert [d["id"] for d in doc] == [w["id"] for w in want]
    assert [d["timestep"] for d in doc] == [2, 1, 0]  # back to the initial genome
    assert doc[-1]["parent_id"] is None
    for child, parent in zip(doc, doc[1:]):
        assert child["parent_id"] == parent["id"]
        if child["fitness"] is not None and parent["fitness"] is not None:
            assert child["delta"] == pytest.approx(child["fitness"] - parent["fitness"])
            assert child["ratio"] == pytest.approx(child["fitness"] / parent["fitness"])
    assert doc[-1]["delta"] is None
    rows = q.csv("lineage", str(ids["deepest"]))
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert {"id", "timestep", "particle", "mutation_kind", "fitness", "delta", "expression"} <= set(rows[0])
    assert [r["mutation_kind"] for r in rows] == [w["mutation_kind"] or "" for w in want]
    table = q.text("lineage", str(ids["deepest"]))
    assert table.startswith(f"lineage of #{ids['deepest']}: 2 step(s) back to initial genome #{want[-1]['id']}\n")
    initial = want[-1]["id"]  # steps = mutations: none for an initial genome
    assert q.text("lineage", str(initial)).startswith(f"#{initial} is an initial genome\n")
    assert q.text("lineage", str(want[1]["id"])).startswith(f"lineage of #{want[1]['id']}: 1 step(s) back")


def test_stats(q: Query, store: Store, ids: dict[str, int]) -> None:
    want = store.timestep_stats(ids["run"])
    assert [w["timestep"] for w in want] == [0, 1, 2]
    keys = ("timestep", "candidates", "passed", "duplicates", "invalid", "errors", "best_fitness",
            "median_fitness")
    full = q.json("stats", RUN)
    doc = full["timesteps"]
    assert [{k: d[k] for k in keys} for d in doc] == [{k: w[k] for k in keys} for w in want]
    for d in doc:  # the integrity pass rate: screened candidates (not duplicates or invalid) that passed
        assert d["pass_rate"] == pytest.approx((d["passed"] + d["errors"]) / (d["candidates"] - d["duplicates"] - d["invalid"]))
    diag = full["diagnostics"]
    assert set(diag["rank_correlation"]) == {"n", "spearman", "p_value", "ci_low", "ci_high"} and diag["rank_correlation"]["n"] == 1
    assert len(diag["best_so_far"]) == len(store.individuals(ids["run"]))
    finite = [b for b in diag["best_so_far"] if b is not None]
    assert finite == sorted(finite, reverse=True) and finite[-1] == pytest.approx(store.top(ids["run"], 1)[0]["fitness"])
    rows = q.csv("stats", RUN)
    assert [int(r["candidates"]) for r in rows] == [w["candidates"] for w in want]
    assert [int(r["passed"]) for r in rows] == [w["passed"] for w in want]
    assert [num(r["best_fitness"]) for r in rows] == [pytest.approx(w["best_fitness"]) for w in want]
    inds = store.individuals(ids["run"])  # the stats agree with the individuals themselves
    for w in want:
        at = [r for r in inds if r["timestep"] == w["timestep"]]
        assert w["candidates"] == len(at) and w["passed"] == sum(r["status"] == "evaluated" for r in at)
    assert "pass_rate" in q.text("stats", RUN)


@pytest.mark.parametrize(
    "args",
    [
        ["show", "999999"],
        ["lineage", "999999"],
        ["top", "no-such-run"],
        ["stats", "424242"],
        ["show", "abc"],
        ["lineage", "-3"],
        ["top", RUN, "-n", "0"],
        ["runs", "--format", "xml"],
        ["runs", "--bogus"],
        ["frobnicate"],
        [],
    ],
)
def test_user_errors_are_one_line(tiny_db: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = in_process(capsys, *args, "--db", str(tiny_db))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["runs"], ["top"], ["show"], ["lineage"], ["stats"], ["compare"]):
        code, out, _ = in_process(capsys, *args, "--help")
        assert code == 0 and "usage: python -m nos.query " + args[0] in out
    code, out, _ = in_process(capsys, "compare", "--help")
    assert "RUN [RUN ...]" in out and "--table {methods,versus}" in out


def test_nos_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    """Every module of nos with a `main` is a verb of `nos`, and `nos --help` names it."""
    from nos.__main__ import VERBS
    from nos.__main__ import main as nos_main

    modules = {p.stem for p in (ROOT / "nos").glob("*.py")
               if p.stem != "__main__" and re.search(r"^def main\(", p.read_text(), re.M)}
    assert modules == set(VERBS)
    code, out, _ = in_process(capsys, "--help", main=nos_main)
    assert code == 0
    assert all(re.search(rf"^  {verb} +\S", out, re.M) for verb in VERBS), out
    assert "compare" in out  # query's line names all its subcommands


def test_bounds_read_as_numbers(tiny_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 64-bit bound is written 2^63-1, not 9223372036854775807."""
    for args in (["show", "0"], ["top", RUN, "-n", "x"], ["lineage", "9223372036854775808"]):
        code, out, err = in_process(capsys, *args, "--db", str(tiny_db))
        assert code == 2 and "in [1, 2^63-1]" in err and "9223372036854775807" not in err, err


# ---------------------------------------------------------------------- the command's name


NOS = Path(sys.executable).parent / "nos"  # the console script (pyproject.toml [project.scripts])


def command(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not NOS.exists(), reason="the nos console script is not installed beside this python")
def test_messages_name_the_command_typed(tiny_db: Path) -> None:
    """`nos query top ...` reports `nos query top: ...`; `python -m nos.query top ...` names itself;
    `python -m nos query ...` says so (real processes: the console script, -m nos, -m nos.query)."""
    bad = ["top", RUN, "-n", "0", "--db", str(tiny_db)]
    as_typed = {
        "nos query top": (NOS, "query", *bad),
        "python -m nos.query top": (sys.executable, "-m", "nos.query", *bad),
        "python -m nos query top": (sys.executable, "-m", "nos", "query", *bad),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(as_typed, pool.map(lambda a: command(*a), as_typed.values())))
        helps = dict(zip(as_typed, pool.map(lambda a: command(*a[: a.index("top")], "top", "--help"),
                                            as_typed.values())))
    for name, proc in procs.items():
        line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
        assert line.startswith(f"error: {name}: argument -n: expected a count"), line
        assert helps[name].returncode == 0 and helps[name].stdout.startswith(f"usage: {name} "), helps[name].stdout
    help_ = command(NOS, "query", "--help").stdout
    assert help_.startswith("usage: nos query ") and "nos query compare RUN RUN ..." in help_
    assert "python -m nos." not in help_  # the description's examples too


def test_invocation_rewrites_only_through_the_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    """Messages from other modules (`fail`, log lines) are rewritten too, but only while a verb runs
    under `nos`; afterwards (or run directly) `python -m nos.X` names itself."""
    from nos.ui.cli import fail, invocation, set_dispatcher

    text = "continue with  python -m nos.evolve --resume demo; see python -m nos.query runs"
    assert invocation(text) == text
    before = set_dispatcher("nos")
    try:
        assert invocation(text) == "continue with  nos evolve --resume demo; see nos query runs"
        with pytest.raises(SystemExit):
            fail("python -m nos.export 3 -o x.py")
        assert capsys.readouterr().err == "error: nos export 3 -o x.py\n"
    finally:
        set_dispatcher(before)
    assert invocation(text) == text


# ---------------------------------------------------------------------- real commands


def test_real_commands(tiny_db: Path, ids: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m nos.query` in subprocesses prints exactly what the entry point prints, and
    reports user errors in one line with exit status 2 and no traceback."""
    db = ["--db", str(tiny_db)]
    good = [  # one per format (each subprocess imports torch: ~4 s of CPU)
        ["runs", "--format", "json"],
        ["top", RUN, "-n", "3", "--format", "csv"],
        ["lineage", str(ids["deepest"])],
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        help_ = pool.submit(run_module, "nos.query", "--help")
        bad = pool.submit(run_module, "nos.query", "show", "999999", *db)
        procs = list(pool.map(lambda a: run_module("nos.query", *a, *db), good))
    assert help_.result().returncode == 0 and "lineage" in help_.result().stdout
    for args, proc in zip(good, procs):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == in_process(capsys, *args, *db)[1], args
    assert json.loads(procs[0].stdout)[0]["name"] == RUN
    assert list(csv.DictReader(io.StringIO(procs[1].stdout)))[0]["id"] == str(store_top_id(tiny_db))
    bad_proc = bad.result()
    assert bad_proc.returncode == 2 and bad_proc.stdout == ""
    assert "Traceback" not in bad_proc.stderr and len(bad_proc.stderr.strip().splitlines()) == 1
    assert "999999" in bad_proc.stderr


def store_top_id(db: Path) -> int:
    with Store(db, create=False) as s:
        return s.top(s.get_run(RUN)["id"], 1)[0]["id"]


def test_missing_or_foreign_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "nos.sqlite"
    proc = run_module("nos.query", "runs", "--db", str(missing))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
    assert not missing.parent.exists()  # nothing created
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n")
    code, out, err = in_process(capsys, "runs", "--db", str(foreign))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert foreign.read_text() == "not a database\n"


class Abort(Exception):
    """Leaves a store.session() block by rolling it back."""


def test_reads_while_another_process_writes(tiny_db: Path, store: Store, ids: dict[str, int]) -> None:
    """This process holds the write lock with uncommitted rows (as nos.evolve does while it
    writes a chunk): a query in another process still answers at once and sees committed data."""
    before = len(store.individuals(ids["run"]))
    with pytest.raises(Abort), store.session() as session:
        session.connection(execution_options={"nos_write": True})  # BEGIN IMMEDIATE: the write lock
        session.add(Individual(run_id=ids["run"], slot="test:uncommitted", genome={}, status="invalid"))
        session.flush()
        start = time.perf_counter()
        proc = run_module("nos.query", "runs", "--format", "json", "--db", str(tiny_db), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["candidates"] == before
        assert time.perf_counter() - start < 30  # no waiting on the lock
        raise Abort  # roll the writer back
    assert len(store.individuals(ids["run"])) == before
