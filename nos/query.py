"""`python -m nos.query`: read what searches recorded in the database.

    python -m nos.query runs                    # every run: status, candidates, best fitness
    python -m nos.query top RUN -n 10           # best evaluated individuals of a run (name or id)
    python -m nos.query show ID                 # one individual: genome, expression, evaluations
    python -m nos.query lineage ID              # the chain from ID back to its initial genome
    python -m nos.query stats RUN               # per-timestep counts, pass rate, best/median fitness
    python -m nos.query compare RUN             # test-seed comparison with the tuned baselines (CIs)
    python -m nos.query compare RUN RUN ...     # each run's champion vs the baselines, side by side
    python -m nos.query compare RUN --format latex --table methods   # one booktabs table

Every subcommand takes --db and --format table|json|csv|latex (before or after it); csv and
latex print exactly one table (`compare --table` picks which). It only reads (the database is
opened read-only, so read-only files and directories work and nothing is left beside them), so
it is safe to run while `python -m nos.evolve` is writing the same database.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from db.store import Store, StoreError

from .ui.cli import (
    DEFAULT_DB,
    MAX_ID,
    ArgumentParser,
    UsageError,
    bounded_int,
    db_arg,
    fmt_value,
    format_csv,
    format_table,
    print_json,
    render_table,
    run_command,
    run_ref,
    shown,
)

if TYPE_CHECKING:
    from .evaluation.compare import Comparison
    from .search.config import SearchConfig

log = logging.getLogger("nos.query")  # not __name__: it is __main__ under python -m

# nos.search and nos.ui.tables import torch (and scipy): they are imported inside the
# subcommands that need them (stats, compare), so `runs`, `top`, `show`, `lineage`, --help and
# usage errors start without them.

FORMATS = ("table", "json", "csv", "latex")
TABLES = ("methods", "versus")  # the tables of `compare` (csv and latex print one: versus by default)
MAX_COMPARED = 50  # runs side by side in one `compare`

# `runs`: the table shows the wall time in place of finished_at; csv has both
RUN_COLUMNS = ["id", "name", "algorithm", "status", "started_at", "wall", "candidates", "evaluated", "best_fitness",
               "funnel"]
RUN_CSV_COLUMNS = ["id", "name", "algorithm", "status", "started_at", "finished_at", "wall_seconds", "candidates",
                   "evaluated", "best_fitness", "funnel"]
TOP_COLUMNS = ["id", "fitness", "fidelity", "lr", "particle", "timestep", "expression"]
EVAL_COLUMNS = ["individual_id", "id", "task", "split", "horizon", "lr", "seed", "loss", "steps", "seconds"]
EVAL_SUMMARY_COLUMNS = ["split", "task", "horizon", "evaluations", "diverged", "best_loss", "best_lr", "best_seed"]
SHOWN_EVALUATIONS = 20  # `show` prints this many evaluation rows (--all: every one)
SHOW_FIELDS = [
    "id", "run_name", "run_id", "slot", "status", "parent_id", "particle", "timestep", "mutation",
    "attempt", "mutation_kind", "fitness", "fidelity", "lr", "sign", "genome_hash", "unflipped_hash",
    "duplicate_of", "error", "created_at",
]
LINEAGE_COLUMNS = ["id", "timestep", "particle", "mutation_kind", "status", "fitness", "fidelity", "delta", "ratio",
                   "expression"]
STATS_COLUMNS = [
    "timestep", "candidates", "passed", "pass_rate", "duplicates", "invalid", "errors", "rejected",
    "best_fitness", "median_fitness",
]


individual_id = bounded_int(1, MAX_ID, "an individual id (a positive integer)")


def _add_common(p: argparse.ArgumentParser, default: str | None) -> None:
    """--db and --format; ``default`` SUPPRESS for the copies after the subcommand."""
    p.add_argument("--db", type=db_arg, default=default or DEFAULT_DB,
                   help=f"database path or SQLAlchemy URL ({DEFAULT_DB})")
    p.add_argument("--format", choices=FORMATS, default=default or "table", help="output format (default: table)")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.query", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, None)
    # The same options after the subcommand; SUPPRESS keeps the values given before it.
    common = ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    runs = sub.add_parser("runs", parents=[common], help="every run with its counts and best fitness",
                          description="Every run: id, name, algorithm (ga / random), status, start, wall time "
                                      "(start to finish; 'running' while it runs), candidates, evaluated, best "
                                      "full-fidelity fitness, and funnel = how many candidates were judged on "
                                      "held-out seeds ('-': none, so `compare` has nothing to show; a funnel interrupted midway "
                                      "counts its candidates too, and `compare` waits for its end). csv and json "
                                      "add finished_at and wall_seconds.")
    runs.add_argument("--champion", action="store_true",
                      help="also name each funnel's champion (rebuilds each run's comparison: loads torch, "
                           "seconds rather than a fraction of one)")
    top = sub.add_parser("top", parents=[common], help="best evaluated individuals of a run",
                         description="The best evaluated individuals of a run (lower fitness is better).")
    top.add_argument("run", metavar="RUN", type=run_ref, help="run name or id")
    top.add_argument("-n", type=bounded_int(1, MAX_ID, "a count (a positive integer)"), default=10,
                     help="how many (default 10)")
    show = sub.add_parser("show", parents=[common], help="one individual with its evaluations",
                          description="One individual: columns, genome JSON, expression, LaTeX, and its "
                                      "evaluations: a summary per split, task and horizon (count, diverged, the "
                                      f"lowest loss) and the first {SHOWN_EVALUATIONS} rows (--all: every row). "
                                      "--format csv / latex print every evaluation row; json everything.")
    show.add_argument("id", metavar="ID", type=individual_id, help="individual id")
    show.add_argument("--all", action="store_true", help="print every evaluation row in the table")
    lineage = sub.add_parser("lineage", parents=[common], help="the chain from ID back to its initial genome",
                             description="The chain from ID back to its initial genome, with each step's "
                                         "fitness change relative to its parent (delta = fitness - parent's, "
                                         "ratio = fitness / parent's).")
    lineage.add_argument("id", metavar="ID", type=individual_id, help="individual id")
    stats = sub.add_parser("stats", parents=[common], help="per-timestep statistics of a run",
                           description="Per timestep: candidates, passed (evaluated), pass rate = passed / "
                                       "candidates, duplicates, invalid, errors, rejected by the integrity "
                                       "check, best and median fitness.")
    stats.add_argument("run", metavar="RUN", type=run_ref, help="run name or id")
    compare = sub.add_parser("compare", parents=[common], help="test-seed comparison of runs' funnel candidates",
                             description="The run's funnel candidates beside the five tuned baselines on the "
                                         "test seeds: per method and horizon the per-seed losses, median and "
                                         "geometric mean at the lr / sigma chosen on validation seeds (the "
                                         "methods table); per candidate and baseline the geometric-mean loss "
                                         "ratio with a 95% bootstrap CI, seeds won and a paired Wilcoxon "
                                         "p-value (the versus table). A candidate wins at a horizon only when "
                                         "the CI's upper end is below 1. With several runs: each run's champion "
                                         "against the baselines side by side, and each champion's own test "
                                         "losses beside the baselines'; json is then {\"runs\": [one document "
                                         "per run]}. Every run must have funnel results.")
    compare.add_argument("runs", metavar="RUN", nargs="+", type=run_ref, help="run name or id (one or more)")
    compare.add_argument("--table", choices=TABLES, default=None,
                         help="print only this table: csv and latex always print exactly one (default: versus); "
                              "the plain table prints both unless told; json always has both")
    return p


# ---------------------------------------------------------------------- reading


def find_run(store: Store, name_or_id: str) -> dict:
    """The run named (or numbered) ``name_or_id``; a UsageError if there is none."""
    run = store.get_run(name_or_id)
    if run is None:
        raise UsageError(f"no run named {shown(name_or_id)} (nor with that id) in {store.url}")
    return run


def run_config(run: dict) -> SearchConfig:
    """The run's stored config, re-validated like user input; else a one-line UsageError."""
    from .search.config import SearchConfig

    try:
        return SearchConfig.checked(run.get("config"))
    except ValueError as e:
        raise UsageError(f"run {shown(run.get('name'))}: {e}") from None


