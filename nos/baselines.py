"""`python -m nos.baselines`: the five tuned baselines of a task (the sine rollout by default), on test seeds.

Adam, Adam + clip 1.0, both with linear warmup + cosine decay, and RandOpt (layer variant and
sigma): every lr / sigma / variant chosen per horizon on the validation seeds, then each method
run once per horizon on the test seeds -- the protocol of every search (`nos.evaluation.protocol`).
Results are stored in the database under the protocol's key and reused by every later command
and run with the same protocol (`--db`, default runs/nos.sqlite), so `nos evolve` does not tune
them again. When every row is stored already the database is only read (opened read-only: a
file and folder nos cannot write work); it is opened for writing only when rows must be computed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from db.store import Store, StoreError

from .evaluation.compare import compare
from .evaluation.fitness import HORIZONS
from .evaluation.protocol import Protocol, Seeds
from .search.config import DEFAULT_SEEDS
from .search.funnel import before_of, tuned_baselines
from .tasks.budget import DEFAULT_BUDGET_FPE, describe
from .tasks.registry import WAVES, TaskError, resolve
from .tasks.sine import DEFAULT_CACHE_DIR, SineConfig, WaveFamily, pretrain_missing
from .ui.cli import (
    DEFAULT_DB,
    MAX_BUDGET,
    MAX_HORIZON,
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
    list_of,
    path_arg,
    print_json,
    resolve_device,
    run_command,
    text_arg,
)
from .ui.progress import Stages
from .ui.tables import comparison_text

log = logging.getLogger("nos.baselines")  # not __name__: it is __main__ under python -m


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sine", type=text_arg("--task"),
                   help="a shipped task (nos evolve --list-tasks) or FILE.py:FACTORY (sine)")
    p.add_argument("--horizons", type=list_of(float, lo=MIN_HORIZON, hi=MAX_HORIZON, max_items=20, what="horizons (t_max)"),
                   default=None, help="comma-separated t_max values of a wave task (1,2,5,10,20); other tasks: all "
                                      "their variants")
    p.add_argument("--validation-seeds", type=bounded_int(1, 900, "--validation-seeds"),
                   default=len(DEFAULT_SEEDS.validation), help=f"seeds that choose ({len(DEFAULT_SEEDS.validation)})")
    p.add_argument("--test-seeds", type=bounded_int(1, 10_000, "--test-seeds"), default=len(DEFAULT_SEEDS.test),
                   help=f"seeds that are reported ({len(DEFAULT_SEEDS.test)})")
    p.add_argument("--budget", type=bounded_int(MIN_BUDGET, MAX_BUDGET, "a budget (forward-pass equivalents)"),
                   default=DEFAULT_BUDGET_FPE, help="forward-pass equivalents per method (3 = one gradient step)")
    p.add_argument("--quick", action="store_true", help="horizons <= 5, one validation seed, three test seeds")
    p.add_argument("--published", action="store_true",
                   help="also tune and report NOS's published optimizers (Opt5, Opt6, Opt7, AdamClip)")
    p.add_argument("--sine-pretrain-steps", type=bounded_int(1, 1_000_000, "--sine-pretrain-steps"),
                   help="pretraining steps of the sine MLP (3000)")
    p.add_argument("--sine-width", type=bounded_int(1, 4096, "--sine-width"), help="hidden width of the sine MLP (64)")
    p.add_argument("--cache-dir", type=path_arg("--cache-dir"), default=DEFAULT_CACHE_DIR,
                   help=f"pretrained-weight cache ({DEFAULT_CACHE_DIR})")
    p.add_argument("--db", type=db_arg, default=DEFAULT_DB,
                   help=f"where the tuned baselines are stored and reused (path or SQLAlchemy URL; {DEFAULT_DB})")
    add_device(p)
    add_threads(p)
    add_format(p)
    return p


def protocol_of(args) -> Protocol:
    sine = {k: v for k, v in (("pretrain_steps", args.sine_pretrain_steps), ("width", args.sine_width)) if v}
    try:
        family = resolve(args.task, sine, allow_code=True)  # the user named it on the command line
    except TaskError as e:
        raise UsageError(str(e)) from None
    wave = args.task in WAVES
    if args.horizons and not wave:
        raise UsageError(f"--horizons: task {args.task!r} has {family.variant_label} "
                         f"{', '.join(f'{v:g}' for v in family.variants)}; --horizons is for the wave tasks")
    horizons = tuple(args.horizons or HORIZONS) if wave else family.variants
    n_val, n_test = args.validation_seeds, args.test_seeds
    if args.quick:
        horizons, n_val, n_test = (tuple(h for h in horizons if h <= 5) or (1.0,)) if wave else horizons[:1], 1, 3
    seeds = Seeds.counted(len(DEFAULT_SEEDS.search), n_val, n_test)
    if wave:  # the sine task's protocol exactly as before tasks had names (its stored rows stay valid)
        return Protocol(sine=SineConfig(**sine), seeds=seeds, horizons=horizons, budget_fpe=args.budget,
                        cache_dir=args.cache_dir, spec=args.task)
    return Protocol.of(family, args.task, seeds, args.budget, args.cache_dir, horizons=horizons)


def _all_stored(store: Store, protocol: Protocol, published: bool) -> bool:
    """Does the database hold every row `tuned_baselines` would return: each split's rows (and
    the published optimizers', with `published`) at every horizon of the protocol?"""
    suffixes = ("", "+published") if published else ("",)
    return all(set(protocol.horizons) <= {b["horizon"] for b in store.baselines(protocol=protocol.key(split) + sfx)}
               for split in ("validation", "test") for sfx in suffixes)


