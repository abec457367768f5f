"""Sizing a racing funnel from a pilot: how many candidates each stage keeps and on how many
validation seeds, set by measurement (`nos calibrate --race RUN`) rather than by a default.

A stored race (`nos.search.race`) is a pilot: every first-stage entrant has a score on each
validation seed it ran (`race.seed_scores`, log units), the better ones on more seeds. Model:
score(candidate c, seed s) = mu_c + beta_s + noise. From the pilot:

1. **the noise**: within each stage's block (its entrants x its seeds, a full table) the
   residuals of the additive fit candidate + seed are what ranking within a stage cannot cancel;
   pooled over blocks (each scaled by sqrt(n s / ((n - 1)(s - 1))) so that its mean square is the
   variance), `sigma_within` is one seed's noise, and the pooled residuals themselves are what the
   simulation draws from (their heavy tails included);
2. **the spread of the true scores**: the first block's variance of candidate means less their
   noise (method of moments; the first block because every entrant ran it and none was selected
   on it yet), with an F test of "no spread at all": a pilot whose spread is not significant (p >=
   0.05) cannot tell its entrants apart and gets no plan -- ranking plans on it would rank noise;
3. **the true scores' posterior**: a normal prior N(m, sigma_between^2) on every mu_c, a flat one
   on the seed effects, and the pilot's table: the joint Gaussian posterior of the mu_c. This is
   what makes the pilot's own selection harmless: a later block's seed effects are fitted from the
   candidates that advanced alone, so it says how they differ from each other, not how far ahead of
   the eliminated they are -- a finalist's lead rests on the first block's few seeds, and the
   posterior's covariance says so (a plain shrinkage by its sixteen seeds would not);
4. **a simulated race per plan**: each draw takes true scores from the posterior, then runs the
   plan: stage 1 takes every entrant; each stage draws each survivor's per-seed scores as its true
   score plus residuals resampled from the pool, ranks by the mean over every seed so far and keeps
   the best n of the next stage; the champion is chosen on the last block alone by the race's rule:
   the finalists within one standard error of the paired per-seed difference to the block's best
   are equally good by what the block can tell, and among them the simplest wins -- complexity is
   taken as unrelated to quality: a random rank per (draw, candidate). The plan's *regret* is the
   champion's true score above that draw's best entrant (log units: exp(regret) - 1 is how much
   worse the chosen optimizer is on validation than the best one the search offered), with P(the
   best is chosen) and P(the best reaches the last stage). Every plan sees the same true scores and
   the same residual for a (draw, candidate, seed position): a counter hash, not a stream, so that
   plans differ by what they do, not by their luck;
5. **a proposal**: every plan of 1-3 stages with n and s from a grid (s never decreasing, at least 2
   candidates and 2 seeds in the last stage) that spends half to all of the budget in candidate-seed
   trainings (default: the pilot's own), screened on a few draws; the best few, and every plan the
   screen cannot tell from the best, simulated on many. The recommendation is the cheapest of them
   within one standard error of the paired difference to the best (among the plans within the
   budget whose last stage has 2 candidates on 2 seeds).

What it leaves out, as the simulation's limits: the lr each candidate's score is chosen at is
taken as fixed (choosing it on few seeds flatters a candidate a little more than the simulation
says), the race's one-per-cluster rule (near-copies share a true score), a skewed spread of true
scores (the prior is normal), and the search tasks (a multi-task score is one number per seed here
as in the race). The pool is drawn around the pilot's own: a new search offers other candidates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

DRAWS = 2000  # simulated races per plan
SCREEN = 200  # draws per plan when screening every plan; the best `KEPT` get `DRAWS`
KEPT = 40
MAX_KEPT = 400
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # candidates kept by a stage
SEEDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # a stage's validation seeds
MAX_STAGES = 3  # a 4th stage multiplies the plans by ~10 and bought < 1 MC SE on the pilots tried
SPREAD_ALPHA = 0.05  # the F test's level for "the entrants differ at all"

Plan = tuple[tuple[int, int], ...]  # (candidates, seeds) per stage, as `--race` spells it


def plan_text(plan: Plan) -> str:
    """((32, 2), (8, 4)) -> "32x2,8x4", the `--race` argument."""
    return ",".join(f"{n}x{s}" for n, s in plan)


def plan_cost(plan: Plan) -> int:
    """Candidate-seed trainings of a plan's validation stages (each at every lr and horizon, so
    the same factor for every plan of one run)."""
    return sum(n * s for n, s in plan)


@dataclass
class Pilot:
    """What a stored race measured (module docstring, steps 1-3)."""

    candidates: tuple[str, ...]  # the first stage's entrants
    mean: np.ndarray  # posterior mean of their true scores, log units relative to the prior mean
    cov: np.ndarray  # its covariance (zero when the spread is)
    seeds: np.ndarray  # how many validation seeds each ran
    residuals: np.ndarray  # pooled, variance-scaled within-block residuals
    sigma_within: float  # one seed's noise (log units)
    sigma_between: float  # the spread of the true scores (log units)
    spread_ratio: float  # the first block's variance of candidate means / what noise alone gives
    spread_p: float  # the F test's p-value for no spread at all
    blocks: list[dict] = field(default_factory=list)  # per stage block: candidates, seeds, its sigma

    @property
    def separable(self) -> bool:
        """Do the entrants differ beyond the noise (module docstring, step 2)?"""
        return self.spread_p < SPREAD_ALPHA and self.sigma_between > 0


def block_residuals(x: np.ndarray) -> np.ndarray:
    """The residuals of a full (candidates x seeds) table after the candidate and seed means, each
    scaled so that its mean square estimates the per-seed variance; empty below 2 x 2."""
    n, s = x.shape
    if n < 2 or s < 2:
        return np.zeros(0)
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    return (r * math.sqrt(n * s / ((n - 1) * (s - 1)))).ravel()


def posterior(x: np.ndarray, seen: np.ndarray, sw2: float, m: float, sb2: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate effects of the additive model on the observed cells of `x`: the least-squares
    ones (minimum norm: the origin is arbitrary), and the Gaussian posterior's mean and covariance
    under mu ~ N(m, sb2) each, flat seed effects and N(0, sw2) noise (sb2 = 0: all equal to m)."""
    n, s = x.shape
    rows, cols = np.nonzero(seen)
    design = np.zeros((rows.size, n + s))
    design[np.arange(rows.size), rows] = 1.0
    design[np.arange(rows.size), n + cols] = 1.0
    y = x[rows, cols]
    fitted = np.linalg.lstsq(design, y, rcond=None)[0][:n]
    if sb2 <= 0:
        return fitted - fitted.mean(), np.full(n, m), np.zeros((n, n))
    precision = design.T @ design / sw2
    precision[np.arange(n), np.arange(n)] += 1 / sb2
    precision[np.arange(n, n + s), np.arange(n, n + s)] += 1e-9  # flat, but solvable
    rhs = design.T @ y / sw2
    rhs[:n] += m / sb2
    cov = np.linalg.inv(precision)
    return fitted - fitted.mean(), (cov @ rhs)[:n], (cov[:n, :n] + cov[:n, :n].T) / 2


