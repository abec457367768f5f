"""Power and intervals for the comparison and the search diagnostics (issue 16, parts 5 and 6):
`nos.evaluation.stats.detectable_ratio`, `seeds_for`, `ci_span`, `seeds_for_span` and
`spearman_ci` against independent references (published power tables, a seeded Monte-Carlo
simulation of the paired t test, hand computations, the coverage of a seeded bivariate normal);
the `detectable_ratio` key of the compare JSON and its cell in the versus table; the CI of
`rank_correlation`; and `nos calibrate --power RUN` as a real subprocess on the session's tiny run."""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from db.store import Store
from nos.calibrate import main as calibrate_main
from nos.evaluation.compare import compare
from nos.evaluation.protocol import BASELINES, Row, Seeds
from nos.evaluation.stats import (
    MAX_SEEDS,
    ci_span,
    detectable_ratio,
    paired_power,
    seeds_for,
    seeds_for_span,
    spearman_ci,
    stratified_versus,
    versus,
)
from nos.search.metrics import rank_correlation
from nos.ui.tables import comparison_text, num

from .conftest import (
    RUN,
    TINY_EVOLVE,
    Proc,
    assert_one_line_error,
    in_process,
    run_module,
    tiny_search,
)

Z = 1.959963984540054 + 0.8416212335729143  # z_{0.975} + z_{0.8}, from a normal table
NO_FUNNEL = "no-funnel"


# ---------------------------------------------------------------------- power: closed forms


def test_detectable_ratio_is_the_normal_closed_form_for_many_seeds() -> None:
    """For large n the t test is the z test: r = exp((z_{1-alpha/2} + z_power) log_std / sqrt(n))."""
    for log_std, n in [(0.5, 10_000), (2.0, 40_000)]:
        assert detectable_ratio(log_std, n) == pytest.approx(math.exp(Z * log_std / math.sqrt(n)), rel=2e-5)
    # by hand: 2.801585 * 0.5 / 100 = 0.01400792, exp of it 1.014107
    assert detectable_ratio(0.5, 10_000) == pytest.approx(1.014107, abs=2e-6)
    # on few seeds t needs a larger ratio than z claims
    assert detectable_ratio(1.0, 5) > 1.5 * math.exp(Z / math.sqrt(5))


def test_power_matches_the_published_t_test_tables() -> None:
    """Cohen's tables / G*Power: a paired (one-sample) two-sided t test at alpha 0.05 with effect
    size d = 1 has power 0.803 on 10 pairs; so d = 1 needs 10 seeds, and 10 seeds detect slightly
    less than d = 1. Effect size d = |log r| / log_std."""
    assert paired_power(1.0, 10, math.e) == pytest.approx(0.803, abs=5e-4)
    assert paired_power(0.5, 10, math.exp(0.5)) == pytest.approx(0.803, abs=5e-4)  # only d matters
    assert paired_power(1.0, 10, 1 / math.e) == paired_power(1.0, 10, math.e)  # two-sided: r and 1/r
    assert seeds_for(1.0, math.e) == 10
    assert 0.99 < math.log(detectable_ratio(1.0, 10)) < 1.0
    assert paired_power(1.0, 10, 1.0) == pytest.approx(0.05)  # no effect: the test's level


def test_ci_span_by_hand() -> None:
    # t_{0.975, 9} = 2.262157 (a t table): exp(2 * 2.262157 * 1 / sqrt(10)) = exp(1.430722) = 4.18168
    assert ci_span(1.0, 10) == pytest.approx(4.18168, rel=1e-5)
    assert ci_span(0.3, 4) == pytest.approx(math.exp(2 * 3.182446 * 0.3 / 2), rel=1e-6)
    assert ci_span(0.0, 5) == 1.0 and ci_span(1.0, 1) == math.inf
    # how many seeds make the CI span less than 10x: the first n below, the one before not
    for log_std in (0.3, 1.0, 2.5):
        n = seeds_for_span(log_std, 10)
        assert n is not None and ci_span(log_std, n) < 10 and (n == 2 or ci_span(log_std, n - 1) >= 10)
    assert seeds_for_span(1.0, 10) == 6
    assert seeds_for_span(50.0, 1.0001, max_n=1000) is None  # more than max_n needed


