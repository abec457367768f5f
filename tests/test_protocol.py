"""The evaluation protocol: disjoint splits, choices on validation only, baselines stored once,
statistics that match an independent computation, and batch-independent losses."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from db.store import Store
from nos.evaluation.compare import compare
from nos.evaluation.fitness import SearchSetup, TaskEvaluator
from nos.evaluation.protocol import PROTOCOL_VERSION, Protocol, Row, Seeds, baseline_genome, choose
from nos.evaluation.stats import first_best, settle, summarize, versus
from nos.search import SearchConfig
from nos.search.funnel import before_of, stored_candidate_rows
from nos.tasks.sine import SineConfig
from search_space.builtins import builtin
from search_space.mutation import random_genome

ROOT = Path(__file__).resolve().parents[1]
TINY_SINE = ["--sine-pretrain-steps", "50", "--sine-width", "8"]
# small enough for a test: 4 validation, 6 test seeds, two horizons, 20 gradient steps
TINY = ["--initial", "8", "--particles", "2", "--timesteps", "1", "--mutations", "2", "--funnel", "2",
        "--horizons", "1", "--heldout-horizons", "1,2", "--budget", "60", "--search-seeds", "2",
        "--validation-seeds", "4", "--test-seeds", "6", *TINY_SINE, "--device", "cpu"]


def evolve(db: Path, cache: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "nos.evolve", "--db", str(db), "--cache-dir", str(cache),
                          "--name", name, *TINY, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Two real runs with the same protocol in one database (different search seeds)."""
    base = tmp_path_factory.mktemp("protocol")
    db, cache = base / "nos.sqlite", base / "cache"
    evolve(db, cache, "first")
    with Store(db, create=False) as store:
        shared = [b for b in store.baselines() if b["protocol"] is not None]
    second = evolve(db, cache, "second", "--seed", "7")
    with Store(db, create=False) as store:
        # no new protocol rows; the second run adds only its own Adam references: the full stage
        # (1 search horizon x 2 search seeds) and the cheap stage (1 seed)
        assert [b for b in store.baselines() if b["protocol"] is not None] == shared
        own = store.baselines(store.get_run("second")["id"])
        assert sorted(b["task"] for b in own) == ["sine_search", "sine_search", "sine_search_cheap"]
    return db, second


def test_seed_sets_must_be_disjoint() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        Seeds((0, 1), (1, 2), (3,))
    with pytest.raises(ValueError, match="at least one"):
        Seeds((0,), (), (3,))
    s = Seeds.counted(2, 3, 10)
    assert not set(s.search) & set(s.validation) and not set(s.validation) & set(s.test)
    with pytest.raises(ValueError):
        SearchConfig(search_seeds=(0,), validation_seeds=(0,), test_seeds=(5,))


def test_splits_are_disjoint_and_recorded(two_runs) -> None:
    db, _ = two_runs
    con = sqlite3.connect(db)
    cfg = json.loads(con.execute("select config from runs where name = 'first'").fetchone()[0])
    seeds = {k: set(cfg[f"{k}_seeds"]) for k in ("search", "validation", "test")}
    assert [len(seeds[k]) for k in ("search", "validation", "test")] == [2, 4, 6]
    assert not (seeds["search"] & seeds["validation"] or seeds["search"] & seeds["test"]
                or seeds["validation"] & seeds["test"])
    rows = con.execute("select e.split, e.seed from evaluations e join individuals i on i.id = e.individual_id "
                       "join runs r on r.id = i.run_id where r.name = 'first'").fetchall()
    for split in ("search", "validation", "test"):
        used = {s for sp, s in rows if sp == split}
        assert used == seeds[split], split
    for split, seed in con.execute("select split, seed from baselines where protocol is not null"):
        assert split in ("validation", "test") and seed in seeds[split]
    # test rows of a candidate: one lr per horizon (the validated one)
    per = con.execute("select individual_id, horizon, count(distinct lr) from evaluations where split = 'test' "
                      "group by individual_id, horizon").fetchall()
    assert per and all(n == 1 for *_, n in per)