def find_individual(store: Store, ind_id: int) -> dict:
    """An individual with its evaluations and run name; a UsageError if there is none."""
    ind = store.get_individual(ind_id)
    if ind is None:
        raise UsageError(f"no individual with id {ind_id} in {store.url}")
    return ind


def wall_seconds(run: dict) -> float | None:
    """finished_at - started_at in seconds (a resumed run: counted from its creation, the pause
    included); None while it runs or when the stamps are missing or out of order."""
    start, end = run.get("started_at"), run.get("finished_at")
    if run.get("status") == "running" or not isinstance(start, datetime) or not isinstance(end, datetime):
        return None
    try:
        seconds = (end - start).total_seconds()
    except (TypeError, OverflowError):  # one stamp with a time zone, one without
        return None
    return seconds if seconds >= 0 else None


def wall_text(run: dict) -> str:
    """The wall time as the table shows it: "running", "12 s", "3 min 05 s", "2 h 07 min"."""
    seconds = wall_seconds(run)
    if seconds is None:
        return "running" if run.get("status") == "running" else "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def run_algorithm(run: dict) -> str | None:
    """ga / random from the stored config (no validation: `runs` lists even damaged runs)."""
    cfg = run.get("config")
    algo = cfg.get("algorithm", "ga") if isinstance(cfg, dict) else None
    return algo if isinstance(algo, str) else None


