"""`python -m nos.evolve`: search for optimizers that beat Adam and RandOpt on the sine rollout.

    python -m nos.evolve                       # a small search: ~7 minutes on a 2-core CPU
    python -m nos.evolve --preset paper        # NOS's scale: 500 initial, 50 particles, 5 x 7
    python -m nos.evolve --resume NAME         # continue a run that was stopped or killed
    python -m nos.evolve --workers 4           # evaluate on a local Dask cluster of 4 processes
    python -m nos.evolve --scheduler tcp://HOST:8786 --db postgresql+psycopg://...   # many machines

Every candidate goes into the database (default runs/nos.sqlite) with its parent, so the
lineage of any optimizer can be queried (`python -m nos.query`) and exported (`python -m nos.export`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from db.store import Store, StoreError

from .evaluation.compare import Comparison
from .evaluation.fitness import REFERENCES
from .evaluation.protocol import Seeds, horizon_text
from .ga.particle import STRATEGIES
from .search import PRESETS, Cooperation, Progress, Run, RunError, SearchConfig
from .search.config import ALGORITHMS, DEFAULT_FIDELITY, DEFAULT_SEEDS, parse_race
from .search.diagnostics import diagnostics
from .search.funnel import candidate_id
from .search.objective import LocalEvaluator, Objective
from .tasks.api import TaskFamily
from .tasks.budget import describe
from .tasks.registry import TaskError, is_code
from .tasks.registry import resolve as resolve_task
from .ui.cli import (
    DEFAULT_DB,
    MAX_BUDGET,
    MAX_HORIZON,
    MAX_ID,
    MIN_BUDGET,
    MIN_HORIZON,
    ArgumentParser,
    UsageError,
    add_device,
    add_format,
    add_threads,
    apply_threads,
    bounded_int,
    db_arg,
    finite_float,
    invocation,
    list_of,
    path_arg,
    print_json,
    render_table,
    resolve_device,
    run_command,
    run_name,
    run_ref,
    text_arg,
)
from .ui.progress import Stages
from .ui.tables import comparison_text, race_text

log = logging.getLogger("nos.evolve")  # not __name__: it is __main__ under python -m


def _promote_default() -> str:
    return f"{DEFAULT_FIDELITY['promote']:.3g}"


def _fidelity(args, cfg: SearchConfig) -> dict | None:
    """The cheap stage of a multi-fidelity search from the flags (None: one stage). Unset flags
    take DEFAULT_FIDELITY, its horizon the shortest search horizon, its budget the full one."""
    promote = args.promote if args.promote is not None else DEFAULT_FIDELITY["promote"]
    if promote >= 1:
        return None
    seeds = args.cheap_seeds or DEFAULT_FIDELITY["seeds"]
    if seeds > len(cfg.search_seeds):
        raise UsageError(f"--cheap-seeds {seeds}: the run has only {len(cfg.search_seeds)} search seed(s)")
    return {"seeds": seeds, "horizons": list(args.cheap_horizons or [min(cfg.horizons)]),
            "budget_fpe": args.cheap_budget or cfg.budget_fpe, "promote": promote}


def _seed_range(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.evolve", description=__doc__.split("\n")[0])
    d = SearchConfig()
    p.add_argument("--preset", choices=list(PRESETS), default="default", help="paper: NOS's scale")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ga",
                   help="ga: the particle GA (default); random: random search with the GA's schedule of proposals "
                        "(the control for any claim that evolution found something)")
    p.add_argument("--reference", choices=REFERENCES, default=None,
                   help="what the search fitness is divided by, per search horizon: adam, tuned Adam (default); "
                        "best, the strongest of the tuned gradient baselines (Adam, + clip, + warmup-cosine, both)")
    # Every number is checked here, before anything is opened or built (bad -> one line, exit 2).
    p.add_argument("--initial", type=bounded_int(1, 100_000, "--initial"),
                   help=f"random genomes in the initial population ({d.initial}; at most 100,000)")
    p.add_argument("--particles", type=bounded_int(1, 10_000, "--particles"), help=f"independent particles ({d.particles})")
    p.add_argument("--timesteps", type=bounded_int(0, 1_000, "--timesteps"), help=f"timesteps per particle ({d.timesteps})")
    p.add_argument("--mutations", type=bounded_int(1, 1_000, "--mutations"),
                   help=f"children per particle per timestep ({d.mutations})")
    p.add_argument("--max-tries", type=bounded_int(1, 100, "--max-tries"), help=f"tries per child slot ({d.max_tries})")
    p.add_argument("--seed", type=bounded_int(0, MAX_ID, "--seed"), default=0,
                   help="the run's seed: same seed and config, same lineage")
    p.add_argument("--seed-builtins", action="store_true", help="add the classic optimizers to the initial population")
    p.add_argument("--elitism", action="store_true", help="keep a particle where it is unless a child is better")
    horizons = list_of(float, lo=MIN_HORIZON, hi=MAX_HORIZON, max_items=20, what="horizons (t_max)")
    p.add_argument("--horizons", type=horizons,
                   help=f"search horizons t_max, comma-separated ({','.join(f'{h:g}' for h in d.horizons)})")
    p.add_argument("--budget", type=bounded_int(MIN_BUDGET, MAX_BUDGET, "--budget (forward-pass equivalents, 3 = one step)"),
                   help=f"forward-pass equivalents per training run ({d.budget_fpe}; a gradient step costs 3)")
    p.add_argument("--funnel", type=bounded_int(0, 1_000, "--funnel"),
                   help=f"best candidates re-evaluated on held-out seeds ({d.funnel}); 0 skips")
    p.add_argument("--heldout-horizons", type=horizons, help="funnel horizons, comma-separated (1,2,5,10,20)")
    p.add_argument("--race", metavar="NxS,...", type=text_arg("--race"),
                   help="a racing funnel: stage k judges N candidates on its own S validation seeds, the best "
                        "distinct ones advance, the last stage alone picks the champion (e.g. 32x2,8x4,3x10; "
                        "sets --funnel and, unless given, --validation-seeds; default: one stage)")
    seeds = DEFAULT_SEEDS
    p.add_argument("--search-seeds", type=bounded_int(1, 100, "--search-seeds"),
                   help=f"seeds whose losses give the fitness ({len(seeds.search)}: {_seed_range(seeds.search)})")
    p.add_argument("--validation-seeds", type=bounded_int(1, 900, "--validation-seeds"),
                   help=f"seeds that make every choice: lrs, sigmas, the champion ({len(seeds.validation)}: "
                        f"{_seed_range(seeds.validation)})")
    p.add_argument("--test-seeds", type=_test_seeds_spec, metavar="N[,H=N...]",
                   help=f"seeds only reported, never used for a choice ({len(seeds.test)}: {_seed_range(seeds.test)}); "
                        "N,H=M: M of them at horizon H (t_max, or a task's variant), N at the others, e.g. "
                        "50,20=150 (what `nos calibrate --power` advises)")
    f = p.add_argument_group("multi-fidelity (successive halving): a cheap first stage, the best fraction promoted")
    f.add_argument("--promote", type=finite_float(0, 1, "--promote (a fraction)", lo_open=True),
                   help=f"fraction of each chunk's candidates promoted from the cheap stage to the full fitness "
                        f"({_promote_default()}; 1 = no cheap stage)")
    f.add_argument("--cheap-seeds", type=bounded_int(1, 100, "--cheap-seeds"),
                   help=f"search seeds of the cheap stage ({DEFAULT_FIDELITY['seeds']})")
    f.add_argument("--cheap-horizons", type=horizons, help="horizons of the cheap stage (the shortest search horizon)")
    f.add_argument("--cheap-budget", type=bounded_int(MIN_BUDGET, MAX_BUDGET, "--cheap-budget"),
                   help="forward-pass equivalents per training run in the cheap stage (the full budget)")
    p.add_argument("--published", action="store_true",
                   help="also tune and report NOS's published optimizers (Opt5, Opt6, Opt7, AdamClip) in the funnel")
    t = p.add_argument_group("tasks (shipped names: nos evolve --list-tasks; or your own FILE.py:FACTORY / module:factory)")
    t.add_argument("--task", metavar="SPEC", type=text_arg("--task"),
                   help="search on one task (sine); a user's task is imported because it is named here")
    t.add_argument("--tasks", metavar="A,B,...", type=text_arg("--tasks"),
                   help="search on a mix of tasks: the fitness is the geometric mean over all of them")
    t.add_argument("--test-tasks", metavar="C,D,...", type=text_arg("--test-tasks"),
                   help="held-out tasks: reported by the funnel, never read by any choice of champion")
    t.add_argument("--list-tasks", action="store_true", help="list the shipped tasks and exit")
    p.add_argument("--sine-pretrain-steps", type=bounded_int(1, 1_000_000, "--sine-pretrain-steps"),
                   help="pretraining steps of the wave tasks' MLP (3000)")
    p.add_argument("--sine-width", type=bounded_int(1, 4096, "--sine-width"), help="hidden width of the sine MLP (64)")
    p.add_argument("--cache-dir", type=path_arg("--cache-dir"), default="runs/cache",
                   help="pretrained-weight cache (runs/cache)")
    p.add_argument("--db", type=db_arg, default=DEFAULT_DB, help=f"database path or SQLAlchemy URL ({DEFAULT_DB})")
    p.add_argument("--name", type=run_name, help="run name (default: run-<date>-<time>)")
    p.add_argument("--resume", metavar="NAME", type=run_ref, help="continue the named run from the database")
    p.add_argument("--chunk", type=bounded_int(1, 100_000, "--chunk"),
                   help=f"initial candidates judged and stored together ({d.chunk})")
    p.add_argument("--timestep-chunk", type=bounded_int(0, 100_000, "--timestep-chunk"),
                   help="children of a timestep judged together (0 = all of an attempt, the default)")
    g = p.add_argument_group("scale out (Dask; several processes on one PostgreSQL run)")
    g.add_argument("--scheduler", metavar="tcp://HOST:PORT", type=text_arg("--scheduler"),
                   help="evaluate candidates on this Dask cluster")
    g.add_argument("--workers", type=bounded_int(1, 256, "--workers"),
                   help="evaluate on a local Dask cluster of N worker processes")
    g.add_argument("--batch-size", type=bounded_int(1, 100_000, "--batch-size"), default=16,
                   help="candidates per Dask task (16)")
    g.add_argument("--timeout", type=finite_float(0, 1e6, "--timeout (seconds)", lo_open=True), default=600.0,
                   help="seconds a Dask task may run; a candidate over it is recorded as error (600)")
    g.add_argument("--cooperate", action=argparse.BooleanOptionalAction, default=None,
                   help="share the run with other processes through claims in the database "
                        "(default: on for server databases such as PostgreSQL, off for SQLite)")
    g.add_argument("--claim-timeout", type=finite_float(0, 1e6, "--claim-timeout (seconds)", lo_open=True), default=60.0,
                   help="seconds without a heartbeat after which another process's claim is taken over (60)")
    g.add_argument("--db-retries", type=bounded_int(0, 100, "--db-retries"), default=5,
                   help="retries of a locked or unreachable database before giving up (5)")
    g.add_argument("--db-timeout", type=finite_float(0, 1e6, "--db-timeout (seconds)"), default=10.0,
                   help="seconds an SQLite writer waits for the lock (10)")
    add_device(p)
    add_threads(p)
    add_format(p)
    return p


def _config(args) -> SearchConfig:
    cfg = SearchConfig(**PRESETS[args.preset])  # type: ignore[arg-type]
    for arg, attr in (("initial", "initial"), ("particles", "particles"), ("timesteps", "timesteps"),
                      ("mutations", "mutations"), ("max_tries", "max_tries"), ("budget", "budget_fpe"),
                      ("funnel", "funnel")):
        if getattr(args, arg) is not None:
            setattr(cfg, attr, getattr(args, arg))
    cfg.seed, cfg.seed_builtins, cfg.elitism, cfg.cache_dir = args.seed, args.seed_builtins, args.elitism, args.cache_dir
    cfg.algorithm = args.algorithm
    if args.reference is not None:
        cfg.reference = args.reference
    cfg.published = cfg.published or args.published
    if args.chunk:
        cfg.chunk = args.chunk
    if args.timestep_chunk is not None:
        cfg.timestep_chunk = args.timestep_chunk
    for attr in ("horizons", "heldout_horizons"):  # tuples, checked by the parser
        if getattr(args, attr):
            setattr(cfg, attr, tuple(getattr(args, attr)))
    d = cfg.seeds()
    n_validation = args.validation_seeds or len(d.validation)
    if args.race:
        try:
            stages = parse_race(args.race)
        except ValueError as e:
            raise UsageError(f"-{e}") from None
        if args.funnel is not None and args.funnel != stages[0][0]:
            raise UsageError(f"--race judges {stages[0][0]} candidates at its first stage, --funnel says {args.funnel}")
        cfg.race, cfg.funnel = args.race.replace(" ", ""), stages[0][0]
        n_validation = args.validation_seeds or sum(s for _, s in stages)
    n_test, test_at = args.test_seeds or (len(d.test), {})
    seeds = Seeds.counted(args.search_seeds or len(d.search), n_validation, max([n_test, *test_at.values()]))
    cfg.search_seeds, cfg.validation_seeds, cfg.test_seeds = seeds.search, seeds.validation, seeds.test
    cfg.fidelity = _fidelity(args, cfg)
    if args.sine_pretrain_steps:
        cfg.sine["pretrain_steps"] = args.sine_pretrain_steps
    if args.sine_width:
        cfg.sine["width"] = args.sine_width
    families = _named_tasks(args)
    if families:
        search = _specs(args.task or args.tasks) if (args.task or args.tasks) else cfg.tasks
        cfg.tasks, cfg.test_tasks = tuple(search), tuple(_specs(args.test_tasks)) if args.test_tasks else ()
        cfg.add_task_info({s: f for s, f in families.items() if is_code(s)})
    if test_at:
        cfg.test_seeds_at = _test_seeds_at(cfg, n_test, test_at)
    try:  # the same checks a stored config gets when it is read back
        return SearchConfig.checked(cfg.to_json())
    except (ValueError, TypeError) as e:
        raise UsageError(f"configuration: {e}") from None


def _specs(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",")]
    if not all(specs):
        raise UsageError(f"expected comma-separated task names, got {text!r}")
    return specs


def _named_tasks(args) -> dict[str, TaskFamily]:
    """The tasks named by --task / --tasks / --test-tasks, resolved (a user's code imported: the user
    named it). One line, exit 2, for a bad name, a missing file or factory, a factory that fails."""
    if args.task and args.tasks:
        raise UsageError("--task and --tasks: give one (--tasks A,B searches on several)")
    specs = [*(_specs(args.task) if args.task else []), *(_specs(args.tasks) if args.tasks else []),
             *(_specs(args.test_tasks) if args.test_tasks else [])]
    out = {}
    for spec in specs:
        try:
            out[spec] = resolve_task(spec, allow_code=True)
        except TaskError as e:
            raise UsageError(str(e)) from None
    return out


def _progress(stages: Stages) -> Progress:
    """The run's progress callbacks drawn by `stages` (bars in a terminal, timestamped lines
    elsewhere): each stage with its own fixed count, the batch labels as what it is doing now."""
    return Progress(message=stages.message, stage=stages.stage, advance=stages.advance, end=stages.end)


def _test_seeds_spec(text: str) -> tuple[int, dict[float, int]]:
    """`--test-seeds N` or `N,H=M,...`: N test seeds at every horizon, M at horizon H."""
    count = bounded_int(1, 10_000, "--test-seeds")
    horizon = finite_float(-1e300, 1e300, "--test-seeds: a horizon")  # any task variant (a noise level may be 0)
    head, *rest = text.split(",")
    at: dict[float, int] = {}
    for item in rest:
        h, eq, m = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--test-seeds: expected N or N,H=N,... (e.g. 50,20=150), got {text!r}")
        if horizon(h.strip()) in at:
            raise argparse.ArgumentTypeError(f"--test-seeds: horizon {h.strip()} is named twice")
        at[horizon(h.strip())] = count(m.strip())
    return count(head.strip()), at


def _test_seeds_at(cfg: SearchConfig, default: int, at: dict[float, int]) -> dict[str, int]:
    """The config's `test_seeds_at` for `--test-seeds default,H=N,...`: each variant of every task
    that gets fewer than the largest count, by its count. A horizon no task has is one line."""
    variants = {float(v) for spec in cfg.all_tasks for v in cfg.info(spec)["variants"]}
    missing = sorted(set(at) - variants)
    if missing:
        raise UsageError(f"--test-seeds: no task has horizon {', '.join(map(horizon_text, missing))} "
                         f"(held-out horizons / variants: {', '.join(map(horizon_text, sorted(variants)))})")
    most = max([default, *at.values()])
    return {repr(v): at.get(v, default) for v in sorted(variants) if at.get(v, default) < most}


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: marked interrupted, resumable.
    Ctrl-C gets Python's own handler back even when the process inherited SIGINT ignored (a
    background job of a non-interactive shell), so it always stops the run cleanly."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_tasks:
        from .tasks.registry import listing

        print(render_table(listing(), ["task", "what"]))
        return 0
    apply_threads(args)
    _stop_on_sigterm()
    if args.scheduler and args.workers:
        raise UsageError("--scheduler and --workers: give one (a remote cluster or a local one)")
    if args.timeout <= 0 or args.claim_timeout <= 0 or args.db_timeout < 0:
        raise UsageError("--timeout, --claim-timeout: need positive seconds; --db-timeout: non-negative")
    distributed = bool(args.scheduler or args.workers)
    # With Dask the workers evaluate on their own devices; this process only screens candidates.
    device = resolve_device("auto" if distributed and args.device == "cuda" else args.device)
    # every flag and named task is checked before anything is opened: bad input writes nothing
    if args.resume:
        _named_tasks(args)  # a user's task named again, so that the resumed run can train on it
    cfg = None if args.resume else _config(args)
    # --resume never creates a file or a schema: a missing or foreign database is one line
    try:
        store = Store(args.db, create=not args.resume, retries=args.db_retries, busy_timeout=args.db_timeout)
    except StoreError as e:
        if args.resume:
            raise UsageError(f"cannot resume run {args.resume!r}: {e}") from None
        raise
    client = cluster = None
    try:
        if distributed:
            from .search.distributed import connect

            try:  # before the run exists: an unreachable cluster leaves nothing behind
                client, cluster = connect(args.scheduler, args.workers)
            except (OSError, RuntimeError) as e:  # unreachable scheduler, Dask missing
                raise UsageError(f"Dask: {e}") from None
            log.info(f"evaluating on Dask: {client.scheduler.address}")
        cooperate = args.cooperate if args.cooperate is not None else not store.url.startswith("sqlite")
        stages = Stages.for_stderr()
        try:
            # the run's parts, built here and handed over: what it optimises, how it proposes,
            # where fitness is computed (this process, or every fidelity stage on the cluster)
            config = Run.stored_config(store, args.resume) if args.resume else cfg
            assert config is not None
            if client is not None:
                from .search.distributed import DaskEvaluator
            parts: dict[str, Any] = {"objective": Objective(config, device), "strategy": STRATEGIES[config.algorithm].of(config),
                     "evaluator": LocalEvaluator() if client is None else
                     DaskEvaluator(client, args.device, args.batch_size, args.timeout),
                     "progress": _progress(stages),
                     "cooperate": Cooperation(stale_s=args.claim_timeout) if cooperate else None}
            if args.resume:
                run = Run.resume(store, args.resume, **parts)
            else:
                name = args.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
                run = Run.create(store, name, config, **parts)
        except RunError as e:
            stages.close()
            raise UsageError(str(e)) from None
        return _search(run, stages, args.format)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        store.close()


def _search(run: Run, stages: Stages, fmt: str) -> int:
    """Run the search and the funnel inside the run's lifecycle, then print the summary (the time
    per stage on stderr, and in the JSON document)."""
    start = time.perf_counter()
    try:
        with run:  # first thing: from here on a Ctrl-C marks the run interrupted
            log.info(f"run {run.name!r} (id {run.id}) -> {run.storage.url}")
            best = run.optimize()
            comparison = run.funnel(best)
    except KeyboardInterrupt:
        stages.close()
        log.warning(stages.summary())
        if run.status == "finished":  # the signal came while the finished run was being marked so
            log.warning(f"interrupted after run {run.name!r} finished: its results are stored (nos query runs)")
        else:
            log.warning(f"interrupted: continue with  python -m nos.evolve --resume {run.name}")
        return 130
    finally:
        stages.close()  # ends the last stage before the run's seconds are taken
    seconds = time.perf_counter() - start
    log.info(stages.summary())
    summary: dict = {"run": run.name, "run_id": run.id, "seconds": seconds, "stage_seconds": stages.stage_seconds,
                     **run.metrics(),
                     "best_search": [{"id": c.id, "fitness": c.fitness, "lr": c.lr, "expression": c.expression}
                                     for c in best]}
    if comparison is not None:
        summary["champion"] = comparison.champion
        if run.config.race:
            summary["race"] = diagnostics(run.storage, run.storage.get_run(run.id) or {}, cmp=comparison)["race"]
        summary["comparison"] = comparison.json(run.name)
        if comparison.champion:
            summary["verdicts"] = {f"{h:g}": v for h, v in comparison.verdicts(comparison.champion).items()}
    if fmt == "json":
        print_json(summary)
        return 0
    _print_summary(run, summary, best, comparison)
    return 0


def _print_summary(run: Run, summary: dict, best: list, comparison: Comparison | None) -> None:
    counts = summary["status_counts"]
    print(f"\nrun {run.name!r}: {summary['candidates']} candidates in {summary['seconds']:.0f} s; "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"integrity pass rate {100 * (summary['integrity_pass_rate'] or 0):.0f}%, "
          f"duplicate rate {100 * (summary['duplicate_rate'] or 0):.0f}%")
    if best:
        b = best[0]
        print(f"best in search: #{b.id} fitness {b.fitness:.4g} (lr {b.lr:g}): {b.expression}")
    if comparison is None:
        return
    print(f"\nheld-out comparison ({describe(run.config.budget_fpe)})")
    print(comparison_text(comparison))
    if summary.get("race"):
        print("\n" + race_text(summary["race"]))
    champ = comparison.champion
    if champ:
        print()
        for task in comparison.tasks:  # one line per task (the first task's alone for a one-task run)
            won = [f"{h:g}" for h, w in comparison.beats_all(champ, task).items() if w]
            label = comparison.labels.get(task, "t_max")
            verdict = f"wins at {label} = {', '.join(won)}" if won else f"wins at no {label}"
            where = f" of task {task}" if len(comparison.tasks) > 1 else ""
            print(f"{champ} (champion, chosen on validation) against all five baselines on the test seeds{where}: "
                  f"{verdict}")
        print(invocation(f"export it:  python -m nos.export {candidate_id(champ)} -o runs/{run.name}-{candidate_id(champ)}.py"))


if __name__ == "__main__":
    sys.exit(run_command(main))
