"""Candidate evaluation on a Dask cluster: many processes, GPUs or machines evaluate, one decides.

The run (`nos.search.run.Run`, driving the GA) stays in one coordinator process: it creates, screens
and deduplicates candidates and decides which children survive. Only the expensive part -- the
sine-rollout fitness of the candidates that passed the integrity check -- is shipped to Dask
workers as batches. Each worker rebuilds the batched `TaskEvaluator` for the run's `SearchSetup`
on its own device (once per process: pretrained tasks are reused) and returns plain numbers.

Why Dask: it already knows how to find workers across machines, re-run the tasks of a worker
that died (a killed worker's candidates are simply re-queued) and restart a stuck worker
process. What it cannot do is interrupt a running Python function, so `DaskFitness` watches
which tasks are executing and for how long: a batch over the time limit is cancelled, its
worker restarted, and its candidates retried one by one, so that only a candidate that hangs by
itself is reported as an error ("timed out after N s").

Genomes travel as JSON and are re-validated on the worker (`search_space.genome.from_json`);
nothing read from the database is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from search_space.genome import Genome, from_json

from ..evaluation.fitness import AdamReference, Fitness, MultiEvaluator, SearchSetup, TaskEvaluator
from ..tasks.registry import is_code, resolve
from ..tasks.sine import SineConfig

log = logging.getLogger(__name__)

# Fault-injection hook for tests, never set in normal use: a worker asked to evaluate a genome
# whose JSON mentions this op name sleeps forever, as a candidate stuck in a kernel would.
HANG_ENV = "NOS_TEST_HANG_OP"

_EVALUATORS: dict[tuple[str, str], TaskEvaluator | MultiEvaluator] = {}  # per worker process: tasks stay pretrained


def setup_to_json(setup: SearchSetup) -> dict[str, Any]:
    """A SearchSetup as plain data (what is sent to workers, and keys their evaluator cache); the
    family travels as its spec (a worker resolves it; a user's file must be readable there too)."""
    d = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup) if f.name != "family"}
    return {**d, "sine": dataclasses.asdict(setup.sine)}


def setup_from_json(d: dict[str, Any]) -> SearchSetup:
    """Inverse of `setup_to_json`."""
    sine = dict(d["sine"])
    for k, v in sine.items():
        if isinstance(v, list):
            sine[k] = tuple(v)
    return SearchSetup(
        horizons=tuple(d["horizons"]), lrs=tuple(d["lrs"]), budget_fpe=int(d["budget_fpe"]),
        seeds=tuple(int(x) for x in d["seeds"]), sine=SineConfig(**sine), cache_dir=str(d["cache_dir"]),
        task=str(d.get("task", "sine")), spec=str(d.get("spec", "sine")),
    )


def _evaluator(setup_json: dict[str, Any] | list[dict[str, Any]], device: str) -> TaskEvaluator | MultiEvaluator:
    """This worker's evaluator of a setup (or of several: a multi-task search), kept between tasks."""
    key = (json.dumps(setup_json, sort_keys=True), device)
    if key not in _EVALUATORS:
        parts = []
        for d in setup_json if isinstance(setup_json, list) else [setup_json]:
            setup = setup_from_json(d)
            if is_code(setup.spec):  # the coordinator's user named this task on its command line
                resolve(setup.spec, allow_code=True)
            parts.append(TaskEvaluator(setup, _worker_device(device)))
        _EVALUATORS[key] = MultiEvaluator(parts) if isinstance(setup_json, list) else parts[0]
    return _EVALUATORS[key]


def _reference(ref: AdamReference) -> AdamReference:
    return {(float(h), int(s)): (float(v[0]), float(v[1])) for (h, s), v in ref.items()}


def _worker_device(device: str) -> torch.device:
    """The worker's own device: `auto` means its GPU when it has one (its CUDA_VISIBLE_DEVICES)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fitness_to_json(fit: Fitness) -> dict[str, Any]:
    return {"fitness": fit.fitness, "lr": fit.lr, "evaluations": fit.evaluations}


def fitness_from_json(d: dict[str, Any]) -> Fitness:
    return Fitness(d["fitness"], d["lr"], d["evaluations"])


def evaluate_batch(setup_json: dict[str, Any] | list[dict[str, Any]], genomes_json: list[dict], adam_ref: AdamReference,
                   device: str) -> list[dict[str, Any]]:
    """Dask task: fitness of a batch of genomes on this worker's device, as plain dicts."""
    hang = os.environ.get(HANG_ENV)
    if hang and any(f'"{hang}"' in json.dumps(g) for g in genomes_json):
        while True:  # fault injection (tests only): a candidate that never finishes
            time.sleep(3600)
    evaluator = _evaluator(setup_json, device)
    genomes = [from_json(g) for g in genomes_json]
    if isinstance(evaluator, MultiEvaluator):
        multi = {str(t): _reference(r) for t, r in adam_ref.items()}  # type: ignore[arg-type]
        return [fitness_to_json(f) for f in evaluator.fitness(genomes, multi)]
    return [fitness_to_json(f) for f in evaluator.fitness(genomes, _reference(adam_ref))]


def _executing_keys(dask_worker: Any) -> list[str]:
    """Run on each worker (event loop, not the busy thread): keys of the tasks it is running."""
    return [str(ts.key) for ts in dask_worker.state.executing]