def runs_rows(store: Store, champions: bool = False) -> list[dict]:
    """Every run with algorithm, wall time, candidates / evaluated / best fitness, funnel size
    (and its config, for json); with ``champions``, each funnel's champion (loads torch)."""
    funnel = store.heldout_counts()  # the funnel's size per run: no torch, `runs` stays instant
    rows = []
    for r in store.list_runs():
        rows.append({
            "id": r["id"], "name": r["name"], "algorithm": run_algorithm(r), "status": r["status"],
            "seed": r.get("seed"), "started_at": r["started_at"], "finished_at": r["finished_at"],
            "wall_seconds": wall_seconds(r), "wall": wall_text(r),
            "candidates": r["n_individuals"], "evaluated": r["n_evaluated"], "best_fitness": r["best_fitness"],
            "funnel": funnel.get(r["id"]) or None, "config": r.get("config"),
        })
        if champions:
            rows[-1]["champion"] = champion_of(store, r) if funnel.get(r["id"]) else None
    return rows


def champion_of(store: Store, run: dict) -> str | None:
    """The champion of a run's funnel, as `compare` names it; None (and a warning) if the run's
    comparison cannot be rebuilt, so one damaged run does not hide the others."""
    from .search.funnel import comparison

    try:
        cmp = comparison(store, run["id"], run_config(run))
    except (UsageError, StoreError) as e:
        log.warning(f"run {shown(run.get('name'))}: no champion: {e}")
        return None
    return None if cmp is None else cmp.champion


def lineage_rows(store: Store, ind_id: int) -> list[dict]:
    """``store.lineage`` with the fitness change of each step relative to its parent."""
    chain = store.lineage(ind_id)
    if not chain:
        raise UsageError(f"no individual with id {ind_id} in {store.url}")
    rows = []
    for i, ind in enumerate(chain):
        parent = chain[i + 1] if i + 1 < len(chain) else None
        delta = ratio = None
        if parent is not None and ind["fitness"] is not None and parent["fitness"] is not None:
            delta = ind["fitness"] - parent["fitness"]
            ratio = ind["fitness"] / parent["fitness"] if parent["fitness"] else None
        rows.append({**ind, "delta": delta, "ratio": ratio})
    return rows


def stats_rows(store: Store, run_id: int) -> list[dict]:
    """``store.timestep_stats`` plus the integrity pass rate (defined once, in nos.search.metrics)
    and the integrity rejections."""
    from .search.metrics import integrity_pass_rate

    rows = []
    for s in store.timestep_stats(run_id):
        n = s["candidates"] or 0
        rejected = max(0, n - sum(s[k] or 0 for k in ("passed", "duplicates", "invalid", "errors")))
        counts = {"evaluated": s["passed"] or 0, "error": s["errors"] or 0, "duplicate": s["duplicates"] or 0,
                  "invalid": s["invalid"] or 0, "rejected_integrity": rejected}
        rows.append({**s, "pass_rate": integrity_pass_rate(counts), "rejected": rejected})
    return rows