def fit_pilot(table: Mapping[str, Mapping[int, float]], blocks: Sequence[tuple[Sequence[str], Sequence[int]]]
              ) -> Pilot:
    """The pilot of per-seed scores `table` (candidate -> seed -> log score) whose stages ran
    `blocks` (entrants, seeds) each, the first block holding every candidate; a ValueError when
    no block has 2 candidates on 2 seeds (no noise to measure) or a score is not finite."""
    names = tuple(table)
    seeds = sorted({s for row in table.values() for s in row})
    col = {s: j for j, s in enumerate(seeds)}
    x = np.zeros((len(names), len(seeds)))
    seen = np.zeros_like(x, dtype=bool)
    for i, n in enumerate(names):
        for s, v in table[n].items():
            if not math.isfinite(v):
                raise ValueError(f"candidate {n}: its score on seed {s} is not finite")
            x[i, col[s]], seen[i, col[s]] = v, True
    row = {n: i for i, n in enumerate(names)}
    if not blocks or set(blocks[0][0]) != set(names) or not all(seen[row[n], col[s]] for n in names
                                                                  for s in blocks[0][1]):
        raise ValueError("the pilot's first block must hold every candidate on every one of its seeds")
    pooled, info, df, rss = [], [], 0, 0.0
    for entrants, block in blocks:
        sub = x[np.ix_([row[n] for n in entrants], [col[s] for s in block])]
        r = block_residuals(sub)
        pooled.append(r)
        if r.size:
            k = (len(entrants) - 1) * (len(block) - 1)
            df, rss = df + k, rss + float(np.mean(r ** 2)) * k  # each block's unbiased variance, by its df
        info.append({"candidates": len(entrants), "seeds": len(block),
                     "sigma_within": float(np.sqrt(np.mean(r ** 2))) if r.size else None})
    residuals = np.concatenate(pooled)
    if residuals.size == 0:
        raise ValueError("no stage of the pilot has 2 candidates on 2 seeds: its noise cannot be measured")
    sw2 = rss / df  # the pooled residual variance: what the F test's denominator, on df degrees, is
    first = x[np.ix_([row[n] for n in blocks[0][0]], [col[s] for s in blocks[0][1]])].mean(1)
    s1 = len(blocks[0][1])
    spread = float(np.var(first, ddof=1)) if first.size > 1 else 0.0
    ratio = spread / (sw2 / s1) if sw2 > 0 else math.inf
    p = float(stats.f.sf(ratio, first.size - 1, df)) if first.size > 1 and math.isfinite(ratio) else 0.0
    sb2 = max(spread - sw2 / s1, 0.0)
    m = float(first.mean())
    _, mean, cov = posterior(x, seen, sw2, m, sb2)
    return Pilot(names, mean - m, cov, seen.sum(1).astype(int), residuals, math.sqrt(sw2), math.sqrt(sb2),
                 ratio, p, info)


