"""A search run, as a library object built from parts (in the spirit of Optuna's `Study`).

    objective = Objective(config, device)                 # what is optimised: fidelity stages, tasks
    strategy = ParticleGA(GAConfig.of(config))            # what to try next: ask / tell, explicit state
    with Run.create(storage, "demo", config, objective=objective, strategy=strategy,
                    evaluator=LocalEvaluator()) as run:   # or Run.resume(storage, "demo", ...)
        run.optimize()                                    # ask / tell until the strategy stops
        comparison = run.funnel()                         # validation + test, stored
    comparison.champion, run.metrics()

The parts are passed in (the command builds them; missing ones get the config's defaults) and
nothing outside assigns to a run's internals. The run owns everything a strategy must not know
about: the storage (through the judge), claims and heartbeats when several processes share it
(`nos.search.claims`), the stored reference that normalises fitness (tuned Adam, or the strongest
tuned gradient baseline: the config's `reference`), the funnel and its rows,
the champion and the run's metrics. Its status follows the `with` block: `running` inside;
`finished` on a normal exit (once the funnel is done), `interrupted` on Ctrl-C, `failed` on any
other exception.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch

from db.errors import StoreError
from db.storage import Storage

from ..evaluation.compare import Comparison
from ..evaluation.fitness import (
    AdamReference,
    MultiEvaluator,
    MultiReference,
    TaskEvaluator,
    TunedBaselines,
    strongest,
)
from ..evaluation.protocol import GRADIENT_BASELINES
from ..ga.strategy import Strategy
from ..tasks.registry import WAVES
from ..tasks.sine import SineConfig, WaveFamily, pretrain_missing
from ..ui.progress import Reporter
from . import funnel as funnel_mod
from .claims import Claims, Cooperation
from .config import SearchConfig
from .judge import Judge, Progress, Stage
from .metrics import run_metrics
from .objective import Evaluator, LocalEvaluator, Objective, ObjectiveStage
from .records import Candidate

log = logging.getLogger(__name__)


class RunError(Exception):
    """A run cannot be created, resumed or found (one line for the user)."""


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while a stopped run's status is written, then deliver them.

    A signal that lands inside the write would roll it back and leave a stopped run `running`
    for good (it blocks its name, and `--resume` would be the only way out). Inside the block
    Python's handlers only note the signal; afterwards the handlers the process had are back
    and each noted signal is raised again (SIGTERM first), so it stops the process as it would
    have. A signal landing while the handlers are put back can leave a noting handler installed:
    once the block is over it puts the process's own handler back itself and passes the signal
    on. Signals reach Python's handlers in the main thread only, so elsewhere this does nothing.
    The write's own retries (`--db-retries`, `--db-timeout`) bound how long a signal waits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before: dict[int, Any] = {}
    done = False

    def restore(sig: int) -> None:  # None: a handler not set from Python, i.e. the default
        signal.signal(sig, signal.SIG_DFL if before[sig] is None else before[sig])

    def hold(signum: int, frame: object) -> None:
        if not done:
            caught.append(signum)
        else:  # left installed after the block: put the process's handler back and deliver
            restore(signum)
            signal.raise_signal(signum)

    try:
        for watched in (signal.SIGINT, signal.SIGTERM):
            before[watched] = signal.signal(watched, hold)
        yield
    finally:
        done = True
        for sig in before:
            restore(sig)
        for signum in sorted(set(caught), key=lambda s: s != signal.SIGTERM):  # once each; terminate first
            signal.raise_signal(signum)


def stop_status(exc_type: type[BaseException]) -> str:
    """The status of a run stopped by `exc_type`: Ctrl-C and SIGTERM interrupt it, anything else fails it."""
    return "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"


def default_strategy(config: SearchConfig) -> Strategy[Any]:
    """The strategy a run's config names (`algorithm`: the particle GA or its random control)."""
    from ..ga.particle import STRATEGIES  # here: nos.ga imports this package's records

    return STRATEGIES[config.algorithm].of(config)


