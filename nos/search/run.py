"""A search run, as a library object (in the spirit of Optuna's `Study`).

    with Run.create(store, "demo", SearchConfig()) as run:      # or Run.resume(store, "demo")
        run.optimize(ParticleGA(run.config))                      # ask / tell until the strategy stops
        comparison = run.funnel()                                 # validation + test, stored
    comparison.champion, run.metrics()

The run owns everything a strategy must not know about: the database rows (through `Judge`),
claims and heartbeats when several processes share it, the stored Adam reference that normalises
fitness, the funnel and its rows, the champion and the run's metrics. Its status follows the
`with` block: `running` inside; `finished` on a normal exit (once the funnel is done),
`interrupted` on Ctrl-C, `failed` on any other exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch

from db.store import Store, StoreError

from ..evaluation.compare import Comparison
from ..evaluation.fitness import (
    AdamReference,
    MultiEvaluator,
    MultiReference,
    SearchSetup,
    TaskEvaluator,
)
from ..ga.strategy import Strategy
from ..progress import Reporter
from ..tasks.registry import WAVES
from ..tasks.sine import SineConfig, WaveFamily, pretrain_missing
from . import funnel as funnel_mod
from .config import SearchConfig
from .judge import Cooperation, FitnessFn, Judge, Progress, Stage
from .metrics import run_metrics
from .records import Candidate

log = logging.getLogger(__name__)


class RunError(Exception):
    """A run cannot be created, resumed or found (one line for the user)."""


def search_total(cfg: SearchConfig) -> int:
    """Candidate slots the GA's schedule settles (the fixed total of the "search" stage): the
    initial population, then particles x mutations child slots per timestep. A slot is settled
    once a try of it is evaluated or its last try (`max_tries`) is judged, so retries never make
    the total grow."""
    from ..ga.particle import initial_proposals  # here: nos.ga.particle imports this package

    return len(initial_proposals(cfg)) + cfg.timesteps * cfg.particles * cfg.mutations


class Run:
    def __init__(self, store: Store, record: dict, config: SearchConfig, device: torch.device | str = "cpu", *,
                 progress: Progress | None = None, fitness_fn: FitnessFn | None = None,
                 cooperate: Cooperation | None = None) -> None:
        self.store = store
        self.record = record
        self.config = config
        self.device = torch.device(device)
        self.progress = progress or Progress()
        self.coop = cooperate
        # one evaluator and Adam reference per fidelity stage; the last stage is the full fitness
        # (on several search tasks a stage's evaluator combines one evaluator per task)
        setups = config.stage_setups()
        self.stages = [Stage(self._evaluator(stage_setups), self._adam_reference_of(k), promote=promote)
                       for k, (stage_setups, promote) in enumerate(setups)]
        self.stages[-1].fitness_fn = fitness_fn
        self.evaluator = self.stages[-1].evaluator
        # the judge reports each chunk through `_judged`, which also advances the "search" stage
        self.judge = Judge(store, self.id, config.seed, self.stages, self.device,
                           replace(self.progress, judged=self._judged), cooperate=cooperate)
        self._counts = {"judged": 0, "evaluated": 0, "duplicate": 0}
        self._best_fitness: float | None = None
        self._by_slot = False  # the search stage counts the GA's slots (else proposals)
        self.funnel_done = config.funnel == 0
        self._adam: dict[str, AdamReference] = {}
        self._best: list[Candidate] = []
        self._heldout: dict[str, TaskEvaluator] = {}

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
        try:  # checked before the run is touched: a tampered config is one line, nothing written
            config = SearchConfig.checked(record["config"])
            config.check_task_code()  # the tasks resolve (a user's named again) and are unchanged
        except ValueError as e:
            raise RunError(f"run {name!r}: {e}") from None
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
        else:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            try:
                self.store.set_run_status(self.id, status)
            except StoreError as e:  # the database itself failed (a full disk): its first error is what to say
                log.warning(f"could not mark run {self.name!r} {status}: {e}")

    # ------------------------------------------------------------------ the search
    def _evaluator(self, setups: list[SearchSetup]) -> TaskEvaluator | MultiEvaluator:
        evaluators = [TaskEvaluator(setup, self.device) for setup in setups]
        return evaluators[0] if len(evaluators) == 1 else MultiEvaluator(evaluators)

    def _adam_reference_of(self, k: int) -> Callable[[], AdamReference | MultiReference]:
        def reference() -> AdamReference | MultiReference:
            ev = self.stages[k].evaluator
            if isinstance(ev, MultiEvaluator):
                return {e.setup.task: self.adam_reference(e.setup.reference, e) for e in ev.evaluators}
            return self.adam_reference(ev.setup.reference, ev)

        return reference

    def adam_reference(self, task: str | None = None, evaluator: TaskEvaluator | None = None) -> AdamReference:
        """Tuned Adam on each search instance of one task of a stage (its fitness normaliser),
        computed once per run and stored (task `sine_search`; `sine_search_cheap` for a cheap
        first stage; `<name>_search` for other tasks)."""
        if evaluator is None:
            ev = self.stages[-1].evaluator
            evaluator = ev.evaluators[0] if isinstance(ev, MultiEvaluator) else ev
        task = task or evaluator.setup.reference
        if task not in self._adam:
            def stored_adam() -> list[dict]:
                return [b for b in self.store.baselines(self.id, task=task) if b["method"] == "adam"]

            stored = stored_adam()
            if not stored and self.coop is not None and not self.judge.claim_or_wait(
                    "adam" if task == "sine_search" else f"adam:{task}", lambda: bool(stored_adam())):
                stored = stored_adam()  # another process tuned it
            if stored:
                self._adam[task] = {(b["horizon"], b["seed"]): (b["loss"], b["hparam"]) for b in stored}
            else:
                self.progress.message(f"tuning Adam on the search task{'' if task == 'sine_search' else f' ({task})'}")
                self._adam[task] = ref = evaluator.adam_reference()
                self.store.add_baselines([
                    {"run_id": self.id, "method": "adam", "task": task, "task_key": evaluator.identity, "horizon": h, "seed": s,
                     "loss": loss, "hparam": lr, "budget": evaluator.setup.budget_fpe, "split": "search"}
                    for (h, s), (loss, lr) in ref.items()
                ])
        return self._adam[task]

    def optimize(self, strategy: Strategy) -> list[Candidate]:
        """Ask the strategy for batches, judge them, tell it the results, until it stops.
        Returns the strategy's best distinct candidates (its hall of fame).

        Stages of `progress`: "pretraining" (networks not cached yet, if any), "Adam reference"
        (the fitness normaliser of each search task), "search" (a fixed count of the GA's
        candidate slots, `search_total`; proposals, without a total, for another strategy)."""
        from ..ga.particle import ParticleGA  # here: nos.ga.particle imports this package

        cfg = self.config
        first = True
        self._by_slot = isinstance(strategy, ParticleGA)  # random search shares the GA's schedule
        while (batch := strategy.ask()) is not None:
            self.progress.planned(len(batch.proposals))
            if first:
                self.pretrain()
                self._tune_references()
                self.progress.stage("search", search_total(cfg) if self._by_slot else None, "candidates")
                first = False
            self.progress.message(batch.label)
            size = cfg.chunk if all(p.timestep == 0 for p in batch.proposals) else cfg.timestep_chunk
            size = size or len(batch.proposals) or 1
            props = batch.proposals
            self.judge.judge_chunks([props[i : i + size] for i in range(0, len(props), size)])
            judged = [Candidate.from_row(self.judge.rows[p.slot]) for p in props]
            if self._by_slot and props and all(p.timestep == 0 for p in props):
                self._skip_missing_particles(judged)
            for generation in strategy.tell(judged):
                self.store.put_timestep_stats(self.id, generation.row())
        self.progress.end()
        self._best = strategy.best()
        return self._best

    def pretrain(self) -> None:
        """Pretrain (and cache) the wave networks the run will train on and has not cached yet --
        the search seeds, and the validation and test seeds when this process may run the funnel
        -- as a stage of its own (they would otherwise be trained on first use: same weights)."""
        jobs: list[tuple[SineConfig, int, str]] = []
        for stage in self.stages:
            ev = stage.evaluator
            for e in ev.evaluators if isinstance(ev, MultiEvaluator) else [ev]:
                if isinstance(e.family, WaveFamily):
                    jobs += [(e.family.sine, s, e.setup.cache_dir) for s in e.setup.seeds]
        if self.config.funnel and self.coop is None:  # cooperating: the funnel's holder pretrains its own
            for spec in self.config.all_tasks:
                if spec in WAVES:
                    held = self.heldout_evaluator(spec)
                    if isinstance(held.family, WaveFamily):
                        jobs += [(held.family.sine, s, held.setup.cache_dir)
                                 for s in (*self.config.validation_seeds, *self.config.test_seeds)]
        pretrain_missing(jobs, self.device, self.progress)

    def _tune_references(self) -> None:
        """Every fidelity stage's Adam reference, tuned or read back, as the stage "Adam reference"."""
        todo = [e for stage in self.stages
                for e in (stage.evaluator.evaluators if isinstance(stage.evaluator, MultiEvaluator) else [stage.evaluator])]
        self.progress.stage("Adam reference", len(todo), "references")
        for e in todo:  # what each stage's `adam_reference` asks for, in its order
            self.adam_reference(e.setup.reference, e)
            self.progress.advance(1)

    def _judged(self, rows: list[dict]) -> None:
        """One chunk judged: the caller's callback, then the "search" stage advanced by the slots
        it settled (with the pass rate, duplicates and best full fitness so far)."""
        self.progress.judged(rows)
        c, last_try = self._counts, self.config.max_tries - 1
        settled = 0
        for r in rows:
            c["judged"] += 1
            if r["status"] == "evaluated":
                c["evaluated"] += 1
                full = r.get("fidelity") in (None, 1)
                if full and r.get("fitness") is not None and (self._best_fitness is None or r["fitness"] < self._best_fitness):
                    self._best_fitness = r["fitness"]
            elif r["status"] == "duplicate":
                c["duplicate"] += 1
            settled += (not self._by_slot or r.get("timestep", 0) == 0 or r["status"] == "evaluated"
                        or (r.get("attempt") or 0) >= last_try)
        passed = c["evaluated"] / max(1, c["judged"] - c["duplicate"])
        self.progress.advance(settled, passed=f"{100 * passed:.0f}%", dups=c["duplicate"],
                              best="-" if self._best_fitness is None else f"{self._best_fitness:.3g}")

    def _skip_missing_particles(self, initial: list[Candidate]) -> None:
        """Fewer evaluated initial candidates than particles: the missing particles' child slots
        will never be proposed; count them as settled, so the search stage's total stays fixed."""
        cfg = self.config
        particles = min(cfg.particles, sum(c.evaluated for c in initial))
        skipped = (cfg.particles - particles) * cfg.mutations * cfg.timesteps
        if skipped:
            self.progress.message(f"only {particles} particle(s) of {cfg.particles}: "
                                  f"{skipped} child slot(s) will not be proposed")
            self.progress.advance(skipped)

    # ------------------------------------------------------------------ the funnel
    def funnel(self, best: list[Candidate] | None = None,
               progress: Reporter | funnel_mod.Progress | None = None) -> Comparison | None:
        """Judge the best candidates on validation and test seeds beside the tuned baselines
        (stored; see `nos.search.funnel`). Cooperating processes run it once: the claim holder;
        the others wait for the run to finish (and get None) or take over if it dies. Its stages
        (baselines, funnel validation and test) go to `progress` (the run's by default)."""
        best = self._best if best is None else best
        if not self.config.funnel or not best:
            self.funnel_done = True
            return None
        if self.coop is not None and not self.judge.claim_or_wait(
                "funnel", lambda: (self.store.get_run(self.id) or {}).get("status") == "finished"):
            return None
        result = funnel_mod.run_funnel(self.store, self.id, self.config, self.heldout_evaluator, best,
                                       progress=progress or self.progress)
        self.progress.end()
        self.funnel_done = True
        return result

    def heldout_evaluator(self, spec: str | None = None) -> TaskEvaluator:
        """Trains on one task's validation and test seeds (its instances are cached like the search's)."""
        spec = spec or self.config.tasks[0]
        if spec not in self._heldout:
            self._heldout[spec] = self.config.protocol(spec).evaluator(self.device)
        return self._heldout[spec]

    def comparison(self) -> Comparison | None:
        """The test-seed comparison rebuilt from the stored rows (None before the funnel)."""
        return funnel_mod.comparison(self.store, self.id, self.config)

    def metrics(self) -> dict[str, Any]:
        return run_metrics(self.store.status_counts(self.id))
