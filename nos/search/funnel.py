"""The funnel: the search's best candidates judged on held-out seeds beside tuned baselines.

1. The baselines of the run's protocol (`nos.evaluation.protocol`): computed once per protocol
   key and stored (`baselines` rows with no run, `protocol` = the key), reused by every run and
   command with the same protocol; stored horizon by horizon, so an interrupted tuning resumes.
2. The funnel candidates (the search's hall of fame) at every lr of the grid on the validation
   seeds; each candidate's lr per horizon and the champion are chosen there.
3. Every candidate once per horizon on the test seeds, at its validated lr.

Candidate rows are `evaluations` (task = the family's name, e.g. `sine`; split `validation` /
`test`), stored one *unit* at a time: every candidate's rows of one (split, horizon) in one
transaction, the validation horizons first (a test horizon needs only the validation choice at
that horizon). A kill leaves each unit whole or absent, so a resumed run computes only the
missing units; a task's funnel is done once every unit is stored, and a partial one is "not
reached yet" to every reader (`funnel_rows`), never a partial table. Everything shown afterwards
-- the evolve summary, `nos query compare`, `nos report` -- is rebuilt from these stored rows by
`comparison`, so all of them agree.

On several tasks, steps 1-3 run per task (search tasks and test tasks alike: every method's lr on
a task is chosen on that task's validation seeds), and the champion is chosen on the *search*
tasks' validation scores alone: no choice ever reads a test task (`compare.combine`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from db.errors import StoreError
from db.storage import Storage
from search_space.genome import Genome, from_json

from ..evaluation.compare import Comparison, combine, compare
from ..evaluation.fitness import TaskEvaluator
from ..evaluation.protocol import (
    BEFORE,
    GRADIENT_BASELINES,
    PUBLISHED,
    Choice,
    Progress,
    Protocol,
    Row,
    baseline_units,
    before_losses,
    choose,
    gradient_rows,
    test_baselines,
    validation_baselines,
)
from ..tasks.budget import steps_for
from ..tasks.registry import WAVES
from ..ui.progress import reporter
from .config import SearchConfig
from .records import Candidate

TASK = "sine"  # held-out rows of the sine task's candidates and baselines (split validation / test)
SEARCH_TASK = "sine_search"  # the sine run's stored Adam reference (the fitness normaliser)

log = logging.getLogger(__name__)


def candidate_name(ind_id: int) -> str:
    """How a candidate is named among methods in tables: "#<id>"."""
    return f"#{ind_id}"


def candidate_id(name: str | None) -> int | None:
    """Inverse of `candidate_name`; None for a method name such as "adam"."""
    if not name or not name.startswith("#") or not name[1:].isascii() or not name[1:].isdigit():
        return None
    return int(name[1:])


# ------------------------------------------------------------------------------- baselines


def _baseline_row(row: dict) -> Row:
    return Row(row["method"], row["horizon"], row["seed"], row["hparam"], row["loss"], row["split"])


def stored_baselines(store: Storage, key: str) -> list[Row]:
    """The baseline rows stored under one protocol key."""
    return [_baseline_row(b) for b in store.baselines(protocol=key)]


def _store_rows(store: Storage, key: str, rows: Sequence[Row], budget: int, task: str = TASK,
                task_key: str | None = None) -> None:
    store.add_baselines([
        {"run_id": None, "method": r.method, "task": task, "task_key": task_key, "horizon": r.horizon, "seed": r.seed,
         "loss": r.loss, "hparam": r.hparam, "budget": budget, "split": r.split, "protocol": key}
        for r in rows
    ])


def _before_rows(evaluator: TaskEvaluator, h: float, seeds: Sequence[int], split: str) -> list[Row]:
    return [Row(BEFORE, h, s, None, loss, split) for (_, s), loss in before_losses(evaluator, [h], seeds).items()]


def before_of(rows: Sequence[Row]) -> dict[tuple[float, int], float]:
    """The pretrained network's loss per (horizon, seed), from the stored "before" rows."""
    return {(r.horizon, r.seed): float(r.loss) for r in rows if r.method == BEFORE and r.loss is not None}


def tuned_baselines(store: Storage, protocol: Protocol, evaluator: TaskEvaluator,
                    progress: Progress | None = None, published: bool = False,
                    splits: Sequence[str] = ("validation", "test")) -> list[Row]:
    """Validation and test rows of every baseline under `protocol`, computed once and stored
    (with `published`, also NOS's published optimizers, under keys of their own).

    Horizons already stored under the protocol's keys are reused (and the log says so); the rest
    are computed and stored one horizon at a time, each split a stage of `progress` ("baselines
    (validation)", "baselines (test)", "published (validation)", ...) counting its trainings.
    `splits` = ("validation",): the validation rows alone (a race needs no test row until its
    finalists are known); the test split always needs the validation one, computed first."""
    rows = _tuned(store, protocol, evaluator, progress, "", GRADIENT_BASELINES, True, splits=splits)
    if published:
        rows += _tuned(store, protocol, evaluator, progress, "+published", PUBLISHED, False, base=rows, splits=splits)
    return rows


