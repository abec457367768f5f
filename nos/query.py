"""`python -m nos.query`: read what searches recorded in the database.

    python -m nos.query runs                    # every run: status, candidates, best fitness
    python -m nos.query top RUN -n 10           # best evaluated individuals of a run (name or id)
    python -m nos.query show ID                 # one individual: genome, expression, evaluations
    python -m nos.query lineage ID              # the chain from ID back to its initial genome
    python -m nos.query stats RUN               # per-timestep counts, pass rate, best/median fitness
    python -m nos.query compare RUN             # test-seed comparison with the tuned baselines (CIs)

Every subcommand takes --db and --format table|json|csv (before or after it). It only reads
(the database is opened read-only, so read-only files and directories work and nothing is left
beside them), so it is safe to run while `python -m nos.evolve` is writing the same database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from db.store import Store

from .cli import (
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
    run_command,
    run_ref,
    shown,
)

if TYPE_CHECKING:
    from .search.config import SearchConfig

# nos.search and nos.report_table import torch (and scipy): they are imported inside the
# subcommands that need them (stats, compare), so `runs`, `top`, `show`, `lineage`, --help and
# usage errors start without them.

FORMATS = ("table", "json", "csv")

RUN_COLUMNS = ["id", "name", "status", "started_at", "finished_at", "candidates", "evaluated", "best_fitness"]
TOP_COLUMNS = ["id", "fitness", "fidelity", "lr", "particle", "timestep", "expression"]
EVAL_COLUMNS = ["individual_id", "id", "task", "split", "horizon", "lr", "seed", "loss", "steps", "seconds"]
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

    sub.add_parser("runs", parents=[common], help="every run with its counts and best fitness",
                   description="Every run: id, name, status, start/finish, candidates, evaluated, best fitness.")
    top = sub.add_parser("top", parents=[common], help="best evaluated individuals of a run",
                         description="The best evaluated individuals of a run (lower fitness is better).")
    top.add_argument("run", metavar="RUN", type=run_ref, help="run name or id")
    top.add_argument("-n", type=bounded_int(1, MAX_ID, "a count (a positive integer)"), default=10,
                     help="how many (default 10)")
    show = sub.add_parser("show", parents=[common], help="one individual with its evaluations",
                          description="One individual: columns, genome JSON, expression, LaTeX, evaluations "
                                      "(--format csv prints the evaluations).")
    show.add_argument("id", metavar="ID", type=individual_id, help="individual id")
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
    compare = sub.add_parser("compare", parents=[common], help="test-seed comparison of a run's funnel candidates",
                             description="The run's funnel candidates beside the five tuned baselines on the "
                                         "test seeds: per method and horizon the per-seed losses, median and "
                                         "geometric mean at the lr / sigma chosen on validation seeds; per "
                                         "candidate and baseline the geometric-mean loss ratio with a 95% "
                                         "bootstrap CI, seeds won and a paired Wilcoxon p-value. A candidate "
                                         "wins at a horizon only when the CI's upper end is below 1.")
    compare.add_argument("run", metavar="RUN", type=run_ref, help="run name or id")
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


def runs_rows(store: Store) -> list[dict]:
    """Every run with candidates / evaluated / best fitness (and its config, for json)."""
    return [
        {
            "id": r["id"], "name": r["name"], "status": r["status"], "seed": r.get("seed"),
            "started_at": r["started_at"], "finished_at": r["finished_at"],
            "candidates": r["n_individuals"], "evaluated": r["n_evaluated"], "best_fitness": r["best_fitness"],
            "config": r.get("config"),
        }
        for r in store.list_runs()
    ]


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


def _emit(fmt: str, rows: list[dict], columns: list[str], document: Any = None, title: str | None = None) -> None:
    """Print rows as an aligned table, CSV, or ``document`` (default: rows) as one JSON document."""
    if fmt == "json":
        print_json(rows if document is None else document)
    elif fmt == "csv":
        print(format_csv(rows, columns))
    else:
        if title:
            print(title)
        print(format_table(rows, columns) if rows else "(none)")


def _show_table(ind: dict) -> str:
    """An individual as labelled lines, its genome, and its evaluations as a table."""
    width = max(len(f) for f in SHOW_FIELDS + ["expression", "latex"])
    lines = [f"{f.ljust(width)}  {fmt_value(ind.get(f))}" for f in SHOW_FIELDS if f in ind]
    lines.append(f"{'expression'.ljust(width)}  {fmt_value(ind.get('expression'))}")
    lines.append(f"{'latex'.ljust(width)}  {fmt_value(ind.get('latex'))}")
    lines += ["", "genome:", json.dumps(ind.get("genome"), indent=2, sort_keys=True), ""]
    evals = ind.get("evaluations") or []
    lines.append(f"evaluations ({len(evals)}):")
    if evals:
        lines.append(format_table(evals, EVAL_COLUMNS[2:]))
    return "\n".join(lines)


def cmd_runs(store: Store, args: argparse.Namespace) -> None:
    rows = runs_rows(store)
    _emit(args.format, rows, RUN_COLUMNS)


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
    else:
        print(_show_table(ind))


def cmd_lineage(store: Store, args: argparse.Namespace) -> None:
    rows = lineage_rows(store, args.id)
    title = f"lineage of #{args.id}: {len(rows)} step(s) back to initial genome #{rows[-1]['id']}"
    _emit(args.format, rows, LINEAGE_COLUMNS, title=title)


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
        rho = "-" if rc["spearman"] is None else f"{rc['spearman']:.2f} (p = {rc['p_value']:.2g})"
        print(f"\nsearch fitness vs validation score over {rc['n']} funnel candidate(s): Spearman {rho}")
        print(f"best fitness after {len(best)} judged candidates: {fmt_value(best[-1] if best else None)}")
        if diag["control"]:
            c = diag["control"]
            print(f"random-search control {c['run']!r}: best after {len(c['best_so_far'])} judged candidates: "
                  f"{fmt_value(c['best_so_far'][-1] if c['best_so_far'] else None)}")


COMPARE_METHOD_COLUMNS = ["method", "horizon", "hparam", "variant", "median", "gmean", "diverged", "per_seed"]
COMPARE_VERSUS_COLUMNS = ["candidate", "baseline", "horizon", "gmean_ratio", "ci_low", "ci_high", "wins", "n",
                          "p_value", "verdict"]


def cmd_compare(store: Store, args: argparse.Namespace) -> None:
    from .report_table import comparison_text
    from .search.funnel import comparison as run_comparison

    run = find_run(store, args.run)
    cmp = run_comparison(store, run["id"], run_config(run))
    if cmp is None:
        raise UsageError(f"run {shown(run['name'])} has no funnel results (it ran with --funnel 0 or has not "
                         "reached its funnel)")
    doc = cmp.json(run["name"])
    if args.format == "json":
        print_json(doc)
    elif args.format == "csv":
        rows = [{**m, "per_seed": " ".join("" if x is None else repr(x) for x in m["per_seed"])} for m in doc["methods"]]
        print(format_csv(rows, COMPARE_METHOD_COLUMNS))
        print()
        print(format_csv(doc["versus"], COMPARE_VERSUS_COLUMNS))
    else:
        print(f"run {run['name']!r} (id {run['id']}, {run['status']}); champion {cmp.champion or '-'}")
        print(comparison_text(cmp))


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