# ---------------------------------------------------------------------- printing


def _emit(fmt: str, rows: list[dict], columns: list[str], document: Any = None, title: str | None = None,
          csv_columns: list[str] | None = None) -> None:
    """Print rows as an aligned table, CSV (``csv_columns``, default ``columns``), a LaTeX tabular
    (one table, no title), or ``document`` (default: rows) as one JSON document."""
    if fmt == "json":
        print_json(rows if document is None else document)
    elif fmt == "csv":
        print(format_csv(rows, csv_columns or columns))
    elif fmt == "latex":
        print(format_table(rows, columns, fmt="latex"))
    else:
        if title:
            print(title)
        print(format_table(rows, columns) if rows else "(none)")


def _show_table(ind: dict, every: bool = False) -> str:
    """An individual as labelled lines, its genome, a summary of its evaluations and the first
    of them (``every``: all of them) as a table."""
    width = max(len(f) for f in SHOW_FIELDS + ["expression", "latex"])
    lines = [f"{f.ljust(width)}  {fmt_value(ind.get(f))}" for f in SHOW_FIELDS if f in ind]
    lines.append(f"{'expression'.ljust(width)}  {fmt_value(ind.get('expression'))}")
    lines.append(f"{'latex'.ljust(width)}  {fmt_value(ind.get('latex'))}")
    lines += ["", "genome:", json.dumps(ind.get("genome"), indent=2, sort_keys=True), ""]
    evals = ind.get("evaluations") or []
    if not evals:
        return "\n".join([*lines, "evaluations (0)"])
    lines.append(f"evaluations ({len(evals)}): per split, task and horizon, how many, how many diverged (no "
                 "finite loss), the lowest loss with its lr and seed")
    lines += [format_table(evaluation_summary(evals), EVAL_SUMMARY_COLUMNS), ""]
    if every or len(evals) <= SHOWN_EVALUATIONS:
        lines.append(f"every evaluation ({len(evals)}):")
        lines.append(format_table(evals, EVAL_COLUMNS[2:]))
    else:
        lines.append(f"the first {SHOWN_EVALUATIONS} of {len(evals)} evaluations (--all prints every one; "
                     "--format csv too):")
        lines.append(format_table(evals[:SHOWN_EVALUATIONS], EVAL_COLUMNS[2:]))
    return "\n".join(lines)


SPLIT_ORDER = {"search": 0, "validation": 1, "test": 2}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def evaluation_summary(evals: Sequence[dict]) -> list[dict]:
    """Per (split, task, horizon): how many evaluations, how many diverged (no finite loss), and
    the lowest loss with its lr and seed; search first, then validation, then test."""
    groups: dict[tuple, list[dict]] = {}
    for e in evals:
        groups.setdefault((e.get("split"), e.get("task"), e.get("horizon")), []).append(e)
    rows = []
    for (split, task, horizon), es in groups.items():
        ok = [e for e in es if _finite(e.get("loss"))]
        best = min(ok, key=lambda e: e["loss"]) if ok else None
        rows.append({"split": split, "task": task, "horizon": horizon, "evaluations": len(es),
                     "diverged": len(es) - len(ok), "best_loss": best and best["loss"],
                     "best_lr": best and best.get("lr"), "best_seed": best and best.get("seed")})

    def key(r: dict) -> tuple:
        h = r["horizon"]
        return (SPLIT_ORDER.get(r["split"], 3), str(r["split"]), str(r["task"]),
                h if _finite(h) else math.inf)

    return sorted(rows, key=key)


def cmd_runs(store: Store, args: argparse.Namespace) -> None:
    rows = runs_rows(store, champions=args.champion)
    extra = ["champion"] if args.champion else []
    _emit(args.format, rows, RUN_COLUMNS + extra, csv_columns=RUN_CSV_COLUMNS + extra)


def cmd_top(store: Store, args: argparse.Namespace) -> None:
    run = find_run(store, args.run)
    rows = store.top(run["id"], args.n)
    _emit(args.format, rows, TOP_COLUMNS,
          title=f"run {run['name']!r} (id {run['id']}, {run['status']}): best {len(rows)} evaluated")