def _tuned(store: Storage, protocol: Protocol, evaluator: TaskEvaluator, progress: Progress | None, suffix: str,
           gradient: Sequence[str], with_randopt: bool, base: Sequence[Row] = (),
           splits: Sequence[str] = ("validation", "test")) -> list[Row]:
    say = reporter(progress)
    rows: list[Row] = []
    for split in [s for s in ("validation", "test") if s in splits]:
        key = protocol.key(split) + suffix
        stored = stored_baselines(store, key)
        have = {r.horizon for r in stored}
        if have:
            log.info(f"reusing stored {split} rows of {', '.join(gradient)}{' and RandOpt' if with_randopt else ''} "
                     f"(protocol {key}; t_max = {', '.join(f'{h:g}' for h in sorted(have))})")
        todo = [h for h in protocol.horizons if h not in have]
        if todo:
            kind = "published" if suffix else "baselines"
            say.stage(f"{kind} ({split}{_where(protocol)})",
                      sum(baseline_units(protocol, split, h, gradient, with_randopt) for h in todo), "trainings")
        for h in todo:
            one = Protocol(**{**protocol.__dict__, "horizons": (h,)})
            new = [] if base else _before_rows(evaluator, h, protocol.seeds.of_unit(split, h), split)
            if split == "validation":
                new += validation_baselines(one, evaluator, say, gradient, with_randopt)
            else:
                known = [*base, *rows]
                chosen = choose([r for r in known if r.horizon == h], before_of(known))
                new += test_baselines(one, evaluator, chosen, say, gradient, with_randopt)
            _store_rows(store, key, new, protocol.budget_fpe, protocol.task, protocol.task_key)
            stored += new
        rows += [r for r in stored if r.horizon in protocol.horizons]
    return rows


# ------------------------------------------------------------------------------- candidates


def evaluate_candidates(store: Storage, run_id: int, evaluator: TaskEvaluator, protocol: Protocol,
                        candidates: Mapping[str, Genome], baseline_rows: Sequence[Row],
                        progress: Progress | None = None) -> list[Row]:
    """Candidates on the validation seeds at every lr, then on the test seeds at the lr chosen
    on validation (per horizon), each (split, horizon) stored in one transaction as soon as it is
    trained; units already stored (an interrupted funnel) are reused, not trained again. Two
    stages of `progress`, "funnel (validation)" and "funnel (test)", counting the horizons still
    to train (a stage with none is not started: the log says what is reused). Returns every row."""
    say = reporter(progress)
    units = _stored_units(store, run_id, protocol)
    for (split, h), rows in units.items():
        names = {r.method for r in rows}
        if names != set(candidates):  # the search replays deterministically: this is not that run's funnel
            raise StoreError(f"run {run_id}: the funnel rows stored for {protocol.task} at {_variant(protocol)} = {h:g} ({split}) "
                             f"are of {_names(names)}, not of this run's funnel candidates {_names(candidates)}; "
                             "the database is damaged")
    where = "" if protocol.task == TASK else f"{protocol.task}, "
    unit = "horizons" if _variant(protocol) == "t_max" else "variants"
    for split in SPLITS:
        have = [h for h in protocol.horizons if (split, h) in units]
        todo = [h for h in protocol.horizons if (split, h) not in units]
        if have:
            log.info(f"reusing stored funnel ({split}{_where(protocol)}) rows of {len(candidates)} candidate(s) "
                     f"({_variant(protocol)} = {', '.join(f'{h:g}' for h in have)})")
        if not todo:
            continue
        say.stage(f"funnel ({split}{_where(protocol)})", len(todo), unit)
        # test: each candidate at its validated lr; every validation unit is stored by now
        choices = choose([r for rows in units.values() for r in rows], before_of(baseline_rows)) if split == "test" else {}
        for h in todo:
            if split == "validation":
                say.message(f"{len(candidates)} candidate(s) at every lr, {where}{_variant(protocol)} = {h:g}")
                lrs: dict[str, Sequence[float]] = {n: protocol.lrs for n in candidates}
            else:
                say.message(f"{len(candidates)} candidate(s) at the validated lr, {where}{_variant(protocol)} = {h:g}")
                lrs = {n: [_lr(choices[(n, h)])] for n in candidates}
            new = gradient_rows(evaluator, candidates, h, protocol.seeds.of_unit(split, h), lrs, split)
            # one transaction per unit: a kill leaves it whole or absent (`Store.add_evaluations`)
            store.add_evaluations(candidate_evaluations(new, candidates, protocol.budget_fpe, protocol.task,
                                                        protocol.task_key))
            units[(split, h)] = new
            say.advance(1)
    return [r for key in funnel_units(protocol) for r in units[key]]