# ------------------------------------------------------------------------------- simulating


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _counter(seed: int, *keys: np.ndarray) -> np.ndarray:
    """A uint64 per combination of `keys` (broadcast), the same whatever else is drawn."""
    h = _mix(np.full(1, seed, dtype=np.uint64))
    for k in keys:
        h = _mix(h ^ k.astype(np.uint64))
    return h


@dataclass(eq=False)  # one per simulated plan, told apart by identity
class Simulated:
    plan: Plan
    regret: float  # mean over draws, log units
    regret_se: float  # its Monte-Carlo standard error
    p_best: float  # P(the champion is the best entrant)
    p_best_final: float  # P(the best entrant reaches the last stage)
    per_draw: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # regret of each draw

    @property
    def cost(self) -> int:
        return plan_cost(self.plan)

    def json(self) -> dict:
        return {"race": plan_text(self.plan), "validation_seeds": sum(s for _, s in self.plan), "cost": self.cost,
                "regret": self.regret, "regret_se": self.regret_se, "worse_than_best": math.expm1(self.regret),
                "p_best": self.p_best, "p_best_final": self.p_best_final}


def true_scores(mean: np.ndarray, cov: np.ndarray | None, draws: int, seed: int) -> np.ndarray:
    """(draws, candidates) true scores from N(mean, cov); `mean` itself in every draw if cov is None."""
    if cov is None or not np.any(cov):
        return np.broadcast_to(mean, (draws, mean.size)).copy()
    w, v = np.linalg.eigh(cov)
    root = v * np.sqrt(np.clip(w, 0, None))
    return mean + np.random.default_rng(seed).standard_normal((draws, mean.size)) @ root.T


