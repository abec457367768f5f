"""`python -m nos.bench`: throughput of candidate evaluation, batched vs one at a time.

Everything is measured in one run on one machine, so the printed ratios compare like with like.
A "candidate-step" is one training step of one candidate optimizer (forward + backward of the
rollout and the interpreted update). Candidates are distinct random genomes that pass the
integrity check (a realistic mix of ops), each at one learning rate.

    python -m nos.bench                      # 64 candidates at horizon 5 is the headline row
    python -m nos.bench --format json        # keys: naive_candidate_steps_per_s, batched_..., speedup
    python -m nos.bench --no-scaling         # skip the Dask row (1 vs 2 local worker processes)

The scaling row: candidates per second evaluating the fitness of the same 32 candidates (small
budget, horizon 1) through `nos.distributed.DaskFitness` on a local Dask cluster of 1 and of 2
worker processes (one thread each), after a warm-up that pretrains the task on every worker.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence

import torch

from search_space.genome import Genome
from search_space.mutation import random_genome

from .cli import (
    ArgumentParser,
    add_device,
    add_format,
    format_table,
    positive_int,
    print_json,
    resolve_device,
    run_command,
)
from .engine import integrity
from .engine.trainer import train
from .evaluation.sine import SearchSetup, SineEvaluator
from .tasks.sine import DEFAULT_CACHE_DIR, SineConfig, SineTask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def passing_genomes(n: int, seed: int = 0, device: torch.device | str = "cpu") -> list[Genome]:
    """n distinct random genomes that pass the integrity check (deterministic)."""
    rng = random.Random(seed)
    out: list[Genome] = []
    while len(out) < n:
        batch = [random_genome(rng) for _ in range(4 * n)]
        for g, r in zip(batch, integrity.check(batch, device=device)):
            if r.passed and len(out) < n:
                out.append(r.apply(g))
    return out


def rate(task: SineTask, genomes: Sequence[Genome], steps: int, device: torch.device) -> float:
    """Candidate-steps per second training `genomes` together in one batch."""
    train(task, genomes[:1], [1e-3], steps=2)  # warm-up (allocator, kernels)
    _sync(device)
    start = time.perf_counter()
    train(task, genomes, [1e-3] * len(genomes), steps=steps)
    _sync(device)
    return len(genomes) * steps / (time.perf_counter() - start)


def naive_rate(task: SineTask, genomes: Sequence[Genome], steps: int, device: torch.device) -> float:
    """Candidate-steps per second training the same genomes one at a time."""
    train(task, genomes[:1], [1e-3], steps=2)
    _sync(device)
    start = time.perf_counter()
    for g in genomes:
        train(task, [g], [1e-3], steps=steps)
    _sync(device)
    return len(genomes) * steps / (time.perf_counter() - start)


def _has_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def scaling(genomes: Sequence[Genome], cache_dir: str, workers: Sequence[int] = (1, 2)) -> dict:
    """Candidates per second of `DaskFitness` on local clusters of 1 and 2 worker processes."""
    from distributed import Client, LocalCluster

    from .distributed import DaskFitness

    setup = SearchSetup(horizons=(1.0,), budget_fpe=300, sine=SineConfig(pretrain_steps=300), cache_dir=cache_dir)
    adam = SineEvaluator(setup, "cpu").adam_reference()  # also fills the pretraining cache
    out: dict = {"candidates": len(genomes), "budget_fpe": setup.budget_fpe, "horizon": 1.0}
    for n in workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(n)
            fitness = DaskFitness(client, setup, "cpu", batch_size=max(1, len(genomes) // (4 * n)), timeout_s=600)
            fitness(genomes[: 2 * n], adam)  # warm-up: imports and tasks on every worker
            start = time.perf_counter()
            fitness(genomes, adam)
            out[f"workers_{n}_candidates_per_s"] = len(genomes) / (time.perf_counter() - start)
        print(f"  dask workers={n}: {out[f'workers_{n}_candidates_per_s']:.2f} candidates/s", file=sys.stderr)
    if len(workers) > 1:
        out["speedup"] = out[f"workers_{workers[-1]}_candidates_per_s"] / out[f"workers_{workers[0]}_candidates_per_s"]
    return out


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.bench", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="8,64,256", help="candidates per batch (default 8,64,256)")
    p.add_argument("--horizons", default="1,5", help="rollout horizons t_max (default 1,5)")
    p.add_argument("--steps", type=positive_int, default=10, help="training steps per measurement (10)")
    p.add_argument("--naive", type=positive_int, default=8, help="candidates timed one at a time (8)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="add the Dask row: 32 candidates with 1 and 2 local workers (default: on when Dask is installed)")
    add_device(p)
    add_format(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x]
        horizons = [float(x) for x in args.horizons.split(",") if x]
    except ValueError:
        p.error("--batch-sizes and --horizons take comma-separated numbers")
    if not sizes or min(sizes) < 1 or not horizons or min(horizons) <= 0:
        p.error("need positive batch sizes and horizons")
    device = resolve_device(args.device)
    print(f"bench on {device} ({torch.get_num_threads()} threads)", file=sys.stderr)

    start = time.perf_counter()
    pool = passing_genomes(max(sizes + [args.naive]), device=device)
    check_pool = [random_genome(random.Random(1)) for _ in range(1000)]
    t0 = time.perf_counter()
    integrity.check(check_pool, device=device)
    integrity_s = time.perf_counter() - t0

    rows = []
    headline = None
    for h in horizons:
        task = SineTask(SineConfig(), 0, 0, h, device, args.cache_dir)
        naive = naive_rate(task, pool[: args.naive], args.steps, device)
        for n in sizes:
            batched = rate(task, pool[:n], args.steps, device)
            row = {"horizon": h, "candidates": n, "naive_candidate_steps_per_s": naive,
                   "batched_candidate_steps_per_s": batched, "speedup": batched / naive}
            rows.append(row)
            print(f"  t_max={h:g} C={n}: {batched:.0f} vs {naive:.0f} candidate-steps/s", file=sys.stderr)
            if n == 64 and h == 5:
                headline = row
    headline = headline or rows[-1]
    do_scaling = _has_dask() if args.scaling is None else args.scaling
    if do_scaling and not _has_dask():
        p.error("--scaling needs Dask: pip install 'nos[distributed]'")
    scale = scaling(passing_genomes(32, seed=7, device=device), args.cache_dir) if do_scaling else None
    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        **{k: headline[k] for k in ("naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup")},
        "headline": {"candidates": headline["candidates"], "horizon": headline["horizon"]},
        "integrity_check_1000_random_s": integrity_s,
        "rows": rows,
        "scaling": scale,
        "seconds": time.perf_counter() - start,
    }
    if args.format == "json":
        print_json(out)
        return 0
    print(format_table(rows, ["horizon", "candidates", "naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup"],
                       ["t_max", "candidates", "one-at-a-time /s", "batched /s", "speedup"]))
    print(f"\nintegrity check of 1,000 random genomes (x 6 lrs x 2 signs, 35 steps): {integrity_s:.2f} s")
    print(f"headline (C={headline['candidates']}, t_max={headline['horizon']:g}): speedup {headline['speedup']:.1f}x")
    if scale is not None:
        print("\nscaling (Dask, local worker processes, 1 thread each; 32 candidates, horizon 1, budget 300):")
        print(format_table([{"workers": n, "candidates_per_s": scale[f"workers_{n}_candidates_per_s"]} for n in (1, 2)],
                           ["workers", "candidates_per_s"], ["workers", "candidates/s"]))
        print(f"2 vs 1 workers: {scale['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
