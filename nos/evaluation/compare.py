"""The test-seed comparison: each method at its validated choice, per seed, with paired statistics.

Built from `protocol.Row`s alone (validation rows make the choices, test rows are reported), so
every command -- the evolve summary, `nos query compare`, `nos report`, `nos baselines` -- shows
the same numbers from the same stored rows. Its JSON (`nos query compare --format json`) is a
contract with outside tools:
`{"run", "seeds": {"search", "validation", "test"}, "methods": [{"method", "horizon", "hparam",
"per_seed", "median", "gmean"}], "versus": [{"candidate", "baseline", "horizon", "gmean_ratio",
"ci_low", "ci_high", "wins", "n", "p_value", "detectable_ratio"}]}`. `detectable_ratio` (added
later; null below 2 seeds) is the ratio r such that a true ratio r or 1/r would be detected with 80%
power on those seeds (`nos.evaluation.stats.detectable_ratio`): how much a "ties" can rule out.
A run with per-horizon test seeds also has `seeds.test_per_horizon` (horizon -> its count, for the
horizons tested on fewer than all); each method's `per_seed` and each row's `n` are its horizon's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol import (
    BASELINES,
    BEFORE,
    METHOD_LABELS,
    PUBLISHED,
    Choice,
    Row,
    Seeds,
    best_randopt,
    choose,
    horizon_text,
)
from .stats import Versus, gmean, settle, stratified_versus, summarize, versus


@dataclass(frozen=True)
class MethodResult:
    """A method at one horizon on the test seeds, at its validated hyperparameter."""

    method: str  # "adam", ..., "randopt", "#17" (a candidate), "before"
    horizon: float
    hparam: float | None  # lr, or sigma for RandOpt (None: before fine-tuning)
    per_seed: tuple[float | None, ...]  # test losses in seed order; None = diverged
    median: float
    gmean: float
    log_std: float | None
    diverged: int
    variant: str | None = None  # RandOpt's chosen layers ("all", "first", ...)
    validation_score: float | None = None  # geometric mean over validation seeds at the choice
    task: str = "sine"  # the task family's name

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersusRow:
    candidate: str
    baseline: str
    horizon: float | None  # None: an aggregate over every horizon of its task(s)
    stats: Versus
    task: str = "sine"  # a task's name, or AGGREGATE / the test tasks joined by "," (aggregates)

    @property
    def verdict(self) -> str:
        return self.stats.verdict

    def json(self) -> dict[str, Any]:
        s = self.stats
        return {"task": self.task, "candidate": self.candidate, "baseline": self.baseline, "horizon": self.horizon,
                "gmean_ratio": s.gmean_ratio, "ci_low": s.ci_low, "ci_high": s.ci_high, "wins": s.wins,
                "n": s.n, "p_value": s.p_value, "verdict": s.verdict, "detectable_ratio": s.detectable_ratio}


AGGREGATE = "all"  # the task of aggregate rows over every task (and horizon) of a run


@dataclass
class Comparison:
    seeds: Seeds
    horizons: tuple[float, ...]  # the first task's (every task's: `task_horizons`)
    methods: list[MethodResult] = field(default_factory=list)
    versus: list[VersusRow] = field(default_factory=list)  # per task and horizon
    candidates: tuple[str, ...] = ()
    champion: str | None = None
    validation_scores: dict[str, float] = field(default_factory=dict)
    task: str = "sine"  # the first task
    task_horizons: dict[str, tuple[float, ...]] = field(default_factory=dict)  # task -> its horizons
    search_tasks: tuple[str, ...] = ("sine",)
    test_tasks: tuple[str, ...] = ()
    aggregate: list[VersusRow] = field(default_factory=list)  # over tasks x horizons x seeds
    labels: dict[str, str] = field(default_factory=dict)  # task -> what its variants are ("t_max")

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.search_tasks, *self.test_tasks)

    def result(self, method: str, horizon: float, task: str | None = None) -> MethodResult | None:
        task = task or self.task
        return next((m for m in self.methods if m.method == method and m.horizon == horizon and m.task == task), None)

    def verdicts(self, candidate: str, task: str | None = None) -> dict[float, dict[str, str]]:
        """horizon -> baseline -> wins / ties / loses (on one task: the first by default)."""
        task = task or self.task
        out: dict[float, dict[str, str]] = {}
        for v in self.versus:
            if v.candidate == candidate and v.task == task and v.horizon is not None:
                out.setdefault(v.horizon, {})[v.baseline] = v.verdict
        return out

    def beats_all(self, candidate: str, task: str | None = None) -> dict[float, bool]:
        """horizon -> does the candidate win (CI upper end < 1) against every baseline?"""
        return {h: bool(vs) and all(x == "wins" for x in vs.values())
                for h, vs in self.verdicts(candidate, task).items()}

    def json(self, run: str | None = None) -> dict[str, Any]:
        seeds: dict[str, Any] = {"search": list(self.seeds.search), "validation": list(self.seeds.validation),
                                 "test": list(self.seeds.test)}
        if self.seeds.test_at:  # only in a run with per-horizon test seeds: the contract's keys otherwise
            seeds["test_per_horizon"] = {horizon_text(h): n for h, n in self.seeds.test_at}
        return {"run": run, "seeds": seeds,
                "tasks": {"search": list(self.search_tasks), "test": list(self.test_tasks)},
                "horizons": list(self.horizons),
                "task_horizons": {t: list(hs) for t, hs in self.task_horizons.items()}, "variant_labels": self.labels,
                "candidates": list(self.candidates), "champion": self.champion,
                "validation_scores": self.validation_scores,
                "methods": [m.json() for m in self.methods],
                "versus": [v.json() for v in (*self.versus, *self.aggregate)]}


def validation_scores(choices: Mapping[tuple[str, float], Choice], candidates: Sequence[str],
                      horizons: Sequence[float]) -> dict[str, float]:
    """Each candidate's validation score relative to tuned Adam: the geometric mean over horizons
    of (its validation geometric mean / Adam's), each at its validated choice (lower is better)."""
    scores = {}
    for c in candidates:
        pairs = [(choices.get((c, h)), choices.get(("adam", h))) for h in horizons]
        if all(x is not None and a is not None for x, a in pairs):
            scores[c] = gmean([x.score / a.score for x, a in pairs])  # type: ignore[union-attr]
    return scores


def champion(scores: Mapping[str, float]) -> str | None:
    """The candidate with the lowest validation score (the first of equal ones)."""
    return min(scores, key=scores.__getitem__) if scores else None


def compare(rows: Sequence[Row], before: Mapping[tuple[float, int], float], seeds: Seeds,
            horizons: Sequence[float], candidates: Sequence[str] = (), bootstrap_seed: int = 0,
            task: str = "sine") -> Comparison:
    """The comparison on one task from stored rows: choices on validation, numbers on test."""
    choices = choose(rows, before)
    out = Comparison(seeds, tuple(horizons), candidates=tuple(candidates), task=task,
                     task_horizons={task: tuple(horizons)}, search_tasks=(task,))
    out.validation_scores = validation_scores(choices, candidates, horizons)
    out.champion = champion(out.validation_scores)
    test = {(r.method, r.horizon, r.hparam, r.seed): r.loss for r in rows if r.split == "test"}
    for h in horizons:
        test_seeds = seeds.test_for(h)
        fallback = [before[(h, s)] for s in test_seeds]
        settled: dict[str, list[float]] = {}
        bsum = summarize(fallback)
        out.methods.append(MethodResult(BEFORE, h, None, tuple(fallback), bsum.median, bsum.gmean, bsum.log_std, 0,
                                        task=task))
        picks: list[tuple[str, Choice | None, str | None]] = [(m, choices.get((m, h)), None) for m in BASELINES[:-1]]
        ro = best_randopt(choices, h)
        picks.append(("randopt", ro, ro.method[len("randopt_"):] if ro else None))
        picks += [(m, choices.get((m, h)), None) for m in PUBLISHED if (m, h) in choices]
        picks += [(c, choices.get((c, h)), None) for c in candidates]
        for name, choice, variant in picks:
            if choice is None:
                continue
            raw = tuple(test.get((choice.method, h, choice.hparam, s)) for s in test_seeds)
            if any((choice.method, h, choice.hparam, s) not in test for s in test_seeds):
                continue  # not evaluated on test (yet)
            losses, diverged = settle(raw, fallback)
            settled[name] = losses
            summ = summarize(losses)
            out.methods.append(MethodResult(name, h, choice.hparam, raw, summ.median, summ.gmean, summ.log_std,
                                            diverged, variant, choice.score, task))
        for c in candidates:
            for b in BASELINES:
                if c in settled and b in settled:
                    out.versus.append(VersusRow(c, b, h, versus(settled[c], settled[b], seed=bootstrap_seed), task))
    out.aggregate = _aggregate(out, (task,), AGGREGATE, bootstrap_seed)
    return out


def _settled(cmp: Comparison, method: str, task: str, horizon: float) -> list[float] | None:
    """A method's test losses on one task and horizon, diverged runs settled as `compare` does."""
    res, before = cmp.result(method, horizon, task), cmp.result(BEFORE, horizon, task)
    if res is None or before is None:
        return None
    return settle(res.per_seed, [float(x) for x in before.per_seed if x is not None])[0]


def _strata(cmp: Comparison, c: str, b: str, tasks: Sequence[str]) -> list[tuple[list[float], list[float]]] | None:
    """(candidate, baseline) test losses per (task, horizon); None if any is missing."""
    strata = []
    for t in tasks:
        for h in cmp.task_horizons.get(t, ()):
            cs, bs = _settled(cmp, c, t, h), _settled(cmp, b, t, h)
            if cs is None or bs is None:
                return None
            strata.append((cs, bs))
    return strata or None


def _aggregate(cmp: Comparison, tasks: Sequence[str], label: str, bootstrap_seed: int) -> list[VersusRow]:
    """Each candidate against each baseline over every (task, horizon) of `tasks` x test seeds."""
    out = []
    for c in cmp.candidates:
        for b in BASELINES:
            strata = _strata(cmp, c, b, tasks)
            if strata is not None:
                out.append(VersusRow(c, b, None, stratified_versus(strata, seed=bootstrap_seed), label))
    return out


def combine(per_task: Sequence[Comparison], search_tasks: Sequence[str], test_tasks: Sequence[str],
            bootstrap_seed: int = 0) -> Comparison:
    """One comparison from per-task ones: every task's rows, aggregates over all tasks (task
    AGGREGATE) and over the test tasks (their names joined by ","), and the champion chosen on the
    search tasks' validation scores alone (their geometric mean): test tasks never enter a choice."""
    first = per_task[0]
    if len(per_task) == 1 and not test_tasks:
        return first
    # every task's per-horizon test counts (one config's: a horizon has one count in all tasks)
    seeds = dataclasses.replace(first.seeds, test_at=tuple(sorted({x for c in per_task for x in c.seeds.test_at})))
    out = Comparison(seeds, first.horizons, candidates=first.candidates, task=first.task,
                     search_tasks=tuple(search_tasks), test_tasks=tuple(test_tasks))
    for cmp in per_task:
        out.methods += cmp.methods
        out.versus += cmp.versus
        out.task_horizons.update(cmp.task_horizons)
        out.labels.update(cmp.labels)
    by_task = {cmp.task: cmp.validation_scores for cmp in per_task}
    out.validation_scores = {c: gmean([by_task[t][c] for t in search_tasks]) for c in first.candidates
                             if all(c in by_task.get(t, {}) for t in search_tasks)}
    out.champion = champion(out.validation_scores)
    out.aggregate = _aggregate(out, out.tasks, AGGREGATE, bootstrap_seed)
    if test_tasks:
        out.aggregate += _aggregate(out, test_tasks, ",".join(test_tasks), bootstrap_seed)
    return out


def method_label(result: MethodResult) -> str:
    label = METHOD_LABELS.get(result.method, result.method)
    return f"{label} ({result.variant} layers)" if result.variant else label