class DaskEvaluator:
    """The run's evaluator (`nos.search.objective.Evaluator`) on a Dask cluster: each fidelity
    stage's fitness is a `DaskFitness` on the stage's setups (one per task)."""

    def __init__(self, client: Any, device: str = "auto", batch_size: int = 16, timeout_s: float = 600.0) -> None:
        self.client = client
        self.device = device
        self.batch_size = batch_size
        self.timeout_s = timeout_s

    def fitness_fn(self, evaluator: TaskEvaluator | MultiEvaluator) -> DaskFitness:
        setups = [e.setup for e in evaluator.evaluators] if isinstance(evaluator, MultiEvaluator) else evaluator.setup
        return DaskFitness(self.client, setups, self.device, self.batch_size, self.timeout_s)


class DaskFitness:
    """`fitness(genomes, adam_ref) -> list[Fitness | Exception]` evaluated by Dask workers.

    `batch_size` candidates per task; `timeout_s`: how long one task may execute (measured from
    when a worker is seen running it, so queued tasks do not count).
    """

    def __init__(self, client: Any, setup: SearchSetup | Sequence[SearchSetup], device: str = "auto",
                 batch_size: int = 16, timeout_s: float = 600.0, retries: int = 2, poll_s: float = 0.5) -> None:
        self.client = client
        self.setup_json: dict[str, Any] | list[dict[str, Any]] = (
            setup_to_json(setup) if isinstance(setup, SearchSetup) else [setup_to_json(s) for s in setup])
        self.device = device
        self.batch_size = max(1, batch_size)
        self.timeout_s = timeout_s
        self.retries = retries
        self.poll_s = poll_s

    def __call__(self, genomes: Sequence[Genome], adam_ref: AdamReference) -> list[Fitness | Exception]:
        from distributed import wait

        genomes_json = [g.to_json() for g in genomes]
        results: list[Fitness | Exception | None] = [None] * len(genomes)
        pending: dict[Any, list[int]] = {}  # future -> candidate indices

        def submit(idx: list[int]) -> None:
            fut = self.client.submit(evaluate_batch, self.setup_json, [genomes_json[i] for i in idx], adam_ref,
                                     self.device, pure=False, retries=self.retries)
            pending[fut] = idx

        for i in range(0, len(genomes), self.batch_size):
            submit(list(range(i, min(i + self.batch_size, len(genomes)))))
        running_since: dict[str, float] = {}
        while pending:
            try:
                done, _ = wait(list(pending), timeout=self.poll_s, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished within this poll
                done = set()
            for fut in done:
                idx = pending.pop(fut)
                running_since.pop(str(fut.key), None)
                try:
                    out = fut.result()
                except Exception as e:  # noqa: BLE001 -- a failing batch: isolate the culprit
                    if len(idx) > 1:
                        for i in idx:
                            submit([i])
                    else:
                        results[idx[0]] = e
                    continue
                for i, d in zip(idx, out):
                    results[i] = fitness_from_json(d)
            if pending:
                self._expire(pending, running_since, results, submit)
        return [r if r is not None else RuntimeError("no result") for r in results]

    def _expire(self, pending: dict[Any, list[int]], running_since: dict[str, float],
                results: list[Fitness | Exception | None], submit: Any) -> None:
        """Cancel tasks that have executed longer than the limit; restart their workers."""
        try:
            executing = self.client.run(_executing_keys, on_error="ignore")
        except Exception:  # noqa: BLE001 -- a worker going away; look again at the next poll
            return
        now = time.monotonic()
        by_key = {str(f.key): f for f in pending}
        stuck_workers: set[str] = set()
        for worker, keys in executing.items():
            if not isinstance(keys, list):
                continue
            for key in keys:
                if key not in by_key:
                    continue
                start = running_since.setdefault(key, now)
                if now - start <= self.timeout_s:
                    continue
                fut = by_key.pop(key)
                idx = pending.pop(fut)
                running_since.pop(key, None)
                fut.cancel()
                stuck_workers.add(worker)
                if len(idx) > 1:  # which of them hangs? retry one by one
                    for i in idx:
                        submit([i])
                else:
                    results[idx[0]] = TimeoutError(f"timed out after {self.timeout_s:g} s")
        if stuck_workers:
            # A running Python call cannot be interrupted: restarting the process is the only way
            # to get the worker back (its nanny starts a fresh one).
            log.warning(f"nos: restarting stuck Dask worker(s) {', '.join(sorted(stuck_workers))}")
            try:
                self.client.restart_workers(sorted(stuck_workers), raise_for_error=False)
            except Exception as e:  # noqa: BLE001 -- the cluster goes on with the other workers
                log.warning(f"nos: could not restart {sorted(stuck_workers)}: {e}")


def connect(scheduler: str | None, workers: int | None) -> tuple[Any, Any]:
    """A Dask client for `--scheduler ADDR` or a local cluster of `--workers N` processes.

    Returns (client, cluster or None); close both when done.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise RuntimeError("Dask is not installed: pip install 'nos[distributed]'") from e
    if scheduler:
        return Client(scheduler, timeout=30), None
    cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster), cluster