def test_baselines_are_computed_once_per_protocol_and_reused(two_runs) -> None:
    db, second = two_runs
    assert "reusing stored validation rows of adam, adam_clip, adam_wc, adam_clip_wc and RandOpt" in second.stderr
    assert "reusing stored test rows of adam, adam_clip, adam_wc, adam_clip_wc and RandOpt" in second.stderr
    con = sqlite3.connect(db)
    keys = con.execute("select distinct protocol from baselines where protocol is not null").fetchall()
    assert len(keys) == 2  # one validation key, one test key, shared by both runs
    # every (method, horizon, seed, hparam) of the protocol exactly once
    dup = con.execute("select count(*) from (select method, horizon, seed, hparam, split, count(*) c from baselines "
                      "where protocol is not null group by method, horizon, seed, hparam, split having c > 1)")
    assert dup.fetchone()[0] == 0


def _all_rows(db: Path, name: str) -> tuple[list[Row], SearchConfig]:
    with Store(db, create=False) as store:
        run = store.get_run(name)
        cfg = SearchConfig.from_json(run["config"])
        protocol = cfg.protocol()
        base = [Row(b["method"], b["horizon"], b["seed"], b["hparam"], b["loss"], b["split"])
                for k in ("validation", "test") for b in store.baselines(protocol=protocol.key(k))]
        return base + stored_candidate_rows(store, run["id"]), cfg