SPLITS = ("validation", "test")  # the funnel's order: a test unit needs the validation unit of its horizon


def funnel_units(protocol: Protocol) -> list[tuple[str, float]]:
    """The (split, horizon) units of a task's funnel, in the order they are computed and stored."""
    return [(split, h) for split in SPLITS for h in protocol.horizons]


def _lr(choice: Choice) -> float:
    assert choice.hparam is not None  # a candidate's validation rows always carry their lr
    return choice.hparam


def _names(names: Iterable[str]) -> str:
    shown = sorted(names, key=lambda n: candidate_id(n) or 0)
    return ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "") if shown else "none"


def _stored_units(store: Storage, run_id: int, protocol: Protocol) -> dict[tuple[str, float], list[Row]]:
    """The funnel units of one task stored for a run, each checked whole: the same candidates in
    every unit, each with every seed of its split once, at every lr of the grid (validation) or
    at one lr (test). A unit is written in one transaction, so one that is not whole was changed
    behind nos's back: a StoreError, never a unit reused or trained again beside its rows. Rows
    at a horizon the protocol does not have are not the funnel's and are ignored, as before."""
    wanted = set(funnel_units(protocol))
    units: dict[tuple[str, float], list[Row]] = {}
    for r in stored_candidate_rows(store, run_id, protocol.task):
        if (r.split, r.horizon) in wanted:
            units.setdefault((r.split, r.horizon), []).append(r)
    everyone = {r.method for rows in units.values() for r in rows}
    grid = set(protocol.lrs)
    for (split, h), rows in units.items():
        seeds = set(protocol.seeds.of_unit(split, h))
        by_method: dict[str, list[Row]] = {}
        for r in rows:
            by_method.setdefault(r.method, []).append(r)
        whole = set(by_method) == everyone
        for method_rows in by_method.values():
            pairs = [(r.seed, r.hparam) for r in method_rows]
            if split == "validation":
                whole &= len(pairs) == len(seeds) * len(grid) and set(pairs) == {(s, lr) for s in seeds for lr in grid}
            else:
                whole &= len(pairs) == len(seeds) and {s for s, _ in pairs} == seeds
        if not whole:
            raise StoreError(f"run {run_id}: the stored funnel rows of {protocol.task} at {_variant(protocol)} = {h:g} "
                             f"({split}) are not whole (each is written at once); the database is damaged")
    return units


def funnel_rows(store: Storage, run_id: int, protocol: Protocol) -> list[Row] | None:
    """The funnel rows of a run's candidates on one task once every unit is stored; None while
    one is missing (the funnel has not run, or was interrupted: "not reached yet"). A stored unit
    that is not whole is a StoreError (`_stored_units`)."""
    units = _stored_units(store, run_id, protocol)
    if not units or any(key not in units for key in funnel_units(protocol)):
        return None
    return [r for key in funnel_units(protocol) for r in units[key]]


def _where(protocol: Protocol) -> str:
    """", square" in the name of a stage of a task other than sine (a run may have several)."""
    return "" if protocol.task == TASK else f", {protocol.task}"


def _variant(protocol: Protocol) -> str:
    return "t_max" if protocol.spec in WAVES else "variant"


