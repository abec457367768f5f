"""`python -m nos.query`: read what searches recorded in the database.

    python -m nos.query runs                    # every run: status, candidates, best fitness
    python -m nos.query top RUN -n 10           # best evaluated individuals of a run (name or id)
    python -m nos.query show ID                 # one individual: genome, expression, evaluations
    python -m nos.query lineage ID              # the chain from ID back to its initial genome
    python -m nos.query stats RUN               # per-timestep counts, pass rate, best/median fitness

Every subcommand takes --db and --format table|json|csv (before or after it). It only reads,
so it is safe to run while `python -m nos.evolve` is writing the same database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from db.store import Store

from .cli import (
    DEFAULT_DB,
    ArgumentParser,
    UsageError,
    fmt_value,
    format_csv,
    format_table,
    positive_int,
    print_json,
    run_command,
)

FORMATS = ("table", "json", "csv")

RUN_COLUMNS = ["id", "name", "status", "started_at", "finished_at", "candidates", "evaluated", "best_fitness"]
TOP_COLUMNS = ["id", "fitness", "lr", "particle", "timestep", "expression"]
EVAL_COLUMNS = ["individual_id", "id", "task", "horizon", "lr", "seed", "loss", "steps", "seconds"]
SHOW_FIELDS = [
    "id", "run_name", "run_id", "slot", "status", "parent_id", "particle", "timestep", "mutation",
    "attempt", "mutation_kind", "fitness", "lr", "sign", "genome_hash", "unflipped_hash",
    "duplicate_of", "error", "created_at",
]
LINEAGE_COLUMNS = ["id", "timestep", "particle", "mutation_kind", "status", "fitness", "delta", "ratio", "expression"]
STATS_COLUMNS = [
    "timestep", "candidates", "passed", "pass_rate", "duplicates", "invalid", "errors", "rejected",
    "best_fitness", "median_fitness",
]


def individual_id(text: str) -> int:
    """argparse type of an individual id (a positive integer)."""
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an individual id (a positive integer), got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, default: str | None) -> None:
    """--db and --format; ``default`` SUPPRESS for the copies after the subcommand."""
    p.add_argument("--db", default=default or DEFAULT_DB, help=f"database path or SQLAlchemy URL ({DEFAULT_DB})")
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
    top.add_argument("run", metavar="RUN", help="run name or id")
    top.add_argument("-n", type=positive_int, default=10, help="how many (default 10)")
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
    stats.add_argument("run", metavar="RUN", help="run name or id")
    return p


# ---------------------------------------------------------------------- reading


def find_run(store: Store, name_or_id: str) -> dict:
    """The run named (or numbered) ``name_or_id``; a UsageError if there is none."""
    run = store.get_run(name_or_id)
    if run is None:
        raise UsageError(f"no run named {name_or_id!r} (nor with that id) in {store.url}")
    return run


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
    """``store.timestep_stats`` plus the pass rate and the integrity rejections."""
    rows = []
    for s in store.timestep_stats(run_id):
        n = s["candidates"] or 0
        rejected = n - s["passed"] - s["duplicates"] - s["invalid"] - s["errors"]
        rows.append({**s, "pass_rate": s["passed"] / n if n else None, "rejected": max(0, rejected)})
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
    run = find_run(store, args.run)
    rows = stats_rows(store, run["id"])
    _emit(args.format, rows, STATS_COLUMNS, title=f"run {run['name']!r} (id {run['id']}, {run['status']})")


COMMANDS: dict[str, Callable[[Store, argparse.Namespace], None]] = {
    "runs": cmd_runs, "top": cmd_top, "show": cmd_show, "lineage": cmd_lineage, "stats": cmd_stats,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = Store(args.db, create=False)
    try:
        COMMANDS[args.command](store, args)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
