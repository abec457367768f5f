"""`python -m nos.bench`: throughput of candidate evaluation, batched vs one at a time.

Everything is measured in one run on one machine, so the printed ratios compare like with like.
A "candidate-step" is one training step of one candidate optimizer (forward + backward of the
rollout and the interpreted update). Candidates are distinct random genomes that pass the
integrity check (a realistic mix of ops), each at one learning rate.

    python -m nos.bench                      # 64 candidates at horizon 5 is the headline row
    python -m nos.bench --format json        # keys: naive_candidate_steps_per_s, batched_..., speedup
"""

from __future__ import annotations

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
from .tasks.sine import SineConfig, SineTask


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


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.bench", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="8,64,256", help="candidates per batch (default 8,64,256)")
    p.add_argument("--horizons", default="1,5", help="rollout horizons t_max (default 1,5)")
    p.add_argument("--steps", type=positive_int, default=10, help="training steps per measurement (10)")
    p.add_argument("--naive", type=positive_int, default=8, help="candidates timed one at a time (8)")
    p.add_argument("--cache-dir", default="runs/cache")
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
    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        **{k: headline[k] for k in ("naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup")},
        "headline": {"candidates": headline["candidates"], "horizon": headline["horizon"]},
        "integrity_check_1000_random_s": integrity_s,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    if args.format == "json":
        print_json(out)
        return 0
    print(format_table(rows, ["horizon", "candidates", "naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup"],
                       ["t_max", "candidates", "one-at-a-time /s", "batched /s", "speedup"]))
    print(f"\nintegrity check of 1,000 random genomes (x 6 lrs x 2 signs, 35 steps): {integrity_s:.2f} s")
    print(f"headline (C={headline['candidates']}, t_max={headline['horizon']:g}): speedup {headline['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