def candidate_evaluations(rows: Sequence[Row], genomes: Mapping[str, Genome], budget_fpe: int,
                          task: str = TASK, task_key: str | None = None) -> dict[int, list[dict]]:
    """Candidate rows as `evaluations` rows of their individuals."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        ind_id = candidate_id(r.method)
        assert ind_id is not None
        out.setdefault(ind_id, []).append(
            {"task": task, "task_key": task_key, "horizon": r.horizon, "lr": r.hparam, "seed": r.seed, "loss": r.loss,
             "steps": steps_for(genomes[r.method], budget_fpe), "seconds": r.seconds, "split": r.split})
    return out


def stored_candidate_rows(store: Storage, run_id: int, task: str = TASK) -> list[Row]:
    """Every stored funnel row of a run's candidates on one task, as stored (a partial funnel's
    too: `funnel_rows` says whether the funnel is done)."""
    rows = []
    for ind_id, e in store.heldout_evaluations(run_id, task):
        rows.append(Row(candidate_name(ind_id), e["horizon"], e["seed"], e["lr"], e["loss"], e["split"]))
    return rows


def run_funnel(store: Storage, run_id: int, cfg: SearchConfig, evaluator_of: Callable[[str], TaskEvaluator],
               best: Sequence[Candidate], progress: Progress | None = None) -> Comparison | None:
    """Steps 1-3 of the module docstring for every task of the run (`evaluator_of(spec)` trains on
    a task's held-out seeds); idempotent: every baseline horizon and funnel unit already stored is
    reused, so an interrupted funnel resumes where it stopped."""
    if cfg.race:  # the racing funnel (`nos.search.race`): successive halving, then the same tables
        from .race import run_race

        run_race(store, run_id, cfg, evaluator_of, best, progress)
        return comparison(store, run_id, cfg)
    genomes = {candidate_name(c.id): from_json(dict(c.genome)) for c in best}
    for spec in cfg.all_tasks:
        protocol = cfg.protocol(spec)
        evaluator = evaluator_of(spec)
        base = tuned_baselines(store, protocol, evaluator, progress, published=cfg.published)
        evaluate_candidates(store, run_id, evaluator, protocol, genomes, base, progress)
    return comparison(store, run_id, cfg)


def comparison(store: Storage, run_id: int, cfg: SearchConfig) -> Comparison | None:
    """The run's comparison rebuilt from stored rows; None when its funnel has not run. On several
    tasks: per-task rows, aggregates over tasks and the champion of the search tasks (`combine`)."""
    per_task = []
    for spec in cfg.all_tasks:
        one = _task_comparison(store, run_id, cfg, spec)
        if one is None:
            return None
        per_task.append(one)
    out = combine(per_task, [cfg.task_name(s) for s in cfg.tasks], [cfg.task_name(s) for s in cfg.test_tasks])
    if cfg.race:  # the champion is the race's: chosen on its last stage's seeds alone
        from .race import apply, stored_race

        race = stored_race(store, run_id, cfg)
        assert race is not None  # every task's rows are whole, so its race is stored
        out = apply(out, race)
    return out


def task_rows(store: Storage, run_id: int, cfg: SearchConfig, spec: str | None = None) -> list[Row] | None:
    """A task's funnel rows once every unit is stored (the plain funnel's or the race's: a race's
    search tasks hold rows of every stage, its test tasks a plain funnel of the finalists); None
    while one is missing."""
    spec = spec or cfg.tasks[0]
    if cfg.race and spec in cfg.tasks:
        from .race import race_rows

        got = race_rows(store, run_id, cfg, spec)
        return None if got is None else got[0]
    return funnel_rows(store, run_id, cfg.protocol(spec))


def _task_comparison(store: Storage, run_id: int, cfg: SearchConfig, spec: str) -> Comparison | None:
    protocol = cfg.protocol(spec)
    cand = task_rows(store, run_id, cfg, spec)
    if cand is None:  # not run yet, or interrupted: never a partial table
        return None
    suffixes = ("", "+published") if cfg.published else ("",)
    base = [r for split in ("validation", "test") for sfx in suffixes for r in stored_baselines(store, protocol.key(split) + sfx)]
    before = before_of(base)
    if any((h, s) not in before for h in protocol.horizons for s in (*protocol.seeds.validation, *protocol.seeds.test_for(h))):
        raise StoreError(f"the baselines of this run's protocol ({protocol.key('test')}) are not in the database; "
                         "rerun its funnel (nos evolve --resume) or `nos baselines` with the run's settings")
    # candidates with test rows (a race's finalists; the plain funnel's every candidate)
    names = sorted({r.method for r in cand if r.split == "test"}, key=lambda n: candidate_id(n) or 0)
    out = compare([*base, *cand], before, protocol.seeds, protocol.horizons, names, task=protocol.task)
    out.labels[protocol.task] = str(cfg.info(spec).get("variant_label", "variant"))
    return out


def validated_lrs(store: Storage, run_id: int, cfg: SearchConfig, ind_id: int, spec: str | None = None) -> dict[float, float]:
    """horizon -> the lr chosen on the validation seeds for one funnel candidate on one task (the
    first search task by default; empty when the candidate was not in the run's funnel or that
    funnel is not done). What `nos export ID --horizon H` makes the default."""
    name = candidate_name(ind_id)
    protocol = cfg.protocol(spec)
    rows = [r for r in task_rows(store, run_id, cfg, spec) or () if r.method == name and r.split == "validation"]
    if not rows:  # not in the funnel, or the funnel is not done (its choices are not final until then)
        return {}
    before = before_of(stored_baselines(store, protocol.key("validation")))
    chosen = choose(rows, {k: before.get(k, float("inf")) for k in {(r.horizon, r.seed) for r in rows}})
    return {h: c.hparam for (_, h), c in sorted(chosen.items(), key=lambda kv: kv[0][1]) if c.hparam is not None}
