"""The racing funnel (`nos.search.race`): its plan, its record of stored rows (clusters, advancers,
the champion's noise and simplicity rule) against hand-made rows, and a real race end to end:
evolve, kill, resume, the same rows; a damaged unit refused."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from db.store import Store
from nos.engine.simplify import effective_nodes
from nos.evaluation.protocol import BEFORE, Protocol, Row, Seeds
from nos.search.config import SearchConfig, parse_race
from nos.search.funnel import comparison
from nos.search.race import CLUSTER_TOL, clusters, record, stored_race
from nos.tasks.sine import SineConfig
from search_space.builtins import builtin

from .conftest import REPO

# ------------------------------------------------------------------------------- the plan


def test_parse_race_and_plan() -> None:
    assert parse_race("32x2, 8x4,3x10") == [(32, 2), (8, 4), (3, 10)]
    for bad in ("", "32", "x2", "3x0", "0x3", "2x2,3x2", "4x2;2x2", "-1x2"):
        with pytest.raises(ValueError, match="race"):
            parse_race(bad)
    cfg = SearchConfig(funnel=4, race="4x1,2x2", validation_seeds=(100, 101, 102))
    assert cfg.race_plan() == [(4, (100,)), (2, (101, 102))]  # consecutive, disjoint blocks
    with pytest.raises(ValueError, match="funnel has 5"):
        SearchConfig(funnel=5, race="4x1,2x2", validation_seeds=(100, 101, 102))
    with pytest.raises(ValueError, match="validation seeds"):
        SearchConfig(funnel=4, race="4x1,2x1", validation_seeds=(100, 101, 102))


def test_evolve_refuses_a_bad_race(tmp_path: Path) -> None:
    for args, says in ((["--race", "3x1,5x1"], "more candidates"), (["--race", "4x1", "--funnel", "3"], "--funnel"),
                       (["--race", "4x1,2x1", "--validation-seeds", "5"], "validation seeds")):
        res = subprocess.run([sys.executable, "-m", "nos.evolve", "--db", str(tmp_path / "x.sqlite"), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "x.sqlite").exists()  # refused before anything was written


# ------------------------------------------------------------------------------- the record

H = 1.0
LRS = (0.1, 0.01)
PROTOCOL = Protocol(sine=SineConfig(), seeds=Seeds((0,), (100, 101, 102, 103, 104, 105), (1000,)), horizons=(H,),
                    lrs=LRS)


def _rows(losses: dict[str, dict[int, float]]) -> list[Row]:
    """Validation rows: each candidate at lr 0.1 with the given loss per seed, 10x worse at 0.01."""
    return [Row(name, H, s, lr, loss * (1 if lr == 0.1 else 10), "validation")
            for name, per_seed in losses.items() for s, loss in per_seed.items() for lr in LRS]


def _base(seeds: range) -> list[Row]:
    return ([Row("adam", H, s, lr, 1.0, "validation") for s in seeds for lr in LRS]
            + [Row(BEFORE, H, s, None, 5.0, "validation") for s in seeds])


def test_clusters_merge_near_copies_only() -> None:
    prof = {"#1": np.log([[0.5, 0.4]]), "#2": np.log([[0.52, 0.41]]), "#3": np.log([[0.9, 0.1]])}
    assert clusters(["#1", "#2", "#3"], prof) == {"#1": "#1", "#2": "#1", "#3": "#3"}
    assert clusters(["#2", "#1", "#3"], prof) == {"#2": "#2", "#1": "#2", "#3": "#3"}  # the better one represents
    far = {"#1": np.zeros((1, 2)), "#2": np.full((1, 2), CLUSTER_TOL * 1.01)}
    assert clusters(["#1", "#2"], far) == {"#1": "#1", "#2": "#2"}


def _race(final: dict[str, dict[int, float]], genomes: dict[str, str]) -> object:
    """A three-candidate final stage after a first stage of five (#2 a near-copy of #1)."""
    first = {"#1": {100: 0.50, 101: 0.40}, "#2": {100: 0.51, 101: 0.41}, "#3": {100: 0.6, 101: 0.45},
             "#4": {100: 0.7, 101: 0.8}, "#5": {100: 3.0, 101: 2.0}}
    cand = {"sine": _rows(first) + _rows(final)}
    plan = [(5, (100, 101)), (3, (102, 103, 104, 105))]
    return record(cand, {"sine": _base(range(100, 106))}, plan, list(first), {"sine": PROTOCOL},
                  {n: builtin(g) for n, g in genomes.items()})


def test_record_advances_distinct_candidates_and_picks_the_simplest_within_noise() -> None:
    genomes = {"#1": "adam", "#2": "adam", "#3": "sgd", "#4": "adam", "#5": "adam"}
    assert effective_nodes(builtin("sgd")) < effective_nodes(builtin("adam"))
    seeds = (102, 103, 104, 105)
    # #3 is worse than #1 on average but within one standard error of the paired differences
    final = {"#1": dict(zip(seeds, (0.30, 0.50, 0.40, 0.45))), "#3": dict(zip(seeds, (0.45, 0.40, 0.50, 0.40))),
             "#4": dict(zip(seeds, (0.9, 0.8, 0.95, 0.85)))}
    race = _race(final, genomes)
    s1 = race.stages[0]  # type: ignore[attr-defined]
    assert s1.cluster["#2"] == "#1" and s1.advanced == ("#1", "#3", "#4")  # #2, a near-copy, does not advance
    assert race.finalists == ("#1", "#3", "#4")  # type: ignore[attr-defined]
    scores = race.final_scores  # type: ignore[attr-defined]
    gm = {n: float(np.exp(np.mean(np.log(list(v.values()))))) for n, v in final.items()}
    assert scores == pytest.approx(gm)  # over Adam's 1.0 on the last block alone
    assert min(scores, key=scores.__getitem__) == "#1"
    d = np.log(list(final["#3"].values())) - np.log(list(final["#1"].values()))
    assert d.mean() > 0 and d.mean() <= d.std(ddof=1) / 2  # the construction: worse, within one SE
    assert race.within_noise == ("#1", "#3")  # type: ignore[attr-defined]
    assert race.champion == "#3"  # type: ignore[attr-defined]  # fewer effective nodes, within noise
    # beyond the noise the best stays champion, whatever its size
    final["#3"] = dict(zip(seeds, (0.60, 0.70, 0.65, 0.72)))
    race = _race(final, genomes)
    assert race.within_noise == ("#1",) and race.champion == "#1"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- a real race

RACE = ["--initial", "12", "--particles", "2", "--timesteps", "1", "--mutations", "2", "--promote", "1",
        "--sine-pretrain-steps", "50", "--sine-width", "8", "--horizons", "1", "--budget", "60",
        "--heldout-horizons", "1,2", "--race", "6x1,3x1,2x2", "--test-seeds", "3", "--device", "cpu",
        "--threads", "1", "--seed", "1"]


def _evolve(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nos.evolve", "--db", str(tmp / "nos.sqlite"),
                             "--cache-dir", str(tmp.parent / "cache"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _evaluations(db: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return sorted(con.execute("SELECT individual_id, task, horizon, lr, seed, loss, split FROM evaluations"))


@pytest.fixture(scope="module")
def raced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("race") / "whole"
    tmp.mkdir()
    proc = _evolve(tmp, *RACE, "--name", "r")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return tmp / "nos.sqlite"


def test_a_race_end_to_end(raced: Path) -> None:
    with Store(str(raced), create=False) as store:
        run = store.get_run("r")
        cfg = SearchConfig.checked(run["config"])
        race = stored_race(store, run["id"], cfg)
        cmp = comparison(store, run["id"], cfg)
    assert race is not None and race.complete and cmp is not None
    assert len(race.stages[0].entrants) == 6 and len(race.finalists) <= 2
    assert cmp.champion == race.champion and set(cmp.validation_scores) == set(race.finalists)
    assert set(cmp.candidates) == set(race.finalists)  # test rows: the finalists' only
    rows = _evaluations(raced)
    test_ids = {r[0] for r in rows if r[6] == "test"}
    assert {f"#{i}" for i in test_ids} == set(race.finalists)
    # each stage's block: its own candidates only, every lr
    for stage in race.stages:
        names = {f"#{r[0]}" for r in rows if r[6] == "validation" and r[4] in stage.seeds}
        assert names == set(stage.entrants)
    out = subprocess.run([sys.executable, "-m", "nos.query", "--db", str(raced), "stats", "r", "--format", "json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    diag = json.loads(out.stdout)["diagnostics"]
    assert diag["race"]["champion"] == race.champion and diag["rank_correlation"]["n"] == 6
    assert [s["candidates"] for s in diag["race"]["stages"]] == [len(s.entrants) for s in race.stages]


@pytest.mark.slow  # two more real searches (~1 min): the slow suite
def test_a_killed_race_resumes_to_the_same_rows(raced: Path, tmp_path: Path) -> None:
    whole = _evaluations(raced)
    first_stage = sum(1 for r in whole if r[6] == "validation" and r[4] == 100)
    proc = _evolve(tmp_path, *RACE, "--name", "r")
    deadline = time.time() + 600
    db = tmp_path / "nos.sqlite"
    while proc.poll() is None and time.time() < deadline:  # kill inside the race, after its first stage
        time.sleep(0.05)
        try:
            n = sum(1 for r in _evaluations(db) if r[6] == "validation" and r[4] in (100, 101)) if db.exists() else 0
        except sqlite3.Error:
            continue
        if n > first_stage:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the race finished before it could be killed"
    assert 0 < len(_evaluations(db)) < len(whole)
    res = _evolve(tmp_path, "--resume", "r", "--device", "cpu", "--threads", "1")
    _, err = res.communicate(timeout=600)
    assert res.returncode == 0, err[-3000:]
    assert _evaluations(db) == whole


def test_a_damaged_race_unit_is_refused(raced: Path, tmp_path: Path) -> None:
    db = tmp_path / "damaged.sqlite"
    db.write_bytes(raced.read_bytes())
    with sqlite3.connect(db) as con:  # one row of the second stage goes missing
        con.execute("DELETE FROM evaluations WHERE id = (SELECT MIN(id) FROM evaluations WHERE seed = 101 "
                    "AND split = 'validation')")
    before = db.read_bytes()
    res = subprocess.run([sys.executable, "-m", "nos.query", "--db", str(db), "compare", "r"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "damaged" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert db.read_bytes() == before


def _calibrate(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nos", "calibrate", "--db", str(db), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_calibrate_race_measures_the_stored_race(raced: Path, tmp_path: Path) -> None:
    """`nos calibrate --race` on the real race reads the database only and measures the pilot:
    each eliminated entrant's per-seed score is its best lr's mean log loss over horizons, the
    noise is the finalists' 2 x 2 block's interaction, the spread the first block's variance,
    all recomputed here from the stored rows. This tiny race's entrants spread less than that
    noise, so it proposes nothing and says why; bad questions are one line and exit 2."""
    from nos.search.race import seed_scores

    before = raced.read_bytes()
    as_json = _calibrate(raced, "--race", "r", "--draws", "500", "--format", "json")
    text = _calibrate(raced, "--race", "r", "--draws", "500")
    assert as_json.returncode == 0 and text.returncode == 0, as_json.stderr[-2000:] + text.stderr[-2000:]
    assert raced.read_bytes() == before
    doc = json.loads(as_json.stdout)
    assert (doc["run"], doc["entrants"], doc["stages_measured"], doc["budget"]) == ("r", 6, 3, 6 + 3 + 4)
    assert [b["sigma_within"] is None for b in doc["blocks"]] == [True, True, False]  # only 2x2 has noise to see
    with Store(str(raced), create=False) as store:
        run = store.get_run("r")
        race, table = seed_scores(store, run["id"], SearchConfig.checked(run["config"]))  # type: ignore[misc]
    assert set(table) == set(race.stages[0].entrants)
    with sqlite3.connect(f"file:{raced}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT individual_id, horizon, lr, seed, loss FROM evaluations WHERE split = 'validation'"
                           ).fetchall()
    checked = 0
    for name in set(race.stages[0].entrants) - set(race.stages[1].entrants):
        mine = [r for r in rows if f"#{r[0]}" == name]
        (seed,) = {r[3] for r in mine}
        assert list(table[name]) == [seed]
        if any(r[4] is None or not math.isfinite(r[4]) for r in mine):
            continue
        best = [min(r[4] for r in mine if r[1] == h) for h in sorted({r[1] for r in mine})]
        assert table[name][seed] == pytest.approx(float(np.mean(np.log(best))), rel=1e-6, abs=1e-9)
        checked += 1
    assert checked >= 1
    (f1, f2), (s1, s2) = race.finalists, race.stages[2].seeds
    sigma = abs(table[f1][s1] - table[f1][s2] - table[f2][s1] + table[f2][s2]) / 2
    (first,) = race.stages[0].seeds
    spread = float(np.var([table[n][first] for n in race.stages[0].entrants], ddof=1))
    assert doc["sigma_within"] == pytest.approx(sigma, rel=1e-9)
    assert doc["spread_ratio"] == pytest.approx(spread / sigma ** 2, rel=1e-9) and doc["spread_ratio"] <= 1
    assert doc["recommended"] is None and doc["plans"] == [] and doc["sigma_between"] == 0
    assert "cannot tell its candidates apart" in text.stdout and "next:" not in text.stdout
    copy = tmp_path / "nos.sqlite"
    copy.write_bytes(before)
    with Store(str(copy), create=False) as store:  # a run of the same config without a race
        store.set_run_status(store.create_run("plain", {**run["config"], "race": ""}, seed=3), "finished")
    for args, expect in [(["--race", "nope"], "no run named 'nope'"), (["--race", "r", "--power", "r"], "one pilot"),
                         (["--race", "plain"], "ran no race")]:
        bad = _calibrate(copy, *args)
        assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1, bad.stderr
        assert expect in bad.stderr, bad.stderr
    assert raced.read_bytes() == before


def test_calibrate_race_proposes_the_next_race(raced: Path, tmp_path: Path) -> None:
    """The race's rows with the entrants the first stage eliminated made e^20, e^40, e^60 times worse
    on every row (what the race stored is otherwise the same: the same candidates advance, the
    finalists' rows and so the noise are untouched): now the entrants differ beyond the noise,
    and the command ranks the plans within the run's budget and names a `--race` evolve takes."""
    db = tmp_path / "spread.sqlite"
    db.write_bytes(raced.read_bytes())
    with Store(str(db), create=False) as store:
        run = store.get_run("r")
        race = stored_race(store, run["id"], SearchConfig.checked(run["config"]))
    assert race is not None
    out = sorted(set(race.stages[0].entrants) - set(race.stages[1].entrants), key=lambda n: int(n[1:]))
    with sqlite3.connect(db) as con:
        for k, name in enumerate(out):
            # far apart: the spread's F test has one residual degree of freedom (the 2 x 2 block)
            con.execute("UPDATE evaluations SET loss = loss * ? WHERE individual_id = ?", (math.exp(20 + 20 * k),
                                                                                          int(name[1:])))
    orig = json.loads(_calibrate(raced, "--race", "r", "--format", "json").stdout)
    as_json = _calibrate(db, "--race", "r", "--draws", "500", "--format", "json")
    text = _calibrate(db, "--race", "r", "--draws", "500")
    assert as_json.returncode == 0 and text.returncode == 0, as_json.stderr[-2000:] + text.stderr[-2000:]
    doc = json.loads(as_json.stdout)
    assert doc["sigma_within"] == pytest.approx(orig["sigma_within"], rel=1e-9)  # the finalists' block: untouched
    assert doc["spread_p"] < 0.05 and doc["sigma_between"] > 0
    assert doc["own"]["race"] == "6x1,3x1,2x2" and doc["own"]["cost"] == 13
    pick = parse_race(doc["recommended"]["race"])
    assert pick[0][0] == 6 and 6.5 <= sum(n * s for n, s in pick) <= 13 and pick[-1][1] >= 2
    assert all(0 <= p["p_best"] <= p["p_best_final"] <= 1 and p["cost"] <= 13 for p in doc["plans"])
    assert f"next: --race {doc['recommended']['race']} " in text.stdout and "(this run's)" in text.stdout
    bad = _calibrate(db, "--race", "r", "--budget", "5")
    assert bad.returncode == 2 and bad.stdout == "" and "no plan fits" in bad.stderr, bad.stderr
