"""How a run is summarised: status counts, integrity pass rate, duplicate rate (defined once)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..evaluation.stats import spearman_ci


def integrity_pass_rate(counts: Mapping[str, int]) -> float | None:
    """Share of screened candidates that passed the integrity check: (evaluated + error) over
    all candidates that were screened, i.e. not duplicates and not invalid. None when none was."""
    screened = sum(counts.values()) - counts.get("duplicate", 0) - counts.get("invalid", 0)
    return (counts.get("evaluated", 0) + counts.get("error", 0)) / screened if screened > 0 else None


def duplicate_rate(counts: Mapping[str, int]) -> float | None:
    total = sum(counts.values())
    return counts.get("duplicate", 0) / total if total else None


def run_metrics(counts: Mapping[str, int]) -> dict[str, object]:
    return {
        "candidates": sum(counts.values()),
        "status_counts": dict(counts),
        "integrity_pass_rate": integrity_pass_rate(counts),
        "duplicate_rate": duplicate_rate(counts),
    }


def best_so_far(individuals: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """The best full-fidelity fitness among the first k judged candidates, k = 1..n (id order)."""
    out: list[float | None] = []
    best: float | None = None
    for r in sorted(individuals, key=lambda r: r["id"]):
        if r["status"] == "evaluated" and r.get("fidelity", 1) == 1 and r["fitness"] is not None:
            best = r["fitness"] if best is None else min(best, r["fitness"])
        out.append(best)
    return out


def rank_correlation(fitness: Mapping[int, float], validation: Mapping[int, float], seed: int = 0) -> dict[str, Any]:
    """Spearman's rank correlation between search fitness and validation score over the funnel
    candidates (does the search objective predict held-out results?) with its 95% percentile
    bootstrap interval over candidates (`spearman_ci`, seeded: the same run prints the same
    interval): keys n, spearman, p_value, ci_low, ci_high; None below 3 candidates (or when one
    side is constant, so that rho is undefined)."""
    ids = sorted(set(fitness) & set(validation))
    out: dict[str, Any] = {"n": len(ids), "spearman": None, "p_value": None, "ci_low": None, "ci_high": None}
    if len(ids) >= 3:
        rho, lo, hi, p = spearman_ci([fitness[i] for i in ids], [validation[i] for i in ids], seed=seed)
        for key, x in (("spearman", rho), ("p_value", p), ("ci_low", lo), ("ci_high", hi)):
            out[key] = x if math.isfinite(x) else None
    return out
