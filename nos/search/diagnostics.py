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

# what makes two runs comparable: everything but the algorithm, the seed and the names
_SAME = ("initial", "particles", "timesteps", "mutations", "max_tries", "seed_builtins", "horizons", "lrs",
         "budget_fpe", "search_seeds", "sine", "fidelity", "tasks")
_BEFORE_TASKS = {"tasks": ["sine"]}  # what a config written before tasks had names searched on
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
    }
    control = control_for(store, run)
    if control is not None:
        out["control"] = {"run": control["name"], "best_so_far": best_so_far(store.individuals(control["id"]))}
    return out