def simulate_draws(truth: np.ndarray, residuals: np.ndarray, plan: Plan, seed: int = 0, rule: str = "race"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A simulated race of `plan` per row of `truth` (draws x candidates; module docstring, step
    4): per draw the champion's regret, whether it is the best, whether the best reached the last
    stage. `rule` "race": the champion as the race chooses it (within one SE of the last block's
    best, the one of least complexity rank); "best": the last block's best."""
    draws, entrants = truth.shape
    if not plan or plan[0][0] != entrants:
        raise ValueError(f"a plan's first stage takes every entrant ({entrants}), got {plan_text(plan)}")
    if any(b[0] > a[0] for a, b in zip(plan, plan[1:])) or any(n < 1 or s < 1 for n, s in plan):
        raise ValueError(f"a plan's stages keep at most the candidates of the stage before: {plan_text(plan)}")
    d = np.arange(draws)[:, None, None]
    alive = np.broadcast_to(np.arange(entrants), (draws, entrants))
    total = np.zeros((draws, entrants))
    count, offset = 0, 0
    per_seed = np.zeros((draws, entrants, 1))
    for k, (n, s) in enumerate(plan):
        if k:
            order = np.argsort(total / count, axis=1, kind="stable")[:, :n]
            alive = np.take_along_axis(alive, order, 1)
            total = np.take_along_axis(total, order, 1)
        j = np.arange(offset, offset + s)[None, None, :]
        noise = residuals[_counter(seed, d, alive[:, :, None], j) % np.uint64(residuals.size)]
        per_seed = np.take_along_axis(truth, alive, 1)[:, :, None] + noise
        total = total + per_seed.sum(2)
        count, offset = count + s, offset + s
    block = per_seed.mean(2)
    lead = np.argmin(block, axis=1)
    if rule == "best":
        pick = lead
    else:
        if per_seed.shape[2] < 2:  # no noise estimate: the race counts every finalist within it
            within = np.ones(block.shape, dtype=bool)
        else:
            diff = per_seed - np.take_along_axis(per_seed, lead[:, None, None], 1)
            se = diff.std(axis=2, ddof=1) / math.sqrt(per_seed.shape[2])
            within = diff.mean(2) <= se  # the lead itself: 0 <= 0
        # the simplest of them: a complexity rank per (draw, candidate), unrelated to its quality and
        # the same in every plan, as a candidate's effective nodes are
        rank = _counter(seed, d[:, :, 0], alive, np.array(2**33))
        pick = np.argmin(np.where(within, rank, np.iinfo(np.uint64).max), axis=1)
    champ = alive[np.arange(draws), pick]
    best = np.argmin(truth, axis=1)
    rows = np.arange(draws)
    return truth[rows, champ] - truth[rows, best], champ == best, (alive == best[:, None]).any(1)


def simulate(pilot: Pilot, plan: Plan, draws: int = DRAWS, seed: int = 0, rule: str = "race") -> Simulated:
    truth = true_scores(pilot.mean, pilot.cov, draws, seed)
    return simulate_truth(truth, pilot.residuals, plan, seed, rule)


def simulate_truth(truth: np.ndarray, residuals: np.ndarray, plan: Plan, seed: int = 0, rule: str = "race"
                   ) -> Simulated:
    regret, chosen, final = simulate_draws(truth, residuals, plan, seed, rule)
    n = regret.size
    return Simulated(plan, float(regret.mean()), float(regret.std(ddof=1) / math.sqrt(n)), float(chosen.mean()),
                     float(final.mean()), regret)


def plans(first: int, budget: int, max_stages: int = MAX_STAGES) -> Iterator[Plan]:
    """Every plan whose first stage takes all `first` entrants, later stages fewer candidates from
    `SIZES`, seeds from `SEEDS` never fewer than the stage before, at least 2 candidates and 2
    seeds in the last stage (the champion rule compares finalists on a noise estimate), at most
    `budget` candidate-seed trainings and at least half of them (a plan that leaves half the budget
    unspent is not what was asked for)."""
    sizes = [n for n in SIZES if n < first]

    def more(plan: Plan, cost: int) -> Iterator[Plan]:
        if eligible(plan, budget):
            yield plan
        if len(plan) == max_stages:
            return
        n0, s0 = plan[-1]
        for n in (m for m in sizes if m < n0):
            for s in (t for t in SEEDS if t >= s0):
                if cost + n * s > budget:
                    break
                yield from more((*plan, (n, s)), cost + n * s)

    for s in SEEDS:
        if first * s > budget:
            break
        yield from more(((first, s),), first * s)


def eligible(plan: Plan, budget: int) -> bool:
    """A plan that may be proposed: half to all of the budget, 2 candidates on 2 seeds at the end."""
    return min(plan[-1]) >= 2 and budget <= 2 * plan_cost(plan) <= 2 * budget


def propose(pilot: Pilot, budget: int, draws: int = DRAWS, seed: int = 0, also: Sequence[Plan] = ()) -> list[Simulated]:
    """Every plan of `plans` for the pilot's entrants within `budget`, screened on `SCREEN` draws;
    the best `KEPT` of them, every other within two paired standard errors of the screen's best (up
    to `MAX_KEPT`: a screen that cannot tell them apart does not drop them) and the plans `also`
    (e.g. the pilot's own, whatever its cost) simulated again on `draws` draws, all on the same
    true scores and residuals; best (least regret, then cheapest, then fewest stages) first."""
    entrants = len(pilot.candidates)
    screen = true_scores(pilot.mean, pilot.cov, min(SCREEN, draws), seed + 1)
    scored = sorted((simulate_truth(screen, pilot.residuals, p, seed + 1) for p in plans(entrants, budget)),
                    key=lambda r: (r.regret, r.cost, len(r.plan)))
    if not scored:
        raise ValueError(f"no plan fits a budget of {budget} candidate-seed trainings for {entrants} entrants (each "
                         "spends at least half of it and needs 2 candidates on 2 seeds in its last stage)")
    top = scored[0].per_draw
    close = [r.plan for r in scored[KEPT:] if _paired(r.per_draw, top) <= 2][: MAX_KEPT - KEPT]
    kept = list(dict.fromkeys([r.plan for r in scored[:KEPT]] + close + list(also)))
    truth = true_scores(pilot.mean, pilot.cov, draws, seed)
    out = [simulate_truth(truth, pilot.residuals, p, seed) for p in kept]
    return sorted(out, key=lambda r: (r.regret, r.cost, len(r.plan)))


def recommend(ranked: Sequence[Simulated], budget: int) -> Simulated:
    """Among the plans within the budget (half of it to all of it), the cheapest (then the fewest
    stages) whose regret exceeds the best's by at most one standard error of their paired
    difference: a plan that only sampling noise ranks above a cheaper one does not earn its extra
    trainings."""
    fit = [r for r in ranked if eligible(r.plan, budget)]
    if not fit:
        raise ValueError(f"no simulated plan spends half to all of {budget} candidate-seed trainings")
    best = min(fit, key=lambda r: (r.regret, r.cost, len(r.plan)))

    close = [r for r in fit if r is best or _paired(r.per_draw, best.per_draw) <= 1]
    return min(close, key=lambda r: (r.cost, len(r.plan), r.regret))


def _paired(a: np.ndarray, b: np.ndarray) -> float:
    """How many standard errors of the paired difference the mean regret `a` is above `b`'s."""
    d = a - b
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return float(d.mean()) / se if se > 0 else (0.0 if float(d.mean()) <= 0 else math.inf)
