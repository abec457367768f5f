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
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from tqdm import tqdm

from db.store import Store

from .cli import (
    DEFAULT_DB,
    ArgumentParser,
    UsageError,
    add_device,
    add_format,
    nonneg_int,
    number_list,
    positive_int,
    print_json,
    resolve_device,
    run_command,
)
from .ga.particle import ParticleGA
from .report_table import comparison_json, comparison_table
from .search import PRESETS, Cooperation, Progress, Run, RunError, SearchConfig
from .search.funnel import RIVALS, candidate_id, wins
from .tasks.budget import describe


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.evolve", description=__doc__.split("\n")[0])
    d = SearchConfig()
    p.add_argument("--preset", choices=list(PRESETS), default="default", help="paper: NOS's scale")
    p.add_argument("--initial", type=positive_int, help=f"random genomes in the initial population ({d.initial})")
    p.add_argument("--particles", type=positive_int, help=f"independent particles ({d.particles})")
    p.add_argument("--timesteps", type=nonneg_int, help=f"timesteps per particle ({d.timesteps})")
    p.add_argument("--mutations", type=positive_int, help=f"children per particle per timestep ({d.mutations})")
    p.add_argument("--max-tries", type=positive_int, help=f"tries per child slot ({d.max_tries})")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: same seed and config, same lineage")
    p.add_argument("--seed-builtins", action="store_true", help="add the classic optimizers to the initial population")
    p.add_argument("--elitism", action="store_true", help="keep a particle where it is unless a child is better")
    p.add_argument("--horizons", help=f"search horizons t_max, comma-separated ({','.join(f'{h:g}' for h in d.horizons)})")
    p.add_argument("--budget", type=positive_int, help=f"forward-pass equivalents per training run ({d.budget_fpe})")
    p.add_argument("--funnel", type=nonneg_int, help=f"best candidates re-evaluated on held-out seeds ({d.funnel}); 0 skips")
    p.add_argument("--heldout-horizons", help="funnel horizons, comma-separated (1,2,5,10,20)")
    p.add_argument("--heldout-seeds", help="funnel pretraining/target seeds, comma-separated (1001,1002,1003)")
    p.add_argument("--sine-pretrain-steps", type=positive_int, help="pretraining steps of the sine MLP (3000)")
    p.add_argument("--sine-width", type=positive_int, help="hidden width of the sine MLP (64)")
    p.add_argument("--cache-dir", default="runs/cache", help="pretrained-weight cache (runs/cache)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database path or SQLAlchemy URL ({DEFAULT_DB})")
    p.add_argument("--name", help="run name (default: run-<date>-<time>)")
    p.add_argument("--resume", metavar="NAME", help="continue the named run from the database")
    p.add_argument("--chunk", type=positive_int, help=f"initial candidates judged and stored together ({d.chunk})")
    p.add_argument("--timestep-chunk", type=nonneg_int,
                   help="children of a timestep judged together (0 = all of an attempt, the default)")
    g = p.add_argument_group("scale out (Dask; several processes on one PostgreSQL run)")
    g.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="evaluate candidates on this Dask cluster")
    g.add_argument("--workers", type=positive_int, help="evaluate on a local Dask cluster of N worker processes")
    g.add_argument("--batch-size", type=positive_int, default=16, help="candidates per Dask task (16)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a Dask task may run; a candidate over it is recorded as error (600)")
    g.add_argument("--cooperate", action=argparse.BooleanOptionalAction, default=None,
                   help="share the run with other processes through claims in the database "
                        "(default: on for server databases such as PostgreSQL, off for SQLite)")
    g.add_argument("--claim-timeout", type=float, default=60.0,
                   help="seconds without a heartbeat after which another process's claim is taken over (60)")
    g.add_argument("--db-retries", type=nonneg_int, default=5,
                   help="retries of a locked or unreachable database before giving up (5)")
    g.add_argument("--db-timeout", type=float, default=10.0, help="seconds an SQLite writer waits for the lock (10)")
    add_device(p)
    add_format(p)
    return p


def _config(args) -> SearchConfig:
    cfg = SearchConfig(**PRESETS[args.preset])
    for arg, attr in (("initial", "initial"), ("particles", "particles"), ("timesteps", "timesteps"),
                      ("mutations", "mutations"), ("max_tries", "max_tries"), ("budget", "budget_fpe"),
                      ("funnel", "funnel")):
        if getattr(args, arg) is not None:
            setattr(cfg, attr, getattr(args, arg))
    cfg.seed, cfg.seed_builtins, cfg.elitism, cfg.cache_dir = args.seed, args.seed_builtins, args.elitism, args.cache_dir
    if args.chunk:
        cfg.chunk = args.chunk
    if args.timestep_chunk is not None:
        cfg.timestep_chunk = args.timestep_chunk
    if args.horizons:
        try:
            cfg.horizons = number_list(args.horizons)
        except ValueError as e:
            raise UsageError(f"--horizons: {e}") from None
        if not cfg.horizons or any(h <= 0 for h in cfg.horizons):
            raise UsageError("--horizons: need positive values")
    for arg, attr, conv in (("heldout_horizons", "heldout_horizons", float), ("heldout_seeds", "heldout_seeds", int)):
        text = getattr(args, arg)
        if text:
            try:
                values = number_list(text, conv)
            except ValueError as e:
                raise UsageError(f"--{arg.replace('_', '-')}: {e}") from None
            if not values or any(v <= 0 for v in values if conv is float):
                raise UsageError(f"--{arg.replace('_', '-')}: need at least one (positive) value")
            setattr(cfg, attr, values)
    if args.sine_pretrain_steps:
        cfg.sine["pretrain_steps"] = args.sine_pretrain_steps
    if args.sine_width:
        cfg.sine["width"] = args.sine_width
    return cfg


