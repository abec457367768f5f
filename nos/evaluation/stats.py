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

Power (how many seeds a comparison needs): the per-seed log ratio d = log(candidate / baseline)
with standard deviation `log_std` over n seeds; a true geometric-mean ratio r (or 1/r) is
*detected* when a two-sided paired test at level alpha rejects "ratio 1". The numbers below are
those of the paired t test on d, computed exactly from the noncentral t distribution
(`scipy.stats.nct`, noncentrality |log r| sqrt(n) / log_std, n - 1 degrees of freedom) rather than
the normal approximation exp((z_{1-alpha/2} + z_power) log_std / sqrt(n)): on the 5 to 20 test
seeds a comparison has, z is too optimistic (log_std 1 on 5 seeds: t detects 5.4x, z claims 3.5x;
a 3x ratio needs 9 seeds, z says 7); for large n the two agree. The verdicts themselves use the BCa bootstrap interval, which on few seeds is narrower
than the t interval: it calls more differences (with normal log ratios, true ratio 1, a verdict
other than "ties" in about 16% of draws on 5 seeds and 11% on 10, not 5%), so for it these numbers
are conservative -- they are what a test that keeps its 5% level needs. `ci_span` is the
expected width high / low of the 95% t interval of the ratio with the sample std equal to
`log_std`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
ALPHA = 0.05  # 1 - CONFIDENCE: the level of the two-sided tests behind the power numbers
POWER = 0.8  # the power `detectable_ratio` and `seeds_for` ask for
MAX_SEEDS = 1_000_000  # `seeds_for` and `seeds_for_span` search no further (None: more needed)
N_SPEARMAN = 2000  # bootstrap resamples of `spearman_ci`
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
    # the ratio r (> 1) such that a true ratio r or 1/r is detected with 80% power on these n seeds
    # (`detectable_ratio`; pooled over strata for `stratified_versus`); None below 2 seeds
    detectable_ratio: float | None = None
    log_std: float | None = None  # sample std (ddof 1) of the per-seed log ratios; None: one seed / pooled

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
    log_std = float(np.std(d, ddof=1)) if len(d) > 1 else None
    detectable = None if log_std is None else detectable_ratio(log_std, len(d))
    return Versus(ratio, lo, hi, int(np.sum(d < 0)), len(d), p, detectable, log_std)


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
    return Versus(float(np.exp(point)), lo, hi, int(np.sum(pooled < 0)), len(pooled), p, _pooled_detectable(diffs))


def _pooled_detectable(diffs: Sequence[np.ndarray], power: float = POWER, alpha: float = ALPHA) -> float | None:
    """`detectable_ratio` of the mean over strata of the strata's mean log ratios: its standard
    error sqrt(sum var_s / n_s) / S, degrees of freedom by Welch-Satterthwaite; None when a
    stratum has fewer than 2 seeds."""
    if any(len(d) < 2 for d in diffs):
        return None
    v = np.array([np.var(d, ddof=1) / len(d) for d in diffs]) / len(diffs) ** 2
    if not v.sum() > 0:
        return 1.0
    df = v.sum() ** 2 / np.sum(v**2 / np.array([len(d) - 1 for d in diffs]))
    return math.exp(_detectable_nc(float(df), power, alpha) * math.sqrt(v.sum()))


# ---------------------------------------------------------------------- power


def _check_levels(power: float, alpha: float) -> None:
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha}, power {power}")


def _check_std(log_std: float) -> None:
    if not (math.isfinite(log_std) and log_std >= 0):
        raise ValueError(f"log_std must be finite and >= 0, got {log_std}")


