"""Sizing a racing funnel from a pilot: how many candidates each stage keeps and on how many
validation seeds, set by measurement (`nos calibrate --race RUN`) rather than by a default.

A stored race (`nos.search.race`) is a pilot: every first-stage entrant has a score on each
validation seed it ran (`race.seed_scores`, log units), the better ones on more seeds. From it:

1. **the noise**: within each stage's block (its entrants x its seeds, a full table) the
   residuals of the additive fit candidate + seed are what ranking within a stage cannot cancel;
   pooled over blocks (each scaled by sqrt(n s / ((n - 1)(s - 1))) so that its mean square is the
   variance), `sigma_within` is one seed's noise, and the pooled residuals themselves are what the
   simulation draws from (their heavy tails included);
2. **the candidates' true scores**: the additive fit over every seed each entrant ran (seed effects
   shared, so a candidate that ran the easy block is not flattered), shrunk towards the mean by the
   normal-normal factor sigma_between^2 / (sigma_between^2 + sigma_within^2 / seeds), with
   sigma_between^2 the variance of the first block's candidate means less their noise (method of
   moments; the first block, because no entrant was selected on it yet) -- a candidate eliminated
   after two seeds is pulled in more than a finalist measured on sixteen;
3. **a simulated race per plan** (parametric bootstrap): stage 1 takes every entrant; each stage
   draws each survivor's per-seed scores as its true score plus residuals drawn with replacement,
   ranks by the mean over every seed so far and keeps the best n of the next stage; the champion is
   the best of the last block alone. The plan's *regret* is the champion's true score above the
   best entrant's (log units: exp(regret) - 1 is how much worse the chosen optimizer is on
   validation than the best one the search had offered), averaged over draws, with P(the best is
   chosen) and P(the best reaches the last stage);
4. **a proposal**: every plan of 1-3 stages with n and s from a grid, s never decreasing, from half
   the budget to all of it in candidate-seed trainings (default: the pilot's own), screened on a few draws, the
   best few simulated on many and ranked by regret (the same random stream for each plan, so that
   their differences are not sampling noise alone); the recommendation is the cheapest plan within
   one Monte-Carlo standard error of the best.

What it leaves out, as the simulation's limits: the lr each candidate's score is chosen at is
taken as fixed (choosing it on few seeds flatters a candidate a little more than the simulation
says), the race's one-per-cluster rule and its simplicity rule for the champion (near-copies share
a true score, so regret ignores them), and the search tasks (a multi-task score is one number per
seed here as in the race). A finalist's fitted score includes the seeds it was selected on, which
flatters it a little (the winner's curse): the best entrants look further ahead than they are, so
the regrets are, if anything, optimistic. The true scores are the pilot's own pool: a new search
offers other candidates, drawn from much the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

DRAWS = 2000  # simulated races per plan: regret's Monte-Carlo SE is ~2% of its spread
SCREEN = 200  # draws per plan when screening every plan; the best `KEPT` get `DRAWS`
KEPT = 40
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # candidates kept by a stage
SEEDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # a stage's validation seeds
MAX_STAGES = 3  # a 4th stage multiplies the plans by ~10 and bought < 1 MC SE on the pilots tried

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
    """What a stored race measured (module docstring, steps 1 and 2)."""

    candidates: tuple[str, ...]  # the first stage's entrants
    truth: np.ndarray  # their shrunk true scores, log units relative to the mean (lower is better)
    fitted: np.ndarray  # their additive-fit scores before shrinking
    seeds: np.ndarray  # how many validation seeds each ran
    residuals: np.ndarray  # pooled, variance-scaled within-block residuals
    sigma_within: float  # one seed's noise (log units)
    sigma_between: float  # the spread of the true scores (log units)
    # the first block's variance of candidate means / what noise alone would give it: <= 1, the
    # pilot cannot tell its entrants apart
    # (sigma_between is then 0, every plan's regret 0: the race chose by chance)
    spread_ratio: float
    blocks: list[dict] = field(default_factory=list)  # per stage block: candidates, seeds, its sigma


def _additive_fit(x: np.ndarray, seen: np.ndarray, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares candidate + seed effects of a table with missing cells (`seen` False), by
    alternating means (each step can only lower the squared error; the table is connected, as
    every candidate ran the first block). Seed effects sum to zero."""
    mu = np.where(seen, x, 0).sum(1) / seen.sum(1)
    beta = np.zeros(x.shape[1])
    for _ in range(iters):
        beta = np.where(seen, x - mu[:, None], 0).sum(0) / np.maximum(seen.sum(0), 1)
        beta -= beta[seen.any(0)].mean()
        new = np.where(seen, x - beta[None, :], 0).sum(1) / seen.sum(1)
        if np.allclose(new, mu, rtol=0, atol=1e-12):
            mu = new
            break
        mu = new
    return mu, beta


