"""`python -m nos.export`: write an optimizer as a standalone PyTorch file.

    python -m nos.export 42 -o runs/discovered42.py          # individual 42 of the database
    python -m nos.export 42 --horizon 10 -o opt42_t10.py      # ... with the lr validated for t_max 10
    python -m nos.export --builtin adam -o adam.py            # a classic optimizer's genome
    python -m nos.export --builtin discovered_erf_sign -o d.py  # a champion of the README's runs
    python -m nos.export --genome my.json --lr 3e-4 -o my.py  # any genome file
    python -m nos.export 42 --no-simplify -o raw42.py         # the genome exactly as stored

The file is generated from the simplified genome (`nos.engine.simplify`): the same update with
the nodes, edge decays and gradient clip it does not depend on left out. Where something was
left out, its docstring lists what, and the stored genome it came from; where nothing can be,
the file is the stored genome's. `--no-simplify` exports the genome as stored.
The file imports only torch, math and warnings; see its docstring for the update rule and provenance.
An individual's default lr is the one its search chose (on the search seeds); with --horizon H,
the one its run's funnel chose for rollout horizon H on the validation seeds. The docstring
lists both.
Bad input -- arguments, an output path that cannot be written, a damaged database row -- is
one line on stderr and exit status 2, and then nothing is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from db.store import Store
from search_space.builtins import BUILTINS, builtin, builtin_title
from search_space.genome import Genome, GenomeError, from_json, read_file

from .engine.codegen import LrChoice, check_class_name, class_name_for, render, visible
from .engine.simplify import describe as describe_simplification
from .engine.simplify import simplification
from .search.config import SearchConfig
from .search.funnel import validated_lrs
from .tasks.budget import DEFAULT_BUDGET_FPE, steps_for
from .ui.cli import (
    DEFAULT_DB,
    MAX_HORIZON,
    MAX_ID,
    ArgumentParser,
    UsageError,
    db_arg,
    finite_float,
    path_arg,
    record_id,
    run_command,
)

BUILTIN_LR = {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "lion": 1e-4, "rso": 1.0,
              # sign-like updates: the lr their runs validated (README "Results")
              "discovered_erf_sign": 1e-4, "discovered_sign_interp": 1e-4, "discovered_lion_interp": 1e-4}
DEFAULT_LR = 1e-3
SHOWN = 80  # characters of a path or value quoted in an error line

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# arguments


def _class_name(text: str) -> str:
    try:
        check_class_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.export", description=__doc__.split("\n")[0])
    p.add_argument("id", nargs="?", type=record_id, help="individual id in the database")
    p.add_argument("--builtin", choices=BUILTINS, metavar="NAME",
                   help=f"export a builtin instead: {', '.join(BUILTINS)}")
    p.add_argument("--genome", type=path_arg("genome file"), metavar="FILE.json",
                   help="export the genome in a JSON file instead (as `nos integrity --genome` reads it)")
    p.add_argument("--lr", type=finite_float(0, 1e6, "a learning rate", lo_open=True),
                   help="the file's default lr (default: the search's or validation's choice for an individual, "
                        f"{DEFAULT_LR:g} for a genome file, a classic value for a builtin)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .py file to write (its directory must exist)")
    p.add_argument("--db", type=db_arg, default=DEFAULT_DB, help=f"database path or SQLAlchemy URL (default {DEFAULT_DB})")
    p.add_argument("--class-name", type=_class_name, help="name of the optimizer class (default: derived)")
    p.add_argument("--horizon", type=finite_float(-MAX_HORIZON, MAX_HORIZON, "a horizon t_max (a task's variant)"), metavar="H",
                   help="default lr: the one chosen on validation seeds for rollout horizon t_max = H in the "
                        "individual's run's funnel (default: the lr chosen in the search)")
    p.add_argument("--no-simplify", action="store_true",
                   help="export the genome as stored (default: simplified, leaving out the nodes, edge decays "
                        "and clip its update does not depend on; the file says what was left out)")
    return p


# ---------------------------------------------------------------------------------------------
# the output file: checked before any work, written all at once or not at all


def _shown(path: Path | str) -> str:
    return visible(os.fspath(path), SHOWN)


def check_output(path: Path, db: str | None = None) -> Path:
    """The file to write `path` to (symbolic links followed); UsageError, before anything is
    read or written, for a path that could not be written."""
    try:
        target = Path(os.path.realpath(path))
        parent = target.parent
        if target.is_dir():
            raise UsageError(f"output {_shown(path)} is a directory; give a file name ending in .py")
        if not parent.exists():
            raise UsageError(f"output {_shown(path)}: directory {_shown(parent)} does not exist")
        if not parent.is_dir():
            raise UsageError(f"output {_shown(path)}: {_shown(parent)} is not a directory")
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        if len(os.fsencode(target.name)) > name_max:
            raise UsageError(f"output {_shown(path)}: file name longer than {name_max} bytes")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"output {_shown(path)}: directory {_shown(parent)} is not writable")
        if target.exists():
            if not target.is_file():
                raise UsageError(f"output {_shown(path)} exists and is not a regular file")
            if not os.access(target, os.W_OK):
                raise UsageError(f"output {_shown(path)} exists and is not writable")
            if db is not None and "://" not in db and Path(db).exists() and os.path.samefile(target, db):
                raise UsageError(f"output {_shown(path)} is the database; refusing to overwrite it")
    except OSError as e:  # e.g. a path too long to even look at
        raise UsageError(f"output {_shown(path)}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the path
        raise UsageError(f"output {_shown(path)}: {e}") from None
    return target


def write_atomically(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file beside it, so `target` is either the
    whole new file or untouched; UsageError if the file system refuses."""
    fd, tmp = -1, ""
    try:
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".nos-export-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fd = -1
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = ""
    except OSError as e:
        raise UsageError(f"cannot write {_shown(target)}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# reading an individual back: every stored value is checked like user input (its run's config by
# `SearchConfig.checked`, the one validator of stored configs; the row's own values here)


def _stored(what: str, read: Callable[[], T]) -> T:
    """A row read from the database; one that does not even parse (a JSON column that is
    not JSON, or nested thousands deep; a value of the wrong type) is a UsageError."""
    try:
        return read()
    except RecursionError:
        raise UsageError(f"{what}: a stored JSON value is nested too deeply; the database is damaged") from None
    except ValueError as e:  # json.JSONDecodeError, db.models.StoredValueError
        raise UsageError(f"{what}: the database is damaged: {visible(e, 160)}") from None


def _stored_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise UsageError(f"{what} is {visible(repr(value), 40)}, not a positive integer; the database is damaged")
    return value


def _stored_lr(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise UsageError(f"{what} is {visible(repr(value), 40)}, not a positive finite number; the database is damaged")
    return float(value)


def _stored_genome(value: Any, what: str) -> Genome:
    try:
        return from_json(value)
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply; the database is damaged") from None
    except (GenomeError, TypeError, ValueError) as e:
        raise UsageError(f"{what} is not a valid genome ({visible(e, 120)}); the database is damaged") from None


def stored_config(raw: Any, what: str) -> SearchConfig:
    """A run's stored config (None: an old run's, the defaults), validated by the one validator
    of stored configs, `SearchConfig.checked`; a UsageError (one line) if it is damaged."""
    try:
        return SearchConfig.checked({} if raw is None else raw)
    except RecursionError:
        raise UsageError(f"{what}: its stored config is nested too deeply; the database is damaged") from None
    except ValueError as e:
        raise UsageError(f"{what}: {visible(e, 200)}; the database is damaged") from None


def trained_steps(genome: Genome, cfg: SearchConfig, raw: Any) -> int:
    """The steps `genome` was trained for in a run with config `cfg` (read from the stored dict
    `raw`): `steps_for` of its budget, or for an old run that stored `total_steps` and no budget,
    those steps (`SearchConfig.checked` has checked both)."""
    stored = raw if isinstance(raw, dict) else {}
    if stored.get("budget_fpe") is None and stored.get("total_steps") is not None:
        return int(stored["total_steps"])
    return steps_for(genome, cfg.budget_fpe)


def funnel_lrs(store: Store, run_id: int, cfg: SearchConfig, ind_id: int, evaluations: Any = ()) -> dict[float, float]:
    """horizon -> the lr the run's funnel chose for the individual on the validation seeds
    (`nos.search.funnel.validated_lrs`); empty when it was not in the funnel. A row that cannot
    be read, or a horizon of the individual's validation `evaluations` without a chosen lr
    (every lr stored there is unreadable), is a UsageError."""
    what = f"run {run_id}"
    try:
        lrs = _stored(f"{what}: the funnel's rows", lambda: validated_lrs(store, run_id, cfg, ind_id))
    except RecursionError:
        raise UsageError(f"{what}: a stored value is nested too deeply; the database is damaged") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"{what}: cannot read its funnel's choices ({visible(e, 120)}); the database is damaged") from None
    funnel_task = cfg.task_name(cfg.tasks[0])
    out = {}
    for h, lr in lrs.items():
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h):  # a variant
            raise UsageError(f"{what}: a funnel horizon is {visible(repr(h), 40)}; the database is damaged")
        out[float(h)] = _stored_lr(lr, f"{what}: the lr validated at t_max = {h:g}")
    rows = evaluations if isinstance(evaluations, (list, tuple)) else ()
    funnel = {e.get("horizon") for e in rows if isinstance(e, dict) and e.get("task") == funnel_task
              and e.get("split") == "validation"}
    missing = sorted((h for h in funnel if h not in out), key=repr)
    if missing:
        shown = f"{missing[0]:g}" if isinstance(missing[0], float) else visible(repr(missing[0]), 40)
        raise UsageError(f"{what}: individual {ind_id} has validation rows at t_max = {shown} but "
                         "no readable lr there; the database is damaged")
    return out


