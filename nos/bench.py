"""`python -m nos.bench`: throughput of candidate evaluation, batched vs one at a time, and vs its floor.

Everything is measured in one run on one machine, so the printed ratios compare like with like.
A "candidate-step" is one training step of one candidate optimizer (forward + backward of the
rollout and the interpreted update). Candidates are distinct random genomes that pass the
integrity check (a realistic mix of ops), each at one learning rate.

    python -m nos.bench                      # 64 candidates at horizon 5 is the headline row
    python -m nos.bench --format json        # one JSON document on stdout (keys below)
    python -m nos.bench --quick              # small sizes, a few seconds (for tests)
    python -m nos.bench --threads 2          # torch threads (default: `nos.ui.cli.apply_threads`)
    python -m nos.bench --no-scaling         # skip the Dask row (1 vs 2 local worker processes)

What it reports (JSON keys):

- rows: one-at-a-time vs batched rates of random genomes per (t_max, candidates); the headline
  row's `naive_candidate_steps_per_s`, `batched_candidate_steps_per_s` and `speedup` at top level.
- The floor: on a `StackedSineTask` (seeds 0, 1, 2 stacked on the candidate axis) with 256
  candidates at t_max = 5, the interpreter training the Adam genome (`interpreter_adam_...`) vs
  `reference_adam`, a hand-written batched Adam on the same task (`reference_adam_...`):
  `interpreter_vs_reference` = reference rate / interpreter rate (1 = at the floor), and
  `adam_loss_max_rel_diff`, the largest relative difference of their final losses (same lr).
- Random genomes on the same task: `random_vs_adam_cost` (cost per candidate-step relative to
  Adam's, on the kernels a search uses: the fused rollout and, where numba is there, the fused
  update of `nos.engine.fused`), `random_vs_adam_cost_eager_update` (the same with the eager
  update), `random_update_share` (the share of a random genome's step outside the task's forward +
  backward) and the ops by self CPU time (torch.profiler): `random_top_ops` / `adam_top_ops` of
  whole training steps, `random_update_top_ops` of the interpreter's update alone (`update_only`).
  The update alone on random genomes, eager op groups vs the fused kernel:
  `random_update_eager_candidate_steps_per_s`, `random_update_fused_candidate_steps_per_s`,
  `update_fused_vs_eager_speedup` (`update_kernel` says which one a search takes).
- Sharing the CPU: the interpreter's Adam rate alone and then beside a second busy torch process
  (large matmuls, torch's default threads), at this run's thread count and at the others
  compared (1 and torch's default): `shared_cpu_slowdown` = alone / shared at this run's
  threads, `shared_cpu_slowdown_threads_N` at N threads.

The scaling row: candidates per second evaluating the fitness of the same 32 candidates (small
budget, horizon 1) through `nos.search.distributed.DaskFitness` on a local Dask cluster of 1 and of 2
worker processes (one thread each), after a warm-up that pretrains the task on every worker.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from search_space.builtins import builtin
from search_space.genome import Genome
from search_space.mutation import random_genome

from .engine import fused as fused_update
from .engine import integrity
from .engine.interpreter import BatchedOptimizer
from .engine.trainer import Task, train
from .evaluation.fitness import SearchSetup, TaskEvaluator
from .tasks import sine_kernel
from .tasks.sine import DEFAULT_CACHE_DIR, SineConfig, SineTask, StackedSineTask
from .ui.cli import (
    MAX_HORIZON,
    MIN_HORIZON,
    ArgumentParser,
    add_device,
    add_format,
    add_threads,
    apply_threads,
    bounded_int,
    format_table,
    number_list,
    path_arg,
    print_json,
    resolve_device,
    run_command,
)

log = logging.getLogger("nos.bench")  # not __name__: it is __main__ under python -m


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


def rate(task: Task, genomes: Sequence[Genome], steps: int, device: torch.device) -> float:
    """Candidate-steps per second training `genomes` together in one batch."""
    train(task, genomes[:1], [1e-3], steps=2)  # warm-up (allocator, kernels)
    _sync(device)
    start = time.perf_counter()
    train(task, genomes, [1e-3] * len(genomes), steps=steps)
    _sync(device)
    return len(genomes) * steps / (time.perf_counter() - start)


def naive_rate(task: Task, genomes: Sequence[Genome], steps: int, device: torch.device) -> float:
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

    from .search.distributed import DaskFitness

    setup = SearchSetup(horizons=(1.0,), budget_fpe=300, sine=SineConfig(pretrain_steps=300), cache_dir=cache_dir)
    adam = TaskEvaluator(setup, "cpu").adam_reference()  # also fills the pretraining cache
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
        log.info(f"  dask workers={n}: {out[f'workers_{n}_candidates_per_s']:.2f} candidates/s")
    if len(workers) > 1:
        out["speedup"] = out[f"workers_{workers[-1]}_candidates_per_s"] / out[f"workers_{workers[0]}_candidates_per_s"]
    return out


# ---------------------------------------------------------------------------------- the floor

ADAM_BETAS = (0.9, 0.999)  # the adam builtin's moments (search_space.operands)
ADAM_EPS = 1e-8  # the `div` op's epsilon
ADAM_LR = 1e-3


@dataclass(frozen=True)
class FloorSizes:
    """What the floor, random-genome and shared-CPU measurements run on."""

    candidates: int = 256
    horizon: float = 5.0
    seeds: tuple[int, ...] = (0, 1, 2)  # pretraining = target seed, stacked on the candidate axis
    steps: int = 10
    repeats: int = 3  # best of, interleaved (interpreter, reference, interpreter, ...)


QUICK_FLOOR = FloorSizes(candidates=16, horizon=1.0, seeds=(0,), steps=3, repeats=1)


def stacked_task(sizes: FloorSizes, device: torch.device, cache_dir: str, kernel: str = "eager",
                 candidates: int | None = None) -> StackedSineTask:
    """`candidates` rows (`sizes.candidates` by default) over the tasks of `sizes.seeds` (row i on
    seed i mod n), rolled out by `kernel` (`nos.tasks.sine_kernel`: "eager" is the floor's)."""
    C = sizes.candidates if candidates is None else candidates
    tasks = [SineTask(SineConfig(), s, s, sizes.horizon, device, cache_dir, kernel=kernel) for s in sizes.seeds]
    return StackedSineTask(tasks, torch.arange(C) % len(tasks))


def fused_available(device: torch.device) -> bool:
    return sine_kernel.HAVE_NUMBA and device.type == "cpu"


def reference_adam(task: StackedSineTask | SineTask, candidates: int, lr: float, steps: int) -> list[float]:
    """Hand-written batched Adam (bias-corrected, torch.optim.Adam's update) on [C, P]
    parameters: the floor of training Adam on `task`. Returns the final loss per candidate."""
    b1, b2 = ADAM_BETAS
    theta = task.init_params(candidates)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t in range(1, steps + 1):
        theta.requires_grad_(True)
        task.loss(theta).sum().backward()
        g = theta.grad
        assert g is not None
        with torch.no_grad():
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2**t)).sqrt_().add_(ADAM_EPS)
            theta = theta.detach().addcdiv_(m / (1 - b1**t), denom, value=-lr)
    with torch.no_grad():
        return task.loss(theta).tolist()