def block_residuals(x: np.ndarray) -> np.ndarray:
    """The residuals of a full (candidates x seeds) table after the candidate and seed means, each
    scaled so that its mean square estimates the per-seed variance; empty below 2 x 2."""
    n, s = x.shape
    if n < 2 or s < 2:
        return np.zeros(0)
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    return (r * math.sqrt(n * s / ((n - 1) * (s - 1)))).ravel()


def fit_pilot(table: Mapping[str, Mapping[int, float]], blocks: Sequence[tuple[Sequence[str], Sequence[int]]]
              ) -> Pilot:
    """The pilot of per-seed scores `table` (candidate -> seed -> log score) whose stages ran
    `blocks` (entrants, seeds) each; a ValueError when no block has 2 candidates on 2 seeds (no
    noise to measure) or a score is not finite."""
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
    if not seen.any(1).all():
        raise ValueError("a candidate of the pilot has no score")
    pooled, info = [], []
    row = {n: i for i, n in enumerate(names)}
    for entrants, block in blocks:
        sub = x[np.ix_([row[n] for n in entrants], [col[s] for s in block])]
        r = block_residuals(sub)
        pooled.append(r)
        info.append({"candidates": len(entrants), "seeds": len(block),
                     "sigma_within": float(np.sqrt(np.mean(r ** 2))) if r.size else None})
    residuals = np.concatenate(pooled) if pooled else np.zeros(0)
    if residuals.size == 0:
        raise ValueError("no stage of the pilot has 2 candidates on 2 seeds: its noise cannot be measured")
    sw2 = float(np.mean(residuals ** 2))
    mu, _ = _additive_fit(x, seen)
    k = seen.sum(1).astype(float)
    # the spread from the first block alone: every entrant on the same seeds, none selected yet
    # (the later blocks hold the candidates chosen for doing well, whose scores flatter them)
    first = x[np.ix_([row[n] for n in blocks[0][0]], [col[s] for s in blocks[0][1]])] if blocks else x[:, :0]
    spread = float(np.var(first.mean(1), ddof=1)) if first.shape[0] > 1 and first.shape[1] else 0.0
    noise = sw2 / max(first.shape[1], 1)
    sb2 = max(spread - noise, 0.0)
    m = float(mu.mean())
    truth = m + (mu - m) * sb2 / (sb2 + sw2 / k) if sw2 > 0 else mu
    return Pilot(names, truth - m, mu - m, k.astype(int), residuals, math.sqrt(sw2), math.sqrt(sb2),
                 spread / noise if noise > 0 else math.inf, info)


@dataclass(eq=False)  # one per simulated plan, told apart by identity
class Simulated:
    plan: Plan
    regret: float  # mean over draws, log units
    regret_se: float  # its Monte-Carlo standard error
    p_best: float  # P(the champion is the best entrant)
    p_best_final: float  # P(the best entrant reaches the last stage)

    @property
    def cost(self) -> int:
        return plan_cost(self.plan)

    def json(self) -> dict:
        return {"race": plan_text(self.plan), "validation_seeds": sum(s for _, s in self.plan), "cost": self.cost,
                "regret": self.regret, "regret_se": self.regret_se, "worse_than_best": math.expm1(self.regret),
                "p_best": self.p_best, "p_best_final": self.p_best_final}


