"""Paired statistics for comparing methods on the same seeds (scipy, not by hand).

Losses span orders of magnitude and a single diverging seed can dominate a mean, so every
comparison is made on log losses, seed by seed:

- per method: per-seed losses, median, geometric mean and the sample std (ddof 1) of the log loss;
- candidate vs baseline: the geometric mean of the per-seed loss ratios, with a 95% bootstrap
  confidence interval (`scipy.stats.bootstrap`, BCa, paired by resampling seeds), per-seed wins
  k of n, and a paired Wilcoxon signed-rank p-value (`scipy.stats.wilcoxon`) on the log losses.

A candidate *wins* at a horizon only when the interval's upper end is below 1, *loses* when its
lower end is above 1, and *ties* otherwise. A run that diverged (no finite loss) counts as the
loss of the pretrained network on that seed -- what a practitioner would keep -- so it neither
vanishes from the comparison nor turns every statistic infinite; `diverged` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
T = TypeVar("T")
TINY = 1e-30  # a loss of exactly 0 is a perfect fit, not a log error


# Scores within this relative distance of the best are ties: float rounding (another CPU, another
# torch build) must not flip a choice between equally good grid points.
TIE_RTOL = 1e-6


def first_best(scored: Sequence[tuple[float, T]], rtol: float = TIE_RTOL) -> tuple[float, T]:
    """The first (score, option) in `scored`'s order whose score is within `rtol` (relative) of the
    lowest -- lower is better; grids are in ascending order, so ties go to the smallest lr / sigma.
    Non-finite scores never win over finite ones."""
    if not scored:
        raise ValueError("nothing to choose from")
    finite = [x for x in scored if math.isfinite(x[0])]
    if not finite:
        return scored[0]
    best = min(score for score, _ in finite)
    return next(x for x in finite if x[0] <= best + rtol * abs(best))


def settle(losses: Sequence[float | None], fallback: Sequence[float]) -> tuple[list[float], int]:
    """Losses with each diverged (None / non-finite) one replaced by `fallback` (the loss before
    fine-tuning on that seed); returns (losses, how many diverged)."""
    out, diverged = [], 0
    for x, f in zip(losses, fallback, strict=True):
        if x is None or not math.isfinite(x):
            out.append(float(f))
            diverged += 1
        else:
            out.append(float(x))
    return out, diverged


def _logs(xs: Sequence[float]) -> np.ndarray:
    return np.log(np.maximum(np.asarray(xs, dtype=float), TINY))


def gmean(xs: Sequence[float]) -> float:
    return float(np.exp(_logs(xs).mean()))


@dataclass(frozen=True)
class Summary:
    median: float
    gmean: float
    log_std: float | None  # sample std (ddof 1) of the natural-log losses; None for one seed


def summarize(xs: Sequence[float]) -> Summary:
    logs = _logs(xs)
    return Summary(float(np.median(xs)), float(np.exp(logs.mean())),
                   float(np.std(logs, ddof=1)) if len(xs) > 1 else None)


@dataclass(frozen=True)
class Versus:
    gmean_ratio: float  # geometric mean of candidate / baseline over seeds (< 1: candidate better)
    ci_low: float
    ci_high: float
    wins: int  # seeds where the candidate's loss is lower
    n: int
    p_value: float | None  # paired Wilcoxon signed-rank (two-sided); None when undefined

    @property
    def verdict(self) -> str:
        if self.ci_high < 1:
            return "wins"
        if self.ci_low > 1:
            return "loses"
        return "ties"


def versus(candidate: Sequence[float], baseline: Sequence[float], seed: int = 0) -> Versus:
    """Paired comparison of two methods' losses on the same seeds (see the module docstring)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("need the same, non-zero number of seeds for both methods")
    d = _logs(candidate) - _logs(baseline)
    ratio = float(np.exp(d.mean()))
    if len(d) < 2 or np.ptp(d) == 0:  # no spread: the interval is the point itself
        lo = hi = ratio
    else:
        res = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                              method="BCa", random_state=np.random.default_rng(seed))
        lo, hi = float(np.exp(res.confidence_interval.low)), float(np.exp(res.confidence_interval.high))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # BCa undefined (e.g. 2 distinct values)
            res = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                                  method="percentile", random_state=np.random.default_rng(seed))
            lo, hi = float(np.exp(res.confidence_interval.low)), float(np.exp(res.confidence_interval.high))
    p: float | None
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(_logs(candidate), _logs(baseline)).pvalue)
    return Versus(ratio, lo, hi, int(np.sum(d < 0)), len(d), p)


def stratified_versus(strata: Sequence[tuple[Sequence[float], Sequence[float]]], seed: int = 0) -> Versus:
    """Paired comparison pooled over strata (e.g. every task x horizon), each stratum weighing alike.

    The ratio is exp(mean over strata of the stratum's mean log ratio); its 95% interval is the
    percentile interval of a *stratified* bootstrap (seeds resampled within each stratum, as
    rliable does over tasks: Agarwal et al., 2021); wins and n count every (stratum, seed) pair, and
    the Wilcoxon p-value is over all of them."""
    diffs = [_logs(c) - _logs(b) for c, b in strata if len(c) == len(b) and len(c)]
    if not diffs or len(diffs) != len(strata):
        raise ValueError("every stratum needs the same, non-zero number of seeds for both methods")
    point = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    boot = np.zeros(N_RESAMPLES)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(N_RESAMPLES, len(d)))].mean(axis=1)
    boot /= len(diffs)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = (float(np.exp(q)) for q in np.quantile(boot, [alpha, 1 - alpha]))
    pooled = np.concatenate(diffs)
    p = 1.0 if np.all(pooled == 0) else float(stats.wilcoxon(pooled).pvalue)
    return Versus(float(np.exp(point)), lo, hi, int(np.sum(pooled < 0)), len(pooled), p)
