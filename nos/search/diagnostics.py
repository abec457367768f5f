"""Does the search work? Diagnostics of a stored run, for `nos query stats` and `nos report`.

- rank correlation (Spearman) between the search fitness and the validation score of the funnel
  candidates: whether the search objective predicts held-out results at all;
- best fitness so far against judged candidates, beside a random-search run of the same size
  (same schedule, protocol and fidelity rule) when the database holds one: the control any
  claim "evolution found this" needs.
"""

from __future__ import annotations

from typing import Any

from db.storage import Storage

from ..evaluation.compare import Comparison
from .config import SearchConfig
from .funnel import candidate_id, comparison
from .metrics import best_so_far, rank_correlation
from .race import Race, stored_race

# what makes two runs comparable: everything but the algorithm, the seed and the names
_SAME = ("initial", "particles", "timesteps", "mutations", "max_tries", "seed_builtins", "horizons", "lrs",
         "budget_fpe", "search_seeds", "sine", "fidelity", "tasks", "reference")
# what a config written before a key existed meant by it
_BEFORE_TASKS = {"tasks": ["sine"], "reference": "adam"}
_READ = object()  # `diagnostics(cmp=...)` not given: read the comparison from the store


def control_for(store: Storage, run: dict) -> dict | None:
    """The latest finished random-search run of the same size as `run` (not `run` itself)."""
    cfg = run["config"] or {}
    if cfg.get("algorithm", "ga") == "random":
        return None
    matches = [r for r in store.list_runs() if r["id"] != run["id"] and r["status"] == "finished"
               and (r["config"] or {}).get("algorithm") == "random"
               and all((r["config"] or {}).get(k, _BEFORE_TASKS.get(k)) == cfg.get(k, _BEFORE_TASKS.get(k))
                       for k in _SAME)]
    return matches[-1] if matches else None


def diagnostics(store: Storage, run: dict, individuals: list[dict] | None = None,
                cmp: Comparison | None | object = _READ) -> dict[str, Any]:
    """The run's diagnostics; `individuals` and `cmp` (its comparison, None without a funnel) are
    read from `store` unless the caller has them already (the report does: the comparison's
    bootstrap intervals are the costly part)."""
    if individuals is None:
        individuals = store.individuals(run["id"])
    if cmp is _READ:
        cmp = comparison(store, run["id"], SearchConfig.checked(run["config"] or {}))
    assert cmp is None or isinstance(cmp, Comparison)
    fitness = {r["id"]: r["fitness"] for r in individuals if r["status"] == "evaluated" and r["fitness"] is not None}
    validation = {i: s for name, s in (cmp.validation_scores.items() if cmp else ()) if (i := candidate_id(name)) is not None}
    out: dict[str, Any] = {
        "rank_correlation": rank_correlation(fitness, validation),
        "best_so_far": best_so_far(individuals),
        "control": None,
        "race": None,
    }
    cfg = SearchConfig.checked(run["config"] or {})
    race = stored_race(store, run["id"], cfg) if cfg.race else None
    if race is not None:
        out["race"] = race_diagnostics(race, fitness)
        # the first stage's scores: the one validation score every funnel candidate of a race has
        # (the finalists' last-stage scores are in "race"), so that the Spearman is over all of them
        first = race.stages[0].scores
        out["rank_correlation"] = rank_correlation(fitness, {i: x for n, x in first.items()
                                                             if (i := candidate_id(n)) is not None})
    control = control_for(store, run)
    if control is not None:
        out["control"] = {"run": control["name"], "best_so_far": best_so_far(store.individuals(control["id"]))}
    return out


def race_diagnostics(race: Race, fitness: dict[int, float]) -> dict[str, Any]:
    """What a race measured: each stage's size, seeds and clusters, its cost, and the rank
    correlations (with 95% bootstrap CIs) between the search fitness and each stage's scores,
    and between consecutive stages' own blocks of seeds (disjoint): does each step of selection
    agree with the next, or is the funnel ranking noise?"""

    def ids(scores: dict[str, float]) -> dict[int, float]:
        return {i: x for n, x in scores.items() if (i := candidate_id(n)) is not None}

    stages = [s for s in race.stages if s.scores]
    out: dict[str, Any] = {
        "stages": [{"stage": s.index + 1, "candidates": len(s.entrants), "seeds": len(s.seeds),
                    "clusters": len(set(s.cluster.values())) if s.cluster else None, "advanced": len(s.advanced)}
                   for s in race.stages],
        "trainings": race.trainings,
        "finalists": list(race.finalists),
        "within_noise": list(race.within_noise),
        "champion": race.champion,
        "finalist_clusters": len({race.stages[-2].cluster.get(n, n) for n in race.finalists})
        if len(race.stages) > 1 else len(race.finalists),
        "correlations": [],
    }
    for s in stages:
        out["correlations"].append({"between": "search fitness", "and": f"stage {s.index + 1}",
                                    **rank_correlation(fitness, ids(s.scores))})
    # consecutive stages on their own blocks: disjoint seeds, so agreement is not shared noise
    for a, b in zip(stages, stages[1:]):
        out["correlations"].append({"between": f"stage {a.index + 1} block", "and": f"stage {b.index + 1} block",
                                    **rank_correlation(ids(a.block_scores), ids(b.block_scores))})
    if race.final_scores:
        out["correlations"].append({"between": "search fitness", "and": "last block alone",
                                    **rank_correlation(fitness, ids(race.final_scores))})
    return out
