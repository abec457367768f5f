"""The racing funnel: successive halving on validation seeds, distinct finalists, a champion
chosen on seeds no earlier choice read.

The plain funnel (`nos.search.funnel`) trains every funnel candidate on every validation seed, so
it can afford five candidates, and five near-copies of one lineage measure nothing. A race
(`SearchConfig.race`, e.g. "32x2,8x4,3x10") instead:

1. gives stage k its own block of validation seeds (consecutive, disjoint slices of the run's
   validation seeds) and trains that stage's candidates on it at every lr of the grid, on every
   search task -- the same lr grid, seeds and horizons the tuned baselines get;
2. ranks a stage's candidates by their score on every block they have run so far (more seeds,
   less noise) -- the score is the plain funnel's: loss over tuned Adam's on the same seeds, each
   at its own best lr, geometric mean over horizons (and search tasks);
3. advances the best N of the next stage, at most one per *behaviour cluster*: two candidates
   whose per-(task, horizon, seed) log losses differ by less than `CLUSTER_TOL` on average behave
   alike (FunSearch clusters programs by their score signature; the canonical hash only catches
   identical formulas, not the near-copies a GA breeds), so the next stage compares ideas;
4. chooses the champion on the last stage's block alone, which no earlier choice read: the
   finalists within one standard error (of the paired per-seed difference) of the best are
   equally good by what this stage can tell, and among them the one with the fewest effective
   nodes wins (then the earlier stages' order) -- a change of champion away from the simpler
   or earlier-preferred candidate needs a gain beyond the stage's noise.

The finalists are then trained on the test seeds (each at its lr chosen on all of its validation
seeds, as every baseline's lr is chosen on all of them), and on the run's test tasks exactly as the
plain funnel does it. Rows are the funnel's `evaluations` rows; stage k's rows are those on its
block of seeds. Each (stage, horizon) of a task is stored in one transaction, so a killed race
resumes at the first missing unit; which candidates a stage holds follows from the stored rows of
the stages before it (`record`), so a resume recomputes it and checks the stored units against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from db.errors import StoreError
from db.storage import Storage
from search_space.genome import Genome, from_json

from ..engine.simplify import effective_nodes
from ..evaluation.compare import Comparison, validation_scores
from ..evaluation.fitness import TaskEvaluator
from ..evaluation.protocol import Progress, Protocol, Row, choose, gradient_rows
from ..evaluation.stats import TINY, gmean, settle
from ..ui.progress import reporter
from .config import SearchConfig
from .funnel import (
    before_of,
    candidate_evaluations,
    candidate_id,
    candidate_name,
    evaluate_candidates,
    stored_baselines,
    stored_candidate_rows,
    tuned_baselines,
)
from .records import Candidate

# two candidates whose log losses differ by less than this on average (over every task, horizon
# and seed of the blocks they share) are one behaviour cluster: a relative 10% -- far below the
# spread between different ideas (orders of magnitude at long horizons), above float32 chaos
CLUSTER_TOL = 0.1


def complexity(genome: Genome) -> int:
    """Effective nodes of a genome (`nos.engine.simplify.effective_nodes`: what its update uses,
    after dropping what it does not depend on): what the simplicity preference counts."""
    return effective_nodes(genome)


@dataclass
class Stage:
    """One stage of a race as the stored rows show it."""

    index: int
    seeds: tuple[int, ...]  # this stage's own block of validation seeds
    entrants: tuple[str, ...]  # candidates trained at this stage ("#id"), in id order
    scores: dict[str, float] = field(default_factory=dict)  # on every block up to this one
    block_scores: dict[str, float] = field(default_factory=dict)  # on this stage's block alone
    cluster: dict[str, str] = field(default_factory=dict)  # candidate -> its cluster's representative
    advanced: tuple[str, ...] = ()  # to the next stage, best first (the last stage: none)
    complete: bool = False  # every unit of this stage is stored


@dataclass
class Race:
    stages: list[Stage]
    finalists: tuple[str, ...] = ()  # the last stage's entrants
    final_scores: dict[str, float] = field(default_factory=dict)  # on the last block alone
    noise: dict[str, float] = field(default_factory=dict)  # finalist -> SE of its difference to the best
    within_noise: tuple[str, ...] = ()  # finalists indistinguishable from the best on the last block
    complexity: dict[str, int] = field(default_factory=dict)  # the finalists' effective nodes
    champion: str | None = None
    trainings: int = 0  # candidate trainings of the race's validation stages (its cost)

    @property
    def complete(self) -> bool:
        return bool(self.stages) and all(s.complete for s in self.stages)

    def json(self) -> dict:
        return {"stages": [{"stage": s.index + 1, "seeds": list(s.seeds), "candidates": list(s.entrants),
                            "scores": s.scores, "block_scores": s.block_scores, "clusters": len(set(s.cluster.values())), "advanced": list(s.advanced)}
                           for s in self.stages],
                "finalists": list(self.finalists), "final_scores": self.final_scores, "noise": self.noise,
                "within_noise": list(self.within_noise), "complexity": self.complexity, "champion": self.champion,
                "trainings": self.trainings}


# ------------------------------------------------------------------------------- the record


def _by_id(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(names, key=lambda n: candidate_id(n) or 0))


def _stage_scores(cand: Mapping[str, Sequence[Row]], base: Mapping[str, Sequence[Row]], names: Sequence[str],
                  seeds: set[int], protocols: Mapping[str, Protocol]) -> dict[str, float]:
    """Each candidate's score on `seeds`: per search task the plain funnel's validation score (its
    best-lr geometric mean over tuned Adam's best on the same seeds, over horizons), then the
    geometric mean over tasks. A candidate lacking a task's rows has no score."""
    per_task = []
    for task, p in protocols.items():
        rows = [r for r in cand[task] if r.split == "validation" and r.seed in seeds and r.method in names]
        rows += [r for r in base[task] if r.method == "adam" and r.split == "validation" and r.seed in seeds]
        per_task.append(validation_scores(choose(rows, before_of(base[task])), names, p.horizons))
    return {n: gmean([s[n] for s in per_task]) for n in names if all(n in s for s in per_task)}


def _profile(cand: Mapping[str, Sequence[Row]], base: Mapping[str, Sequence[Row]], name: str, seeds: Sequence[int],
             protocols: Mapping[str, Protocol]) -> np.ndarray:
    """A candidate's behaviour on `seeds`: log loss per (task, horizon) x seed at its best lr on
    those seeds (diverged: the pretrained network's loss), shape (task-horizons, seeds)."""
    out = []
    want = set(seeds)
    for task, p in protocols.items():
        before = before_of(base[task])
        rows = [r for r in cand[task] if r.method == name and r.split == "validation" and r.seed in want]
        chosen = choose(rows, before)
        for h in p.horizons:
            lr = chosen[(name, h)].hparam
            loss = {r.seed: r.loss for r in rows if r.horizon == h and r.hparam == lr}
            settled, _ = settle([loss.get(s) for s in seeds], [before[(h, s)] for s in seeds])
            out.append([math.log(max(x, TINY)) for x in settled])
    return np.asarray(out, dtype=float)


def clusters(order: Sequence[str], profiles: Mapping[str, np.ndarray], tol: float = CLUSTER_TOL) -> dict[str, str]:
    """candidate -> its cluster's representative: walking `order` (best first), a candidate joins
    the first representative whose mean |difference of log losses| is below `tol`, else it
    represents a cluster of its own."""
    reps: list[str] = []
    out = {}
    for n in order:
        rep = next((r for r in reps if float(np.mean(np.abs(profiles[n] - profiles[r]))) < tol), None)
        if rep is None:
            reps.append(n)
        out[n] = rep or n
    return out


def _champion(race: Race, cand: Mapping[str, Sequence[Row]], base: Mapping[str, Sequence[Row]],
              protocols: Mapping[str, Protocol], prior: Sequence[str]) -> None:
    """The last stage's choice (module docstring, step 4), filled into `race`."""
    last = race.stages[-1]
    scored = [n for n in prior if n in race.final_scores]
    if not scored:
        return
    best = min(scored, key=lambda n: (race.final_scores[n], prior.index(n)))
    ref = _profile(cand, base, best, last.seeds, protocols)
    within = []
    for n in scored:
        # paired per-seed difference in mean log loss (the score's log is its mean over seeds)
        d = (_profile(cand, base, n, last.seeds, protocols) - ref).mean(axis=0)
        se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
        race.noise[n] = se
        if float(np.mean(d)) <= se:
            within.append(n)
    race.within_noise = tuple(within)
    race.champion = min(within, key=lambda n: (race.complexity.get(n, 0), prior.index(n)))


def record(cand: Mapping[str, Sequence[Row]], base: Mapping[str, Sequence[Row]], plan: Sequence[tuple[int, tuple[int, ...]]],
           entrants: Sequence[str], protocols: Mapping[str, Protocol], genomes: Mapping[str, Genome],
           run_id: int | None = None) -> Race:
    """The race as far as `cand` (candidate rows per search task) takes it: each stage's entrants,
    scores, clusters and advancers, and once the last stage is stored, the champion. A stored
    unit whose candidates are not the ones the earlier stages advance is a StoreError."""
    race = Race([])
    names = _by_id(entrants)
    order: list[str] = list(names)
    seen: set[int] = set()
    for k, (_, seeds) in enumerate(plan):
        stage = Stage(k, seeds, names)
        race.stages.append(stage)
        block = set(seeds)
        for task in protocols:
            stored = {r.method for r in cand[task] if r.split == "validation" and r.seed in block}
            if stored and stored != set(names):
                raise StoreError(f"run {run_id}: the stored race rows of {task} at stage {k + 1} are of other candidates "
                                 "than its earlier stages advance; the database is damaged")
        stage.complete = _stored_whole(cand, names, seeds, protocols)
        if not stage.complete:
            break
        race.trainings += len(names) * len(seeds) * sum(len(p.horizons) * len(p.lrs) for p in protocols.values())
        seen |= block
        stage.scores = _stage_scores(cand, base, names, seen, protocols)
        stage.block_scores = _stage_scores(cand, base, names, block, protocols)
        order = sorted(stage.scores, key=lambda n: (stage.scores[n], candidate_id(n) or 0))
        if k + 1 == len(plan):
            race.finalists = names
            race.complexity = {n: complexity(genomes[n]) for n in names}  # the finalists' (each costs ~0.1 s)
            race.final_scores = stage.block_scores
            _champion(race, cand, base, protocols, prior=_prior(race))
            break
        sofar = sorted(seen)
        stage.cluster = clusters(order, {n: _profile(cand, base, n, sofar, protocols) for n in order})
        nxt = plan[k + 1][0]
        stage.advanced = tuple([n for n in order if stage.cluster[n] == n][:nxt])
        names = _by_id(stage.advanced)
    return race


def _prior(race: Race) -> list[str]:
    """The finalists in the order the stages before the last ranked them (the first stage's
    order for a one-stage race: its own ranking)."""
    if len(race.stages) == 1:
        s = race.stages[0]
        return sorted(s.entrants, key=lambda n: (s.scores.get(n, math.inf), candidate_id(n) or 0))
    return [n for n in race.stages[-2].advanced if n in race.finalists]


def _stored_whole(cand: Mapping[str, Sequence[Row]], names: Sequence[str], seeds: Sequence[int],
                  protocols: Mapping[str, Protocol]) -> bool:
    """Is every (task, horizon) unit of a stage stored: each candidate on each seed at each lr?"""
    for task, p in protocols.items():
        for h in p.horizons:
            if not _unit_whole(cand[task], names, seeds, h, p.lrs):
                return False
    return True


def _unit_rows(rows: Sequence[Row], seeds: Sequence[int], h: float) -> list[Row]:
    block = set(seeds)
    return [r for r in rows if r.split == "validation" and r.horizon == h and r.seed in block]


def _unit_whole(rows: Sequence[Row], names: Sequence[str], seeds: Sequence[int], h: float, lrs: Sequence[float]) -> bool:
    got = _unit_rows(rows, seeds, h)
    want = {(n, s, lr) for n in names for s in seeds for lr in lrs}
    have = [(r.method, r.seed, r.hparam) for r in got]
    if not have:
        return False
    if len(have) != len(want) or set(have) != want:
        raise StoreError(f"the stored race rows at t_max = {h:g} on seeds {seeds[0]}.. are not whole "
                         "(each unit is written at once); the database is damaged")
    return True


# ------------------------------------------------------------------------------- running


def _search_rows(store: Storage, run_id: int, cfg: SearchConfig) -> dict[str, list[Row]]:
    return {cfg.protocol(spec).task: stored_candidate_rows(store, run_id, cfg.protocol(spec).task) for spec in cfg.tasks}


def _protocols(cfg: SearchConfig) -> dict[str, Protocol]:
    return {cfg.protocol(spec).task: cfg.protocol(spec) for spec in cfg.tasks}


def _genomes(store: Storage, run_id: int, names: Sequence[str]) -> dict[str, Genome]:
    out = {}
    for n in names:
        ind_id = candidate_id(n)
        row = store.get_individual(ind_id) if ind_id is not None else None
        if row is None or row.get("run_id") != run_id or not isinstance(row.get("genome"), dict):
            raise StoreError(f"run {run_id}: race candidate {n} is not an individual of the run; the database is damaged")
        out[n] = from_json(dict(row["genome"]))
    return out


def run_race(store: Storage, run_id: int, cfg: SearchConfig, evaluator_of: Callable[[str], TaskEvaluator],
             best: Sequence[Candidate], progress: Progress | None = None) -> Race:
    """The race of the module docstring for a run's funnel candidates `best`, every unit already
    stored reused; then the finalists on the test seeds of the search tasks and on the test tasks
    (`nos.search.funnel.evaluate_candidates`). Returns the race as stored."""
    say = reporter(progress)
    genomes = {candidate_name(c.id): from_json(dict(c.genome)) for c in best}
    plan = cfg.race_plan()
    protocols = _protocols(cfg)
    evaluators = {spec: evaluator_of(spec) for spec in cfg.all_tasks}
    # the validation rows of the baselines first: the race reads tuned Adam's; the test rows (long
    # at many test seeds) are computed once the race is stored, so a stopped race keeps its stages
    base = {cfg.protocol(spec).task: tuned_baselines(store, cfg.protocol(spec), evaluators[spec], progress,
                                                      published=cfg.published, splits=("validation",))
            for spec in cfg.tasks}
    for k in range(len(plan)):
        cand = _search_rows(store, run_id, cfg)
        race = record(cand, base, plan, list(genomes), protocols, genomes, run_id)
        stage = race.stages[k]
        if stage.complete:
            continue
        say.stage(f"race {k + 1}/{len(plan)} (validation)", sum(len(p.horizons) for p in protocols.values()), "horizons")
        for spec in cfg.tasks:
            p = cfg.protocol(spec)
            for h in p.horizons:
                if _unit_whole(cand[p.task], stage.entrants, stage.seeds, h, p.lrs):
                    say.advance(1)
                    continue
                say.message(f"{len(stage.entrants)} candidate(s) on {len(stage.seeds)} seed(s) at every lr, "
                            f"{p.task} t_max = {h:g}")
                new = gradient_rows(evaluators[spec], {n: genomes[n] for n in stage.entrants}, h, stage.seeds,
                                    {n: p.lrs for n in stage.entrants}, "validation")
                store.add_evaluations(candidate_evaluations(new, genomes, p.budget_fpe, p.task, p.task_key))
                say.advance(1)
    race = record(_search_rows(store, run_id, cfg), base, plan, list(genomes), protocols, genomes, run_id)
    finalists = {n: genomes[n] for n in race.finalists}
    base = {cfg.protocol(spec).task: tuned_baselines(store, cfg.protocol(spec), evaluators[spec], progress,
                                                      published=cfg.published) for spec in cfg.all_tasks}
    for spec in cfg.tasks:
        _test_units(store, run_id, evaluators[spec], cfg.protocol(spec), finalists, base[cfg.protocol(spec).task], say)
    for spec in cfg.test_tasks:
        p = cfg.protocol(spec)
        evaluate_candidates(store, run_id, evaluators[spec], p, finalists, base[p.task], progress)
    return race


def _test_units(store: Storage, run_id: int, evaluator: TaskEvaluator, p: Protocol, finalists: Mapping[str, Genome],
                base: Sequence[Row], say: Progress) -> None:
    """The finalists on the test seeds of one search task, each at the lr chosen on all of its
    validation seeds; one transaction per horizon, stored units reused (and checked whole)."""
    rows = stored_candidate_rows(store, run_id, p.task)
    test = _test_rows(rows, finalists, p, run_id)
    todo = [h for h in p.horizons if h not in test]
    if not todo:
        return
    rep = reporter(say)
    rep.stage(f"race (test{'' if p.task == 'sine' else ', ' + p.task})", len(todo), "horizons")
    chosen = choose([r for r in rows if r.split == "validation" and r.method in finalists], before_of(base))
    for h in todo:
        rep.message(f"{len(finalists)} finalist(s) at the validated lr, {p.task} t_max = {h:g}")
        lrs = {n: [chosen[(n, h)].hparam or 0.0] for n in finalists}
        new = gradient_rows(evaluator, finalists, h, p.seeds.test_for(h), lrs, "test")
        store.add_evaluations(candidate_evaluations(new, finalists, p.budget_fpe, p.task, p.task_key))
        rep.advance(1)


def _test_rows(rows: Sequence[Row], finalists: Mapping[str, object], p: Protocol, run_id: int) -> dict[float, list[Row]]:
    """horizon -> the stored test unit (whole: each finalist on each test seed once)."""
    out: dict[float, list[Row]] = {}
    for r in rows:
        if r.split == "test" and r.horizon in p.horizons:
            out.setdefault(r.horizon, []).append(r)
    for h, unit in out.items():
        pairs = sorted((r.method, r.seed) for r in unit)
        if pairs != sorted((n, s) for n in finalists for s in p.seeds.test_for(h)):
            raise StoreError(f"run {run_id}: the stored test rows of {p.task} at t_max = {h:g} are not the race "
                             "finalists' on every test seed; the database is damaged")
    return out


# ------------------------------------------------------------------------------- reading


def stored_race(store: Storage, run_id: int, cfg: SearchConfig) -> Race | None:
    """The race of a run as stored (None before its first stage is stored): what the comparison,
    `nos query stats` and the report read."""
    got = _stored(store, run_id, cfg)
    return None if got is None else got[0]


def _stored(store: Storage, run_id: int, cfg: SearchConfig
            ) -> tuple[Race, dict[str, list[Row]], dict[str, list[Row]]] | None:
    """The stored race with the rows it was recorded from: candidates' and baselines' per task."""
    cand = _search_rows(store, run_id, cfg)
    plan = cfg.race_plan()
    first = {r.method for rows in cand.values() for r in rows if r.split == "validation" and r.seed in set(plan[0][1])}
    if not first:
        return None
    base = {cfg.protocol(spec).task: _stored_base(store, cfg, spec) for spec in cfg.tasks}
    race = record(cand, base, plan, sorted(first), _protocols(cfg), _genomes(store, run_id, sorted(first)), run_id)
    return race, cand, base


def seed_scores(store: Storage, run_id: int, cfg: SearchConfig) -> tuple[Race, dict[str, dict[int, float]]] | None:
    """The stored race and, for every first-stage entrant, its score on each validation seed it
    ran, in log units: per search task the mean over horizons of its log loss at the lr chosen on
    all of those seeds (as the race's running score chooses it), then the mean over tasks -- the
    race's score per seed, up to a per-seed term (tuned Adam's loss on that seed) that every
    candidate shares and that ranking within a stage cancels. What `nos calibrate --race` sizes
    the next race from; None before the first stage is stored."""
    got = _stored(store, run_id, cfg)
    if got is None:
        return None
    race, cand, base = got
    protocols = _protocols(cfg)
    table: dict[str, dict[int, float]] = {}
    for name in race.stages[0].entrants:
        seeds = [s for st in race.stages if st.complete and name in st.entrants for s in st.seeds]
        per_task = [_profile(cand, base, name, seeds, {task: p}).mean(axis=0) for task, p in protocols.items()]
        table[name] = dict(zip(seeds, np.mean(per_task, axis=0).tolist()))
    return race, table


def _stored_base(store: Storage, cfg: SearchConfig, spec: str) -> list[Row]:
    return stored_baselines(store, cfg.protocol(spec).key("validation"))


def race_rows(store: Storage, run_id: int, cfg: SearchConfig, spec: str) -> tuple[list[Row], tuple[str, ...]] | None:
    """A task's candidate rows once the race and its test units are all stored, with the
    finalists; None while anything is missing (never a partial table)."""
    race = stored_race(store, run_id, cfg)
    if race is None or not race.complete:
        return None
    p = cfg.protocol(spec)
    rows = stored_candidate_rows(store, run_id, p.task)
    if spec in cfg.tasks:
        test = _test_rows(rows, dict.fromkeys(race.finalists), p, run_id)
        if any(h not in test for h in p.horizons):
            return None
    return rows, race.finalists


def apply(cmp: Comparison, race: Race) -> Comparison:
    """The comparison with the race's choice: the finalists' last-stage scores and its champion."""
    cmp.validation_scores = dict(race.final_scores)
    cmp.champion = race.champion
    return cmp
