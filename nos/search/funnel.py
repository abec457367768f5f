"""The funnel: the search's best candidates re-evaluated on held-out seeds beside the baselines.

Its results are stored (`evaluations` rows of task `sine_heldout` for candidates, `baselines` rows
for the methods) and read back from there by every command: the evolve summary, `nos.query` and
`nos.report` all see the same table and the same champion.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from db.store import Store
from search_space.genome import from_json

from ..evaluation.compare import MethodResult, heldout_comparison
from ..evaluation.sine import SineEvaluator, geometric_mean_ratio
from .config import SearchConfig
from .records import Candidate

HELDOUT_TASK = "sine_heldout"  # funnel rows (evaluations of candidates, baselines of methods)
SEARCH_TASK = "sine_search"  # the run's stored Adam reference (the fitness normaliser)
RIVALS = ("adam", "adam_clip", "randopt_all")  # what a champion must beat to "win" at a horizon

Results = dict[str, dict[float, MethodResult]]  # method or candidate name -> horizon -> result


def candidate_name(ind_id: int) -> str:
    """How a candidate is named among methods in tables: "#<id>"."""
    return f"#{ind_id}"


def candidate_id(name: str) -> int | None:
    """Inverse of `candidate_name`; None for a method name such as "adam"."""
    return int(name[1:]) if name.startswith("#") and name[1:].isdigit() else None


def run_funnel(evaluator: SineEvaluator, cfg: SearchConfig, best: Sequence[Candidate],
               progress: Callable[[str], None] | None = None) -> Results:
    """Held-out comparison of the hall of fame vs Adam, Adam + clip and RandOpt."""
    candidates = {candidate_name(c.id): from_json(dict(c.genome)) for c in best}
    return heldout_comparison(evaluator, candidates, horizons=cfg.heldout_horizons,
                              seeds=cfg.heldout_seeds, progress=progress)


def funnel_rows(run_id: int, results: Results, cfg: SearchConfig) -> tuple[dict[int, list[dict]], list[dict]]:
    """Evaluations of the candidates and baseline rows of the methods, for the database."""
    evaluations: dict[int, list[dict]] = {}
    baselines = []
    for name, per_h in results.items():
        ind_id = candidate_id(name)
        for h, r in per_h.items():
            for s, loss in zip(cfg.heldout_seeds, r.losses):
                if ind_id is not None:
                    evaluations.setdefault(ind_id, []).append(
                        {"task": HELDOUT_TASK, "horizon": h, "lr": r.hparam, "seed": s, "loss": loss,
                         "steps": cfg.total_steps, "seconds": 0.0}
                    )
                else:
                    baselines.append({"run_id": run_id, "method": name, "task": HELDOUT_TASK, "horizon": h,
                                      "seed": s, "loss": loss, "hparam": r.hparam, "budget": cfg.budget_fpe})
    return evaluations, baselines


def stored_results(store: Store, run_id: int, cfg: SearchConfig) -> Results:
    """The funnel's table rebuilt from the database (empty if the run has no funnel rows)."""
    seeds = list(cfg.heldout_seeds)

    def ordered(rows: list[dict]) -> list[float | None]:
        rows = sorted(rows, key=lambda r: seeds.index(r["seed"]) if r["seed"] in seeds else len(seeds) + r["seed"])
        return [r["loss"] for r in rows]

    grouped: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for b in store.baselines(run_id, task=HELDOUT_TASK):
        grouped[(b["method"], b["horizon"])].append(b)
    # The funnel re-evaluates the hall of fame: the best distinct evaluated candidates.
    for ind in store.top(run_id, max(2 * cfg.funnel, cfg.funnel + 5)):
        full = store.get_individual(ind["id"]) or {}
        for e in full.get("evaluations", []):
            if e["task"] == HELDOUT_TASK:
                grouped[(candidate_name(ind["id"]), e["horizon"])].append({**e, "hparam": e["lr"]})
    results: Results = {}
    for (method, h), rows in grouped.items():
        results.setdefault(method, {})[h] = MethodResult(method, h, ordered(rows), rows[0]["hparam"])
    for per_h in results.values():  # horizons in increasing order
        items = sorted(per_h.items())
        per_h.clear()
        per_h.update(items)
    return results


def champion(results: Results) -> str | None:
    """The funnel candidate with the best geometric-mean ratio to tuned Adam over the horizons
    (None when no candidate has a finite mean at every horizon Adam has)."""
    adam = results.get("adam", {})
    scores = {}
    for name, per_h in results.items():
        if candidate_id(name) is None:
            continue
        pairs = [(r.mean, adam[h].mean if h in adam else None) for h, r in per_h.items()]
        if pairs and all(x is not None and a for x, a in pairs):
            scores[name] = geometric_mean_ratio([x for x, _ in pairs], [a for _, a in pairs])  # type: ignore[misc]
    return min(scores, key=scores.__getitem__) if scores else None


def wins(results: Results, name: str, rivals: Sequence[str] = RIVALS) -> dict[float, bool]:
    """Per horizon: does `name`'s mean loss beat every rival's?"""
    out = {}
    for h, r in results[name].items():
        rival_means = [results[x][h].mean for x in rivals if x in results and h in results[x]]
        out[h] = r.mean is not None and all(m is None or r.mean < m for m in rival_means)
    return out