def task_only(task: StackedSineTask | SineTask, candidates: int, steps: int) -> None:
    """The task's forward + backward alone, `steps` times (no update): what every optimizer pays."""
    theta = task.init_params(candidates)
    for _ in range(steps):
        theta.requires_grad_(True)
        task.loss(theta).sum().backward()
        theta = theta.detach()


def update_only(task: StackedSineTask, genomes: Sequence[Genome], steps: int) -> None:
    """The interpreter's update alone (`direction` and the noise, `perturb_`), `steps` times, on a
    fixed gradient: what the trainer adds to the task's forward + backward, less the `if_better`
    trials (their noisy copies are made, not scored)."""
    C = len(genomes)
    opt = BatchedOptimizer(genomes, [ADAM_LR] * C, [steps] * C, [0] * C, task.segments, task.device)
    theta = task.init_params(C)
    grad = 1e-3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0)).to(theta.device)
    with torch.no_grad():
        for _ in range(steps):
            theta = theta - opt.direction(theta, grad)
            opt.perturb_(theta)
            opt.advance()


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def best_rates(fns: dict[str, Callable[[], Any]], work: int, repeats: int,
               device: torch.device) -> tuple[dict[str, float], dict[str, Any]]:
    """Rate (work / s) of each function, the best of `repeats` interleaved runs after one warm-up
    run each (interleaving spreads a passing load over all of them); and each one's last result."""
    best = {k: float("inf") for k in fns}
    results: dict[str, Any] = {}
    for k, fn in fns.items():
        results[k] = fn()  # warm-up (allocator, kernels, thread pool)
    for _ in range(repeats):
        for k, fn in fns.items():
            seconds, results[k] = _timed(fn, device)
            best[k] = min(best[k], seconds)
    return {k: work / s for k, s in best.items()}, results


def max_rel_diff(a: Sequence[float | None], b: Sequence[float]) -> float:
    """max |a - b| / |b| over candidates (inf where `a` failed)."""
    return max((abs(x - y) / max(abs(y), 1e-30) if x is not None else float("inf")) for x, y in zip(a, b))


