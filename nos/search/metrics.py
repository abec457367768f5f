"""How a run is summarised: status counts, integrity pass rate, duplicate rate (defined once)."""

from __future__ import annotations

from collections.abc import Mapping


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
