"""The test-seed comparison: each method at its validated choice, per seed, with paired statistics.

Built from `protocol.Row`s alone (validation rows make the choices, test rows are reported), so
every command -- the evolve summary, `nos query compare`, `nos report`, `nos baselines` -- shows
the same numbers from the same stored rows. Its JSON is a contract (DESIGN.md):
`{"run", "seeds": {"search", "validation", "test"}, "methods": [{"method", "horizon", "hparam",
"per_seed", "median", "gmean"}], "versus": [{"candidate", "baseline", "horizon", "gmean_ratio",
"ci_low", "ci_high", "wins", "n", "p_value"}]}`.
"""

from __future__ import annotations

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
)
from .stats import Versus, gmean, settle, summarize, versus


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

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersusRow:
    candidate: str
    baseline: str
    horizon: float
    stats: Versus

    @property
    def verdict(self) -> str:
        return self.stats.verdict

    def json(self) -> dict[str, Any]:
        s = self.stats
        return {"candidate": self.candidate, "baseline": self.baseline, "horizon": self.horizon,
                "gmean_ratio": s.gmean_ratio, "ci_low": s.ci_low, "ci_high": s.ci_high, "wins": s.wins,
                "n": s.n, "p_value": s.p_value, "verdict": s.verdict}


@dataclass
class Comparison:
    seeds: Seeds
    horizons: tuple[float, ...]
    methods: list[MethodResult] = field(default_factory=list)
    versus: list[VersusRow] = field(default_factory=list)
    candidates: tuple[str, ...] = ()
    champion: str | None = None
    validation_scores: dict[str, float] = field(default_factory=dict)

    def result(self, method: str, horizon: float) -> MethodResult | None:
        return next((m for m in self.methods if m.method == method and m.horizon == horizon), None)

    def verdicts(self, candidate: str) -> dict[float, dict[str, str]]:
        """horizon -> baseline -> wins / ties / loses."""
        out: dict[float, dict[str, str]] = {}
        for v in self.versus:
            if v.candidate == candidate:
                out.setdefault(v.horizon, {})[v.baseline] = v.verdict
        return out

    def beats_all(self, candidate: str) -> dict[float, bool]:
        """horizon -> does the candidate win (CI upper end < 1) against every baseline?"""
        return {h: bool(vs) and all(x == "wins" for x in vs.values()) for h, vs in self.verdicts(candidate).items()}

    def json(self, run: str | None = None) -> dict[str, Any]:
        return {"run": run, "seeds": {"search": list(self.seeds.search), "validation": list(self.seeds.validation),
                                      "test": list(self.seeds.test)},
                "horizons": list(self.horizons), "candidates": list(self.candidates), "champion": self.champion,
                "validation_scores": self.validation_scores,
                "methods": [m.json() for m in self.methods], "versus": [v.json() for v in self.versus]}


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
            horizons: Sequence[float], candidates: Sequence[str] = (), bootstrap_seed: int = 0) -> Comparison:
    """The comparison from stored rows: choices on validation, numbers on test."""
    choices = choose(rows, before)
    out = Comparison(seeds, tuple(horizons), candidates=tuple(candidates))
    out.validation_scores = validation_scores(choices, candidates, horizons)
    out.champion = champion(out.validation_scores)
    test = {(r.method, r.horizon, r.hparam, r.seed): r.loss for r in rows if r.split == "test"}
    for h in horizons:
        fallback = [before[(h, s)] for s in seeds.test]
        settled: dict[str, list[float]] = {}
        bsum = summarize(fallback)
        out.methods.append(MethodResult(BEFORE, h, None, tuple(fallback), bsum.median, bsum.gmean, bsum.log_std, 0))
        picks: list[tuple[str, Choice | None, str | None]] = [(m, choices.get((m, h)), None) for m in BASELINES[:-1]]
        ro = best_randopt(choices, h)
        picks.append(("randopt", ro, ro.method[len("randopt_"):] if ro else None))
        picks += [(m, choices.get((m, h)), None) for m in PUBLISHED if (m, h) in choices]
        picks += [(c, choices.get((c, h)), None) for c in candidates]
        for name, choice, variant in picks:
            if choice is None:
                continue
            raw = tuple(test.get((choice.method, h, choice.hparam, s)) for s in seeds.test)
            if any((choice.method, h, choice.hparam, s) not in test for s in seeds.test):
                continue  # not evaluated on test (yet)
            losses, diverged = settle(raw, fallback)
            settled[name] = losses
            summ = summarize(losses)
            out.methods.append(MethodResult(name, h, choice.hparam, raw, summ.median, summ.gmean, summ.log_std,
                                            diverged, variant, choice.score))
        for c in candidates:
            for b in BASELINES:
                if c in settled and b in settled:
                    out.versus.append(VersusRow(c, b, h, versus(settled[c], settled[b], seed=bootstrap_seed)))
    return out


def method_label(result: MethodResult) -> str:
    label = METHOD_LABELS.get(result.method, result.method)
    return f"{label} ({result.variant} layers)" if result.variant else label