def top_ops(fn: Callable[[], Any], k: int = 8) -> list[dict]:
    """The k torch ops with the most self CPU time while running `fn` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:k]]


def floor(task: StackedSineTask, sizes: FloorSizes, random_pool: Sequence[Genome], device: torch.device,
          fused: StackedSineTask | None = None) -> dict:
    """The interpreter's Adam vs `reference_adam`, and random genomes vs Adam, on one task (the
    eager rollout); with `fused` (the same task on the fused kernel) also the search's own path
    against that floor: `rollout_vs_floor_speedup` = the interpreter's Adam on the fused rollout
    (trained in chunks, as the search does) / the hand-written Adam on the eager one."""
    C, T = sizes.candidates, sizes.steps
    adam = [builtin("adam")] * C
    randoms = list(random_pool[:C])
    fns: dict[str, Callable[[], Any]] = {
        "interpreter": lambda: train(task, adam, [ADAM_LR] * C, steps=T),
        "reference": lambda: reference_adam(task, C, ADAM_LR, T),
        "random": lambda: train(task, randoms, [ADAM_LR] * C, steps=T),
        "task": lambda: task_only(task, C, T),
    }
    if fused is not None:
        fns.update({
            "fused": lambda: train(fused, adam, [ADAM_LR] * C, steps=T),
            "fused_random": lambda: train(fused, randoms, [ADAM_LR] * C, steps=T),
            "fused_task": lambda: task_only(fused, C, T),
            # the fused rollout with the eager update: what the fused update buys
            "eager_update": on_kernels("fused", "eager", lambda: train(fused, adam, [ADAM_LR] * C, steps=T)),
            "eager_update_random": on_kernels("fused", "eager", lambda: train(fused, randoms, [ADAM_LR] * C, steps=T)),
        })
    update_fns = {path: on_kernels("fused", path, lambda: update_only(task, randoms, T)) for path in ("eager", "fused")}
    rates, results = best_rates(fns, C * T, sizes.repeats, device)
    update_rates, _ = best_rates(update_fns, C * T, sizes.repeats, device)
    search = fused if fused is not None else task  # what a search trains on
    adam_key, random_key = ("fused", "fused_random") if fused is not None else ("interpreter", "random")
    out = {
        "interpreter_adam_candidate_steps_per_s": rates["interpreter"],
        "reference_adam_candidate_steps_per_s": rates["reference"],
        "interpreter_vs_reference": rates["reference"] / rates["interpreter"],
        "adam_loss_max_rel_diff": max_rel_diff(results["interpreter"].losses, results["reference"]),
        "random_genome_candidate_steps_per_s": rates["random"],
        "random_vs_adam_cost": rates[adam_key] / rates[random_key],  # on the kernel a search uses
        "random_vs_adam_cost_eager": rates["interpreter"] / rates["random"],
        "task_only_candidate_steps_per_s": rates["task"],
        "random_update_share": max(0.0, 1.0 - rates[random_key] / rates["fused_task" if fused is not None else "task"]),
        "random_top_ops": top_ops(lambda: train(search, randoms, [ADAM_LR] * C, steps=T)),
        "random_update_top_ops": top_ops(lambda: update_only(task, randoms, T)),
        # the update alone (a fixed gradient), random genomes: eager op groups vs the fused kernel
        "random_update_eager_candidate_steps_per_s": update_rates["eager"],
        "random_update_fused_candidate_steps_per_s": update_rates["fused"],
        "update_fused_vs_eager_speedup": update_rates["fused"] / update_rates["eager"],
        "update_kernel": "fused" if fused_update.supports(randoms, device, torch.float32) else "eager",
        "adam_top_ops": top_ops(lambda: train(search, adam, [ADAM_LR] * C, steps=T)),
        "rollout_kernel": "fused" if fused is not None else "eager",
    }
    if fused is not None:
        out.update({
            "fused_adam_candidate_steps_per_s": rates["fused"],
            "fused_random_genome_candidate_steps_per_s": rates["fused_random"],
            "fused_task_only_candidate_steps_per_s": rates["fused_task"],
            "rollout_vs_floor_speedup": rates["fused"] / rates["reference"],
            "task_fused_vs_eager_speedup": rates["fused_task"] / rates["task"],
            "fused_adam_loss_max_rel_diff": max_rel_diff(results["fused"].losses, results["reference"]),
            "random_vs_adam_cost_eager_update": rates["eager_update"] / rates["eager_update_random"],
            "eager_update_adam_candidate_steps_per_s": rates["eager_update"],
            "eager_update_random_genome_candidate_steps_per_s": rates["eager_update_random"],
        })
    log.info(f"  floor (C={C}, t_max={sizes.horizon:g}): interpreter Adam {rates['interpreter']:.0f}, "
             f"reference {rates['reference']:.0f} candidate-steps/s ({out['interpreter_vs_reference']:.2f}x); "
             f"random genomes {out['random_vs_adam_cost']:.2f}x Adam's cost")
    if fused is not None:
        log.info(f"  fused rollout: interpreter Adam {rates['fused']:.0f} candidate-steps/s = "
                 f"{out['rollout_vs_floor_speedup']:.2f}x the floor; forward + backward "
                 f"{out['task_fused_vs_eager_speedup']:.2f}x eager's")
    return out


def rollout_scaling(sizes: FloorSizes, batches: Sequence[int], device: torch.device, cache_dir: str,
                    steps: int = 3) -> list[dict]:
    """The interpreter's Adam rate (candidate-steps/s) on the eager and the fused rollout as the
    batch grows: the eager one falls once the batch's weights spill out of cache."""
    rows = []
    kernels = ("eager", "fused") if fused_available(device) else ("eager",)
    for C in batches:
        adam, lrs = [builtin("adam")] * C, [ADAM_LR] * C

        def run(task: StackedSineTask, adam: list[Genome] = adam, lrs: list[float] = lrs) -> None:
            train(task, adam, lrs, steps=steps)

        tasks = {k: stacked_task(sizes, device, cache_dir, k, candidates=C) for k in kernels}
        rates, _ = best_rates({k: functools.partial(run, t) for k, t in tasks.items()}, C * steps, 1, device)
        rows.append({"candidates": C, **rates})
        log.info(f"  C={C}: " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items()) + " candidate-steps/s")
    return rows