def cmd_show(store: Store, args: argparse.Namespace) -> None:
    ind = find_individual(store, args.id)
    if args.format == "json":
        print_json(ind)
    elif args.format == "csv":
        print(format_csv(ind["evaluations"], EVAL_COLUMNS))
    elif args.format == "latex":
        print(format_table(ind["evaluations"], EVAL_COLUMNS, fmt="latex"))
    else:
        print(_show_table(ind, every=args.all))


def cmd_lineage(store: Store, args: argparse.Namespace) -> None:
    rows = lineage_rows(store, args.id)
    _emit(args.format, rows, LINEAGE_COLUMNS, title=lineage_title(args.id, rows))


def lineage_title(ind_id: int, rows: Sequence[dict]) -> str:
    """How far back the chain goes: steps = mutations = len(chain) - 1."""
    steps, last = len(rows) - 1, rows[-1]
    if last.get("parent_id") is not None:  # the chain stops at a row whose parent is gone (or a cycle)
        return (f"lineage of #{ind_id}: {steps} step(s) back to #{last['id']}, whose parent "
                f"#{last['parent_id']} is not in the chain")
    if steps == 0:
        return f"#{ind_id} is an initial genome"
    return f"lineage of #{ind_id}: {steps} step(s) back to initial genome #{last['id']}"


def cmd_stats(store: Store, args: argparse.Namespace) -> None:
    from .search.diagnostics import diagnostics

    run = find_run(store, args.run)
    rows = stats_rows(store, run["id"])
    run_config(run)  # checked here: diagnostics trusts it
    diag = diagnostics(store, run)
    if args.format == "json":
        print_json({"run": run["name"], "timesteps": rows, "diagnostics": diag})
        return
    _emit(args.format, rows, STATS_COLUMNS, title=f"run {run['name']!r} (id {run['id']}, {run['status']})")
    if args.format == "table":
        rc, best = diag["rank_correlation"], diag["best_so_far"]
        rho = "-" if rc["spearman"] is None else f"{rc['spearman']:.2f}{_rho_ci(rc)} (p = {rc['p_value']:.2g})"
        print(f"\nsearch fitness vs validation score over {rc['n']} funnel candidate(s): Spearman {rho}")
        print(f"best fitness after {len(best)} judged candidates: {fmt_value(best[-1] if best else None)}")
        if diag.get("race"):
            from .ui.tables import race_text

            print(race_text(diag["race"]))
        if diag["control"]:
            c = diag["control"]
            print(f"random-search control {c['run']!r}: best after {len(c['best_so_far'])} judged candidates: "
                  f"{fmt_value(c['best_so_far'][-1] if c['best_so_far'] else None)}")


def _rho_ci(rc: dict) -> str:
    """" [low, high]" of a rank correlation's 95% bootstrap interval; "" when it has none."""
    return "" if rc.get("ci_low") is None else f" [95% CI {rc['ci_low']:.2f}, {rc['ci_high']:.2f}]"


COMPARE_METHOD_COLUMNS = ["run", "task", "method", "horizon", "hparam", "variant", "median", "gmean", "diverged",
                          "per_seed"]
COMPARE_VERSUS_COLUMNS = ["run", "task", "candidate", "champion", "baseline", "horizon", "gmean_ratio", "ci_low",
                          "ci_high", "wins", "n", "p_value", "verdict", "detectable_ratio"]


def load_comparisons(store: Store, refs: Sequence[str]) -> list[tuple[dict, Comparison]]:
    """(run, comparison) of each named run, in order; a UsageError naming the first run that is
    missing, named twice or has no funnel results (every name is checked before any work)."""
    from .search.funnel import comparison as run_comparison

    if len(refs) > MAX_COMPARED:
        raise UsageError(f"compare: at most {MAX_COMPARED} runs, got {len(refs)}")
    runs: list[dict] = []
    for ref in refs:
        run = find_run(store, ref)
        if any(r["id"] == run["id"] for r in runs):
            raise UsageError(f"compare: run {shown(run['name'])} (id {run['id']}) is named twice")
        runs.append(run)
    out = []
    for run in runs:
        cmp = run_comparison(store, run["id"], run_config(run))
        if cmp is None:
            raise UsageError(f"run {shown(run['name'])} has no funnel results (it ran with --funnel 0 or has not "
                             "reached its funnel)")
        out.append((run, cmp))
    return out


