"""`python -m nos.export`: write an optimizer as a standalone PyTorch file.

    python -m nos.export 42 -o runs/discovered42.py          # individual 42 of the database
    python -m nos.export --builtin adam -o adam.py            # a classic optimizer's genome

The file imports only torch and math; see its docstring for the update rule and provenance.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from db.store import Store
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json

from .cli import DEFAULT_DB, ArgumentParser, UsageError, run_command
from .codegen import class_name_for, render

BUILTIN_LR = {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "lion": 1e-4, "rso": 1.0}
DEFAULT_LR = 1e-3
DEFAULT_TOTAL_STEPS = 200


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.export", description=__doc__.split("\n")[0])
    p.add_argument("id", nargs="?", type=int, help="individual id in the database")
    p.add_argument("--builtin", choices=BUILTINS, help="export a classic optimizer instead")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .py file to write")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database path or SQLAlchemy URL (default {DEFAULT_DB})")
    p.add_argument("--class-name", help="name of the optimizer class (default: derived)")
    return p


def export_individual(store: Store, ind_id: int) -> tuple[Genome, str, float, int, dict]:
    ind = store.get_individual(ind_id)
    if ind is None:
        raise UsageError(f"no individual with id {ind_id} in {store.url}")
    if ind["status"] != "evaluated" or ind.get("lr") is None:
        raise UsageError(f"individual {ind_id} has status {ind['status']!r}: only evaluated candidates have a tuned lr")
    genome = from_json(ind["genome"])
    run = store.get_run(ind["run_id"]) or {}
    total_steps = int(run.get("config", {}).get("total_steps", DEFAULT_TOTAL_STEPS))
    provenance = {
        "title": f"Optimizer {ind_id} discovered by nos (run {run.get('name')!r})",
        "run": run.get("name"),
        "individual": ind_id,
        "parent": ind.get("parent_id"),
        "fitness (geometric mean of loss / tuned Adam's loss over the search horizons; lower is better)": ind.get("fitness"),
        "particle / timestep / mutation": f"{ind.get('particle')} / {ind.get('timestep')} / {ind.get('mutation')}",
    }
    return genome, f"NosOptimizer{ind_id}", float(ind["lr"]), total_steps, provenance


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.id is None) == (args.builtin is None):
        raise UsageError("give either an individual ID or --builtin NAME")
    if args.builtin:
        genome = builtin(args.builtin)
        name, lr, total = class_name_for(args.builtin), BUILTIN_LR.get(args.builtin, DEFAULT_LR), DEFAULT_TOTAL_STEPS
        provenance = {"title": f"{args.builtin}, a classic optimizer written as a nos genome", "builtin": args.builtin}
    else:
        store = Store(args.db, create=False)
        try:
            genome, name, lr, total, provenance = export_individual(store, args.id)
        finally:
            store.close()
    code = render(genome, class_name=args.class_name or name, lr=lr, total_steps=total, provenance=provenance)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(code)
    print(f"wrote {args.output} (class {args.class_name or name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
