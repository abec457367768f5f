"""Formatting of the comparison tables (methods x horizons, mean +- std over held-out seeds)."""

from __future__ import annotations

from .cli import format_table
from .evaluation.compare import MethodResult

METHOD_LABELS = {
    "before": "before fine-tuning",
    "adam": "Adam (lr tuned)",
    "adam_clip": "Adam + clip 1.0 (lr tuned)",
    "randopt_all": "RandOpt all layers (sigma tuned)",
    "randopt_first": "RandOpt first layer",
    "randopt_middle": "RandOpt middle layer",
    "randopt_last": "RandOpt last layer",
}


def cell(r: MethodResult) -> str:
    if r.mean is None:
        return "diverged"
    if len(r.losses) == 1:
        return f"{r.mean:.3g}"
    return f"{r.mean:.3g} +- {r.std:.2g}"


def comparison_table(results: dict[str, dict[float, MethodResult]]) -> str:
    horizons = sorted({h for per_h in results.values() for h in per_h})
    rows = []
    for name, per_h in results.items():
        row = {"method": METHOD_LABELS.get(name, name)}
        row.update({f"t_max={h:g}": cell(per_h[h]) for h in horizons if h in per_h})
        rows.append(row)
    cols = ["method"] + [f"t_max={h:g}" for h in horizons]
    return format_table(rows, cols)


def comparison_json(results: dict[str, dict[float, MethodResult]]) -> dict:
    return {
        name: {
            f"{h:g}": {"mean": r.mean, "std": r.std, "losses": r.losses, "hparam": r.hparam}
            for h, r in per_h.items()
        }
        for name, per_h in results.items()
    }
