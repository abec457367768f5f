"""`python -m nos.calibrate`: measure the choices behind the search defaults.

Evaluates N random genomes that pass the integrity check on several search seeds (the search
fitness: tuned-Adam-normalised geometric mean over the search horizons, best lr of the search
grid) and on held-out seeds, then reports:

- **search seeds**: Spearman rank correlation between the fitness on the first k search seeds
  and the fitness on the held-out seeds, for k = 1 .. K (how many seeds the fitness needs before
  it predicts new seeds);
- **fidelity**: for a cheap first stage on one search seed and the shortest search horizon,
  and promoted fractions 1/4, 1/3, 1/2, how often a candidate the full fitness would put in its
  top 10% is dropped by the cheap stage (promotion within random chunks of `--chunk` candidates,
  as in a search), and the cost of the cheap stage relative to the full fitness.

    python -m nos.calibrate --genomes 60 --format json

**Power from a pilot** (`--power RUN`: reads the database only, evaluates nothing): for a finished
run's funnel champion against each baseline at each horizon (of each task), the standard
deviation of the per-seed log loss ratios on the run's test seeds, the ratio those seeds detect
with 80% power, how many seeds detect a ratio of `--ratio` (or its inverse) with 80% power
(two-sided paired t test at level 0.05), and how many make the expected 95% interval of the ratio
span less than `--span` (high / low); see `nos.evaluation.stats`.

    python -m nos.calibrate --power RUN [--ratio 2] [--span 10] [--db runs/nos.sqlite] [--format json]

**Race stage sizes from a pilot** (`--race RUN`: reads the database only, evaluates nothing): the
stored race of RUN measures the noise of one validation seed, the spread of its candidates' true
scores (with an F test: a pilot that cannot tell its entrants apart gets no plan) and their
posterior; every plan of 1-3 stages spending half to all of `--budget` candidate-seed trainings
(default: RUN's own) is simulated on them, and the plans are ranked by the champion's expected
shortfall against the best entrant (`nos.search.race_sizing`). Prints the `--race` to use next.

    python -m nos.calibrate --race RUN [--budget N] [--draws 2000] [--db runs/nos.sqlite] [--format json]
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scipy import stats

from search_space.genome import Genome
from search_space.mutation import random_genome

from .engine import integrity
from .evaluation.fitness import (
    SEARCH_LRS,
    AdamReference,
    SearchSetup,
    TaskEvaluator,
    geometric_mean_ratio,
)
from .evaluation.protocol import horizon_text
from .evaluation.stats import ALPHA, CONFIDENCE, MAX_SEEDS, POWER, seeds_for, seeds_for_span
from .search.race_sizing import DRAWS
from .tasks.sine import DEFAULT_CACHE_DIR, SineConfig
from .ui.cli import (
    DEFAULT_DB,
    ArgumentParser,
    UsageError,
    add_device,
    add_format,
    bounded_int,
    db_arg,
    finite_float,
    print_json,
    render_table,
    resolve_device,
    run_command,
    run_ref,
)

if TYPE_CHECKING:
    from .evaluation.compare import Comparison

log = logging.getLogger("nos.calibrate")  # not __name__: it is __main__ under python -m
HORIZONS = (2.0, 10.0)
PROMOTE = (0.25, 1 / 3, 0.5)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--genomes", type=bounded_int(6, 10_000, "--genomes"), default=60, help="random genomes (60)")
    p.add_argument("--search-seeds", type=bounded_int(1, 20, "--search-seeds"), default=3, help="K (3)")
    p.add_argument("--heldout-seeds", type=bounded_int(1, 20, "--heldout-seeds"), default=3, help="(3)")
    p.add_argument("--chunk", type=bounded_int(2, 10_000, "--chunk"), default=12,
                   help="candidates judged together (promotion is within a chunk; 12)")
    p.add_argument("--seed", type=bounded_int(0, 2**31, "--seed"), default=0)
    p.add_argument("--sine-pretrain-steps", type=bounded_int(1, 1_000_000, "--sine-pretrain-steps"))
    p.add_argument("--sine-width", type=bounded_int(1, 4096, "--sine-width"))
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--power", metavar="RUN", type=run_ref,
                   help="power from a pilot: read RUN's test-seed comparison from --db (evaluates nothing)")
    p.add_argument("--ratio", type=finite_float(1, 1e12, "--ratio (> 1)", lo_open=True), default=2.0,
                   help="--power: the loss ratio (or its inverse) to detect with 80%% power (2)")
    p.add_argument("--span", type=finite_float(1, 1e12, "--span (> 1)", lo_open=True), default=10.0,
                   help="--power: the 95%% CI's width high / low to stay under (10)")
    p.add_argument("--race", metavar="RUN", type=run_ref,
                   help="race stage sizes from a pilot: read RUN's stored race from --db (evaluates nothing)")
    p.add_argument("--budget", type=bounded_int(2, 10_000_000, "--budget"),
                   help="--race: candidate-seed trainings of the validation stages (default: RUN's own)")
    p.add_argument("--draws", type=bounded_int(100, 1_000_000, "--draws"), default=DRAWS,
                   help=f"--race: simulated races per plan ({DRAWS})")
    p.add_argument("--db", type=db_arg, default=DEFAULT_DB, help=f"--power, --race: database path or URL ({DEFAULT_DB})")
    add_device(p)
    add_format(p)
    return p


MAX_TEST_SEEDS = 10_000  # what `nos evolve --test-seeds` takes
POWER_COLUMNS = ("task", "horizon", "baseline", "n", "gmean_ratio", "log_std", "detectable_ratio",
                 "seeds_for_ratio", "seeds_for_span")


def power_rows(cmp: Comparison, ratio: float, span: float) -> list[dict[str, Any]]:
    """The champion against each baseline at each horizon of each task (aggregates left out): the
    test seeds' count n, geometric-mean ratio, std of the per-seed log ratios, the ratio n seeds
    detect with 80% power, and the seeds that detect `ratio` / make the 95% CI span less than
    `span` (None: one test seed, or more than `MAX_SEEDS` needed)."""
    rows = []
    for v in cmp.versus:
        if v.candidate != cmp.champion or v.horizon is None:
            continue
        s, std = v.stats, v.stats.log_std
        rows.append({"task": v.task, "horizon": v.horizon, "baseline": v.baseline, "n": s.n,
                     "gmean_ratio": s.gmean_ratio, "log_std": std, "detectable_ratio": s.detectable_ratio,
                     "seeds_for_ratio": None if std is None else seeds_for(std, ratio),
                     "seeds_for_span": None if std is None else seeds_for_span(std, span, CONFIDENCE)})
    return rows


def _seeds(row: dict[str, Any], key: str) -> str:
    if row["log_std"] is None:
        return "-"
    return f"> {MAX_SEEDS:,}" if row[key] is None else str(row[key])


def power_main(args: argparse.Namespace) -> int:
    """`--power RUN`: the power numbers of RUN's stored comparison; never writes the database."""
    from db.store import Store

    from .query import load_comparisons
    from .ui.cli import UsageError, shown
    from .ui.tables import num

    store = Store(args.db, readonly=True)
    try:
        ((run, cmp),) = load_comparisons(store, [args.power])
    finally:
        store.close()
    if cmp.champion is None:
        raise UsageError(f"run {shown(run['name'])} has no champion (no funnel candidate has a validation score)")
    rows = power_rows(cmp, args.ratio, args.span)
    per_horizon, nxt = next_test_seeds(rows)
    if args.format == "json":
        print_json({"run": run["name"], "champion": cmp.champion, "test_seeds": len(cmp.seeds.test),
                    "ratio": args.ratio, "span": args.span, "power": POWER, "alpha": ALPHA,
                    "confidence": CONFIDENCE, "rows": rows, "test_seeds_per_horizon": per_horizon,
                    "next_test_seeds": nxt,
                    "next_test_seeds_spec": None if nxt is None or nxt > MAX_TEST_SEEDS else test_seeds_spec(rows)})
        return 0
    print(f"run {run['name']!r} (id {run['id']}, {run['status']}): champion {cmp.champion} vs each baseline on "
          f"test seeds {cmp.seeds.test_text()}. log std = std of the per-seed log loss ratios; detects = the ratio "
          f"(or its inverse) these seeds detect with {POWER:.0%} power; seeds for {args.ratio:g}x = the seeds "
          f"that detect a {args.ratio:g}x ratio with {POWER:.0%} power (two-sided paired t test, alpha "
          f"{ALPHA:.2g}); seeds for span < {args.span:g}x = the seeds whose expected {CONFIDENCE:.0%} CI is "
          f"narrower than {args.span:g}x (high / low)")
    cells = [[r["task"], f"{r['horizon']:g}", r["baseline"], str(r["n"]), num(r["gmean_ratio"]),
              num(r["log_std"]), "-" if r["detectable_ratio"] is None else f"{num(r['detectable_ratio'])}x",
              _seeds(r, "seeds_for_ratio"), _seeds(r, "seeds_for_span")] for r in rows]
    print(render_table(cells, ["task", "horizon", "baseline", "n", "ratio", "log std", "detects",
                               f"seeds for {args.ratio:g}x", f"seeds for span < {args.span:g}x"]))
    if nxt is not None:
        each = ", ".join(f"{k} {v:,}" for k, v in per_horizon.items())
        advice = (f"next: --test-seeds {test_seeds_spec(rows)} (per horizon what it needs; --test-seeds {nxt}: "
                  "that many everywhere)" if nxt <= MAX_TEST_SEEDS
                  else f"more than --test-seeds allows ({MAX_TEST_SEEDS:,}): a span < {args.span:g}x is out of reach")
        print(f"seeds for span < {args.span:g}x against every baseline, per horizon: {each}; {advice}")
    return 0