# ---------------------------------------------------------------------------------- end to end

E2E_SEARCH = ("--funnel", "0", "--seed", "0", "--initial", "12", "--particles", "2", "--timesteps", "2",
              "--mutations", "3")  # the default search's size, no funnel: the search stage alone


def _fitness_moves(new: Sequence[float | None], old: Sequence[float | None], prefix: str) -> dict:
    """How far the search fitness of the same genomes moved between two ways of computing it."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(new, old) if a is not None and b is not None]
    rel = sorted(abs(a - b) / abs(b) for a, b in pairs)
    return {f"{prefix}{k}": v for k, v in {
        "fitness_both_finite": len(pairs),
        "fitness_finite_eager_only": sum(a is None and b is not None for a, b in zip(new, old)),
        "fitness_finite_fused_only": sum(a is not None and b is None for a, b in zip(new, old)),
        "fitness_median_rel_diff": rel[len(rel) // 2] if rel else None,
        "fitness_max_rel_diff": rel[-1] if rel else None,
        "fitness_within_1e-6": sum(r <= 1e-6 for r in rel),
        "fitness_within_1e-3": sum(r <= 1e-3 for r in rel),
        "fitness_spearman": float(spearmanr([a for a, _ in pairs], [b for _, b in pairs])[0]) if len(pairs) > 2 else None,
    }.items()}


@contextmanager
def kernels(rollout: str, update: str) -> Iterator[None]:
    """Tasks and optimizers built inside the block use these kernels (the `NOS_ROLLOUT` and
    `NOS_UPDATE` they read: `nos.tasks.sine_kernel`, `nos.engine.fused`)."""
    saved = {k: os.environ.get(k) for k in ("NOS_ROLLOUT", "NOS_UPDATE")}
    os.environ.update({"NOS_ROLLOUT": rollout, "NOS_UPDATE": update})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def on_kernels(rollout: str, update: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run inside `kernels(rollout, update)`."""
    def run() -> Any:
        with kernels(rollout, update):
            return fn()
    return run


def end_to_end(cache_dir: str, threads: int, genomes: Sequence[Genome]) -> dict:
    """Before (the eager rollout and the eager update) vs after (both fused): judged candidates per
    hour of the default search's size (`nos evolve`, a subprocess each, its search stage's
    seconds), and the search fitness of the same fixed genomes both ways (how far the numbers move)."""
    import json
    import tempfile

    out: dict = {"search_args": " ".join(E2E_SEARCH)}
    with tempfile.TemporaryDirectory() as tmp:
        for when, kernel in (("before", "eager"), ("after", "fused")):
            env = {**os.environ, "NOS_ROLLOUT": kernel, "NOS_UPDATE": kernel}
            cmd = [sys.executable, "-m", "nos.evolve", *E2E_SEARCH, "--db", os.path.join(tmp, f"{kernel}.sqlite"),
                   "--name", kernel, "--cache-dir", cache_dir, "--threads", str(threads), "--format", "json"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"the end-to-end search ({kernel}) failed: {proc.stderr.strip()[-400:]}")
            summary = json.loads(proc.stdout)
            judged = summary["status_counts"].get("evaluated", 0)
            seconds = summary["stage_seconds"]["search"]
            out[f"judged_{when}"], out[f"search_seconds_{when}"] = judged, seconds
            out[f"judged_per_hour_{when}"] = 3600 * judged / seconds
            log.info(f"  search ({kernel} rollout and update): {judged} judged in {seconds:.1f} s")
    out["judged_per_hour_speedup"] = out["judged_per_hour_after"] / out["judged_per_hour_before"]
    setup = SearchSetup(seeds=(0, 1), cache_dir=cache_dir)
    scores: dict[tuple[str, str], list[float | None]] = {}
    for rollout, update in (("eager", "eager"), ("fused", "eager"), ("fused", "fused")):
        with kernels(rollout, update):
            evaluator = TaskEvaluator(setup, "cpu")
            start = time.perf_counter()
            scores[rollout, update] = [f.fitness for f in evaluator.fitness(genomes, evaluator.adam_reference())]
            out[f"fitness_seconds_{rollout}_rollout_{update}_update"] = time.perf_counter() - start
    out["fitness_seconds_eager"] = out["fitness_seconds_eager_rollout_eager_update"]
    out["fitness_seconds_fused"] = out["fitness_seconds_fused_rollout_fused_update"]
    out["fitness_genomes"] = len(genomes)
    # after vs before (both kernels), and the update's share alone (the fused rollout either way)
    out.update(_fitness_moves(scores["fused", "fused"], scores["eager", "eager"], ""))
    out.update(_fitness_moves(scores["fused", "fused"], scores["fused", "eager"], "update_"))
    log.info(f"  fitness of {len(genomes)} fixed genomes, fused vs eager: median relative difference "
             f"{out['fitness_median_rel_diff']:.1e}, Spearman {out['fitness_spearman']:.3f}; the fused update "
             f"alone: {out['update_fitness_within_1e-6']} of {out['update_fitness_both_finite']} within 1e-6")
    return out


