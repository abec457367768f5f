"""The strategies' explicit state: pure ask / tell, a JSON round trip, the replay the report uses
(the positions the GA held during a live multi-fidelity run), and a random search without particles."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from nos import report
from nos.ga.particle import GAConfig, GAState, ParticleGA, RandomSearch, Schedule, ScheduleState
from nos.ga.strategy import Strategy
from nos.search import Batch, Candidate, Generation, Run, SearchConfig

CFG = SearchConfig(initial=7, particles=3, timesteps=3, mutations=3, max_tries=3, seed_builtins=True, seed=4)


def outcome(slot: str) -> tuple[str, float | None, int]:
    """(status, fitness, fidelity), deterministic by slot: some fail, some only get a cheap fitness."""
    r = random.Random(f"outcome:{slot}")
    if r.random() < 0.3:
        return "rejected_integrity", None, 1
    return "evaluated", r.choice([0.5, 1.0, 2.0, 3.0]), r.choice([0, 1, 1])


def judge(batch: Batch, next_id: int) -> list[Candidate]:
    out = []
    for k, p in enumerate(batch.proposals):
        status, fitness, fidelity = ("invalid", None, 1) if p.genome is None else outcome(p.slot)
        out.append(Candidate(next_id + k, p.slot, status, {} if p.genome is None else p.genome.to_json(),
                             f"h{next_id + k}", fitness, fidelity, 1e-3, p.timestep, p.parent_id, None, p.attempt))
    return out


def shape(batch: Batch | None) -> Any:
    """What a batch proposes, comparably."""
    if batch is None:
        return None
    return (batch.label, batch.initial, [(p.slot, None if p.genome is None else p.genome.to_json(), p.kind,
                                          p.invalid, p.columns()) for p in batch.proposals])


def drive(strategy: Schedule[Any]) -> tuple[list[Any], list[Candidate]]:
    """Every state of a search judged by `outcome`, and every judged candidate."""
    state = strategy.init()
    states: list[Any] = [state]
    judged: list[Candidate] = []
    while (batch := strategy.ask(state)) is not None:
        told = judge(batch, len(judged) + 1)
        judged += told
        state, _ = strategy.tell(state, told)
        states.append(state)
    return states, judged


@pytest.mark.parametrize("strategy", [ParticleGA, RandomSearch])
def test_state_round_trips_through_json_and_a_fresh_strategy_goes_on_from_it(strategy: type[Schedule[Any]]) -> None:
    states, _ = drive(strategy.of(CFG))
    assert states[-1].phase == "done" and len(states) > CFG.timesteps + 2
    for state in states:
        back = type(state).from_json(json.loads(json.dumps(state.to_json())))
        assert back == state and type(back) is type(state)
        # a new strategy object (no cache) proposes the same from the restored state
        assert shape(strategy.of(CFG).ask(back)) == shape(strategy.of(CFG).ask(state))
    if strategy is ParticleGA:  # the states cover the middle of a timestep: retries pending, children held
        assert any(s.pending and any(s.children) and s.attempt > 0 for s in states)
        assert all(isinstance(s, GAState) and len(s.positions) == s.lanes for s in states[1:])
    else:
        assert all(type(s) is ScheduleState for s in states)


def test_ask_and_tell_are_pure() -> None:
    ga = ParticleGA(GAConfig.of(CFG))
    states, judged = drive(ga)
    by_slot = {c.slot: c for c in judged}
    for state in states[:-1]:
        batch = ga.ask(state)
        assert batch is not None and shape(ga.ask(state)) == shape(batch)
        told = [by_slot[p.slot] for p in batch.proposals]
        assert ga.tell(state, told) == ga.tell(state, told)
    assert ga.best(states[-1]) == list(states[-1].hall) and len(states[-1].hall) == CFG.funnel


def test_the_schedule_counts_slots_as_the_run_shows_them() -> None:
    cfg = SearchConfig(initial=2, particles=4, timesteps=2, mutations=3, max_tries=2)
    ga = ParticleGA.of(cfg)
    assert ga.total() == 2 + 2 * 4 * 3 == RandomSearch.of(cfg).total()
    state = ga.init()
    assert ga.unreachable(state) == 0
    batch = ga.ask(state)
    assert batch is not None and batch.initial
    one = judge(batch, 1)
    one = [Candidate(c.id, c.slot, s, c.genome, c.genome_hash, f, 1, c.lr, 0, None, None)
           for c, (s, f) in zip(one, [("evaluated", 1.0), ("error", None)])]
    state, generations = ga.tell(state, one)
    assert [g.timestep for g in generations] == [0] and generations[0].passed == 1
    assert state.lanes == 1 and ga.unreachable(state) == 3 * 3 * 2  # three particles never filled
    assert ga.settled(one) == 2  # every initial candidate settles its slot
    child = judge(ga.ask(state), 10)[0]  # type: ignore[arg-type]
    failed = [Candidate(child.id, child.slot, "duplicate", child.genome, None, None, 1, None, 1, child.parent_id,
                        None, attempt) for attempt in (0, 1)]
    assert [ga.settled([c]) for c in failed] == [0, 1]  # a failed try settles its slot only when it is the last


def test_replay_stops_at_the_first_slot_not_stored() -> None:
    ga = ParticleGA.of(CFG)
    states, judged = drive(ga)
    by_slot = {c.slot: c for c in judged}
    full = ga.positions(by_slot)
    assert len(full) == CFG.particles and all(len(pts) == CFG.timesteps + 1 for pts in full.values())
    # the states after each generation: after the initial population, then after each timestep
    assert [s.positions for s in ga.replay(by_slot)] == [s.positions for s in states[1:] if s.attempt == 0]
    # drop one slot of timestep 2: the replay ends after timestep 1
    gone = next(c.slot for c in judged if c.timestep == 2)
    partial = ga.positions({s: c for s, c in by_slot.items() if s != gone})
    assert {p: pts[:2] for p, pts in full.items()} == partial
    assert ga.positions({}) == {}


class Recorder(Strategy[GAState]):
    """The GA, recording the positions its state holds after each generation of a live run."""

    def __init__(self, ga: ParticleGA) -> None:
        self.ga = ga
        self.positions: list[tuple[Candidate, ...]] = []

    def init(self) -> GAState:
        return self.ga.init()

    def ask(self, state: GAState) -> Batch | None:
        return self.ga.ask(state)

    def tell(self, state: GAState, judged: Sequence[Candidate]) -> tuple[GAState, list[Generation]]:
        state, generations = self.ga.tell(state, judged)
        self.positions += [state.positions] * len(generations)
        return state, generations

    def best(self, state: GAState) -> list[Candidate]:
        return self.ga.best(state)

    def total(self) -> int:
        return self.ga.total()

    def settled(self, judged: Sequence[Candidate]) -> int:
        return self.ga.settled(judged)

    def unreachable(self, state: GAState) -> int:
        return self.ga.unreachable(state)


def tiny(tmp_path: Path, **kw: Any) -> SearchConfig:
    return SearchConfig(**{"horizons": (1.0,), "budget_fpe": 60, "sine": {"pretrain_steps": 100, "width": 8},
                           "cache_dir": str(tmp_path.parent / "cache"), "funnel": 0, "search_seeds": (0,), **kw})


@pytest.mark.parametrize("elitism", [False, True])
def test_report_positions_are_those_the_ga_held_in_a_multi_fidelity_run(tmp_path: Path, elitism: bool) -> None:
    cheap = {"seeds": 1, "horizons": [1.0], "budget_fpe": 30, "promote": 0.5}
    cfg = tiny(tmp_path, initial=8, particles=2, timesteps=2, mutations=3, max_tries=2, seed=5, elitism=elitism,
               fidelity=cheap)
    recorder = Recorder(ParticleGA.of(cfg))
    with Store(str(tmp_path / "x.sqlite")) as store:
        with Run.create(store, "mf", cfg, "cpu", strategy=recorder) as run:
            run.optimize()
            run.funnel()
        data = report.load(store, "mf")
    assert {r["fidelity"] for r in data.individuals if r["status"] == "evaluated"} == {0, 1}  # both stages stored
    assert len(recorder.positions) == cfg.timesteps + 1
    live = {p: [pos[p].id for pos in recorder.positions] for p in range(len(recorder.positions[0]))}
    assert len(live) == cfg.particles
    assert {p: [r["id"] for r in pts] for p, pts in report.particle_paths(data).items()} == live


def test_random_search_stores_no_particle_mutation_or_parent(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, algorithm="random", initial=4, particles=2, timesteps=1, mutations=2, max_tries=2)
    rnd = RandomSearch.of(cfg)
    states, _ = drive(rnd)
    for state in states[:-1]:
        batch = rnd.ask(state)
        assert batch is not None
        assert all(p.parent_id is None and not p.lineage and p.kind is None for p in batch.proposals)
        assert all(set(p.columns()) == {"timestep", "attempt"} for p in batch.proposals)
    with Store(str(tmp_path / "r.sqlite")) as store:
        with Run.create(store, "rnd", cfg, "cpu", strategy=rnd) as run:
            run.optimize()
            run.funnel()
        rows = store.individuals(run.id)
        data = report.load(store, "rnd")
    assert {r["timestep"] for r in rows} == {0, 1}
    assert all(r["particle"] is None and r["mutation"] is None and r["parent_id"] is None for r in rows)
    assert report.particle_paths(data) == {}  # no particles to draw