def _pick_horizon(lrs: dict[float, float], horizon: float, what: str, run: str) -> float:
    """The stored horizon `horizon` names (as the funnel stored it); one line otherwise."""
    for h in lrs:
        if math.isclose(h, horizon, rel_tol=1e-9, abs_tol=0.0):
            return h
    if not lrs:
        raise UsageError(f"--horizon {horizon:g}: {what} was not in the funnel of run {run}, so no lr was chosen "
                         "on validation seeds; export without --horizon for the lr chosen in the search")
    have = ", ".join(f"{h:g}" for h in sorted(lrs))
    raise UsageError(f"--horizon {horizon:g}: {what} has no lr validated at t_max = {horizon:g}; "
                     f"it has one at t_max = {have}")


@dataclass(frozen=True)
class Exported:
    """What the file of an individual is made from."""

    genome: Genome
    class_name: str
    lr: float  # the constructor's default
    total_steps: int
    provenance: dict
    lr_choice: LrChoice


def export_individual(store: Store, ind_id: int, horizon: float | None = None) -> Exported:
    """A stored, evaluated individual, its default lr the search's or (with `horizon`) the one
    its run's funnel chose for that horizon on the validation seeds."""
    what = f"individual {ind_id}"
    ind = _stored(what, lambda: store.get_individual(ind_id))
    if ind is None:
        raise UsageError(f"no individual with id {ind_id} in {_shown(store.url)}")
    if ind.get("status") != "evaluated":
        status = visible(repr(ind.get("status")), 40)
        raise UsageError(f"{what} has status {status}: only evaluated candidates have a tuned lr")
    if ind.get("lr") is None:
        raise UsageError(f"{what} is evaluated but has no stored lr; the database is damaged")
    lr = _stored_lr(ind["lr"], f"{what}: the stored lr")
    genome = _stored_genome(ind.get("genome"), f"{what}: the stored genome")
    run_id = _stored_id(ind.get("run_id"), f"{what}: the stored run id")
    run = _stored(f"run {run_id}", lambda: store.get_run(run_id)) or {}
    cfg = stored_config(run.get("config"), f"run {run_id}")
    total_steps = trained_steps(genome, cfg, run.get("config"))
    validated = funnel_lrs(store, run_id, cfg, ind_id, ind.get("evaluations"))
    search = cfg.setup(cfg.tasks[0])  # the task whose funnel lrs the file offers (checked: it builds)
    label = str(cfg.info(cfg.tasks[0]).get("variant_label", "variant"))
    if horizon is not None:
        horizon = _pick_horizon(validated, horizon, what, visible(repr(run.get("name")), 60))
    lr_choice = LrChoice(lr, validated, search.horizons, horizon, search.task, label)
    provenance = {  # codegen escapes every value that goes into the file
        "title": f"Optimizer {ind_id} discovered by nos (run {run.get('name')!r})",
        "run": run.get("name"),
        "individual": ind_id,
        "parent": ind.get("parent_id"),
        "fitness (geometric mean of loss / tuned Adam's loss over the search horizons; lower is better)": ind.get("fitness"),
        "particle / timestep / mutation": f"{ind.get('particle')} / {ind.get('timestep')} / {ind.get('mutation')}",
    }
    return Exported(genome, f"NosOptimizer{ind_id}", lr_choice.default, total_steps, provenance, lr_choice)