def test_seeds_for_is_the_inverse_of_detectable_ratio() -> None:
    for log_std in (0.1, 0.7, 1.3, 3.0):
        for ratio in (1.2, 2.0, 5.0):
            n = seeds_for(log_std, ratio)
            assert n is not None and n >= 2
            assert detectable_ratio(log_std, n) <= ratio * (1 + 1e-9)
            if n > 2:
                assert detectable_ratio(log_std, n - 1) > ratio
            assert seeds_for(log_std, 1 / ratio) == n  # a ratio or its inverse


def test_edge_cases_and_bad_input() -> None:
    assert detectable_ratio(1.0, 1) == math.inf and math.isnan(paired_power(1.0, 1, 2.0))
    assert detectable_ratio(0.0, 3) == 1.0 and seeds_for(0.0, 1.01) == 2 and seeds_for_span(0.0, 1.01) == 2
    assert seeds_for(1.0, 1.0) is None  # no difference is never detected
    assert seeds_for(1.0, 1.0001) is None and seeds_for(1.0, 1.0001, max_n=MAX_SEEDS) is None
    assert seeds_for(1.0, 2.0, max_n=5) is None and seeds_for(1.0, 2.0, max_n=19) == 19
    for bad in (lambda: detectable_ratio(-1.0, 5), lambda: detectable_ratio(math.nan, 5),
                lambda: detectable_ratio(1.0, 5, power=0.01), lambda: detectable_ratio(1.0, 5, alpha=1.5),
                lambda: seeds_for(1.0, 0.0), lambda: seeds_for_span(1.0, 1.0), lambda: ci_span(1.0, 5, 1.0)):
        with pytest.raises(ValueError):
            bad()


# ---------------------------------------------------------------------- power: simulation


def simulated_power(log_std: float, n: int, ratio: float, sims: int = 40_000, seed: int = 0) -> float:
    """The share of seeded draws of n normal log ratios (mean log ratio, std log_std) in which
    scipy's one-sample t test (the paired test on log losses) rejects at 5%, two-sided."""
    d = np.random.default_rng(seed).normal(math.log(ratio), log_std, size=(sims, n))
    return float(np.mean(sps.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05))


@pytest.mark.parametrize(("log_std", "ratio"), [(1.0, 3.0), (0.5, 2.0), (0.8, 3.0)])
def test_seeds_for_reaches_the_power_in_a_simulation(log_std: float, ratio: float) -> None:
    """At seeds_for the simulated power is >= 0.8; at one seed fewer it is lower (40,000 draws:
    a standard error of 0.002; these cases are 0.02 or more from 0.8 either side)."""
    n = seeds_for(log_std, ratio)
    assert n is not None and n > 2
    at, below = simulated_power(log_std, n, ratio), simulated_power(log_std, n - 1, ratio, seed=1)
    assert at >= 0.8 > below
    assert at == pytest.approx(paired_power(log_std, n, ratio), abs=0.01)
    assert below == pytest.approx(paired_power(log_std, n - 1, ratio), abs=0.01)


def test_detectable_ratio_has_the_power_in_a_simulation() -> None:
    for log_std, n in [(1.0, 8), (0.4, 4), (2.0, 30)]:
        assert simulated_power(log_std, n, detectable_ratio(log_std, n), seed=n) == pytest.approx(0.8, abs=0.01)


# ---------------------------------------------------------------------- Spearman


def test_spearman_ci_is_scipys_rho_with_a_seeded_interval() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=25)
    y = x + rng.normal(size=25)
    rho, lo, hi, p = spearman_ci(x, y, seed=4)
    ref = sps.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert -1 <= lo < rho < hi <= 1
    assert spearman_ci(x, y, seed=4) == (rho, lo, hi, p)  # seeded: the same interval
    assert spearman_ci(x, y, seed=5)[1:3] != (lo, hi) and spearman_ci(x, y, seed=5)[0] == rho
    # pairs with a NaN are left out
    assert spearman_ci([*x, math.nan], [*y, 1.0], seed=4) == (rho, lo, hi, p)


