"""A search on a mix of tasks with held-out test tasks, end to end (real subprocesses): per-task and
aggregate comparison rows, a champion chosen on the search tasks alone, and the report's profile."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from db.store import Store
from nos.evaluation.stats import stratified_versus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--initial", "5", "--particles", "1", "--timesteps", "1", "--mutations", "2", "--funnel", "2",
        "--validation-seeds", "1", "--test-seeds", "3", "--budget", "45", "--threads", "1",
        "--sine-pretrain-steps", "60", "--sine-width", "8", "--horizons", "1", "--heldout-horizons", "1,2"]


def nos(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "nos", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    nos(d, "evolve", "--tasks", "quadratic,sine", "--test-tasks", "rosenbrock", "--name", "mix", "--db", "mix.sqlite",
        *TINY)
    return d


def test_compare_has_per_task_and_aggregate_rows(mixed: Path) -> None:
    doc = json.loads(nos(mixed, "query", "compare", "mix", "--db", "mix.sqlite", "--format", "json").stdout)
    assert doc["tasks"] == {"search": ["quadratic", "sine"], "test": ["rosenbrock"]}
    assert {m["task"] for m in doc["methods"]} == {"quadratic", "sine", "rosenbrock"}
    assert doc["task_horizons"] == {"quadratic": [10.0, 1000.0], "sine": [1.0, 2.0], "rosenbrock": [2.0, 10.0]}
    # per-task rows, the aggregate over all tasks ("all") and over the test tasks (named by them)
    assert {v["task"] for v in doc["versus"]} == {"quadratic", "sine", "rosenbrock", "all"}
    assert {v["task"] for v in doc["versus"] if v["horizon"] is None} == {"all", "rosenbrock"}
    for v in doc["versus"]:
        if v["task"] in ("all", "rosenbrock") and v["horizon"] is None:
            n_strata = 6 if v["task"] == "all" else 2  # 3 tasks x 2 variants, or the test task's 2
            assert v["n"] == 3 * n_strata and v["ci_low"] <= v["gmean_ratio"] <= v["ci_high"]

    # the champion is the lowest geometric mean of the *search* tasks' validation scores: recompute
    # each task's score from its rows (validation_score of the candidate / Adam's, per variant)
    def task_score(c: str, task: str) -> float:
        rows = {(m["method"], m["horizon"]): m["validation_score"] for m in doc["methods"] if m["task"] == task}
        ratios = [rows[(c, h)] / rows[("adam", h)] for h in doc["task_horizons"][task]]
        return math.exp(sum(map(math.log, ratios)) / len(ratios))

    scores = {c: math.exp((math.log(task_score(c, "quadratic")) + math.log(task_score(c, "sine"))) / 2)
              for c in doc["candidates"]}
    assert doc["champion"] == min(scores, key=scores.__getitem__)
    for c, s in scores.items():  # and the rosenbrock (test task) rows entered no score
        assert math.isclose(doc["validation_scores"][c], s, rel_tol=1e-9)

    # the aggregate row over all tasks equals an independent stratified computation from the methods
    champ = doc["champion"]
    strata = []
    for task, hs in doc["task_horizons"].items():
        for h in hs:
            get = {m["method"]: m for m in doc["methods"] if m["task"] == task and m["horizon"] == h}
            before = get["before"]["per_seed"]
            c, a = ([b if x is None else x for x, b in zip(get[m]["per_seed"], before)] for m in (champ, "adam"))
            strata.append((c, a))
    agg = next(v for v in doc["versus"] if v["task"] == "all" and v["candidate"] == champ and v["baseline"] == "adam")
    ref = stratified_versus(strata)
    assert math.isclose(agg["gmean_ratio"], ref.gmean_ratio, rel_tol=1e-9)
    assert math.isclose(agg["ci_low"], ref.ci_low, rel_tol=1e-9) and agg["wins"] == ref.wins


def test_rows_carry_their_task(mixed: Path) -> None:
    with Store(str(mixed / "mix.sqlite"), create=False) as store:
        run = store.get_run("mix")
        tasks = {e["task"] for i in store.individuals(run["id"])
                 for e in (store.get_individual(i["id"]) or {}).get("evaluations", [])}
        baselines = {b["task"] for b in store.baselines()}
    assert {"quadratic", "sine", "rosenbrock", "quadratic_cheap", "sine_cheap"} >= tasks >= {"quadratic", "sine"}
    assert "rosenbrock" in tasks  # the funnel's rows on the test task
    assert {"quadratic_search", "sine_search", "quadratic", "sine", "rosenbrock"} <= baselines


def test_report_draws_the_performance_profile(mixed: Path) -> None:
    nos(mixed, "report", "mix", "--db", "mix.sqlite", "--out", "report")
    assert (mixed / "report" / "profile.png").stat().st_size > 10_000
    assert not (mixed / "report" / "rollouts.png").exists()  # the first task is no wave: nothing retrained
    assert "profile.png" in (mixed / "report" / "summary.md").read_text()


def test_stratified_bootstrap_weighs_strata_alike() -> None:
    # two strata: the candidate is 10x better on one (2 seeds) and 10x worse on the other (6 seeds)
    v = stratified_versus([([0.1, 0.1], [1.0, 1.0]), ([10.0] * 6, [1.0] * 6)])
    assert math.isclose(v.gmean_ratio, 1.0, rel_tol=1e-12) and v.n == 8 and v.wins == 2
    same = stratified_versus([([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])])
    assert same.ci_low == same.ci_high == pytest.approx(2.0)