def simplified(genome: Genome, provenance: dict[str, Any]) -> tuple[Genome, dict[str, Any]]:
    """The genome to write, simplified, and the provenance saying what was left out of which
    stored genome. A genome that cannot be simplified comes back as it is, with the provenance
    unchanged, so its file is the one `--no-simplify` writes. The default total_steps and lr stay
    those of the stored genome: the steps it was trained for, the lr chosen for it."""
    s = simplification(genome)
    if not s.changed:
        return genome, provenance
    return s.genome, {
        **provenance,
        "simplified": f"{describe_simplification(s)} (the same updates on nos's probe problems; "
                      "export with --no-simplify for the stored genome)",
        "stored genome": genome.dumps(),
    }


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sources = [x for x in (args.id, args.builtin, args.genome) if x is not None]
    if len(sources) != 1:
        raise UsageError("give one of: an individual ID, --builtin NAME, --genome FILE.json")
    if args.id is None and args.horizon is not None:
        raise UsageError("--horizon picks the lr a run's funnel validated for an individual; only with an ID")
    target = check_output(args.output, args.db if args.id is not None else None)
    lr_choice: LrChoice | None = None  # where an individual's default lr comes from
    if args.builtin:
        genome = builtin(args.builtin)
        name, lr = class_name_for(args.builtin), BUILTIN_LR.get(args.builtin, DEFAULT_LR)
        total = steps_for(genome, DEFAULT_BUDGET_FPE)
        provenance = {"title": builtin_title(args.builtin), "builtin": args.builtin}
    elif args.genome:
        genome = read_file(args.genome)
        stem = "".join(ch for ch in Path(args.genome).stem.title() if ch.isalnum())
        name = f"Nos{stem}" if stem.isascii() and stem[:1].isalpha() else "NosOptimizer"
        lr, total = DEFAULT_LR, steps_for(genome, DEFAULT_BUDGET_FPE)
        provenance = {"title": f"The genome of {Path(args.genome).name}, exported by nos", "genome file": args.genome}
    else:
        store = Store(args.db, readonly=True)
        try:
            ex = export_individual(store, args.id, args.horizon)
        finally:
            store.close()
        genome, name, lr, total, provenance, lr_choice = (
            ex.genome, ex.class_name, ex.lr, ex.total_steps, ex.provenance, ex.lr_choice)
    if args.lr is not None and args.lr != lr:  # the user's lr replaces the chosen one, and the file says so
        provenance["lr"] = f"{args.lr:g}, given on the command line (nos's choice: {lr:g})"
        lr, lr_choice = args.lr, None
    if not args.no_simplify:
        genome, provenance = simplified(genome, provenance)
    class_name = args.class_name or name
    code = render(genome, class_name=class_name, lr=lr, total_steps=total, provenance=provenance, lr_choice=lr_choice)
    write_atomically(target, code)
    print(f"wrote {visible(os.fspath(args.output))} (class {class_name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
