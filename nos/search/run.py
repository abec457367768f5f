"""A search run, as a library object (in the spirit of Optuna's `Study`).

    with Run.create(store, "demo", SearchConfig()) as run:      # or Run.resume(store, "demo")
        run.optimize(ParticleGA(run.config))                      # ask / tell until the strategy stops
        results = run.funnel()                                    # held-out comparison, stored
    run.champion(results), run.metrics()

The run owns everything a strategy must not know about: the database rows (through `Judge`),
claims and heartbeats when several processes share it, the stored Adam reference that normalises
fitness, the funnel and its rows, the champion and the run's metrics. Its status follows the
`with` block: `running` inside; `finished` on a normal exit (once the funnel is done),
`interrupted` on Ctrl-C, `failed` on any other exception.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from db.store import Store

from ..evaluation.sine import SineEvaluator
from ..ga.strategy import Strategy
from . import funnel as funnel_mod
from .config import SearchConfig
from .funnel import SEARCH_TASK, Results
from .judge import Cooperation, FitnessFn, Judge, Progress
from .metrics import run_metrics
from .records import Candidate


class RunError(Exception):
    """A run cannot be created, resumed or found (one line for the user)."""


class Run:
    def __init__(self, store: Store, record: dict, config: SearchConfig, device: torch.device | str = "cpu", *,
                 progress: Progress | None = None, fitness_fn: FitnessFn | None = None,
                 cooperate: Cooperation | None = None) -> None:
        self.store = store
        self.record = record
        self.config = config
        self.device = torch.device(device)
        self.progress = progress or Progress()
        self.evaluator = SineEvaluator(config.setup(), self.device)
        self.coop = cooperate
        self.judge = Judge(store, self.id, config.seed, self.evaluator, self.adam_reference, self.progress,
                           fitness_fn=fitness_fn, cooperate=cooperate)
        self.funnel_done = config.funnel == 0
        self._adam: dict[float, tuple[float, float]] | None = None
        self._best: list[Candidate] = []

    # ------------------------------------------------------------------ create / resume
    @classmethod
    def create(cls, store: Store, name: str, config: SearchConfig, device: torch.device | str = "cpu",
               **kw: Any) -> Run:
        if store.get_run(name) is not None:
            raise RunError(f"a run named {name!r} exists; continue it with --resume {name}")
        run_id = store.create_run(name, config.to_json(), config.seed)
        record = store.get_run(run_id)
        assert record is not None
        return cls._started(store, record, config, device, kw)

    @classmethod
    def resume(cls, store: Store, name: str, device: torch.device | str = "cpu", **kw: Any) -> Run:
        record = store.get_run(name)
        if record is None:
            raise RunError(f"no run named {name!r} in {store.url}")
        if record["status"] == "finished":
            raise RunError(f"run {name!r} already finished")
        config = SearchConfig.from_json(record["config"])
        store.set_run_status(record["id"], "running")
        return cls._started(store, record, config, device, kw)

    @classmethod
    def _started(cls, store: Store, record: dict, config: SearchConfig, device: torch.device | str,
                 kw: dict[str, Any]) -> Run:
        """The object of a run just marked running; if that fails, the run is marked failed."""
        try:
            return cls(store, record, config, device, **kw)
        except BaseException:
            store.set_run_status(record["id"], "failed")
            raise

    @property
    def id(self) -> int:
        return int(self.record["id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.judge.close()
        if exc_type is None:
            if self.funnel_done:
                self.store.set_run_status(self.id, "finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.store.set_run_status(self.id, "interrupted")
        else:
            self.store.set_run_status(self.id, "failed")

    # ------------------------------------------------------------------ the search
    def adam_reference(self) -> dict[float, tuple[float, float]]:
        """Tuned Adam on the search task (the fitness normaliser), computed once per run and stored."""
        if self._adam is None:
            def stored_adam() -> list[dict]:
                return [b for b in self.store.baselines(self.id, task=SEARCH_TASK) if b["method"] == "adam"]

            stored = stored_adam()
            if not stored and self.coop is not None and not self.judge.claim_or_wait("adam", lambda: bool(stored_adam())):
                stored = stored_adam()  # another process tuned it
            if stored:
                self._adam = {b["horizon"]: (b["loss"], b["hparam"]) for b in stored}
            else:
                self.progress.message("tuning Adam on the search task")
                self._adam = self.evaluator.adam_reference()
                self.store.add_baselines([
                    {"run_id": self.id, "method": "adam", "task": SEARCH_TASK, "horizon": h, "seed": 0,
                     "loss": loss, "hparam": lr, "budget": self.config.budget_fpe}
                    for h, (loss, lr) in self._adam.items()
                ])
        return self._adam

    def optimize(self, strategy: Strategy) -> list[Candidate]:
        """Ask the strategy for batches, judge them, tell it the results, until it stops.
        Returns the strategy's best distinct candidates (its hall of fame)."""
        cfg = self.config
        first = True
        while (batch := strategy.ask()) is not None:
            self.progress.planned(len(batch.proposals))
            if first:
                self.adam_reference()
                first = False
            self.progress.message(batch.label)
            size = cfg.chunk if all(p.timestep == 0 for p in batch.proposals) else cfg.timestep_chunk
            size = size or len(batch.proposals) or 1
            props = batch.proposals
            self.judge.judge_chunks([props[i : i + size] for i in range(0, len(props), size)])
            judged = [Candidate.from_row(self.judge.rows[p.slot]) for p in props]
            for generation in strategy.tell(judged):
                self.store.put_timestep_stats(self.id, generation.row())
        self._best = strategy.best()
        return self._best

    # ------------------------------------------------------------------ the funnel
    def funnel(self, best: list[Candidate] | None = None, progress: Callable[[str], None] | None = None) -> Results | None:
        """Re-evaluate the best candidates on held-out seeds beside the baselines and store the
        rows. Cooperating processes run it once: the claim holder; the others wait for the run
        to finish (and get None) or take over if it dies."""
        best = self._best if best is None else best
        if not self.config.funnel or not best:
            self.funnel_done = True
            return None
        if self.coop is not None and not self.judge.claim_or_wait(
                "funnel", lambda: (self.store.get_run(self.id) or {}).get("status") == "finished"):
            return None
        self.progress.message("held-out funnel")
        results = funnel_mod.run_funnel(self.evaluator, self.config, best, progress=progress or self.progress.message)
        evaluations, baselines = funnel_mod.funnel_rows(self.id, results, self.config)
        self.store.add_evaluations(evaluations)
        self.store.add_baselines(baselines)
        self.funnel_done = True
        return results

    def stored_results(self) -> Results:
        return funnel_mod.stored_results(self.store, self.id, self.config)

    @staticmethod
    def champion(results: Results) -> str | None:
        return funnel_mod.champion(results)

    def metrics(self) -> dict[str, Any]:
        return run_metrics(self.store.status_counts(self.id))