def next_test_seeds(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, int], int | None]:
    """Per "task t_max" the test seeds whose 95% CI spans less than `--span` against every
    baseline (the largest of its rows; `MAX_SEEDS` where more are needed), and the count for the
    next run's `--test-seeds N`: the largest of them (`test_seeds_spec` gives each its own). None when
    no row has a spread (one test seed)."""
    per: dict[str, int] = {}
    for r in rows:
        if r["log_std"] is None:
            continue
        key = f"{r['task']} {r['horizon']:g}"
        per[key] = max(per.get(key, 2), MAX_SEEDS if r["seeds_for_span"] is None else r["seeds_for_span"])
    return per, max(per.values()) if per else None


def test_seeds_spec(rows: Sequence[dict[str, Any]]) -> str:
    """`nos evolve --test-seeds` for `next_test_seeds`'s counts, one per horizon (the most any
    task needs there): the smallest count, then H=N for each horizon that needs more."""
    per: dict[float, int] = {}
    for r in rows:
        if r["log_std"] is not None:
            h = float(r["horizon"])
            per[h] = max(per.get(h, 2), MAX_SEEDS if r["seeds_for_span"] is None else r["seeds_for_span"])
    low = min(per.values())
    return ",".join([str(low), *(f"{horizon_text(h)}={n}" for h, n in sorted(per.items()) if n > low)])