def test_spearman_ci_degenerate_inputs_are_nan() -> None:
    for x, y in [([], []), ([1.0], [2.0]), ([1.0, 2.0], [2.0, 1.0]),  # fewer than 3
                 ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]), ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),  # constant
                 ([1.0, 2.0, math.nan], [1.0, 2.0, 3.0])]:  # 2 finite pairs
        assert all(math.isnan(v) for v in spearman_ci(x, y)), (x, y)
    with pytest.raises(ValueError):
        spearman_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    rho, lo, hi, _ = spearman_ci([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])  # perfect: resamples too
    assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_spearman_ci_covers_the_true_correlation() -> None:
    """Bivariate normal with correlation 0.6: the population Spearman correlation is
    (6 / pi) arcsin(0.6 / 2); the 95% interval of 150 seeded samples of 30 covers it in most."""
    true = 6 / math.pi * math.asin(0.3)
    rng = np.random.default_rng(11)
    covered = 0
    for i in range(150):
        xy = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.6], [0.6, 1.0]], size=30)
        _, lo, hi, _ = spearman_ci(xy[:, 0], xy[:, 1], seed=i, n_resamples=1000)
        covered += lo <= true <= hi
    assert covered / 150 >= 0.88


def test_rank_correlation_reports_the_interval() -> None:
    fitness = {i: float(i) for i in range(1, 11)}
    validation = {i: float(i) + (3.0 if i % 3 == 0 else 0.0) for i in range(1, 11)}
    rc = rank_correlation(fitness, validation)
    assert set(rc) == {"n", "spearman", "p_value", "ci_low", "ci_high"}
    rho, lo, hi, p = spearman_ci(list(fitness.values()), list(validation.values()), seed=0)
    assert (rc["n"], rc["spearman"], rc["p_value"], rc["ci_low"], rc["ci_high"]) == (10, rho, p, lo, hi)
    assert rc["ci_low"] <= rc["spearman"] <= rc["ci_high"]
    few = rank_correlation({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
    assert few == {"n": 2, "spearman": None, "p_value": None, "ci_low": None, "ci_high": None}
    flat = rank_correlation({1: 1.0, 2: 1.0, 3: 1.0}, {1: 1.0, 2: 2.0, 3: 3.0})  # rho undefined
    assert flat["spearman"] is None and flat["ci_low"] is None


# ---------------------------------------------------------------------- the comparison


OLD_VERSUS_KEYS = {"task", "candidate", "baseline", "horizon", "gmean_ratio", "ci_low", "ci_high", "wins", "n",
                   "p_value", "verdict"}


def test_versus_reports_its_detectable_ratio() -> None:
    rng = np.random.default_rng(0)
    base = np.exp(rng.normal(size=8))
    cand = base * np.exp(rng.normal(-0.5, 0.7, size=8))
    v = versus(list(cand), list(base))
    d = np.log(cand) - np.log(base)
    assert v.log_std == pytest.approx(np.std(d, ddof=1))
    assert v.detectable_ratio == pytest.approx(detectable_ratio(float(np.std(d, ddof=1)), 8))
    assert versus([1.0], [2.0]).detectable_ratio is None  # one seed: no test
    assert versus([1.0, 2.0], [2.0, 4.0]).detectable_ratio == 1.0  # no spread
    # pooled over strata: one stratum is the stratum itself
    assert stratified_versus([(list(cand), list(base))]).detectable_ratio == pytest.approx(v.detectable_ratio)
    # two identical strata: the standard error of 2n seeds, Welch-Satterthwaite dof 2n - 2
    two = stratified_versus([(list(cand), list(base))] * 2).detectable_ratio
    s = float(np.std(d, ddof=1))
    assert two is not None and detectable_ratio(s, 16) < two < detectable_ratio(s, 15)


def test_compare_json_adds_detectable_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    """A real comparison of stored-like rows: every versus row keeps its keys and values and adds
    detectable_ratio, the value computed here from the rows' own test losses."""
    rnd = random.Random(0)
    seeds, horizons = Seeds((0,), (100, 101), (1000, 1001, 1002, 1003, 1004)), (1.0, 2.0)
    rows = [Row(m, h, s, 0.01, rnd.uniform(0.1, 0.9), split)
            for h in horizons for m in [*BASELINES[:-1], "randopt_all", "#1", "#2"]
            for split, ss in (("validation", seeds.validation), ("test", seeds.test)) for s in ss]
    before = {(h, s): 1.0 for h in horizons for s in (*seeds.validation, *seeds.test)}
    cmp = compare(rows, before, seeds, horizons, ["#1", "#2"])
    test = {(r.method, r.horizon, r.seed): float(r.loss or 0) for r in rows if r.split == "test"}
    doc = cmp.json("x")
    assert len(doc["versus"]) == 2 * 5 * 2 + 2 * 5  # candidates x baselines x horizons, then the aggregates
    for v, row in zip(doc["versus"], (*cmp.versus, *cmp.aggregate)):
        assert set(v) == OLD_VERSUS_KEYS | {"detectable_ratio"}
        s = row.stats
        assert {k: v[k] for k in OLD_VERSUS_KEYS} == {
            "task": row.task, "candidate": row.candidate, "baseline": row.baseline, "horizon": row.horizon,
            "gmean_ratio": s.gmean_ratio, "ci_low": s.ci_low, "ci_high": s.ci_high, "wins": s.wins, "n": s.n,
            "p_value": s.p_value, "verdict": s.verdict}
        assert v["detectable_ratio"] > 1
        if v["horizon"] is None:
            continue
        method = "randopt_all" if v["baseline"] == "randopt" else v["baseline"]
        d = [math.log(test[(v["candidate"], v["horizon"], t)] / test[(method, v["horizon"], t)]) for t in seeds.test]
        assert v["detectable_ratio"] == pytest.approx(detectable_ratio(float(np.std(d, ddof=1)), 5))
    text = comparison_text(cmp)
    assert "det = the ratio (or its inverse) these seeds detect with 80% power" in text
    for row in (*cmp.versus, *cmp.aggregate):
        assert f" {row.verdict} det {num(row.stats.detectable_ratio)}x" in text


# ---------------------------------------------------------------------- nos calibrate --power


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny database (the original is shared) with a run without funnel."""
    source = tiny_search(tmp_path_factory)
    path = tmp_path_factory.mktemp("power") / "nos.sqlite"
    with sqlite3.connect(source) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    with Store(path, create=False) as store:
        run = store.get_run(RUN)
        assert run is not None
        config = run["config"]
        store.set_run_status(store.create_run(NO_FUNNEL, {**config, "funnel": 0}, seed=3), "finished")
    return path


def calibrate(db: Path, *args: str) -> Proc:
    return Proc(["-m", "nos", "calibrate", "--db", str(db), *args])


def test_calibrate_power(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    """The real command on the real tiny run: its numbers are those of the run's own compare
    document (per-seed log ratios recomputed here from the per-seed losses), errors are one line
    and exit 2, and the database is never written."""
    digest, listing = hashlib.sha256(db.read_bytes()).hexdigest(), sorted(p.name for p in db.parent.iterdir())
    table, as_json = calibrate(db, "--power", RUN), calibrate(db, "--power", RUN, "--format", "json", "--ratio",
                                                              "1.5", "--span", "4")
    errors = [(calibrate(db, "--power", "nope"), "no run named 'nope'"),
              (calibrate(db, "--power", NO_FUNNEL), f"run {NO_FUNNEL!r} has no funnel results")]
    for args, expect in [(("--power", RUN, "--ratio", "1", "--db", str(db)), "--ratio"),
                         (("--power", RUN, "--span", "inf", "--db", str(db)), "--span"),
                         (("--power", RUN, "--db", str(db.parent / "missing.sqlite")), "does not exist")]:
        line = assert_one_line_error(*in_process(capsys, *args, main=calibrate_main))
        assert expect in line, line
    code, out, err = in_process(capsys, "compare", RUN, "--db", str(db), "--format", "json")
    assert code == 0, err
    ref: dict[str, Any] = json.loads(out)
    doc = _ok(as_json)
    assert (doc["run"], doc["champion"], doc["test_seeds"]) == (RUN, ref["champion"], len(ref["seeds"]["test"]))
    assert (doc["ratio"], doc["span"], doc["power"], doc["alpha"]) == (1.5, 4.0, 0.8, 0.05)
    methods = {(m["method"], m["horizon"]): m for m in ref["methods"]}
    want = [v for v in ref["versus"] if v["candidate"] == ref["champion"] and v["horizon"] is not None]
    assert len(doc["rows"]) == len(want) == 5 * len(ref["horizons"])
    span_seeds: dict[str, int] = {}
    for row, v in zip(doc["rows"], want):
        assert (row["task"], row["horizon"], row["baseline"], row["n"]) == (v["task"], v["horizon"], v["baseline"],
                                                                            v["n"])
        assert row["gmean_ratio"] == v["gmean_ratio"] and row["detectable_ratio"] == v["detectable_ratio"]
        h, fallback = v["horizon"], methods[("before", v["horizon"])]["per_seed"]
        c = [x if x is not None else f for x, f in zip(methods[(ref["champion"], h)]["per_seed"], fallback)]
        b = [x if x is not None else f for x, f in zip(methods[(v["baseline"], h)]["per_seed"], fallback)]
        log_std = float(np.std(np.log(c) - np.log(b), ddof=1))
        assert row["log_std"] == pytest.approx(log_std, rel=1e-9, abs=1e-12)
        assert row["detectable_ratio"] == pytest.approx(detectable_ratio(log_std, v["n"]))
        n = row["seeds_for_ratio"]
        assert n == seeds_for(log_std, 1.5) and detectable_ratio(log_std, n) <= 1.5 + 1e-9
        assert n == 2 or detectable_ratio(log_std, n - 1) > 1.5
        m = row["seeds_for_span"]
        assert m == seeds_for_span(log_std, 4.0) and ci_span(log_std, m) < 4 and (m == 2 or ci_span(log_std, m - 1) >= 4)
        key = f"{v['task']} {v['horizon']:g}"
        span_seeds[key] = max(span_seeds.get(key, 2), m)
    # the next run's test seeds: per horizon the most any baseline needs, then the most of those
    assert doc["test_seeds_per_horizon"] == span_seeds and doc["next_test_seeds"] == max(span_seeds.values())
    # ... and per horizon, as `nos evolve --test-seeds` reads it: the fewest, then each horizon needing more
    low = min(span_seeds.values())
    spec = ",".join([str(low), *(f"{k.split()[1]}={n}" for k, n in span_seeds.items() if n > low)])
    assert doc["next_test_seeds_spec"] == spec
    code, out, err = table.result()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"run {RUN!r} (id ") and f"champion {ref['champion']} " in lines[0]
    assert lines[1].split() == ["task", "horizon", "baseline", "n", "ratio", "log", "std", "detects", "seeds", "for",
                                "2x", "seeds", "for", "span", "<", "10x"]
    body = [line.split() for line in lines[3:-1]]
    assert len(body) == len(want)
    assert lines[-1].startswith("seeds for span < 10x against every baseline, per horizon: ") and \
        lines[-1].endswith("that many everywhere)")
    each = dict(item.rsplit(" ", 1) for item in lines[-1].split(": ", 1)[1].split("; ")[0].split(", "))  # --span 10's
    counts = {k.split()[1]: int(n) for k, n in each.items()}
    low = min(counts.values())
    spec10 = ",".join([str(low), *(f"{h}={n}" for h, n in counts.items() if n > low)])
    assert lines[-1].endswith(f"next: --test-seeds {spec10} (per horizon what it needs; --test-seeds "
                              f"{max(counts.values())}: that many everywhere)")
    for cells, v in zip(body, want):
        assert cells[2] == v["baseline"] and cells[6] == f"{num(v['detectable_ratio'])}x"
    for proc, expect in errors:
        line = assert_one_line_error(*proc.result())
        assert expect in line, line
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # read only
    assert sorted(p.name for p in db.parent.iterdir()) == listing  # nothing left beside it


def _ok(proc: Proc) -> dict[str, Any]:
    code, out, err = proc.result()
    assert code == 0, err
    return json.loads(out)


def test_per_horizon_test_seeds_end_to_end(tmp_path: Path) -> None:
    """`nos evolve --test-seeds 2,5=4`: the funnel's candidates and every baseline are tested on 4
    seeds at t_max = 5 and on the first 2 of them at t_max = 1, the comparison's statistics use
    exactly those, and the seeds text and JSON say so. A horizon no task has, or a malformed
    spec, is one line and exit 2, with nothing written."""
    db = tmp_path / "ph.sqlite"
    base = ["--db", str(db), "--cache-dir", str(tmp_path / "cache"), *TINY_EVOLVE, "--heldout-horizons", "1,5",
            "--validation-seeds", "2"]
    for bad, expect in [("2,7=4", "no task has horizon 7"), ("2,5", "expected N or N,H=N"), ("2,5=0", "--test-seeds"),
                        ("2,5=3,5=4", "named twice")]:
        proc = run_module("nos.evolve", *base, "--test-seeds", bad, "--name", "bad")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and expect in proc.stderr, proc.stderr
    assert not db.exists()
    proc = run_module("nos.evolve", *base, "--test-seeds", "2,5=4", "--name", "ph", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("nos.query", "compare", "ph", "--db", str(db), "--format", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["seeds"]["test"] == [1000, 1001, 1002, 1003] and doc["seeds"]["test_per_horizon"] == {"1": 2}
    want = {1.0: 2, 5.0: 4}
    assert {m["horizon"] for m in doc["methods"]} == set(want)
    assert all(len(m["per_seed"]) == want[m["horizon"]] for m in doc["methods"])
    versus = [v for v in doc["versus"] if v["horizon"] is not None]
    assert versus and all(v["n"] == want[v["horizon"]] for v in versus)
    with Store(str(db), create=False) as store:
        run = store.get_run("ph")
        assert run["status"] == "finished" and run["config"]["test_seeds_at"] == {"1.0": 2}
        test = [r for _, r in store.heldout_evaluations(run["id"], "sine") if r["split"] == "test"]
        baselines = [b for b in store.baselines() if b["split"] == "test"]  # this database's only run
    for rows in (test, baselines):
        assert {r["horizon"] for r in rows} == set(want)
        for h, n in want.items():
            assert {r["seed"] for r in rows if r["horizon"] == h} == set(range(1000, 1000 + n))
    proc = run_module("nos.query", "compare", "ph", "--db", str(db))
    assert "test seeds 1000..1003 (n = 4; 2 at horizon 1)" in proc.stdout, proc.stdout[:500]


def test_the_test_seeds_spec_reads_any_variant_and_calibrate_writes_it_back() -> None:
    """`--test-seeds` takes any finite horizon (a task's variant may be a noise level of 0), and
    what `nos calibrate --power` advises parses back to the same counts, horizons exact."""
    import argparse

    from nos.calibrate import test_seeds_spec
    from nos.evolve import _test_seeds_spec

    assert _test_seeds_spec("5,0=10,-1=3,0.1=7") == (5, {0.0: 10, -1.0: 3, 0.1: 7})
    third = 1 / 3
    rows = [{"task": "t", "horizon": h, "log_std": 1.0, "seeds_for_span": n} for h, n in
            [(0.0, 4), (third, 9), (20.0, 30), (20.0, 12), (5.0, None)]]
    spec = test_seeds_spec(rows)
    assert spec == f"4,{third!r}=9,5=1000000,20=30"  # the exact 1/3; None (more than MAX_SEEDS) is MAX_SEEDS
    assert _test_seeds_spec(spec.replace("1000000", "10")) == (4, {third: 9, 5.0: 10, 20.0: 30})
    with pytest.raises(argparse.ArgumentTypeError):
        _test_seeds_spec("5,nan=3")