class Bar:
    """tqdm progress: candidates judged, pass rate, duplicates, best fitness (on stderr)."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = tqdm(total=0, desc="candidates", unit="cand", file=sys.stderr, disable=not enabled or None)
        self.counts = {"evaluated": 0, "duplicate": 0, "judged": 0}
        self.best: float | None = None

    def planned(self, n: int) -> None:
        self.bar.total += n
        self.bar.refresh()

    def judged(self, rows: list[dict]) -> None:
        for r in rows:
            self.counts["judged"] += 1
            if r["status"] == "evaluated":
                self.counts["evaluated"] += 1
                if self.best is None or r["fitness"] < self.best:
                    self.best = r["fitness"]
            if r["status"] == "duplicate":
                self.counts["duplicate"] += 1
        self.bar.update(len(rows))
        j = max(1, self.counts["judged"] - self.counts["duplicate"])
        self.bar.set_postfix(
            passed=f"{100 * self.counts['evaluated'] / j:.0f}%",
            dups=self.counts["duplicate"],
            best="-" if self.best is None else f"{self.best:.3g}",
        )

    def message(self, msg: str) -> None:
        self.bar.set_description(msg)

    def close(self) -> None:
        self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.scheduler and args.workers:
        raise UsageError("--scheduler and --workers: give one (a remote cluster or a local one)")
    if args.timeout <= 0 or args.claim_timeout <= 0 or args.db_timeout < 0:
        raise UsageError("--timeout, --claim-timeout: need positive seconds; --db-timeout: non-negative")
    distributed = bool(args.scheduler or args.workers)
    # With Dask the workers evaluate on their own devices; this process only screens candidates.
    device = resolve_device("auto" if distributed and args.device == "cuda" else args.device)
    store = Store(args.db, retries=args.db_retries, busy_timeout=args.db_timeout)
    client = cluster = None
    try:
        cfg = None if args.resume else _config(args)
        if distributed:
            from .distributed import connect

            try:  # before the run exists: an unreachable cluster leaves nothing behind
                client, cluster = connect(args.scheduler, args.workers)
            except (OSError, RuntimeError) as e:  # unreachable scheduler, Dask missing
                raise UsageError(f"Dask: {e}") from None
            print(f"evaluating on Dask: {client.scheduler.address}", file=sys.stderr)
        cooperate = args.cooperate if args.cooperate is not None else not store.url.startswith("sqlite")
        bar = Bar()
        kw = {"progress": Progress(bar.planned, bar.judged, bar.message),
              "cooperate": Cooperation(stale_s=args.claim_timeout) if cooperate else None}
        try:
            if args.resume:
                run = Run.resume(store, args.resume, device, **kw)
            else:
                assert cfg is not None
                name = args.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
                run = Run.create(store, name, cfg, device, **kw)
        except RunError as e:
            bar.close()
            raise UsageError(str(e)) from None
        if client is not None:
            from .distributed import DaskFitness

            run.judge.fitness_fn = DaskFitness(client, run.config.setup(), args.device, args.batch_size, args.timeout)
        print(f"run {run.name!r} (id {run.id}) -> {store.url}", file=sys.stderr)
        return _search(run, bar, args.format)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        store.close()


def _search(run: Run, bar: Bar, fmt: str) -> int:
    """Run the search and the funnel inside the run's lifecycle, then print the summary."""
    start = time.perf_counter()
    try:
        with run:
            best = run.optimize(ParticleGA(run.config))
            results = run.funnel(best, progress=bar.message)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: continue with  python -m nos.evolve --resume {run.name}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary: dict = {"run": run.name, "run_id": run.id, "seconds": seconds, **run.metrics(),
                     "best_search": [{"id": c.id, "fitness": c.fitness, "lr": c.lr, "expression": c.expression}
                                     for c in best]}
    champion = None
    if results is not None:
        champion = Run.champion(results)
        summary["champion"] = champion
        summary["heldout"] = comparison_json(results)
        if champion:
            summary["wins"] = {f"{h:g}": w for h, w in wins(results, champion, RIVALS).items()}
    if fmt == "json":
        print_json(summary)
        return 0
    _print_summary(run, summary, best, results, champion)
    return 0


def _print_summary(run: Run, summary: dict, best: list, results: dict | None, champion: str | None) -> None:
    counts = summary["status_counts"]
    print(f"\nrun {run.name!r}: {summary['candidates']} candidates in {summary['seconds']:.0f} s; "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"integrity pass rate {100 * (summary['integrity_pass_rate'] or 0):.0f}%, "
          f"duplicate rate {100 * (summary['duplicate_rate'] or 0):.0f}%")
    if best:
        b = best[0]
        print(f"best in search: #{b.id} fitness {b.fitness:.4g} (lr {b.lr:g}): {b.expression}")
    if results is None:
        return
    cfg = run.config
    shown = {k: v for k, v in results.items() if candidate_id(k) is None or k == champion}
    print("\nheld-out comparison (" + describe(cfg.budget_fpe) + f"; seeds {', '.join(map(str, cfg.heldout_seeds))})")
    print(comparison_table(shown))
    if champion:
        won = [f"{h:g}" for h, w in wins(results, champion, RIVALS).items() if w]
        verdict = f"wins at t_max = {', '.join(won)}" if won else "wins at no horizon"
        print(f"\n{champion} vs Adam, Adam + clip and RandOpt: {verdict}")
        print(f"export it:  python -m nos.export {candidate_id(champion)} -o runs/{run.name}-{candidate_id(champion)}.py")


if __name__ == "__main__":
    sys.exit(run_command(main))
