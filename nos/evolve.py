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
from .engine.evaluate import MethodResult, geometric_mean_ratio, wins
from .ga.particle import Cooperation, ParticleSearch, Progress, SearchConfig
from .report_table import comparison_json, comparison_table
from .tasks.budget import describe

PRESETS = {
    "default": {},
    "paper": {"initial": 500, "particles": 50, "timesteps": 5, "mutations": 7},
}
RIVALS = ("adam", "adam_clip", "randopt_all")


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


def _funnel_rows(run_id: int, results: dict[str, dict[float, MethodResult]], best: list[dict], cfg: SearchConfig):
    """Evaluations of the hall of fame and baseline rows of the rivals, for the database."""
    evaluations: dict[int, list[dict]] = {}
    baselines = []
    for name, per_h in results.items():
        for h, r in per_h.items():
            for s, loss in zip(cfg.heldout_seeds, r.losses):
                if name.startswith("#"):
                    evaluations.setdefault(int(name[1:]), []).append(
                        {"task": "sine_heldout", "horizon": h, "lr": r.hparam, "seed": s, "loss": loss,
                         "steps": cfg.total_steps, "seconds": 0.0}
                    )
                else:
                    baselines.append({"run_id": run_id, "method": name, "task": "sine_heldout", "horizon": h,
                                      "seed": s, "loss": loss, "hparam": r.hparam, "budget": cfg.budget_fpe})
    return evaluations, baselines


def _best_heldout(results: dict[str, dict[float, MethodResult]]) -> str | None:
    """The funnel candidate with the best geometric-mean ratio to tuned Adam over the horizons."""
    scores = {}
    for name, per_h in results.items():
        if not name.startswith("#"):
            continue
        pairs = [(r.mean, results["adam"][h].mean) for h, r in per_h.items()]
        if all(x is not None and a for x, a in pairs):
            scores[name] = geometric_mean_ratio([x for x, _ in pairs], [a for _, a in pairs])
    return min(scores, key=scores.get) if scores else None


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
    try:
        if args.resume:
            run = store.get_run(args.resume)
            if run is None:
                raise UsageError(f"no run named {args.resume!r} in {store.url}")
            if run["status"] == "finished":
                raise UsageError(f"run {args.resume!r} already finished")
            cfg = SearchConfig.from_json(run["config"])
            run_id, name = run["id"], run["name"]
            store.set_run_status(run_id, "running")
        else:
            cfg = _config(args)
            name = args.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
            if store.get_run(name) is not None:
                raise UsageError(f"a run named {name!r} exists; continue it with --resume {name}")
            run_id = store.create_run(name, cfg.to_json(), cfg.seed)
        print(f"run {name!r} (id {run_id}) -> {store.url}", file=sys.stderr)
        cooperate = args.cooperate if args.cooperate is not None else not store.url.startswith("sqlite")
        coop = Cooperation(stale_s=args.claim_timeout) if cooperate else None
        client = cluster = None
        fitness_fn = None
        if distributed:
            from .distributed import DaskFitness, connect

            try:
                client, cluster = connect(args.scheduler, args.workers)
            except (OSError, RuntimeError) as e:  # unreachable scheduler, Dask missing
                raise UsageError(f"Dask: {e}") from None
            print(f"evaluating on Dask: {client.scheduler.address}", file=sys.stderr)
            fitness_fn = DaskFitness(client, cfg.setup(), args.device, args.batch_size, args.timeout)
        try:
            return _search(store, run_id, name, cfg, device, args.format, fitness_fn, coop)
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    finally:
        store.close()


def _search(store: Store, run_id: int, name: str, cfg: SearchConfig, device, fmt: str,
            fitness_fn=None, coop: Cooperation | None = None) -> int:
    bar = Bar()
    search = ParticleSearch(store, run_id, cfg, device, Progress(bar.planned, bar.judged, bar.message),
                            fitness_fn=fitness_fn, cooperate=coop)
    start = time.perf_counter()
    funnel_done = True
    try:
        best = search.run()
        results = None
        if cfg.funnel and best:
            # Cooperating processes run the funnel once: the claim holder; the others wait for
            # it to finish the run (or take over if it dies).
            if coop is None or search.claim_or_wait("funnel", lambda: store.get_run(run_id)["status"] == "finished"):
                bar.message("held-out funnel")
                results = search.funnel(best, progress=bar.message)
                evaluations, baselines = _funnel_rows(run_id, results, best, cfg)
                store.add_evaluations(evaluations)
                store.add_baselines(baselines)
            else:
                funnel_done = False
    except KeyboardInterrupt:
        bar.close()
        search.close()
        store.set_run_status(run_id, "interrupted")
        print(f"\ninterrupted: continue with  python -m nos.evolve --resume {name}", file=sys.stderr)
        return 130
    except BaseException:
        bar.close()
        search.close()
        store.set_run_status(run_id, "failed")
        raise
    bar.close()
    search.close()
    if funnel_done:
        store.set_run_status(run_id, "finished")
    seconds = time.perf_counter() - start
    counts = store.status_counts(run_id)
    total = sum(counts.values())
    summary = {
        "run": name, "run_id": run_id, "seconds": seconds, "candidates": total, "status_counts": counts,
        "integrity_pass_rate": (counts["evaluated"] + counts["error"]) / max(1, total - counts["duplicate"] - counts["invalid"]),
        "duplicate_rate": counts["duplicate"] / max(1, total),
        "best_search": best[:1],
    }
    if results is not None:
        champion = _best_heldout(results)
        summary["champion"] = champion
        summary["heldout"] = comparison_json(results)
        if champion:
            summary["wins"] = {f"{h:g}": w for h, w in wins(results, champion, RIVALS).items()}
    if fmt == "json":
        print_json({**summary, "best_search": [{k: r.get(k) for k in ("id", "fitness", "lr", "expression")} for r in best]})
        return 0
    print(f"\nrun {name!r}: {total} candidates in {seconds:.0f} s; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"integrity pass rate {100 * summary['integrity_pass_rate']:.0f}%, duplicate rate {100 * summary['duplicate_rate']:.0f}%")
    if best:
        print(f"best in search: #{best[0]['id']} fitness {best[0]['fitness']:.4g} (lr {best[0]['lr']:g}): {best[0]['expression']}")
    if results is not None:
        champion = summary.get("champion")
        shown = {k: v for k, v in results.items() if not k.startswith("#") or k == champion}
        print("\nheld-out comparison (" + describe(cfg.budget_fpe) + f"; seeds {', '.join(map(str, cfg.heldout_seeds))})")
        print(comparison_table(shown))
        if champion:
            won = [f"{h:g}" for h, w in wins(results, champion, RIVALS).items() if w]
            verdict = f"wins at t_max = {', '.join(won)}" if won else "wins at no horizon"
            print(f"\n{champion} vs Adam, Adam + clip and RandOpt: {verdict}")
            print(f"export it:  python -m nos.export {champion[1:]} -o runs/{name}-{champion[1:]}.py")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
