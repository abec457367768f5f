"""The search fitness's reference (`SearchConfig.reference`): tuned Adam (the default, every number
as before) or, per search horizon, the strongest tuned gradient baseline ("best"), checked against
an independent tuning of each baseline, stored apart from Adam's rows and reused on resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from nos.evaluation.fitness import SearchSetup, TaskEvaluator, strongest
from nos.evaluation.protocol import GRADIENT_BASELINES, baseline_genome
from nos.evolve import _config, _parser
from nos.search import Run, SearchConfig
from nos.search.objective import Objective
from nos.tasks.sine import SineConfig
from search_space.mutation import random_genome

from .conftest import EVOLVE_TINY, assert_one_line_error, run_module

SINE = {"pretrain_steps": 50, "width": 8}
CHEAP = {"seeds": 1, "horizons": [1.0], "budget_fpe": 30, "promote": 0.5}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference_cache")


def tiny(cache: Path, **kw: Any) -> SearchConfig:
    return SearchConfig(**{"horizons": (1.0, 2.0), "budget_fpe": 60, "sine": SINE, "cache_dir": str(cache),
                           "funnel": 0, "search_seeds": (0, 1), "initial": 4, **kw})


@pytest.fixture(scope="module")
def evaluator(cache: Path) -> TaskEvaluator:
    setup = SearchSetup(horizons=(1.0, 2.0), budget_fpe=60, seeds=(0, 1), sine=SineConfig(**SINE), cache_dir=str(cache))
    return TaskEvaluator(setup, "cpu")


def test_strongest_takes_the_lowest_geometric_mean_ties_to_adam_and_skips_diverged() -> None:
    tuned = {
        "adam": {(1.0, 0): (0.4, 1e-3), (1.0, 1): (0.1, 1e-3), (2.0, 0): (0.5, 1e-3), (2.0, 1): (0.5, 1e-3)},
        # lower on seed 0, higher on seed 1 at t 1: geometric mean sqrt(0.3 * 0.2) = 0.245 > 0.2 (Adam's)
        "adam_clip": {(1.0, 0): (0.3, 3e-3), (1.0, 1): (0.2, 3e-3), (2.0, 0): (0.5, 1e-2), (2.0, 1): (0.5, 1e-2)},
        # the lowest at t 1, but diverged at every lr on seed 1 there: no candidate at t 1
        "adam_wc": {(1.0, 0): (0.01, 1e-2), (2.0, 0): (0.2, 1e-2), (2.0, 1): (0.3, 1e-2)},
        "adam_clip_wc": {},
    }
    ref, chosen = strongest(tuned, (1.0, 2.0), (0, 1))
    assert chosen == {1.0: "adam", 2.0: "adam_wc"}
    assert ref == {(1.0, 0): (0.4, 1e-3), (1.0, 1): (0.1, 1e-3), (2.0, 0): (0.2, 1e-2), (2.0, 1): (0.3, 1e-2)}
    # an exact tie at t 2 between Adam and Adam + clip: Adam, the first
    assert strongest({m: tuned[m] for m in ("adam", "adam_clip")}, (2.0,), (0, 1))[1] == {2.0: "adam"}
    with pytest.raises(ValueError, match="diverges at every lr"):
        strongest({"adam_clip_wc": {}}, (1.0,), (0, 1))


def test_best_reference_is_the_strongest_independently_tuned_baseline(evaluator: TaskEvaluator) -> None:
    ref = evaluator.best_reference()
    grid, seeds = evaluator.family.lr_grid, evaluator.setup.seeds
    for h in evaluator.setup.horizons:
        own: dict[str, dict[int, tuple[float, float]]] = {}  # each baseline tuned alone, seed by seed
        for m in GRADIENT_BASELINES:
            results = evaluator.grid_seeds([baseline_genome(m)], grid, evaluator.search_tasks(h))
            per_seed = {s: min((x, lr) for x, lr in zip(res.losses[0], grid) if x is not None)
                        for s, res in zip(seeds, results)}
            own[m] = per_seed
        gm = {m: math.exp(sum(math.log(own[m][s][0]) for s in seeds) / len(seeds)) for m in own}
        lowest = min(gm.values())
        expected = next(m for m in GRADIENT_BASELINES if gm[m] <= lowest * (1 + 1e-6))
        for s in seeds:
            loss, lr = ref[(h, s)]
            assert loss == pytest.approx(own[expected][s][0], rel=1e-6) and lr == own[expected][s][1]
        assert math.exp(sum(math.log(ref[(h, s)][0]) for s in seeds) / len(seeds)) <= gm["adam"] * (1 + 1e-6)
    _, chosen = strongest(evaluator.tuned_baselines(), evaluator.setup.horizons, seeds)
    assert set(chosen) == set(evaluator.setup.horizons) and set(chosen.values()) <= set(GRADIENT_BASELINES)


def test_adam_is_the_default_and_its_fitness_the_old_paths(tmp_path: Path, cache: Path,
                                                          evaluator: TaskEvaluator) -> None:
    cfg = tiny(cache)
    assert cfg.reference == "adam" and Objective(cfg).reference == "adam"
    with Store(str(tmp_path / "a.sqlite")) as store:
        run = Run.create(store, "a", cfg, "cpu")
        run._tune_references()
        stage = run.objective.stages[-1]
        ref = run._reference(stage)
        old = evaluator.adam_reference()  # the old path: tuned Adam on the same instances
        assert ref == old
        genomes = [random_genome(random.Random(f"ref:{i}")) for i in range(3)]
        assert [f.fitness for f in evaluator.fitness(genomes, ref)] == [f.fitness for f in evaluator.fitness(genomes, old)]
        rows = store.baselines(run.id)
        assert {(b["task"], b["method"]) for b in rows} == {("sine_search", "adam")} and len(rows) == 4


def test_best_is_stored_apart_per_stage_and_reused_on_resume(tmp_path: Path, cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(cache, reference="best", fidelity=CHEAP)
    db = str(tmp_path / "b.sqlite")
    with Store(db) as store:
        run = Run.create(store, "b", cfg, "cpu")
        run._tune_references()
        cheap, full = run.objective.members()
        refs = {e.setup.task: run._reference(stage) for e, stage in zip((cheap, full), run.objective.stages)}
        assert refs == {"sine_cheap": cheap.best_reference(), "sine": full.best_reference()}  # each stage its own
        rows = store.baselines(run.id)
        assert {b["task"] for b in rows} == {"sine_search_best_cheap", "sine_search_best"}  # never Adam's tasks
        assert sorted(b["method"] for b in rows if b["task"] == "sine_search_best") == sorted(GRADIENT_BASELINES * 4)
        assert sorted(b["method"] for b in rows if b["task"] == "sine_search_best_cheap") == sorted(GRADIENT_BASELINES)

    def no_tuning(self: TaskEvaluator, methods: object = None) -> None:
        raise AssertionError("a resumed run must read its reference back, not tune it again")

    monkeypatch.setattr(TaskEvaluator, "tuned_baselines", no_tuning)
    with Store(db, create=False) as store:
        again = Run.resume(store, "b", "cpu")
        assert again.config.reference == "best"
        again._tune_references()
        assert {e.setup.task: again._reference(stage)
                for e, stage in zip(again.objective.members(), again.objective.stages)} == refs
        assert len(store.baselines(again.id)) == len(rows)  # nothing stored twice


def test_a_stored_config_without_reference_reads_back_as_adam() -> None:
    stored = SearchConfig().to_json()
    del stored["reference"]
    assert SearchConfig.checked(stored).reference == "adam"
    assert SearchConfig.checked({**stored, "reference": "best"}).reference == "best"
    for bad in ("bogus", 1, ["best"]):
        with pytest.raises(ValueError, match="reference"):
            SearchConfig.checked({**stored, "reference": bad})
    with pytest.raises(ValueError, match="reference: one of adam, best"):
        SearchConfig(reference="strongest")


def test_the_evolve_flag_goes_into_the_stored_config(tmp_path: Path) -> None:
    assert _config(_parser().parse_args([])).reference == "adam"
    db = tmp_path / "nos.sqlite"
    proc = run_module("nos.evolve", "--db", str(db), "--cache-dir", str(tmp_path / "cache"), "--name", "best",
                      *EVOLVE_TINY, "--reference", "best", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["run"] == "best"
    with Store(str(db), create=False) as store:
        run = store.get_run("best")
        assert run is not None and run["status"] == "finished" and run["config"]["reference"] == "best"
        rows = store.baselines(run["id"])
        assert {b["task"] for b in rows} == {"sine_search_best"}
        assert {b["method"] for b in rows} == set(GRADIENT_BASELINES)


def test_a_bad_reference_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "nos.sqlite"
    proc = run_module("nos.evolve", "--db", str(db), "--reference", "strongest")
    line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "--reference" in line and "strongest" in line
    assert not db.exists()
