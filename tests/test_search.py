"""Search strategies through ask / tell (no database), the staged fitness, and the diagnostics."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from nos.evaluation.fitness import Fitness
from nos.ga.particle import ParticleGA, RandomSearch
from nos.search import Candidate, SearchConfig
from nos.search.judge import Stage, staged_fitness
from nos.search.metrics import best_so_far, integrity_pass_rate, rank_correlation
from search_space.genome import Genome
from search_space.mutation import random_genome


def drive(strategy, outcome) -> list[Candidate]:
    """Run a strategy to the end, judging every proposal with `outcome(slot, genome)` ->
    (status, fitness) (an invalid proposal is invalid). Returns every judged candidate, in order."""
    judged: list[Candidate] = []
    next_id = 1
    state = strategy.init()
    while (batch := strategy.ask(state)) is not None:
        told = []
        for p in batch.proposals:
            status, fitness = ("invalid", None) if p.genome is None else outcome(p.slot, p.genome)
            told.append(Candidate(next_id, p.slot, status, {} if p.genome is None else p.genome.to_json(),
                                  str(next_id), fitness, 1, None if fitness is None else 1e-3, p.timestep,
                                  p.parent_id, p.kind, p.attempt))
            next_id += 1
        state, _ = strategy.tell(state, told)
        judged += told
    return judged


def flaky(slot: str, genome: Genome) -> tuple[str, float | None]:
    """A third of all candidates fail (deterministically by slot); the rest get a fitness."""
    h = random.Random(slot).random()
    return ("rejected_integrity", None) if h < 0.33 else ("evaluated", h)


@pytest.mark.parametrize("seed_builtins", [False, True])
def test_random_search_judges_as_many_candidates_as_the_ga_and_never_mutates(seed_builtins: bool) -> None:
    cfg = SearchConfig(initial=9, particles=3, timesteps=3, mutations=4, max_tries=3, seed_builtins=seed_builtins)
    ga = drive(ParticleGA.of(cfg), flaky)
    rnd = drive(RandomSearch.of(SearchConfig(**{**cfg.__dict__, "algorithm": "random"})), flaky)
    per_t = lambda rows, t: [r for r in rows if r.timestep == t]  # noqa: E731
    for t in range(cfg.timesteps + 1):
        # the same slots per timestep (a child slot is retried up to max_tries until evaluated)
        assert len({r.slot.rsplit(":a", 1)[0] for r in per_t(ga, t)}) == len({r.slot.rsplit(":a", 1)[0] for r in per_t(rnd, t)})
    assert len({r.slot.rsplit(":a", 1)[0] for r in per_t(ga, 1)}) == cfg.particles * cfg.mutations
    assert all(r.parent_id is not None and r.expression is not None for r in ga if r.timestep > 0)
    assert all(r.parent_id is None and r.expression is None for r in rnd)  # no parent, no mutation kind
    # equal outcomes => exactly the same number of judged candidates
    always = lambda slot, genome: ("evaluated", random.Random(slot).random())  # noqa: E731
    assert len(drive(ParticleGA.of(cfg), always)) == len(drive(RandomSearch.of(cfg), always))


def test_ga_moves_particles_to_their_best_child_and_elitism_keeps_better_parents() -> None:
    """Children worse than their parents: NOS moves the particles anyway; elitism keeps them."""
    cfg = SearchConfig(initial=6, particles=2, timesteps=2, mutations=3, max_tries=1)
    worse = lambda slot, genome: ("evaluated", 5.0 if slot.startswith("t") else 1.0)  # noqa: E731
    for elitism, parent_timestep in ((False, 1), (True, 0)):
        rows = drive(ParticleGA.of(SearchConfig(**{**cfg.__dict__, "elitism": elitism})), worse)
        by_id = {r.id: r for r in rows}
        assert {by_id[r.parent_id].timestep for r in rows if r.timestep == 2} == {parent_timestep}  # type: ignore[index]


def _fit(value: float | None, tag: str) -> Fitness:
    return Fitness(value, 1e-3, [{"task": tag}])


def test_staged_fitness_promotes_the_best_fraction_of_each_batch() -> None:
    genomes = [random_genome(random.Random(i)) for i in range(7)]
    cheap_values = [5.0, None, 1.0, 3.0, 2.0, 4.0, 0.5]  # None: no finite loss at the cheap stage

    def cheap(gs: Sequence[Genome], adam) -> list[Fitness]:
        return [_fit(cheap_values[genomes.index(g)], "cheap") for g in gs]

    full_seen: list[int] = []

    def full(gs: Sequence[Genome], adam) -> list[Fitness]:
        full_seen.extend(genomes.index(g) for g in gs)
        return [_fit(10.0 + genomes.index(g), "full") for g in gs]

    stages = [Stage(cheap, {}, promote=0.4), Stage(full, {})]
    out = staged_fitness(stages, genomes)
    # 6 finite at the cheap stage; ceil(0.4 * 6) = 3 promoted: the 3 best by cheap fitness
    assert sorted(full_seen) == [2, 4, 6]
    assert [fid for _, fid in out] == [0, 0, 1, 0, 1, 0, 1]
    assert out[2][0].fitness == 12.0 and [e["task"] for e in out[2][0].evaluations] == ["cheap", "full"]
    assert out[0][0].fitness == 5.0 and out[1][0].fitness is None
    # one stage: everything is full fidelity
    assert [fid for _, fid in staged_fitness([Stage(full, {})], genomes[:2])] == [1, 1]


def test_diagnostics_match_independent_computations() -> None:
    fitness = {1: 0.5, 2: 2.0, 3: 1.0, 4: 4.0, 5: 3.0}
    validation = {1: 0.9, 2: 1.5, 3: 1.1, 4: 0.8, 5: 2.0, 6: 9.9}  # 6 was not in the search's ranking
    rc = rank_correlation(fitness, validation)
    ids = [1, 2, 3, 4, 5]
    rx = np.argsort(np.argsort([fitness[i] for i in ids]))
    ry = np.argsort(np.argsort([validation[i] for i in ids]))
    assert rc["n"] == 5 and rc["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert rank_correlation({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})["spearman"] is None  # too few
    rows = [{"id": 3, "status": "evaluated", "fitness": 2.0, "fidelity": 1},
            {"id": 1, "status": "rejected_integrity", "fitness": None},
            {"id": 2, "status": "evaluated", "fitness": 0.1, "fidelity": 0},  # cheap only: not comparable
            {"id": 4, "status": "evaluated", "fitness": 1.5, "fidelity": 1}]
    assert best_so_far(rows) == [None, None, 2.0, 1.5]
    assert integrity_pass_rate({"evaluated": 3, "error": 1, "rejected_integrity": 4, "duplicate": 2}) == 0.5
    assert integrity_pass_rate({"duplicate": 2}) is None


def test_random_search_run_is_stored_as_random(tmp_path: Path) -> None:
    """A real (tiny) random-search run: the config says so, and no row has a parent."""
    import subprocess
    import sys

    from db.store import Store

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "nos.evolve", "--db", str(tmp_path / "r.sqlite"), "--cache-dir",
                          str(tmp_path / "cache"), "--algorithm", "random", "--initial", "6", "--particles", "2",
                          "--timesteps", "1", "--mutations", "2", "--funnel", "0", "--horizons", "1", "--budget", "60",
                          "--search-seeds", "1", "--sine-pretrain-steps", "50", "--sine-width", "8", "--device", "cpu",
                          "--name", "rnd"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with Store(tmp_path / "r.sqlite", create=False) as store:
        run = store.get_run("rnd")
        rows = store.individuals(run["id"])
    assert run["config"]["algorithm"] == "random" and run["status"] == "finished"
    assert all(r["parent_id"] is None and r["mutation_kind"] is None for r in rows)
    assert {r["timestep"] for r in rows} == {0, 1}


def test_calibration_counts_dropped_top_candidates() -> None:
    from nos.calibrate import top10_dropped

    full = [float(i) for i in range(40)]
    # a perfect cheap stage keeping 4 of each 10 drops none of the 4 best
    assert top10_dropped(full, full, 0.4, chunk=10) == 0.0
    # ... but keeping 1 of each 10 drops those that share a chunk with a better one
    assert 0 < top10_dropped(full, full, 0.1, chunk=10) < 1
    # a cheap stage that ranks backwards keeps only the worst of each chunk: every top-4 is dropped
    assert top10_dropped(full, [-x for x in full], 0.1, chunk=10) == 1.0
    assert top10_dropped(full, [None] * 40, 0.5, chunk=12) == 0.0  # nothing comparable, nothing dropped