def race_main(args: argparse.Namespace) -> int:
    """`--race RUN`: race stage sizes from RUN's stored race; never writes the database."""
    from db.store import Store

    from .query import find_run, run_config
    from .search.config import parse_race
    from .search.race import seed_scores
    from .search.race_sizing import (
        SPREAD_ALPHA,
        fit_pilot,
        plan_cost,
        plan_text,
        propose,
        recommend,
    )
    from .ui.cli import shown

    store = Store(args.db, readonly=True)
    try:
        run = find_run(store, args.race)
        cfg = run_config(run)
        if not cfg.race:
            raise UsageError(f"run {shown(run['name'])} ran no race (no --race): there is no pilot to size one from")
        got = seed_scores(store, run["id"], cfg)
    finally:
        store.close()
    if got is None or not got[0].stages[0].complete:
        raise UsageError(f"run {shown(run['name'])} has not stored its race's first stage yet")
    race, table = got
    done = [s for s in race.stages if s.complete]
    try:
        pilot = fit_pilot(table, [(s.entrants, s.seeds) for s in done])
    except ValueError as e:
        raise UsageError(f"run {shown(run['name'])}: {e}") from None
    own = tuple(parse_race(cfg.race))
    budget = args.budget or plan_cost(own)
    head = (f"run {run['name']!r} (id {run['id']}): a pilot of {len(pilot.candidates)} entrants, {len(done)} stage(s) "
            f"stored. One validation seed's noise (log units) {pilot.sigma_within:.3g} (per block "
            + ", ".join(f"{b['candidates']}x{b['seeds']}: {b['sigma_within']:.3g}" for b in pilot.blocks
                        if b["sigma_within"] is not None)
            + f"); the spread of the entrants' true scores {pilot.sigma_between:.3g} ({pilot.spread_ratio:.2f}x the "
            f"noise of a first-block mean, F test p = {pilot.spread_p:.2g}).")
    measured = {"run": run["name"], "entrants": len(pilot.candidates), "stages_measured": len(done),
                "sigma_within": pilot.sigma_within, "sigma_between": pilot.sigma_between,
                "spread_ratio": pilot.spread_ratio, "spread_p": pilot.spread_p, "blocks": pilot.blocks,
                "budget": budget, "draws": args.draws}
    if not pilot.separable:
        # no spread beyond the noise: "the best entrant" is a coin toss and a ranking of plans
        # would be noise dressed as advice
        if args.format == "json":
            print_json({**measured, "seconds": 0.0, "recommended": None, "own": None, "plans": []})
            return 0
        print(head)
        print(f"The entrants' scores on the first block spread {pilot.spread_ratio:.2f}x what noise alone gives "
              f"(F test p = {pilot.spread_p:.2g}, not below {SPREAD_ALPHA:g}): this pilot cannot tell its candidates "
              "apart, so it cannot rank plans and its race chose among near-equals. No --race to propose from it: a "
              "next run needs more seeds per candidate in every stage, or a more varied pool of candidates.")
        return 0
    log.info(f"simulating the race plans of 1-3 stages within {budget} candidate-seed trainings ...")
    start = time.perf_counter()
    try:
        ranked = propose(pilot, budget, args.draws, also=[own] if own[0][0] == len(pilot.candidates) else [])
        pick = recommend(ranked, budget)
    except ValueError as e:
        raise UsageError(str(e)) from None
    mine = next((r for r in ranked if r.plan == own), None)
    seconds = time.perf_counter() - start
    shown_rows = sorted(dict.fromkeys([*ranked[:5], pick, *([mine] if mine else [])]), key=ranked.index)
    if args.format == "json":
        print_json({**measured, "seconds": seconds, "recommended": pick.json(), "own": mine.json() if mine else None,
                    "plans": [r.json() for r in ranked]})
        return 0
    print(head)
    print(f"Plans within {budget} candidate-seed trainings, {args.draws} simulated races each ({seconds:.0f} s): "
          "worse = how much worse on validation the champion (chosen as the race chooses it) is than the best "
          "entrant, on average; P(best) = the best entrant is chosen; P(final) = it reaches the last stage.")
    cells = [[plan_text(r.plan) + (" (recommended)" if r is pick else "") + (" (this run's)" if r is mine else ""),
              str(sum(s for _, s in r.plan)), str(r.cost), f"{100 * math.expm1(r.regret):.1f}%",
              f"{100 * math.exp(r.regret) * r.regret_se:.1f}%", f"{r.p_best:.2f}", f"{r.p_best_final:.2f}"]
             for r in shown_rows]
    print(render_table(cells, ["race", "validation seeds", "cost", "worse", "+-", "P(best)", "P(final)"]))
    print(f"next: --race {plan_text(pick.plan)} (cost {pick.cost} candidate-seed trainings; this run's "
          f"{plan_text(own)}: {plan_cost(own)})")
    return 0