def t_power(nc: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t test at level `alpha` with `df` degrees of freedom when the
    statistic is noncentral t with noncentrality `nc`. The lower tail is taken as the upper tail
    at -nc (equal, and `nct.cdf` returns NaN far out in the tail)."""
    tc = stats.t.ppf(1 - alpha / 2, df)
    tails = [float(stats.nct.sf(tc, df, x)) for x in (nc, -nc)]
    return min(1.0, sum(t if math.isfinite(t) else 0.0 for t in tails))


def _detectable_nc(df: float, power: float, alpha: float) -> float:
    """The noncentrality at which a two-sided t test with `df` degrees of freedom has `power`."""
    hi = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) + 1.0
    while t_power(hi, df, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda nc: t_power(nc, df, alpha) - power, 0.0, hi, xtol=1e-12, rtol=1e-12))


def paired_power(log_std: float, n: int, ratio: float, alpha: float = ALPHA) -> float:
    """The probability that a two-sided paired t test at level `alpha` on `n` seeds detects a true
    geometric-mean ratio `ratio` (or 1 / ratio) when the per-seed log ratios have std `log_std`;
    NaN below 2 seeds (no test)."""
    _check_std(log_std)
    if ratio <= 0:
        raise ValueError(f"a ratio is positive, got {ratio}")
    if n < 2:
        return math.nan
    effect = abs(math.log(ratio))
    if log_std == 0:
        return 1.0 if effect > 0 else alpha
    return t_power(effect * math.sqrt(n) / log_std, n - 1, alpha)


def detectable_ratio(log_std: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest geometric-mean ratio r >= 1 such that a true ratio r (or 1/r) is detected
    with probability `power` by a two-sided paired t test at level `alpha` on `n` seeds whose
    log ratios have std `log_std` (see the module docstring); inf below 2 seeds, 1 when
    `log_std` is 0."""
    _check_std(log_std)
    _check_levels(power, alpha)
    if n < 2:
        return math.inf
    if log_std == 0:
        return 1.0
    return math.exp(_detectable_nc(n - 1, power, alpha) * log_std / math.sqrt(n))


def _smallest_n(ok: Callable[[int], bool], max_n: int) -> int | None:
    """The smallest n in [2, max_n] with ok(n), `ok` monotone (false ... false true ... true)."""
    if max_n < 2 or not ok(max_n):
        return None
    lo, hi = 1, max_n  # ok(hi); lo is below the range
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def seeds_for(log_std: float, ratio: float, power: float = POWER, alpha: float = ALPHA,
              max_n: int = MAX_SEEDS) -> int | None:
    """The fewest seeds (>= 2) on which a two-sided paired t test at level `alpha` detects a true
    geometric-mean ratio `ratio` (or 1 / ratio) with probability >= `power`, the per-seed log
    ratios having std `log_std` (the inverse of `detectable_ratio`); None when more than
    `max_n` would be needed (ratio 1: never)."""
    _check_std(log_std)
    _check_levels(power, alpha)
    if ratio <= 0:
        raise ValueError(f"a ratio is positive, got {ratio}")
    if ratio == 1:
        return None
    return _smallest_n(lambda n: paired_power(log_std, n, ratio, alpha) >= power, max_n)


def ci_span(log_std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """The expected width factor high / low of the `confidence` interval of the geometric-mean
    ratio on `n` seeds, exp(2 t_{(1+confidence)/2, n-1} log_std / sqrt(n)); inf below 2 seeds."""
    _check_std(log_std)
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    if n < 2:
        return math.inf
    return math.exp(2 * float(stats.t.ppf((1 + confidence) / 2, n - 1)) * log_std / math.sqrt(n))


def seeds_for_span(log_std: float, span: float, confidence: float = CONFIDENCE, max_n: int = MAX_SEEDS) -> int | None:
    """The fewest seeds (>= 2) whose expected `confidence` interval spans less than `span`
    (high / low, > 1) -- "how many seeds make the CI narrower than 10x"; None beyond `max_n`."""
    if not span > 1:
        raise ValueError(f"a span high / low is > 1, got {span}")
    _check_std(log_std)
    return _smallest_n(lambda n: ci_span(log_std, n, confidence) < span, max_n)


# ---------------------------------------------------------------------- rank correlation


def spearman_ci(x: ArrayLike, y: ArrayLike, seed: int = 0, n_resamples: int = N_SPEARMAN,
                confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """Spearman's rho of paired samples with a percentile bootstrap interval (pairs resampled,
    `np.random.default_rng(seed)`): (rho, low, high, p-value of `scipy.stats.spearmanr`).

    Pairs with a non-finite member are left out; with fewer than 3 pairs left, or a constant
    sample (rho undefined), every number is NaN. Resamples in which one side is constant have no
    rho and are left out of the interval."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError("need two 1-d samples of the same length")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    nan = math.nan
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return nan, nan, nan, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.spearmanr(xs, ys)
    rho, p = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, n_resamples, 500):  # in blocks: memory stays 500 x n
        idx = rng.integers(0, len(xs), size=(min(500, n_resamples - start), len(xs)))
        rx, ry = stats.rankdata(xs[idx], axis=1), stats.rankdata(ys[idx], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
        ok = den > 0
        boot.append((rx * ry).sum(axis=1)[ok] / den[ok])
    rhos = np.concatenate(boot)
    if not len(rhos):
        return rho, nan, nan, p
    a = (1 - confidence) / 2
    lo, hi = (float(q) for q in np.quantile(rhos, [a, 1 - a]))
    return rho, lo, hi, p