def simulate_draws(truth: np.ndarray, residuals: np.ndarray, plan: Plan, draws: int = DRAWS, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`draws` simulated races of `plan` over candidates of true scores `truth` (module docstring,
    step 3): per draw the champion's regret, whether it is the best, whether the best reached the
    last stage."""
    if not plan or plan[0][0] != len(truth):
        raise ValueError(f"a plan's first stage takes every entrant ({len(truth)}), got {plan_text(plan)}")
    if any(b[0] > a[0] for a, b in zip(plan, plan[1:])) or any(n < 1 or s < 1 for n, s in plan):
        raise ValueError(f"a plan's stages keep at most the candidates of the stage before: {plan_text(plan)}")
    rng = np.random.default_rng(seed)
    best = int(np.argmin(truth))
    alive = np.broadcast_to(np.arange(len(truth)), (draws, len(truth)))
    total = np.zeros((draws, len(truth)))
    count = 0
    block = total
    for k, (n, s) in enumerate(plan):
        if k:
            order = np.argsort(total / count, axis=1, kind="stable")[:, :n]
            alive = np.take_along_axis(alive, order, 1)
            total = np.take_along_axis(total, order, 1)
        noise = residuals[rng.integers(0, residuals.size, size=(draws, alive.shape[1], s))].sum(2)
        block = truth[alive] * s + noise
        total = total + block
        count += s
    champ = np.take_along_axis(alive, np.argmin(block, axis=1)[:, None], 1)[:, 0]
    return truth[champ] - truth[best], champ == best, (alive == best).any(1)


def simulate(truth: np.ndarray, residuals: np.ndarray, plan: Plan, draws: int = DRAWS, seed: int = 0) -> Simulated:
    regret, chosen, final = simulate_draws(truth, residuals, plan, draws, seed)
    return Simulated(plan, float(regret.mean()), float(regret.std(ddof=1) / math.sqrt(draws)), float(chosen.mean()),
                     float(final.mean()))


def plans(first: int, budget: int, max_stages: int = MAX_STAGES) -> Iterator[Plan]:
    """Every plan whose first stage takes all `first` entrants, later stages fewer candidates from
    `SIZES`, seeds from `SEEDS` never fewer than the stage before, at least 2 seeds in the last
    stage (the champion rule needs a noise estimate), at most `budget` candidate-seed trainings and
    at least half of them (a plan that leaves half the budget unspent is not what was asked for)."""
    sizes = [n for n in SIZES if n < first]

    def more(plan: Plan, cost: int) -> Iterator[Plan]:
        if plan[-1][1] >= 2 and 2 * cost >= budget:
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


def propose(pilot: Pilot, budget: int, draws: int = DRAWS, seed: int = 0, also: Sequence[Plan] = ()) -> list[Simulated]:
    """Every plan of `plans` for the pilot's entrants within `budget`, screened on `SCREEN` draws;
    the best `KEPT` of them and the plans `also` (e.g. the pilot's own) simulated again on `draws`
    draws of one random stream each, best (least regret, then cheapest, then fewest stages) first."""
    screened = sorted(((simulate(pilot.truth, pilot.residuals, p, min(SCREEN, draws), seed + 1).regret, p)
                       for p in plans(len(pilot.truth), budget)), key=lambda t: (t[0], plan_cost(t[1]), len(t[1])))
    if not screened:
        raise ValueError(f"no plan fits a budget of {budget} candidate-seed trainings for {len(pilot.truth)} "
                         "entrants (each needs at least 2 seeds in its last stage)")
    kept = list(dict.fromkeys([p for _, p in screened[:KEPT]] + list(also)))
    out = [simulate(pilot.truth, pilot.residuals, p, draws, seed) for p in kept]
    return sorted(out, key=lambda r: (r.regret, r.cost, len(r.plan)))


def recommend(ranked: Sequence[Simulated]) -> Simulated:
    """The cheapest plan (then the fewest stages) whose regret is within one Monte-Carlo standard
    error of the best's: a plan that only sampling noise ranks above a cheaper one does not earn
    its extra trainings."""
    best = ranked[0]
    close = [r for r in ranked if r.regret <= best.regret + best.regret_se]
    return min(close, key=lambda r: (r.cost, len(r.plan), r.regret))