# ---------------------------------------------------------------------------------- sharing the CPU

_BUSY = """\
import os, sys, time
import torch
a = torch.randn(1024, 1024)
parent, deadline = os.getppid(), time.monotonic() + float(sys.argv[1])
a @ a
print("ready", flush=True)
while time.monotonic() < deadline and os.getppid() == parent:
    a @ a
"""


@contextmanager
def busy_neighbour(max_s: float = 600.0, start_timeout_s: float = 120.0) -> Iterator[subprocess.Popen]:
    """A second process busy with large matmuls at torch's default threads while the block runs.

    It stops by itself after `max_s` seconds or when this process dies, and is killed on leaving
    the block (also on an exception or Ctrl-C)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # Its own session, as another user's or terminal's process: with Linux's autogroup scheduling
    # the CPU is shared fairly between sessions first, then between the threads of each.
    proc = subprocess.Popen([sys.executable, "-c", _BUSY, str(max_s)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout_s)
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the busy neighbour process did not start within {start_timeout_s:g} s")
        time.sleep(0.5)  # let it get going
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def shared_cpu(task: StackedSineTask, sizes: FloorSizes, threads: Sequence[int], device: torch.device,
               budget_s: float = 30.0) -> dict:
    """The interpreter's Adam rate alone and beside a busy neighbour, at each thread count.

    Returns {threads: {"alone": rate, "shared": rate, "slowdown": alone / shared, and the steps
    each rate was timed over}}: `sizes.steps`, fewer where that would take over `budget_s`
    seconds. The thread count in force before the call is restored."""
    C, T = sizes.candidates, sizes.steps
    adam = [builtin("adam")] * C
    before = torch.get_num_threads()

    def rate_at(n: int) -> tuple[float, int]:
        """(rate, steps timed): a 1-step run (also the new thread pool's warm-up) sizes the timed
        one to at most `budget_s` seconds (a collapsed rate would otherwise take minutes)."""
        torch.set_num_threads(n)
        probe, _ = _timed(lambda: train(task, adam, [ADAM_LR] * C, steps=1), device)
        steps = max(1, min(T, int(budget_s / probe)))
        seconds, _ = _timed(lambda: train(task, adam, [ADAM_LR] * C, steps=steps), device)
        return C * steps / seconds, steps

    out: dict[int, dict[str, float]] = {}
    try:
        for n in threads:
            out[n] = dict(zip(("alone", "alone_steps"), rate_at(n)))
        with busy_neighbour():
            for n in threads:
                out[n].update(zip(("shared", "shared_steps"), rate_at(n)))
    finally:
        torch.set_num_threads(before)
    for n, r in out.items():
        r["slowdown"] = r["alone"] / r["shared"]
        log.info(f"  {n} thread(s): {r['alone']:.0f} alone, {r['shared']:.0f} beside a busy process "
                 f"({r['slowdown']:.1f}x slower)")
    return out


# ---------------------------------------------------------------------------------- the module adapter


def _forward_backward(task: Task, candidates: int, steps: int) -> None:
    """`steps` forward + backward passes of `candidates` rows of `task` (no update)."""
    theta = task.init_params(candidates)
    for _ in range(steps):
        theta.requires_grad_(True)
        task.loss(theta).sum().backward()
        theta = theta.detach()


def task_adapter_bench(threads: int, candidates: int = 64, steps: int = 5, repeats: int = 3) -> dict[str, float]:
    """The torch-module adapter (`nos.tasks.module`), measured in one call at `threads` threads.

    - digits (its search variant): forward + backward of `candidates` rows batched through vmap
      vs the same rows one at a time (`adapter_batched_candidate_steps_per_s`,
      `adapter_one_at_a_time_candidate_steps_per_s`, `adapter_batched_vs_one_speedup`);
    - the sine MLP (width 64, 50 pretraining steps) at t_max = 5 through the adapter vs the
      hand-stacked `StackedSineTask`, `candidates` rows each: `adapter_sine_vs_hand_stacked` =
      adapter time per candidate-step / hand-stacked time (1 = as fast; target <= 1.5).
    Best of `repeats` interleaved runs after a warm-up; the thread count is restored."""
    import tempfile

    from .tasks.module import sine_module_family
    from .tasks.supervised import digits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fam = digits()
        inst = fam.instance(fam.default_search_variants()[0], 0)
        C, dev = candidates, torch.device("cpu")
        batched, _ = best_rates({"b": lambda: _forward_backward(inst, C, steps)}, C * steps, repeats, dev)

        def one_at_a_time() -> None:
            for _ in range(C):
                _forward_backward(inst, 1, 1)

        one, _ = best_rates({"o": one_at_a_time}, C, repeats, dev)

        config = SineConfig(pretrain_steps=50)
        with tempfile.TemporaryDirectory() as cache:
            hand = StackedSineTask([SineTask(config, 0, 0, 5.0, dev, cache, kernel="eager")],  # like with like
                                   torch.zeros(C, dtype=torch.long))
            adapter = sine_module_family(config).instance(5.0, 0, dev, cache)
        sine, _ = best_rates({"hand": lambda: _forward_backward(hand, C, steps),
                              "adapter": lambda: _forward_backward(adapter, C, steps)},
                             C * steps, repeats, dev)
    finally:
        torch.set_num_threads(before)
    out = {
        "adapter_batched_candidate_steps_per_s": batched["b"],
        "adapter_one_at_a_time_candidate_steps_per_s": one["o"],
        "adapter_batched_vs_one_speedup": batched["b"] / one["o"],
        "adapter_sine_vs_hand_stacked": sine["hand"] / sine["adapter"],
    }
    log.info(f"  module adapter: digits {out['adapter_batched_candidate_steps_per_s']:.0f} candidate-steps/s batched, "
             f"{out['adapter_batched_vs_one_speedup']:.1f}x one at a time; sine "
             f"{out['adapter_sine_vs_hand_stacked']:.2f}x the hand-stacked task's time")
    return out


# ---------------------------------------------------------------------------------- the command

MAX_CANDIDATES = 4096  # per batch (and timed one at a time)
MAX_STEPS = 100_000


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.bench", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default=None, help="candidates per batch (default 8,64,256; --quick: 8)")
    p.add_argument("--horizons", default=None, help="rollout horizons t_max (default 1,5; --quick: 1)")
    p.add_argument("--steps", type=bounded_int(1, MAX_STEPS, "a number of steps"), default=None,
                   help="training steps per measurement (10; --quick: 3)")
    p.add_argument("--naive", type=bounded_int(1, MAX_CANDIDATES, "a number of candidates"), default=None,
                   help="candidates timed one at a time (8; --quick: 2)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (16 candidates at t_max 1 for the floor, no Dask row): seconds, for tests")
    p.add_argument("--cache-dir", type=path_arg("cache directory"), default=DEFAULT_CACHE_DIR)
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="add the Dask row: 32 candidates with 1 and 2 local workers "
                        "(default: on when Dask is installed, off with --quick)")
    p.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=None,
                   help="add the end-to-end row: the default search's size judged on the eager and the fused "
                        "rollout (two `nos evolve` runs, a few minutes; default: on, off with --quick)")
    add_device(p)
    add_threads(p)
    add_format(p)
    return p


def _print_table(out: dict) -> None:
    rows, scale = out["rows"], out["scaling"]
    print(format_table(rows, ["horizon", "candidates", "naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup"],
                       ["t_max", "candidates", "one-at-a-time /s", "batched /s", "speedup"]))
    print(f"\nintegrity check of 1,000 random genomes (x 6 lrs x 2 signs, 35 steps): {out['integrity_check_1000_random_s']:.2f} s")
    head = out["headline"]
    print(f"headline (C={head['candidates']}, t_max={head['horizon']:g}): speedup {out['speedup']:.1f}x")
    f = out["floor"]
    print(f"\nthe floor (C={f['candidates']}, t_max={f['horizon']:g}, seeds {','.join(map(str, f['seeds']))} stacked, "
          f"{f['steps']} steps, {out['threads']} thread(s)):")
    print(format_table([
        {"what": "interpreter, Adam genome", "rate": out["interpreter_adam_candidate_steps_per_s"]},
        {"what": "hand-written batched Adam", "rate": out["reference_adam_candidate_steps_per_s"]},
        {"what": "task forward + backward only", "rate": out["task_only_candidate_steps_per_s"]},
        {"what": "interpreter, random genomes", "rate": out["random_genome_candidate_steps_per_s"]},
    ], ["what", "rate"], ["", "candidate-steps/s"]))
    print(f"interpreter vs reference: {out['interpreter_vs_reference']:.2f}x "
          f"(final losses agree to {out['adam_loss_max_rel_diff']:.1e} relative)")
    print(f"random genomes: {out['random_vs_adam_cost']:.2f}x Adam's cost per candidate-step "
          f"({out['update_kernel']} update), {100 * out['random_update_share']:.0f}% of it outside the task's "
          f"forward + backward")
    if "random_vs_adam_cost_eager_update" in out:
        print(f"  with the eager update: {out['random_vs_adam_cost_eager_update']:.2f}x")
    print(f"the update alone, random genomes: eager {out['random_update_eager_candidate_steps_per_s']:.0f}, fused "
          f"{out['random_update_fused_candidate_steps_per_s']:.0f} candidate-steps/s "
          f"({out['update_fused_vs_eager_speedup']:.1f}x); top ops by self CPU:")
    for key, what in (("random_top_ops", "whole steps"), ("random_update_top_ops", "the update alone")):
        print(f"\n{what}:")
        print(format_table([{**r, "self_cpu_share": 100 * r["self_cpu_share"]} for r in out[key]],
                           ["op", "self_cpu_share", "calls"], ["op", "self CPU %", "calls"]))
    if "rollout_vs_floor_speedup" in out:
        print(f"\nfused rollout (nos.tasks.sine_kernel): the interpreter's Adam "
              f"{out['fused_adam_candidate_steps_per_s']:.0f} candidate-steps/s = {out['rollout_vs_floor_speedup']:.2f}x "
              f"the hand-written floor (losses within {out['fused_adam_loss_max_rel_diff']:.1e}); forward + backward "
              f"{out['task_fused_vs_eager_speedup']:.2f}x the eager rollout's")
    print("\nthe interpreter's Adam as the batch grows (candidate-steps/s):")
    kernels = [k for k in ("eager", "fused") if k in out["rollout_scaling"][0]]
    print(format_table(out["rollout_scaling"], ["candidates", *kernels], ["candidates", *kernels]))
    if out.get("end_to_end"):
        e = out["end_to_end"]
        print(f"\nend to end ({e['search_args']}): {e['judged_per_hour_before']:.0f} judged/hour before (eager "
              f"rollout and update), {e['judged_per_hour_after']:.0f} after (fused): {e['judged_per_hour_speedup']:.1f}x")
        for prefix, what in (("", "fused vs eager (rollout and update)"), ("update_", "the fused update alone")):
            print(f"search fitness of {e['fitness_genomes']} fixed genomes, {what}: median relative difference "
                  f"{e[prefix + 'fitness_median_rel_diff']:.1e}, max {e[prefix + 'fitness_max_rel_diff']:.1e}, "
                  f"{e[prefix + 'fitness_within_1e-6']} / {e[prefix + 'fitness_within_1e-3']} of "
                  f"{e[prefix + 'fitness_both_finite']} within 1e-6 / 1e-3, Spearman {e[prefix + 'fitness_spearman']:.3f}")
    print("\nsharing the CPU with a busy torch process (interpreter, Adam genome, candidate-steps/s):")
    print(format_table([{"threads": int(n), **r} for n, r in out["shared_cpu"].items()],
                       ["threads", "alone", "shared", "slowdown"], ["threads", "alone", "shared", "slowdown"]))
    print(f"shared_cpu_slowdown at this run's {out['threads']} thread(s): {out['shared_cpu_slowdown']:.2f}x")
    if "adapter_batched_candidate_steps_per_s" in out:
        print(f"\ntorch.func adapter (any nn.Module as a task), digits, forward + backward: batched "
              f"{out['adapter_batched_candidate_steps_per_s']:.0f} vs one at a time "
              f"{out['adapter_one_at_a_time_candidate_steps_per_s']:.0f} candidate-steps/s "
              f"({out['adapter_batched_vs_one_speedup']:.1f}x); the sine MLP through the adapter costs "
              f"{out['adapter_sine_vs_hand_stacked']:.2f}x the hand-stacked sine task per candidate-step")
    if scale is not None:
        print("\nscaling (Dask, local worker processes, 1 thread each; 32 candidates, horizon 1, budget 300):")
        print(format_table([{"workers": n, "candidates_per_s": scale[f"workers_{n}_candidates_per_s"]} for n in (1, 2)],
                           ["workers", "candidates_per_s"], ["workers", "candidates/s"]))
        print(f"2 vs 1 workers: {scale['speedup']:.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    quick = args.quick
    try:
        sizes = list(number_list(args.batch_sizes or ("8" if quick else "8,64,256"), int, lo=1, hi=MAX_CANDIDATES,
                                 max_items=10, what="batch sizes"))
        horizons = list(number_list(args.horizons or ("1" if quick else "1,5"), lo=MIN_HORIZON, hi=MAX_HORIZON,
                                    max_items=10, what="horizons"))
    except ValueError as e:
        p.error(f"--batch-sizes / --horizons: {e}")
    if not sizes or min(sizes) < 1 or not horizons or min(horizons) <= 0:
        p.error("need positive batch sizes and horizons")
    steps = args.steps or (3 if quick else 10)
    naive_n = args.naive or (2 if quick else 8)
    do_scaling = (_has_dask() and not quick) if args.scaling is None else args.scaling
    if do_scaling and not _has_dask():
        p.error("--scaling needs Dask: pip install 'nos[distributed]'")
    device = resolve_device(args.device)
    torch_default_threads = torch.get_num_threads()
    threads = apply_threads(args)
    log.info(f"bench on {device} ({threads} threads; torch's default {torch_default_threads})")
    fsizes = QUICK_FLOOR if quick else FloorSizes()

    start = time.perf_counter()
    pool = passing_genomes(max(sizes + [naive_n, fsizes.candidates]), device=device)
    check_pool = [random_genome(random.Random(1)) for _ in range(1000)]
    t0 = time.perf_counter()
    integrity.check(check_pool, device=device)
    integrity_s = time.perf_counter() - t0

    rows = []
    headline = None
    for h in horizons:
        # cast: SineTask.segments is a read-only property, the trainer's Task protocol names a plain attribute
        task = cast(Task, SineTask(SineConfig(), 0, 0, h, device, args.cache_dir))
        naive = naive_rate(task, pool[:naive_n], steps, device)
        for n in sizes:
            batched = rate(task, pool[:n], steps, device)
            row = {"horizon": h, "candidates": n, "naive_candidate_steps_per_s": naive,
                   "batched_candidate_steps_per_s": batched, "speedup": batched / naive}
            rows.append(row)
            log.info(f"  t_max={h:g} C={n}: {batched:.0f} vs {naive:.0f} candidate-steps/s")
            if n == 64 and h == 5:
                headline = row
    headline = headline or rows[-1]

    stack = stacked_task(fsizes, device, args.cache_dir)
    fused = stacked_task(fsizes, device, args.cache_dir, "fused") if fused_available(device) else None
    fl = floor(stack, fsizes, pool, device, fused)
    grow = rollout_scaling(fsizes, (8, 16) if quick else (64, 256, 1024), device, args.cache_dir,
                           steps=1 if quick else 3)
    compared = sorted({1, threads, torch_default_threads}) if device.type == "cpu" else [threads]
    shared = shared_cpu(fused or stack, fsizes, compared, device)  # on the search's own rollout
    e2e = end_to_end(args.cache_dir, threads, passing_genomes(32, seed=11)) \
        if (not quick if args.end_to_end is None else args.end_to_end) and fused_available(device) else None
    scale = scaling(passing_genomes(32, seed=7, device=device), args.cache_dir) if do_scaling else None
    adapter = task_adapter_bench(threads, steps=2 if quick else 5, repeats=1 if quick else 3) \
        if device.type == "cpu" else {}
    out = {
        "device": str(device),
        "threads": threads,
        "threads_torch_default": torch_default_threads,
        **{k: headline[k] for k in ("naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup")},
        "headline": {"candidates": headline["candidates"], "horizon": headline["horizon"]},
        "integrity_check_1000_random_s": integrity_s,
        "rows": rows,
        "floor": {"candidates": fsizes.candidates, "horizon": fsizes.horizon, "seeds": list(fsizes.seeds),
                  "steps": fsizes.steps, "lr": ADAM_LR, "best_of": fsizes.repeats},
        **fl,
        "rollout_scaling": grow,
        **({"fused_1024_vs_64": grow[-1]["fused"] / grow[0]["fused"], "eager_1024_vs_64": grow[-1]["eager"] / grow[0]["eager"]}
           if not quick and "fused" in grow[0] else {}),
        "end_to_end": e2e,
        **({k: e2e[k] for k in ("judged_per_hour_before", "judged_per_hour_after", "judged_per_hour_speedup")}
           if e2e else {}),
        "shared_cpu_slowdown": shared[threads]["slowdown"],
        **{f"shared_cpu_slowdown_threads_{n}": r["slowdown"] for n, r in shared.items()},
        "shared_cpu": {str(n): r for n, r in shared.items()},
        "scaling": scale,
        **adapter,  # the torch.func adapter: batched vs one at a time, and against the hand-stacked sine
        "seconds": time.perf_counter() - start,
    }
    if args.format == "json":
        print_json(out)
    else:
        _print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
