"""Race stage sizes from a pilot (`nos.search.race_sizing`, issue 16 part 1): the noise and spread
estimates against seeded synthetic tables of known variance, the simulated race against the closed
form of a two-candidate race and against brute force, the plan enumeration against an independent
one, and the proposal's rule. The command (`nos calibrate --race`) on a real race: test_race."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from nos.search.race_sizing import (
    SEEDS,
    SIZES,
    Simulated,
    _additive_fit,
    block_residuals,
    fit_pilot,
    plan_cost,
    plan_text,
    plans,
    propose,
    recommend,
    simulate,
    simulate_draws,
)


def test_block_residuals_estimate_the_variance() -> None:
    """Candidate and seed effects cancel; the scaled residuals' mean square is sigma^2 (the
    two-way ANOVA's unbiased error variance), checked over many seeded tables."""
    rng = np.random.default_rng(0)
    ms = []
    for _ in range(200):
        x = rng.normal(size=(6, 3)) * 0.3 + rng.normal(size=(6, 1)) * 5 + rng.normal(size=(1, 3)) * 5
        r = block_residuals(x)
        assert r.shape == (18,) and abs(r.sum()) < 1e-9
        ms.append(np.mean(r ** 2))
    assert np.mean(ms) == pytest.approx(0.09, rel=0.05)
    assert block_residuals(np.ones((1, 5))).size == 0 and block_residuals(np.ones((5, 1))).size == 0


def test_additive_fit_recovers_exact_effects_of_an_unbalanced_table() -> None:
    """Noise-free candidate + seed effects on a race-shaped table (the better candidates on more
    seeds, the later seeds easier): the fit returns them exactly (up to the seed effects' mean)."""
    mu = np.array([0.0, 0.5, 1.0, 2.0, 3.0, -1.0])
    beta = np.array([0.3, -0.2, -3.0, -3.0, 0.4])
    x = mu[:, None] + beta[None, :]
    seen = np.zeros_like(x, dtype=bool)
    seen[:, :2] = True  # stage 1: everyone on 2 seeds
    seen[[0, 1, 4, 5], 2:4] = True  # stage 2: four of them on 2 more (and easy) seeds
    seen[[0, 5], 4] = True  # stage 3
    got_mu, got_beta = _additive_fit(np.where(seen, x, np.nan), seen)
    shift = beta.mean()
    assert got_mu == pytest.approx(mu + shift, abs=1e-9)
    assert got_beta == pytest.approx(beta - shift, abs=1e-9)
    # a plain row mean flatters candidate 4, which ran the two easy seeds, past candidate 3 (1.525
    # against 2.05): the fit's ranking is the true one, the row means' is not
    row_means = np.nanmean(np.where(seen, x, np.nan), axis=1)
    assert list(np.argsort(got_mu)) == list(np.argsort(mu))
    assert list(np.argsort(row_means)) != list(np.argsort(mu))