def test_poisoned_test_losses_change_no_choice(two_runs, tmp_path: Path) -> None:
    db, _ = two_runs
    rows, cfg = _all_rows(db, "first")
    protocol = cfg.protocol()
    names = sorted({r.method for r in rows if r.method.startswith("#")})
    clean = compare(rows, before_of(rows), protocol.seeds, protocol.horizons, names)
    rng = np.random.default_rng(0)
    # every test loss replaced: 30% diverged, the rest anything from 1e-9 to 1e9 (the pretrained
    # net's test losses too, which stand in for diverged runs)
    poisoned = [Row(r.method, r.horizon, r.seed, r.hparam,
                    None if rng.random() < 0.3 and r.method != "before" else float(rng.uniform(1e-9, 1e9)), r.split)
                if r.split == "test" else r for r in rows]
    dirty = compare(poisoned, before_of(poisoned), protocol.seeds, protocol.horizons, names)
    assert clean.champion == dirty.champion and clean.champion is not None
    assert [(m.method, m.horizon, m.hparam, m.variant) for m in clean.methods] == \
           [(m.method, m.horizon, m.hparam, m.variant) for m in dirty.methods]
    assert [m.per_seed for m in clean.methods] != [m.per_seed for m in dirty.methods]
    # the same through the stored rows and the real command: poison every test loss in a copy
    copy = tmp_path / "poisoned.sqlite"
    copy.write_bytes(db.read_bytes())
    con = sqlite3.connect(copy)
    con.execute("update evaluations set loss = loss * 1000 + 1 where split = 'test'")
    con.execute("update baselines set loss = 1e-12 where split = 'test'")
    con.commit()
    con.close()
    outs = []
    for path in (db, copy):
        res = subprocess.run([sys.executable, "-m", "nos.query", "compare", "first", "--db", str(path), "--format",
                              "json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(json.loads(res.stdout))
    assert outs[0]["champion"] == outs[1]["champion"]
    assert [(m["method"], m["hparam"]) for m in outs[0]["methods"]] == [(m["method"], m["hparam"]) for m in outs[1]["methods"]]
    assert outs[0]["versus"] != outs[1]["versus"]


def test_compare_json_follows_the_contract(two_runs) -> None:
    db, _ = two_runs
    res = subprocess.run([sys.executable, "-m", "nos.query", "compare", "first", "--db", str(db), "--format", "json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    doc = json.loads(res.stdout)
    assert doc["run"] == "first" and set(doc["seeds"]) == {"search", "validation", "test"}
    assert {"method", "horizon", "hparam", "per_seed", "median", "gmean"} <= set(doc["methods"][0])
    methods = {m["method"] for m in doc["methods"]}
    assert {"before", "adam", "adam_clip", "adam_wc", "adam_clip_wc", "randopt"} <= methods
    assert all(len(m["per_seed"]) == 6 for m in doc["methods"])
    v = doc["versus"][0]
    assert {"candidate", "baseline", "horizon", "gmean_ratio", "ci_low", "ci_high", "wins", "n", "p_value"} <= set(v)
    assert all(m["task"] == "sine" for m in doc["methods"])
    horizons = {m["horizon"] for m in doc["methods"]}
    for v in doc["versus"]:
        # per (task, horizon): 6 test seeds; the aggregate over the task's horizons pools them all
        n = 6 if v["task"] == "sine" else 6 * len(horizons)
        assert v["task"] in ("sine", "all") and (v["horizon"] is None) == (v["task"] == "all")
        assert v["ci_low"] <= v["gmean_ratio"] <= v["ci_high"] and v["n"] == n
        assert (v["verdict"] == "wins") == (v["ci_high"] < 1)
    assert any(v["task"] == "all" for v in doc["versus"])
    table = subprocess.run([sys.executable, "-m", "nos.query", "compare", "first", "--db", str(db)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    assert "Adam + clip + warmup-cosine" in table and "95% bootstrap CI" in table


# ----------------------------------------------------------------------------- statistics


def test_statistics_match_an_independent_computation() -> None:
    cand = [1e-4, 3e-4, 2e-5, 5e-4, 1.1e-3, 8e-5, 2.5e-4, 4e-4]  # no zero or tied |log ratio|
    base = [2e-4, 2e-4, 1e-4, 9e-4, 1e-3, 3e-4, 1e-4, 7e-4]
    v = versus(cand, base, seed=1)
    d = [math.log(c) - math.log(b) for c, b in zip(cand, base)]
    assert v.gmean_ratio == pytest.approx(math.exp(sum(d) / len(d)), rel=1e-12)
    assert v.wins == sum(c < b for c, b in zip(cand, base)) == 5 and v.n == 8
    # exact two-sided Wilcoxon signed-rank p by enumerating every sign assignment (no ties here)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_obs = sum(r for r, x in zip(ranks, d) if x > 0)
    dist = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    mean = len(d) * (len(d) + 1) / 4
    p_exact = sum(abs(w - mean) >= abs(w_obs - mean) for w in dist) / len(dist)
    assert v.p_value == pytest.approx(p_exact, rel=1e-9)
    # the interval: close to a plain percentile bootstrap done by hand with numpy
    rng = np.random.default_rng(0)
    dd = np.array(d)
    boots = np.exp(dd[rng.integers(0, len(dd), size=(20000, len(dd)))].mean(axis=1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    assert v.ci_low <= v.gmean_ratio <= v.ci_high
    assert math.log(v.ci_low) == pytest.approx(math.log(lo), abs=0.25)
    assert math.log(v.ci_high) == pytest.approx(math.log(hi), abs=0.25)
    assert v.verdict == ("wins" if v.ci_high < 1 else "loses" if v.ci_low > 1 else "ties")
    # a clear, consistent 10x gain wins; identical losses tie with p = 1
    assert versus([1e-5] * 10, [1e-4] * 10).verdict == "wins"
    same = versus(base, base)
    assert same.verdict == "ties" and same.p_value == 1.0 and same.gmean_ratio == 1.0
    s = summarize([1.0, 10.0, 100.0])
    assert s.median == 10.0 and s.gmean == pytest.approx(10.0) and s.log_std == pytest.approx(math.log(10))
    assert settle([1.0, None, float("nan")], [5.0, 6.0, 7.0]) == ([1.0, 6.0, 7.0], 2)


def test_choices_read_validation_rows_only() -> None:
    before = {(1.0, s): 1.0 for s in (1, 2, 9)}
    rows = [Row("adam", 1.0, 1, 1e-3, 0.1, "validation"), Row("adam", 1.0, 2, 1e-3, 0.1, "validation"),
            Row("adam", 1.0, 1, 1e-2, 0.2, "validation"), Row("adam", 1.0, 2, 1e-2, None, "validation"),
            Row("adam", 1.0, 9, 1e-2, 1e-9, "test")]  # a great test loss at another lr changes nothing
    c = choose(rows, before)[("adam", 1.0)]
    assert c.hparam == 1e-3 and c.score == pytest.approx(0.1)


def test_warmup_cosine_baselines_are_genomes_of_the_search_space() -> None:
    g = baseline_genome("adam_clip_wc")
    assert g.lr.schedule == "warmup_cosine" and g.clip == builtin("adam_clip").clip
    assert baseline_genome("adam").to_json() == builtin("adam").to_json()
    with pytest.raises(KeyError):
        baseline_genome("sgd")


# ----------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("horizon", [2.0, 20.0])
def test_loss_does_not_depend_on_batch_companions(tmp_path: Path, horizon: float) -> None:
    """The same (genome, lr, seed) alone, in a batch of 5, and in a batch of 25 with two seeds
    stacked: the same loss to 1e-6 relative."""
    setup = SearchSetup(budget_fpe=30, seeds=(3,), sine=SineConfig(pretrain_steps=50, width=8), cache_dir=str(tmp_path))
    ev = TaskEvaluator(setup, "cpu")
    import random
    others = [random_genome(random.Random(i)) for i in range(12)]
    adam, task, task2 = builtin("adam"), ev.task(horizon, 3, 3), ev.task(horizon, 4, 4)
    alone = ev.grid([adam], [1e-3], task).losses[0][0]
    small = ev.grid(others[:2] + [adam] + others[2:4], [1e-3], task).losses[2][0]
    big = ev.grid_seeds(others[:6] + [adam] + others[6:], [3e-4, 1e-3], [task2, task])[1].losses[6][1]
    assert alone is not None and small is not None and big is not None
    assert small == pytest.approx(alone, rel=1e-6) and big == pytest.approx(alone, rel=1e-6)


def test_protocol_key_depends_on_what_baselines_depend_on() -> None:
    p = Protocol(SineConfig(width=8), Seeds.counted(2, 3, 4), horizons=(1.0,), budget_fpe=60)
    same_but_search = Protocol(SineConfig(width=8), Seeds((50, 51), (100, 101, 102), (1000, 1001, 1002, 1003)),
                               horizons=(1.0,), budget_fpe=60, cache_dir="elsewhere")
    assert p.key("validation") == same_but_search.key("validation") and p.key("test") == same_but_search.key("test")
    other_val = Protocol(SineConfig(width=8), Seeds.counted(2, 2, 4), horizons=(1.0,), budget_fpe=60)
    assert other_val.key("validation") != p.key("validation") and other_val.key("test") != p.key("test")
    assert Protocol(SineConfig(width=8), p.seeds, horizons=(1.0,), budget_fpe=90).key("test") != p.key("test")
    _ = torch  # noqa: F841 -- torch imported for the evaluator's tensors


def test_test_seeds_per_horizon() -> None:
    """A horizon named in `test_at` is tested on the first n test seeds, the others on all; the
    test key covers it (different rows) and leaves every key without it as it was (stored
    baselines stay reusable); bad counts are a ValueError."""
    full = Seeds.counted(2, 3, 6)
    seeds = Seeds(full.search, full.validation, full.test, test_at=((1.0, 2), (5.0, 4)))
    assert seeds.test_for(1.0) == (1000, 1001) and seeds.test_for(5.0) == (1000, 1001, 1002, 1003)
    assert seeds.test_for(20.0) == full.test and seeds.of_unit("validation", 1.0) == full.validation
    assert seeds.test_text() == "1000..1005 (n = 6; 2 at horizon 1; 4 at horizon 5)"
    assert Seeds(full.search, full.validation, full.test, ((1.0, 2), (2.0, 2))).test_text().endswith("2 at horizon 1, 2)")
    p = Protocol(SineConfig(width=8), full, horizons=(1.0, 5.0), budget_fpe=60)
    q = Protocol(SineConfig(width=8), seeds, horizons=(1.0, 5.0), budget_fpe=60)
    assert q.key("test") != p.key("test") and q.key("validation") == p.key("validation")
    # the key of a protocol without per-horizon seeds is the one computed before they existed
    assert p.key("test") == "test:" + hashlib.sha256(json.dumps(
        {"version": PROTOCOL_VERSION, "sine": SineConfig(width=8).key(),
         "seeds": [100, 101, 102, "|", *range(1000, 1006)], "horizons": [1.0, 5.0], "budget_fpe": 60,
         "lrs": list(p.lrs), "sigmas": list(p.sigmas), "layers": list(p.randopt_layers), "top_k": p.top_k},
        sort_keys=True).encode()).hexdigest()[:16]
    # one task's protocol keeps the counts of its own horizons only (another task's variant, or a
    # count that names every seed, would change its key and not its rows)
    assert seeds.only((5.0, 20.0)).test_at == ((5.0, 4),) and seeds.only((2.0,)) == full
    assert Seeds(full.search, full.validation, full.test, ((1.0, 6),)).only((1.0,)) == full
    one = SearchConfig(horizons=(1.0,), heldout_horizons=(1.0, 5.0), test_seeds=full.test,
                       test_seeds_at={"1.0": 2, "1000.0": 3}).protocol()
    assert one.seeds.test_at == ((1.0, 2),)
    assert one.key("test") == Protocol(one.sine, Seeds(one.seeds.search, one.seeds.validation, full.test, ((1.0, 2),)),
                                       horizons=one.horizons, budget_fpe=one.budget_fpe, lrs=one.lrs).key("test")
    for bad in [((1.0, 7),), ((1.0, 0),), ((5.0, 2), (1.0, 2)), ((1.0, 2), (1.0, 3)), ((1.0, 2.0),)]:
        with pytest.raises(ValueError, match="test seeds per horizon"):
            Seeds(full.search, full.validation, full.test, bad)  # type: ignore[arg-type]


def test_choose_breaks_float_level_ties_by_grid_order():
    """Scores equal up to rounding (another CPU's last bits) choose the first grid point; a real
    difference (1e-4 relative) still wins. Non-finite scores never win."""
    before = {(2.0, s): 1.0 for s in (100, 101)}

    def rows(losses: dict[float, float]) -> list[Row]:
        return [Row("adam", 2.0, s, lr, loss * (1 + 0.01 * i), "validation")
                for lr, loss in losses.items() for i, s in enumerate((100, 101))]

    near = choose(rows({1e-4: 1.0000001e-3, 3e-4: 1e-3}), before)[("adam", 2.0)]
    assert near.hparam == 1e-4  # 1e-7 relative worse, within the tolerance: the first lr
    real = choose(rows({1e-4: 1.0001e-3, 3e-4: 1e-3}), before)[("adam", 2.0)]
    assert real.hparam == 3e-4
    assert first_best([(math.nan, "a"), (math.inf, "b"), (2.0, "c"), (2.0 * (1 + 1e-7), "d")]) == (2.0, "c")
    assert first_best([(2.0 * (1 + 1e-7), "d"), (2.0, "c")])[1] == "d"
    assert first_best([(2.0 * (1 + 1e-5), "d"), (2.0, "c")])[1] == "c"