def _fitness(losses: dict[tuple[float, int], list[float | None]], adam: AdamReference,
             keys: Sequence[tuple[float, int]]) -> float | None:
    """The search fitness over `keys` (horizon, seed): best lr of the grid, None if none finite."""
    best = None
    for i in range(len(SEARCH_LRS)):
        xs = [losses[k][i] for k in keys]
        if all(x is not None for x in xs):
            score = geometric_mean_ratio(xs, [adam[k][0] for k in keys])  # type: ignore[arg-type]
            best = score if best is None else min(best, score)
    return best


def top10_dropped(full: Sequence[float | None], cheap: Sequence[float | None], promote: float, chunk: int,
                  draws: int = 50) -> float:
    """Share of the full fitness's top 10% that a cheap stage promoting the best `promote` of
    each chunk would drop, over `draws` random chunk compositions."""
    ok = [i for i in range(len(full)) if full[i] is not None and cheap[i] is not None]
    top = set(sorted(ok, key=lambda i: full[i])[: max(1, math.ceil(0.1 * len(ok)))])  # type: ignore[arg-type, return-value]
    dropped = trials = 0
    for draw in range(draws):
        order = ok[:]
        random.Random(draw).shuffle(order)
        for c in range(0, len(order), chunk):
            part = order[c : c + chunk]
            keep = set(sorted(part, key=lambda i: cheap[i])[: max(1, math.ceil(promote * len(part)))])  # type: ignore[arg-type, return-value]
            dropped += len((set(part) & top) - keep)
            trials += len(set(part) & top)
    return dropped / max(1, trials)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.power is not None and args.race is not None:
        raise UsageError("--power and --race: one pilot question at a time")
    if args.power is not None:
        return power_main(args)
    if args.race is not None:
        return race_main(args)
    device = resolve_device(args.device)
    sine = SineConfig(**{k: v for k, v in (("pretrain_steps", args.sine_pretrain_steps),
                                            ("width", args.sine_width)) if v})
    search = tuple(range(args.search_seeds))
    heldout = tuple(range(500, 500 + args.heldout_seeds))  # disjoint from every default split
    ev = TaskEvaluator(SearchSetup(horizons=HORIZONS, seeds=search + heldout, sine=sine, cache_dir=args.cache_dir),
                       device)
    rng = random.Random(args.seed)
    genomes: list[Genome] = []
    while len(genomes) < args.genomes:
        batch = [random_genome(rng) for _ in range(64)]
        genomes += [g for g, r in zip(batch, integrity.check(batch, device=device)) if r.passed and not r.sign_flipped]
    genomes = genomes[: args.genomes]
    start = time.perf_counter()
    adam = ev.adam_reference()
    losses: list[dict[tuple[float, int], list[float | None]]] = [{} for _ in genomes]
    seconds = {}
    for h in HORIZONS:
        t0 = time.perf_counter()
        for s, res in zip(ev.setup.seeds, ev.grid_seeds(genomes, SEARCH_LRS, ev.search_tasks(h))):
            for j, per_lr in enumerate(res.losses):
                losses[j][(h, s)] = per_lr
        seconds[h] = time.perf_counter() - t0
        log.info(f"t_max = {h:g}: {seconds[h]:.0f} s")
    held = [_fitness(L, adam, [(h, s) for h in HORIZONS for s in heldout]) for L in losses]
    out: dict = {"genomes": len(genomes), "seconds": time.perf_counter() - start, "search_seeds": {}, "fidelity": {}}
    for k in range(1, len(search) + 1):
        fit = [_fitness(L, adam, [(h, s) for h in HORIZONS for s in search[:k]]) for L in losses]
        ok = [i for i in range(len(genomes)) if fit[i] is not None and held[i] is not None]
        rho = stats.spearmanr([fit[i] for i in ok], [held[i] for i in ok]).statistic
        out["search_seeds"][k] = {"spearman_vs_heldout": float(rho), "n": len(ok)}
    full = [_fitness(L, adam, [(h, s) for h in HORIZONS for s in search[:2]]) for L in losses]
    cheap = [_fitness(L, adam, [(min(HORIZONS), search[0])]) for L in losses]
    cost_cheap = seconds[min(HORIZONS)] / len(ev.setup.seeds)  # one seed at the short horizon
    cost_full = sum(seconds.values()) * 2 / len(ev.setup.seeds)  # two seeds at both horizons
    for f in PROMOTE:
        out["fidelity"][f"{f:.3g}"] = {"top10_dropped": top10_dropped(full, cheap, f, args.chunk),
                                       "cost_vs_full": (cost_cheap + f * cost_full) / cost_full}
    out["full_fitness_seeds"] = 2
    out["cheap_cost_vs_full"] = cost_cheap / cost_full
    if args.format == "json":
        print_json(out)
        return 0
    for k, v in out["search_seeds"].items():
        print(f"fitness on {k} search seed(s) vs held-out seeds: Spearman {v['spearman_vs_heldout']:.2f} (n = {v['n']})")
    for f, v in out["fidelity"].items():
        print(f"promote {f}: drops {100 * v['top10_dropped']:.0f}% of the full top 10%; cost {v['cost_vs_full']:.2f} "
              "of the full fitness")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