def _synthetic(rng: np.random.Generator, n: int, sw: float, sb: float) -> tuple[dict, list]:
    """A pilot table of a race n x 4, n/4 x 8, 4 x 16 on true scores N(0, sb^2) plus seed effects
    plus N(0, sw^2) noise, advancing by the running mean (as a race does)."""
    truth = rng.normal(size=n) * sb
    names = [f"#{i}" for i in range(n)]
    table: dict[str, dict[int, float]] = {m: {} for m in names}
    blocks, alive, seed = [], list(range(n)), 0
    for keep, s in ((n, 4), (n // 4, 8), (4, 16)):
        if keep < len(alive):
            alive = sorted(alive, key=lambda i: np.mean(list(table[names[i]].values())))[:keep]
        seeds = list(range(seed, seed + s))
        effect = rng.normal(size=s)
        for i in alive:
            for j, sd in enumerate(seeds):
                table[names[i]][sd] = truth[i] + effect[j] + rng.normal() * sw
        blocks.append(([names[i] for i in alive], seeds))
        seed += s
    return table, blocks


def test_fit_pilot_recovers_noise_and_spread() -> None:
    rng = np.random.default_rng(1)
    sws, sbs = [], []
    for _ in range(20):
        table, blocks = _synthetic(rng, 200, sw=0.8, sb=0.3)
        p = fit_pilot(table, blocks)
        assert len(p.candidates) == 200 and sorted(p.seeds.tolist())[-1] == 28  # 4 + 8 + 16
        assert [b["candidates"] for b in p.blocks] == [200, 50, 4]
        sws.append(p.sigma_within)
        sbs.append(p.sigma_between)
        # shrinking pulls towards the mean, more where a candidate ran fewer seeds
        pull = np.abs(p.truth) / np.maximum(np.abs(p.fitted), 1e-12)
        assert np.all(pull <= 1 + 1e-12)
        assert np.mean(pull[p.seeds == 4]) < np.mean(pull[p.seeds == 28])
    assert np.mean(sws) == pytest.approx(0.8, rel=0.03)
    assert np.mean(sbs) == pytest.approx(0.3, rel=0.15)


def test_a_pilot_of_indistinguishable_candidates_says_so() -> None:
    """No true spread: the fitted scores spread as noise alone would (ratio ~1), and where the
    spread falls below the noise the true scores are all equal, so every plan's regret is 0."""
    rng = np.random.default_rng(9)
    ratios, flat = [], 0
    for _ in range(30):
        p = fit_pilot(*_synthetic(rng, 64, sw=0.7, sb=0.0))
        ratios.append(p.spread_ratio)
        if p.spread_ratio <= 1:
            flat += 1
            assert p.sigma_between == 0 and np.ptp(p.truth) == 0
            assert simulate(p.truth, p.residuals, ((64, 2), (4, 4)), draws=200).regret == 0
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.15) and flat >= 5
    assert fit_pilot(*_synthetic(rng, 64, sw=0.7, sb=0.5)).spread_ratio > 2


def test_fit_pilot_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(ValueError, match="noise cannot be measured"):
        fit_pilot({"#1": {0: 1.0}, "#2": {0: 2.0}}, [(["#1", "#2"], [0])])
    with pytest.raises(ValueError, match="not finite"):
        fit_pilot({"#1": {0: 1.0, 1: math.inf}, "#2": {0: 2.0, 1: 1.0}}, [(["#1", "#2"], [0, 1])])


def test_two_candidates_match_the_closed_form() -> None:
    """Two candidates Delta apart on s seeds of N(0, sigma^2) noise: the better one wins with
    probability Phi(Delta / (sigma sqrt(2 / s))), and the regret is Delta times the miss."""
    normal = np.random.default_rng(2).normal(size=200_000)
    for delta, s in ((0.5, 4), (0.2, 2), (1.0, 1 + 1)):
        p = float(sps.norm.cdf(delta / math.sqrt(2 / s)))
        got = simulate(np.array([0.0, delta]), normal, ((2, s),), draws=40_000, seed=3)
        assert got.p_best == pytest.approx(p, abs=0.01)
        assert got.regret == pytest.approx(delta * (1 - p), abs=0.01)
        assert got.p_best_final == 1.0


def test_no_noise_always_chooses_the_best_and_pure_noise_any() -> None:
    truth = np.random.default_rng(4).normal(size=16)
    for plan in (((16, 2),), ((16, 1), (4, 2)), ((16, 2), (8, 2), (2, 4))):
        exact = simulate(truth, np.zeros(10), plan, draws=500)
        assert (exact.regret, exact.p_best, exact.p_best_final) == (0.0, 1.0, 1.0)
    # noise a thousand times the spread: every entrant equally likely, the best with 1/16
    loud = simulate(truth, np.random.default_rng(5).normal(size=10_000) * 1e3, ((16, 2), (4, 2)), draws=20_000)
    assert loud.p_best == pytest.approx(1 / 16, abs=0.01) and loud.p_best_final == pytest.approx(4 / 16, abs=0.015)
    assert loud.regret == pytest.approx(float(np.mean(truth - truth.min())), rel=0.05)


def test_simulated_race_is_the_brute_force_one() -> None:
    """The vectorised simulation against a plain loop over the same draws: a race of three stages
    ranking by the running mean and choosing on the last block alone."""
    rng = np.random.default_rng(6)
    truth, res, plan = rng.normal(size=10), rng.standard_t(3, size=50), ((10, 2), (5, 3), (2, 4))
    regret, chosen, final = simulate_draws(truth, res, plan, draws=300, seed=7)
    # the same stream, replayed draw by draw in the order the vectorised code consumes it
    replay = np.random.default_rng(7)
    idx = [replay.integers(0, res.size, size=(300, n, s)) for n, s in plan]
    for d in range(300):
        alive, total, count = list(range(10)), dict.fromkeys(range(10), 0.0), 0
        for k, (n, s) in enumerate(plan):
            if k:
                alive = sorted(alive, key=lambda i: total[i] / count)[:n]
            block = {i: truth[i] * s + res[idx[k][d, j]].sum() for j, i in enumerate(alive)}
            for i in alive:
                total[i] += block[i]
            count += s
        champ = min(alive, key=lambda i: block[i])
        assert regret[d] == pytest.approx(truth[champ] - truth.min(), abs=1e-12)
        assert chosen[d] == (champ == int(np.argmin(truth))) and final[d] == (int(np.argmin(truth)) in alive)


def test_a_bad_plan_is_refused() -> None:
    with pytest.raises(ValueError, match="takes every entrant"):
        simulate(np.zeros(4), np.zeros(3), ((3, 2),))
    with pytest.raises(ValueError, match="at most the candidates"):
        simulate(np.zeros(4), np.zeros(3), ((4, 2), (5, 2)))


def test_plans_are_every_plan_within_the_budget() -> None:
    """Against an independent enumeration: every sequence of up to 3 stages over the grids that
    spends half the budget to all of it."""
    first, budget = 12, 80
    want = set()
    for k in range(1, 4):
        for ns in itertools.combinations(sorted((n for n in SIZES if n < first), reverse=True), k - 1):
            for ss in itertools.product(SEEDS, repeat=k):
                plan = tuple(zip((first, *ns), ss))
                if list(ss) == sorted(ss) and ss[-1] >= 2 and budget / 2 <= plan_cost(plan) <= budget:
                    want.add(plan)
    got = list(plans(first, budget))
    assert len(got) == len(set(got)) and set(got) == want and len(want) > 50
    assert plan_text(((32, 2), (8, 4), (3, 10))) == "32x2,8x4,3x10" and plan_cost(((32, 2), (8, 4), (3, 10))) == 126


def test_propose_ranks_and_recommends_within_noise() -> None:
    table, blocks = _synthetic(np.random.default_rng(8), 24, sw=0.6, sb=0.3)
    pilot = fit_pilot(table, blocks)
    own = ((24, 2), (6, 4), (2, 10))
    ranked = propose(pilot, 120, draws=1000, seed=0, also=[own])
    assert ranked == sorted(ranked, key=lambda r: (r.regret, r.cost, len(r.plan)))
    assert all(r.cost <= 120 and r.plan[0][0] == 24 for r in ranked) and any(r.plan == own for r in ranked)
    pick = recommend(ranked)
    assert pick.regret <= ranked[0].regret + ranked[0].regret_se and pick.cost <= ranked[0].cost
    again = propose(pilot, 120, draws=1000, seed=0, also=[own])
    assert [(r.plan, r.regret) for r in again] == [(r.plan, r.regret) for r in ranked]  # seeded
    # more budget buys a better race: the best of 600 beats the best of 60 beyond the noise
    cheap, rich = propose(pilot, 60, draws=1000)[0], propose(pilot, 600, draws=1000)[0]
    assert rich.regret + 3 * rich.regret_se < cheap.regret - 3 * cheap.regret_se
    with pytest.raises(ValueError, match="no plan fits"):
        propose(pilot, 20)  # 24 entrants on one seed are already 24


def test_recommend_prefers_the_cheaper_plan_within_noise() -> None:
    a = Simulated(((8, 4),), 0.100, 0.01, 0.5, 1.0)
    b = Simulated(((8, 2), (2, 4)), 0.105, 0.01, 0.5, 0.8)
    c = Simulated(((8, 1), (2, 2)), 0.200, 0.01, 0.3, 0.6)
    assert recommend([a, b, c]) is b  # within a's SE and 8 cheaper; c is not within it
    assert recommend([a, Simulated(((8, 2),), 0.2, 0.01, 0.3, 1.0)]) is a