def compare_csv(loaded: Sequence[tuple[dict, Comparison]], table: str) -> str:
    """One CSV table over every run: its rows' run and task in the first columns."""
    rows: list[dict] = []
    for run, cmp in loaded:
        doc = cmp.json(run["name"])
        if table == "methods":
            rows += [{**m, "run": run["name"],
                      "per_seed": " ".join("" if x is None else repr(x) for x in m["per_seed"])}
                     for m in doc["methods"]]
        else:
            rows += [{**v, "run": run["name"], "champion": v["candidate"] == cmp.champion} for v in doc["versus"]]
    return format_csv(rows, COMPARE_METHOD_COLUMNS if table == "methods" else COMPARE_VERSUS_COLUMNS)


def _run_line(run: dict, cmp: Comparison) -> str:
    seeds = cmp.seeds
    return (f"run {run['name']!r} (id {run['id']}, {run['status']}, {run_algorithm(run) or '?'}): champion "
            f"{cmp.champion or '-'}; test seeds {seeds.test_text()}, "
            f"choices on validation seeds {', '.join(map(str, seeds.validation))}")


def compare_text(loaded: Sequence[tuple[dict, Comparison]], tables: Sequence[str]) -> str:
    """Several runs side by side: per task, each champion against each baseline, then each
    champion's test losses beside the baselines' (`nos.ui.tables.versus_grid`, `methods_grid`)."""
    from .ui.tables import methods_grid, task_keys, versus_grid

    named = [(run["name"], cmp) for run, cmp in loaded]
    keys = task_keys(named)
    out = [_run_line(run, cmp) for run, cmp in loaded]
    for table in tables:
        for task in keys if table == "versus" else [k for k in keys if any(k in c.tasks for _, c in named)]:
            if table == "versus":
                caption = ("each run's champion vs each baseline: geometric mean of the per-seed test loss ratios "
                           "[95% bootstrap CI] and the verdict (wins only when the CI is below 1); "
                           "all = over every horizon")
                headers, rows = versus_grid(named, champions_only=True, tasks=[task])
            else:
                caption = ("test losses: geometric mean [median] (k div = diverged runs) @ the validated lr or sigma; "
                           "the baselines once per set of runs that share them")
                headers, rows = methods_grid(named, champions_only=True, tasks=[task])
            where = f"task {task}: " if len(keys) > 1 else ""
            out += ["", where + caption, render_table(rows, headers)]
    return "\n".join(out)


def cmd_compare(store: Store, args: argparse.Namespace) -> None:
    from .ui.tables import comparison_text, methods_grid, versus_grid

    if args.format == "json" and args.table:
        raise UsageError("--table picks the table of --format table, csv or latex; --format json has both")
    loaded = load_comparisons(store, args.runs)
    several = len(loaded) > 1
    if args.format == "json":
        docs = [cmp.json(run["name"]) for run, cmp in loaded]
        print_json({"runs": docs} if several else docs[0])
    elif args.format == "csv":
        print(compare_csv(loaded, args.table or "versus"))
    elif args.format == "latex":
        named = [(run["name"], cmp) for run, cmp in loaded]
        grid = methods_grid if (args.table or "versus") == "methods" else versus_grid
        headers, rows = grid(named, champions_only=several)
        print(render_table(rows, headers, "latex"))
    elif several:
        print(compare_text(loaded, [args.table] if args.table else ["versus", "methods"]))
    else:
        ((run, cmp),) = loaded
        print(f"run {run['name']!r} (id {run['id']}, {run['status']}); champion {cmp.champion or '-'}")
        print(comparison_text(cmp, parts=[args.table] if args.table else ("methods", "versus")))


COMMANDS: dict[str, Callable[[Store, argparse.Namespace], None]] = {
    "runs": cmd_runs, "top": cmd_top, "show": cmd_show, "lineage": cmd_lineage, "stats": cmd_stats,
    "compare": cmd_compare,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = Store(args.db, readonly=True)
    try:
        COMMANDS[args.command](store, args)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
