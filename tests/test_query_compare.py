"""`nos query compare RUN [RUN ...]`, `--table`, `--format csv|latex`, and `runs`' new columns,
against real runs: the session's tiny run (tests/conftest.py `tiny_search`) copied beside a second
real tiny run (random search, same protocol: its baselines and pretrained networks are reused, so
it takes seconds), a run that never reached its funnel, and one still running."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from nos.evaluation.compare import Comparison, combine, compare
from nos.evaluation.protocol import BASELINES, Row, Seeds
from nos.ui.cli import latex_escape
from nos.ui.tables import methods_grid, num, task_keys, versus_grid

from .conftest import RUN, TINY_EVOLVE, assert_one_line_error, in_process, run_module, tiny_search

OTHER = "tiny-random"  # the second real run (random search)
NO_FUNNEL = "no-funnel"  # a run with the tiny run's config and no candidates at all
RUNNING = "still-running"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny database (the original is shared: never written here) with a
    second real run, a run without funnel results and a running one."""
    source = tiny_search(tmp_path_factory)
    base = tmp_path_factory.mktemp("compare")
    path, cache = base / "nos.sqlite", base / "cache"
    with sqlite3.connect(source) as src, sqlite3.connect(path) as dst:
        src.backup(dst)  # consistent even while the session's Store holds the original open
    shutil.copytree(source.parent / "cache", cache)
    proc = run_module("nos.evolve", "--db", str(path), "--cache-dir", str(cache), "--name", OTHER,
                      "--algorithm", "random", "--seed", "7", *TINY_EVOLVE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Store(path, create=False) as store:
        config = store.get_run(RUN)["config"]
        store.set_run_status(store.create_run(NO_FUNNEL, {**config, "funnel": 0}, seed=3), "finished")
        store.create_run(RUNNING, config, seed=4)
    return path


def query(capsys: pytest.CaptureFixture[str], db: Path, *args: str) -> str:
    code, out, err = in_process(capsys, *args, "--db", str(db))
    assert code == 0, err
    return out


def docs(capsys: pytest.CaptureFixture[str], db: Path) -> dict[str, Any]:
    """Each run's own (single-run) compare document, by run name."""
    return {r: json.loads(query(capsys, db, "compare", r, "--format", "json")) for r in (RUN, OTHER)}


def latex_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """A booktabs tabular parsed back: (header cells, body rows); asserts its shape."""
    lines = text.strip("\n").split("\n")
    assert re.fullmatch(r"\\begin\{tabular\}\{l+\}", lines[0]), lines[0]
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert text.count(r"\toprule") == 1 and text.count(r"\midrule") == 1 and text.count(r"\begin{tabular}") == 1
    ncols = len(lines[0]) - len(r"\begin{tabular}{}")
    body = [line for line in lines[2:-2] if line != r"\midrule"]
    cells = []
    for line in body:
        assert line.endswith(r" \\"), line
        row = re.split(r"(?<!\\) & ", line[: -len(r" \\")])  # an escaped \& is not a separator
        assert len(row) == ncols, line
        cells.append(row)
    return cells[0], cells[1:]


# ---------------------------------------------------------------------- several runs


def test_compare_several_runs_side_by_side(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    single = docs(capsys, db)
    champions = {r: d["champion"] for r, d in single.items()}
    assert all(champions.values())
    text = query(capsys, db, "compare", RUN, OTHER)
    for r in (RUN, OTHER):
        assert f"run {r!r} (id " in text and f"champion {champions[r]};" in text
    assert "(ga)" not in text and ", ga)" in text and ", random)" in text
    versus = [line for line in text.splitlines() if line.startswith((f"{RUN} ", f"{OTHER} "))]
    assert len(versus) == 2 * 5 + 2  # each champion against the five baselines, then each champion's losses
    for r in (RUN, OTHER):  # every cell: ratio [CI] verdict, as in the run's own document
        rows = [line for line in versus if line.startswith(f"{r} ") and "(champion)" not in line]
        assert len(rows) == 5 and all(f" {champions[r]} " in line for line in rows)
        want = {(v["baseline"], v["horizon"]): v for v in single[r]["versus"] if v["candidate"] == champions[r]}
        for b, line in zip(BASELINES, rows):  # the horizons, then "all" (the aggregate: horizon None)
            cells = [want[(b, h)] for h in (*single[r]["horizons"], None)]
            assert re.findall(r"\] (wins|ties|loses)", line) == [v["verdict"] for v in cells], line
            assert re.findall(r"(\S+) \[", line) == [num(v["gmean_ratio"]) for v in cells], line
    # the losses table: the two runs share their baselines, so they are shown once for both
    assert re.search(rf"^{RUN}, {OTHER} +Adam ", text, re.M)
    assert re.search(rf"^{OTHER} +{champions[OTHER]} \(champion\)", text, re.M)
    methods = query(capsys, db, "compare", RUN, OTHER, "--table", "methods")
    assert "(champion)" in methods and " wins" not in methods


def test_compare_several_runs_json(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    single = docs(capsys, db)
    doc = json.loads(query(capsys, db, "compare", OTHER, RUN, "--format", "json"))
    assert list(doc) == ["runs"] and [d["run"] for d in doc["runs"]] == [OTHER, RUN]
    assert doc["runs"] == [single[OTHER], single[RUN]]  # each run's own document, unchanged


def test_compare_refuses_clearly(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    for args, expect in [((RUN, NO_FUNNEL), f"run {NO_FUNNEL!r} has no funnel results"),
                         ((NO_FUNNEL,), f"run {NO_FUNNEL!r} has no funnel results"),
                         ((RUN, "nope"), "no run named 'nope'"),
                         ((RUN, RUN), "named twice"),
                         ((RUN, "1"), "named twice"),  # the same run by id
                         ((RUN, "--table", "versus", "--format", "json"), "--format json has both")]:
        line = assert_one_line_error(*in_process(capsys, "compare", *args, "--db", str(db)))
        assert expect in line, line


# ---------------------------------------------------------------------- one table per output


@pytest.mark.parametrize("runs", [[RUN], [RUN, OTHER]])
@pytest.mark.parametrize("table", [None, "versus", "methods"])
def test_compare_csv_is_one_table(capsys: pytest.CaptureFixture[str], db: Path, runs: list[str],
                                  table: str | None) -> None:
    out = query(capsys, db, "compare", *runs, "--format", "csv", *(["--table", table] if table else []))
    assert "\n\n" not in out.strip("\n")
    reader = csv.DictReader(io.StringIO(out))
    rows = list(reader)
    assert rows and all(list(r) == reader.fieldnames for r in rows)  # one header, every row its keys
    assert all(None not in r.values() for r in rows)  # no row shorter than the header either
    single = docs(capsys, db)
    key = "methods" if table == "methods" else "versus"  # versus by default
    assert len(rows) == sum(len(single[r][key]) for r in runs)
    assert [r["run"] for r in rows] == [run for run in runs for _ in single[run][key]]
    if key == "versus":
        assert {"candidate", "baseline", "horizon", "gmean_ratio", "ci_low", "ci_high", "verdict"} <= set(rows[0])
        assert all((r["champion"] == "True") == (r["candidate"] == single[r["run"]]["champion"]) for r in rows)
        assert [float(r["gmean_ratio"]) for r in rows] == pytest.approx(
            [v["gmean_ratio"] for run in runs for v in single[run]["versus"]])
    else:
        assert {"method", "horizon", "hparam", "median", "gmean", "per_seed"} <= set(rows[0])
        assert all(len(r["per_seed"].split()) == 10 for r in rows)  # ten test seeds


@pytest.mark.parametrize("table", ["versus", "methods"])
def test_compare_latex(capsys: pytest.CaptureFixture[str], db: Path, table: str) -> None:
    single = docs(capsys, db)
    one = query(capsys, db, "compare", RUN, "--format", "latex", *(["--table", table] if table == "methods" else []))
    assert one.startswith(r"\begin{tabular}{")
    header, rows = latex_rows(one)
    horizons = [f"t\\_max={h:g}" for h in single[RUN]["horizons"]]
    if table == "versus":
        assert header == ["candidate", "baseline", *horizons, "all"]
        assert len(rows) == 5 * len(single[RUN]["candidates"])
        assert all(r[0].startswith(r"\#") for r in rows)  # "#4": escaped
    else:
        assert header == ["method", *horizons]
        assert len(rows) == 6 + len(single[RUN]["candidates"])  # before, five baselines, the candidates
        assert rows[0][0] == "before fine-tuning"
    both = query(capsys, db, "compare", RUN, OTHER, "--format", "latex", "--table", table)
    header, rows = latex_rows(both)
    assert header[0] == "run"
    if table == "versus":
        assert [r[0] for r in rows] == [RUN] * 5 + [OTHER] * 5
        assert {r[1] for r in rows} == {latex_escape(single[r]["champion"]) for r in (RUN, OTHER)}
    else:  # the shared baselines once, then each champion
        assert [r[0] for r in rows] == [f"{RUN}, {OTHER}"] * 6 + [RUN, OTHER]


def test_other_tables_in_latex(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    with Store(db, create=False) as store:
        n_runs = len(store.list_runs())
        timesteps = len(store.timestep_stats(store.get_run(RUN)["id"]))
    header, rows = latex_rows(query(capsys, db, "runs", "--format", "latex"))
    assert header[:3] == ["id", "name", "algorithm"] and len(rows) == n_runs
    header, rows = latex_rows(query(capsys, db, "top", RUN, "-n", "3", "--format", "latex"))
    assert header[:2] == ["id", "fitness"] and len(rows) == 3
    header, rows = latex_rows(query(capsys, db, "stats", RUN, "--format", "latex"))
    assert header[0] == "timestep" and header[3] == r"pass\_rate" and len(rows) == timesteps


def test_latex_escape() -> None:
    assert latex_escape("a_b 50% #4 & $x$ {y} ~^\\") == (
        r"a\_b 50\% \#4 \& \$x\$ \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}")
    assert latex_escape("[0.1, 0.2] wins") == "{[}0.1, 0.2] wins"  # not read as \\[length]
    assert latex_escape("a\nb\x1b") == r"a\textbackslash{}nb\textbackslash{}x1b"  # one line, no raw control


# ---------------------------------------------------------------------- runs


def test_runs_algorithm_wall_funnel_champion(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    by_name = {r["name"]: r for r in json.loads(query(capsys, db, "runs", "--format", "json"))}
    assert {n: r["algorithm"] for n, r in by_name.items()} == {RUN: "ga", OTHER: "random", NO_FUNNEL: "ga",
                                                               RUNNING: "ga"}
    assert by_name[RUN]["funnel"] == by_name[OTHER]["funnel"] == 1  # --funnel 1
    assert by_name[NO_FUNNEL]["funnel"] is None and by_name[RUNNING]["funnel"] is None
    assert "champion" not in by_name[RUN]  # only with --champion: it loads torch
    for name in (RUN, OTHER):
        r = by_name[name]
        start, end = (r[k] for k in ("started_at", "finished_at"))
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        assert r["wall_seconds"] == pytest.approx(seconds) and seconds > 0
    assert by_name[RUNNING]["wall_seconds"] is None and by_name[RUNNING]["wall"] == "running"
    table = query(capsys, db, "runs")
    head, *lines = table.splitlines()
    assert re.split(r"\s{2,}", head.strip()) == ["id", "name", "algorithm", "status", "started_at", "wall",
                                                 "candidates", "evaluated", "best_fitness", "funnel"]
    running = next(line for line in lines if RUNNING in line)
    assert re.search(r"\brunning\s+\S+ \S+\s+running\s", running), running  # status, started_at, wall
    assert re.search(rf"\b{OTHER}\s+random\s+finished\s+\S+ \S+\s+[0-9.]+ s\b", table)
    single = docs(capsys, db)
    champ = {r["name"]: r["champion"] for r in json.loads(query(capsys, db, "runs", "--champion", "--format", "json"))}
    assert champ == {RUN: single[RUN]["champion"], OTHER: single[OTHER]["champion"], NO_FUNNEL: None, RUNNING: None}
    rows = list(csv.DictReader(io.StringIO(query(capsys, db, "runs", "--champion", "--format", "csv"))))
    assert [r["champion"] for r in rows] == [champ[r["name"]] or "" for r in rows]
    assert {"finished_at", "wall_seconds", "algorithm", "funnel"} <= set(rows[0])


# ---------------------------------------------------------------------- runs on several tasks


def comparison_of(task: str, horizons: tuple[float, ...], candidates: list[str], seed: int) -> Comparison:
    """A real comparison (`nos.evaluation.compare.compare`) of stored-like rows with random losses."""
    rnd = random.Random(seed)
    seeds = Seeds((0,), (100, 101), (1000, 1001, 1002))
    rows = [Row(m, h, s, 0.01, rnd.uniform(0.1, 0.9), split)
            for h in horizons for m in [*BASELINES[:-1], "randopt_all", *candidates]
            for split, ss in (("validation", seeds.validation), ("test", seeds.test)) for s in ss]
    before = {(h, s): 1.0 for h in horizons for s in (*seeds.validation, *seeds.test)}
    return compare(rows, before, seeds, horizons, candidates, task=task)


def test_grids_of_runs_on_several_tasks() -> None:
    """A run on search task a and test task b beside a run on a alone: per-task rows, the
    multi-task run's aggregates as rows of their own, and "all" only where it means something."""
    multi = combine([comparison_of("a", (1.0, 2.0), ["#1", "#2"], 0), comparison_of("b", (3.0,), ["#1", "#2"], 1)],
                    ["a"], ["b"])
    single = comparison_of("a", (1.0, 5.0), ["#7"], 2)
    runs = [("multi", multi), ("single", single)]
    assert task_keys(runs) == ["a", "b", "all tasks", "test tasks (b)"]
    headers, rows = versus_grid(runs)
    assert headers == ["run", "task", "candidate", "baseline", "variant=1", "variant=2", "variant=3", "variant=5", "all"]
    assert [(r[0], r[1]) for r in rows[::5]] == [("multi", "a"), ("single", "a"), ("multi", "b"),
                                                 ("multi", "all tasks"), ("multi", "test tasks (b)")]
    assert all(r[2] == multi.champion for r in rows if r[0] == "multi")
    by = {(r[0], r[1]): r for r in rows}
    assert by[("multi", "a")][-1] == "-" and by[("single", "a")][-1] != "-"  # over a's horizons: single only
    assert by[("multi", "all tasks")][4:-1] == ["-"] * 4 and by[("multi", "all tasks")][-1] != "-"
    assert by[("single", "a")][5:7] == ["-", "-"]  # no t = 2 or 3 in that run
    headers, rows = versus_grid(runs, tasks=["b"])
    assert headers == ["run", "candidate", "baseline", "variant=3"] and len(rows) == 5  # no empty "all"
    headers, rows = methods_grid(runs)
    assert headers == ["run", "task", "method", "variant=1", "variant=2", "variant=3", "variant=5"]
    assert [r[2] for r in rows if r[0] == "multi" and r[1] == "b"][-1] == f"{multi.champion} (champion)"
    assert sum(r[2] == "Adam" for r in rows) == 3  # the runs' baselines differ: once per run and task