def open_store(db: str, protocol: Protocol, published: bool = False) -> Store:
    """The database read-only when it holds everything (nothing will be written, so a file or
    folder this user cannot write works, and no -wal / -shm appears); read-write otherwise."""
    try:
        store = Store(db, readonly=True)
    except StoreError:
        # missing or empty (created now), or refused again, with the read-write open's own line
        return Store(db)
    try:
        if _all_stored(store, protocol, published):
            return store
    except BaseException:
        store.close()
        raise
    store.close()
    try:
        return Store(db)
    except StoreError as e:  # readable, but not writable: say why writing was needed at all
        raise StoreError(f"{e}; rows of this protocol are not stored yet, and computing them needs a database "
                         "nos can write") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_threads(args)
    protocol = protocol_of(args)
    device = resolve_device(args.device)
    start = time.perf_counter()
    # the store first: a bad one is refused before the work
    with open_store(args.db, protocol, args.published) as store, Stages.for_stderr() as stages:
        evaluator = protocol.evaluator(device)
        if not store.readonly and isinstance(evaluator.family, WaveFamily):
            # the networks of every held-out seed, as a stage of its own (read-only: nothing to train)
            seeds = (*protocol.seeds.validation, *protocol.seeds.test)
            pretrain_missing([(evaluator.family.sine, s, protocol.cache_dir) for s in seeds], device, stages)
        rows = tuned_baselines(store, protocol, evaluator, progress=stages, published=args.published)
    seconds = time.perf_counter() - start
    log.info(stages.summary())
    cmp = compare(rows, before_of(rows), protocol.seeds, protocol.horizons, task=protocol.task)
    cmp.labels[protocol.task] = protocol.setup().resolved().variant_label
    if args.format == "json":
        print_json({"budget_fpe": protocol.budget_fpe, "protocol": {s: protocol.key(s) for s in ("validation", "test")},
                    "seconds": seconds, "stage_seconds": stages.stage_seconds, **cmp.json()})
        return 0
    print(comparison_text(cmp))
    print(f"\n{describe(protocol.budget_fpe)}; {seconds:.0f} s on {device}; stored in {args.db} "
          f"(protocol {protocol.key('test')})")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