class Run:
    """One search run in `storage`, built from its parts (see the module docstring)."""

    def __init__(self, storage: Storage, record: dict, config: SearchConfig, *, objective: Objective,
                 strategy: Strategy[Any], evaluator: Evaluator | None = None, progress: Progress | None = None,
                 cooperate: Cooperation | None = None) -> None:
        self.storage = storage
        self.record = record
        self.config = config
        self.objective = objective
        self.strategy = strategy
        self.evaluator: Evaluator = evaluator or LocalEvaluator()
        self.device = objective.device
        self.progress = progress or Progress()
        self.claims = Claims(storage, self.id, cooperate, self.progress.message) if cooperate else None
        self._judge: Judge | None = None  # built on first use, once the stages' references are known
        self._counts = {"judged": 0, "evaluated": 0, "duplicate": 0}
        self._best_fitness: float | None = None
        self.funnel_done = config.funnel == 0
        self.status = "running"  # the last status this object wrote (a run object is a running run)
        self._adam: dict[str, AdamReference] = {}
        self._best: list[Candidate] = []
        self._heldout: dict[str, TaskEvaluator] = {}

    # ------------------------------------------------------------------ create / resume
    @classmethod
    def create(cls, storage: Storage, name: str, config: SearchConfig, device: torch.device | str = "cpu", *,
               objective: Objective | None = None, strategy: Strategy[Any] | None = None, **kw: Any) -> Run:
        """A new run named `name`. Parts not given are the config's defaults (an `Objective` on
        `device`, the strategy its `algorithm` names, fitness computed in this process)."""
        if storage.get_run(name) is not None:
            raise RunError(f"a run named {name!r} exists; continue it with --resume {name}")
        run_id = storage.create_run(name, config.to_json(), config.seed)
        return cls._started(storage, run_id, config, device, objective, strategy, kw)

    @staticmethod
    def stored_config(storage: Storage, name: str) -> SearchConfig:
        """The checked config of the unfinished run `name` (what `resume` continues), so a caller
        can build the run's parts from it first. A tampered config is one line (RunError)."""
        record = storage.get_run(name)
        if record is None:
            raise RunError(f"no run named {name!r} in {storage.url}")
        if record["status"] == "finished":
            raise RunError(f"run {name!r} already finished")
        try:  # checked before the run is touched: a tampered config is one line, nothing written
            config = SearchConfig.checked(record["config"])
            config.check_task_code()  # the tasks resolve (a user's named again) and are unchanged
        except ValueError as e:
            raise RunError(f"run {name!r}: {e}") from None
        return config

    @classmethod
    def resume(cls, storage: Storage, name: str, device: torch.device | str = "cpu", *,
               objective: Objective | None = None, strategy: Strategy[Any] | None = None, **kw: Any) -> Run:
        """Continue the unfinished run `name` with its stored config (parts as in `create`)."""
        config = cls.stored_config(storage, name)
        record = storage.get_run(name)
        assert record is not None
        # not held back: a signal inside this write leaves the run as it was (interrupted)
        storage.set_run_status(record["id"], "running")
        return cls._started(storage, record["id"], config, device, objective, strategy, kw)

    @classmethod
    def _started(cls, storage: Storage, run_id: int, config: SearchConfig, device: torch.device | str,
                 objective: Objective | None, strategy: Strategy[Any] | None, kw: dict[str, Any]) -> Run:
        """The object of a run just marked running; if that fails (or Ctrl-C comes before the
        caller's `with` block), the run is marked failed (interrupted)."""
        try:
            record = storage.get_run(run_id)
            assert record is not None
            return cls(storage, record, config, objective=objective or Objective(config, device),
                       strategy=strategy or default_strategy(config), **kw)
        except BaseException as e:
            with interrupts_deferred():
                storage.set_run_status(run_id, stop_status(type(e)))
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
        # all of it with Ctrl-C held back (delivered at the end): the run never stays `running`
        # after it stopped, and `self.status` says which status landed
        with interrupts_deferred():
            if self.claims is not None:
                self.claims.close()
            if exc_type is None:
                if self.funnel_done:
                    self.storage.set_run_status(self.id, "finished")
                    self.status = "finished"
            else:
                status = stop_status(exc_type)
                try:
                    self.storage.set_run_status(self.id, status)
                    self.status = status
                except StoreError as e:  # the database itself failed (a full disk): its first error is what to say
                    log.warning(f"could not mark run {self.name!r} {status}: {e}")

    # ------------------------------------------------------------------ the search
    def adam_reference(self, evaluator: TaskEvaluator | None = None) -> AdamReference:
        """Tuned Adam on each search instance of one task of a stage (its fitness normaliser;
        the full stage's first task by default), computed once per run and stored (task
        `sine_search`; `sine_search_cheap` for a cheap first stage; `<name>_search` for other tasks)."""
        evaluator = evaluator or self.objective.stages[-1].members[0]
        task = evaluator.setup.reference
        if task not in self._adam:
            def stored_adam() -> list[dict]:
                return [b for b in self.storage.baselines(self.id, task=task) if b["method"] == "adam"]

            stored = stored_adam()
            if not stored and self.claims is not None and not self.claims.claim_or_wait(
                    "adam" if task == "sine_search" else f"adam:{task}", lambda: bool(stored_adam())):
                stored = stored_adam()  # another process tuned it
            if stored:
                self._adam[task] = {(b["horizon"], b["seed"]): (b["loss"], b["hparam"]) for b in stored}
            else:
                self.progress.message(f"tuning Adam on the search task{'' if task == 'sine_search' else f' ({task})'}")
                self._adam[task] = ref = evaluator.adam_reference()
                self.storage.add_baselines([
                    {"run_id": self.id, "method": "adam", "task": task, "task_key": evaluator.identity, "horizon": h, "seed": s,
                     "loss": loss, "hparam": lr, "budget": evaluator.setup.budget_fpe, "split": "search"}
                    for (h, s), (loss, lr) in ref.items()
                ])
        return self._adam[task]

    def best_reference(self, evaluator: TaskEvaluator | None = None) -> AdamReference:
        """The fitness normaliser of reference "best" on one task of a stage (the full stage's
        first task by default): every gradient baseline tuned on each search instance like Adam
        (`TaskEvaluator.tuned_baselines`), per horizon the strongest (`strongest`). Computed once
        per run and stored -- every baseline's tuned rows, task `<task>_search_best`
        (`_search_best_cheap` for a cheap first stage; loss NULL where one diverged at every lr),
        apart from Adam's reference rows -- and rebuilt from those rows when the run resumes."""
        evaluator = evaluator or self.objective.stages[-1].members[0]
        setup = evaluator.setup
        task = setup.reference_task("best")
        if task not in self._adam:
            def stored_rows() -> list[dict]:
                return [b for b in self.storage.baselines(self.id, task=task) if b["method"] in GRADIENT_BASELINES]

            stored = stored_rows()
            if not stored and self.claims is not None and not self.claims.claim_or_wait(
                    f"best:{task}", lambda: bool(stored_rows())):
                stored = stored_rows()  # another process tuned them
            where = f"task {evaluator.family.name!r}, {evaluator.family.variant_label}"
            if stored:
                tuned: TunedBaselines = {m: {} for m in GRADIENT_BASELINES}  # in their order: ties go to Adam
                for b in stored:
                    if b["loss"] is not None:
                        tuned[b["method"]][(b["horizon"], b["seed"])] = (b["loss"], b["hparam"])
                self._adam[task] = strongest(tuned, setup.horizons, setup.seeds, where)[0]
            else:
                self.progress.message(f"tuning {', '.join(GRADIENT_BASELINES)} on the search task ({task})")
                tuned = evaluator.tuned_baselines()
                self._adam[task], chosen = strongest(tuned, setup.horizons, setup.seeds, where)  # before storing
                rows = []
                for m, per in tuned.items():
                    for h in setup.horizons:
                        for s in setup.seeds:
                            loss, lr = per.get((h, s), (None, None))
                            rows.append({"run_id": self.id, "method": m, "task": task, "task_key": evaluator.identity,
                                         "horizon": h, "seed": s, "loss": loss, "hparam": lr,
                                         "budget": setup.budget_fpe, "split": "search"})
                self.storage.add_baselines(rows)
                label = evaluator.family.variant_label
                self.progress.message(f"the strongest tuned baseline ({task}): "
                                      + ", ".join(f"{m} at {label} = {h:g}" for h, m in chosen.items()))
        return self._adam[task]

    def reference(self, evaluator: TaskEvaluator | None = None) -> AdamReference:
        """One task's fitness normaliser as the objective asks for it: tuned Adam
        (`adam_reference`), or with reference "best" the strongest tuned gradient baseline per
        horizon (`best_reference`)."""
        if self.objective.reference == "best":
            return self.best_reference(evaluator)
        return self.adam_reference(evaluator)

    def _reference(self, stage: ObjectiveStage) -> AdamReference | MultiReference:
        """A stage's fitness normaliser: its task's reference (`reference`), or one per task."""
        if isinstance(stage.evaluator, MultiEvaluator):
            return {e.setup.task: self.reference(e) for e in stage.members}
        return self.reference(stage.evaluator)

    def judge(self) -> Judge:
        """The judge of this run's proposals: every stage's fitness function (from the evaluator)
        and reference; it reports each chunk through `_judged`, which advances the search stage."""
        if self._judge is None:
            stages = [Stage(self.evaluator.fitness_fn(s.evaluator), self._reference(s), s.promote)
                      for s in self.objective.stages]
            self._judge = Judge(self.storage, self.id, stages, self.device,
                                replace(self.progress, judged=self._judged), claims=self.claims)
        return self._judge

    def optimize(self) -> list[Candidate]:
        """Ask the strategy for batches, judge them, tell it the results, until it stops; the
        strategy's state goes in and out of each ask / tell. Returns the strategy's best distinct
        candidates (its hall of fame).

        Stages of `progress`: "pretraining" (networks not cached yet, if any), "Adam reference"
        (the fitness normaliser of each search task; "best-baseline reference" with reference
        "best"), "search" (the strategy's fixed count of slots, `strategy.total()`, advanced by the
        slots each judged chunk settled; proposals, without a total, for a strategy that gives none)."""
        cfg, strategy = self.config, self.strategy
        state = strategy.init()
        skipped = 0
        judge: Judge | None = None
        while (batch := strategy.ask(state)) is not None:
            self.progress.planned(len(batch.proposals))
            if judge is None:
                self.pretrain()
                self._tune_references()
                self.progress.stage("search", strategy.total(), "candidates")
                judge = self.judge()
            self.progress.message(batch.label)
            size = (cfg.chunk if batch.initial else cfg.timestep_chunk) or len(batch.proposals) or 1
            props = batch.proposals
            judge.judge_chunks([props[i : i + size] for i in range(0, len(props), size)])
            judged = [Candidate.from_row(judge.rows[p.slot]) for p in props]
            state, generations = strategy.tell(state, judged)
            if (unreachable := strategy.unreachable(state)) > skipped:
                self._skip_unreachable(unreachable - skipped)
                skipped = unreachable
            for generation in generations:
                self.storage.put_timestep_stats(self.id, generation.row())
        self.progress.end()
        self._best = strategy.best(state)
        return self._best

    def pretrain(self) -> None:
        """Pretrain (and cache) the wave networks the run will train on and has not cached yet --
        the search seeds, and the validation and test seeds when this process may run the funnel
        -- as a stage of its own (they would otherwise be trained on first use: same weights)."""
        jobs: list[tuple[SineConfig, int, str]] = []
        for e in self.objective.members():
            if isinstance(e.family, WaveFamily):
                jobs += [(e.family.sine, s, e.setup.cache_dir) for s in e.setup.seeds]
        if self.config.funnel and self.claims is None:  # cooperating: the funnel's holder pretrains its own
            for spec in self.config.all_tasks:
                if spec in WAVES:
                    held = self.heldout_evaluator(spec)
                    if isinstance(held.family, WaveFamily):
                        jobs += [(held.family.sine, s, held.setup.cache_dir)
                                 for s in (*self.config.validation_seeds, *self.config.test_seeds)]
        pretrain_missing(jobs, self.device, self.progress)

    def _tune_references(self) -> None:
        """Every fidelity stage's reference, tuned or read back, as the stage "Adam reference"
        ("best-baseline reference" with reference "best")."""
        todo = self.objective.members()
        self.progress.stage("Adam reference" if self.objective.reference == "adam" else "best-baseline reference",
                            len(todo), "references")
        for e in todo:  # what each stage's reference asks for, in its order
            self.reference(e)
            self.progress.advance(1)

    def _judged(self, rows: list[dict]) -> None:
        """One chunk judged: the caller's callback, then the "search" stage advanced by the slots
        it settled (with the pass rate, duplicates and best full fitness so far)."""
        self.progress.judged(rows)
        c = self._counts
        for r in rows:
            c["judged"] += 1
            if r["status"] == "evaluated":
                c["evaluated"] += 1
                full = r.get("fidelity") in (None, 1)
                if full and r.get("fitness") is not None and (self._best_fitness is None or r["fitness"] < self._best_fitness):
                    self._best_fitness = r["fitness"]
            elif r["status"] == "duplicate":
                c["duplicate"] += 1
        settled = self.strategy.settled([Candidate.from_row(r) for r in rows])
        passed = c["evaluated"] / max(1, c["judged"] - c["duplicate"])
        self.progress.advance(settled, passed=f"{100 * passed:.0f}%", dups=c["duplicate"],
                              best="-" if self._best_fitness is None else f"{self._best_fitness:.3g}")

    def _skip_unreachable(self, skipped: int) -> None:
        """`skipped` more slots of the search will never be proposed (the strategy's
        `unreachable`: for the GA, the child slots of particles the initial population could not
        fill); count them as settled, so the search stage's total stays fixed."""
        self.progress.message(f"{skipped} slot(s) of the search will not be proposed")
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
        if self.claims is not None and not self.claims.claim_or_wait(
                "funnel", lambda: (self.storage.get_run(self.id) or {}).get("status") == "finished"):
            return None
        result = funnel_mod.run_funnel(self.storage, self.id, self.config, self.heldout_evaluator, best,
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
        return funnel_mod.comparison(self.storage, self.id, self.config)

    def metrics(self) -> dict[str, Any]:
        return run_metrics(self.storage.status_counts(self.id))
