"""Evaluate optimizers on a task family (`nos.tasks.api`; the sine rollout by default).

- `TaskEvaluator.grid`: many genomes x an lr grid trained in one batch per variant (horizon).
- `fitness`: the search objective. Each variant's loss is divided by tuned Adam's loss on that
  (variant, seed) and the ratios are combined by their geometric mean, so variants weigh alike
  whatever their scale (a 10x gain counts the same at t_max = 1 as at t_max = 20); the candidate's
  lr is the grid point with the best score (NOS picks each candidate's lr from a sweep too). Lower
  is better; Adam itself scores about 1. Adam's lr grid and the candidates' come from the family.
  With reference "best" (`SearchConfig.reference`) the divisor is, per variant, the strongest tuned
  gradient baseline instead (`best_reference`: Adam, Adam + clip and both with warmup-cosine, each
  tuned like Adam; the one with the lowest geometric mean over the search seeds), so that a fitness
  below 1 means "beats the strongest of them", nearer the claim the funnel tests than "beats Adam".
- `MultiEvaluator`: the same objective over several families (a search on a mix of tasks): the
  geometric mean over every (task, variant, seed) ratio, each task at the candidate's best lr there.

The held-out comparison of methods lives beside this module, in `compare.py`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from search_space.builtins import builtin
from search_space.genome import Genome

from ..engine.trainer import train
from ..tasks.api import (
    DEFAULT_LR_GRID,
    DEFAULT_SEARCH_LRS,
    DEFAULT_SIGMAS,
    TaskFamily,
    TaskInstance,
)
from ..tasks.budget import DEFAULT_BUDGET_FPE, steps_for
from ..tasks.registry import WAVES, resolve
from ..tasks.sine import DEFAULT_CACHE_DIR, HORIZONS, SineConfig, WaveFamily
from .stats import first_best, gmean

# The sine task's grids (the family defaults of nos.tasks.api are these). The RandOpt post's
# authors tuned Adam on {1e-4 ... 1e-2}; we go lower because Adam kept picking the grid's low end.
LR_GRID = DEFAULT_LR_GRID
SEARCH_LRS = DEFAULT_SEARCH_LRS
# RandOpt's sigma grid: the post's 0.002 and below (the long horizons picked the grid's low end)
SIGMAS = DEFAULT_SIGMAS
__all__ = ["HORIZONS", "LR_GRID", "REFERENCES", "SEARCH_LRS", "SIGMAS", "SearchSetup", "TaskEvaluator", "MultiEvaluator"]
MAX_ROWS = 2048  # candidates x lrs trained in one batch; more are split into chunks
# What the search fitness is divided by (`SearchConfig.reference`): tuned Adam, or per search
# variant the strongest of the tuned gradient baselines (`nos.evaluation.protocol.GRADIENT_BASELINES`)
REFERENCES = ("adam", "best")


@dataclass(frozen=True)
class SearchSetup:
    """Everything that defines the search objective on one task (stored with a run's config).

    `seeds`: the search seeds (instance seeds of the family; for the waves, seed s is the network
    pretrained with seed s fine-tuned on the target trajectory of seed s). `spec` names the family
    (`nos.tasks.registry`); `sine` holds the wave families' knobs; `family` may carry the resolved
    family (not compared: the spec and its identity are what a setup is)."""

    horizons: tuple[float, ...] = (2.0, 10.0)
    lrs: tuple[float, ...] = SEARCH_LRS
    budget_fpe: int = DEFAULT_BUDGET_FPE
    seeds: tuple[int, ...] = (0,)
    sine: SineConfig = field(default_factory=SineConfig)
    cache_dir: str = DEFAULT_CACHE_DIR
    task: str = "sine"  # the `task` of its evaluation rows ("sine_cheap": a multi-fidelity first stage)
    spec: str = "sine"  # the task family (a shipped name, FILE.py:FACTORY or module:factory)
    family: TaskFamily | None = field(default=None, compare=False, repr=False)

    def resolved(self) -> TaskFamily:
        """The family this setup trains on (user code only when it came resolved from the CLI)."""
        if self.family is not None:
            return self.family
        if self.spec in WAVES:
            return WaveFamily(dataclasses.replace(self.sine, wave=self.spec))
        return resolve(self.spec)  # a user's code only if it was named in this process

    @property
    def reference(self) -> str:
        """The `task` of the stored Adam reference rows of this setup: `<task>_search`, or
        `<task>_search_cheap` for a cheap first stage (`sine_search`, `sine_search_cheap`)."""
        return self.reference_task("adam")

    def reference_task(self, kind: str = "adam") -> str:
        """The `task` of the stored reference rows of one kind (`REFERENCES`): Adam's (`reference`),
        or for "best" the tuned gradient baselines' `<task>_search_best` (`_search_best_cheap` for
        a cheap first stage), so that the two references never mix."""
        if kind not in REFERENCES:
            raise ValueError(f"reference: one of {', '.join(REFERENCES)}, not {kind!r}")
        base, cheap = (self.task[: -len("_cheap")], "_cheap") if self.task.endswith("_cheap") else (self.task, "")
        return f"{base}_search{'' if kind == 'adam' else '_' + kind}{cheap}"


# (horizon, search seed) -> (tuned Adam's loss, its lr): the fitness normaliser (with reference
# "best": the loss and lr of the strongest tuned gradient baseline at that horizon)
AdamReference = dict[tuple[float, int], tuple[float, float]]
# gradient baseline -> its tuned (loss, lr) per (horizon, search seed); a (horizon, seed) where it
# diverged at every lr is missing (`TaskEvaluator.tuned_baselines`)
TunedBaselines = dict[str, AdamReference]


@dataclass
class GridResult:
    losses: list[list[float | None]]  # [genome][lr]
    steps: list[int]  # per genome
    seconds: float


@dataclass
class Fitness:
    fitness: float | None  # None: no lr gave a finite loss at every horizon and seed
    lr: float | None
    evaluations: list[dict]  # one row per (horizon, seed, lr), for the database


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def strongest(tuned: TunedBaselines, horizons: Sequence[float], seeds: Sequence[int],
              where: str = "horizon") -> tuple[AdamReference, dict[float, str]]:
    """The "best" reference from tuned baselines: per horizon, the baseline whose tuned losses have
    the lowest geometric mean over `seeds` (near-ties, within `stats.TIE_RTOL`: the first in
    `tuned`'s order, Adam first), and its per-seed (loss, lr) as the reference; also which baseline
    that is per horizon. A baseline that diverged at every lr on some seed of a horizon is no
    candidate there; ValueError when none is left."""
    ref: AdamReference = {}
    chosen: dict[float, str] = {}
    for h in horizons:
        scored = [(gmean([per[(h, s)][0] for s in seeds]), m)
                  for m, per in tuned.items() if all((h, s) in per for s in seeds)]
        if not scored:
            raise ValueError(f"every tuned gradient baseline diverges at every lr on some search seed "
                             f"({where} {h:g}): widen the family's lr_grid")
        method = first_best(scored)[1]
        chosen[h] = method
        ref.update({(h, s): tuned[method][(h, s)] for s in seeds})
    return ref, chosen


def geometric_mean_ratio(losses: Sequence[float], reference: Sequence[float]) -> float:
    """exp(mean(log(loss / reference))): 1.0 means "as good as the reference" on average."""
    tiny = 1e-30  # a loss of exactly 0 is a perfect fit, not a log error
    return math.exp(statistics.fmean(math.log(max(x, tiny) / max(r, tiny)) for x, r in zip(losses, reference)))


class TaskEvaluator:
    """Trains batches of candidates on one family's instances (one per (variant, seed), cached)."""

    def __init__(self, setup: SearchSetup, device: torch.device | str = "cpu") -> None:
        self.setup = setup
        self.family = setup.resolved()
        self.identity = self.family.identity()  # the `task_key` of its rows
        self.device = torch.device(device)
        self._tasks: dict[tuple[int, int, float], TaskInstance] = {}

    def task(self, horizon: float, pretrain_seed: int | None = None, target_seed: int | None = None) -> TaskInstance:
        """The instance of variant `horizon` and seed `pretrain_seed` (wave families may pair a
        network pretrained with one seed with the target trajectory of another)."""
        ps = self.setup.seeds[0] if pretrain_seed is None else pretrain_seed
        ts = ps if target_seed is None else target_seed
        key = (ps, ts, horizon)
        if key not in self._tasks:
            if ps == ts:
                self._tasks[key] = self.family.instance(horizon, ps, self.device, self.setup.cache_dir)
            elif isinstance(self.family, WaveFamily):
                from ..tasks.sine import SineTask

                self._tasks[key] = SineTask(self.family.sine, ps, ts, horizon, self.device, self.setup.cache_dir)
            else:
                raise ValueError(f"task {self.family.name!r} has one seed per instance")
        return self._tasks[key]

    def grid(self, genomes: Sequence[Genome], lrs: Sequence[float], task: TaskInstance) -> GridResult:
        """Train every genome at every lr on `task` within the budget; losses [genome][lr]."""
        return self.grid_seeds(genomes, lrs, [task])[0]

    def grid_seeds(self, genomes: Sequence[Genome], lrs: Sequence[float], tasks: Sequence[TaskInstance]) -> list[GridResult]:
        """`grid` on several tasks of one horizon at once (seeds stacked on the candidate axis).

        Returns one GridResult per task. Each task's rows use its own target seed for random ops.
        Batches above MAX_ROWS rows are split.
        """
        start = time.perf_counter()
        combos = [(t, g, lr) for t in range(len(tasks)) for g in genomes for lr in lrs]
        losses: list[float | None] = []
        for i in range(0, len(combos), MAX_ROWS):
            chunk = combos[i : i + MAX_ROWS]
            stack = self.family.stack(list(tasks), torch.tensor([t for t, _, _ in chunk]))
            res = train(stack, [g for _, g, _ in chunk], [lr for _, _, lr in chunk],
                        seeds=[tasks[t].seed for t, _, _ in chunk], budget_fpe=self.setup.budget_fpe)
            losses += res.losses
        seconds = time.perf_counter() - start
        n, per_task = len(lrs), len(genomes) * len(lrs)
        steps = [steps_for(g, self.setup.budget_fpe) for g in genomes]
        return [
            GridResult(
                losses=[[_finite(x) for x in losses[t * per_task + j * n : t * per_task + (j + 1) * n]] for j in range(len(genomes))],
                steps=steps,
                seconds=seconds / len(tasks),
            )
            for t in range(len(tasks))
        ]

    def search_tasks(self, horizon: float) -> list[TaskInstance]:
        return [self.task(horizon, s, s) for s in self.setup.seeds]

    def adam_reference(self) -> AdamReference:
        """Tuned Adam on each search instance: its best loss over the family's lr grid, and that lr."""
        out: AdamReference = {}
        grid = self.family.lr_grid
        for h in self.setup.horizons:
            for s, res in zip(self.setup.seeds, self.grid_seeds([builtin("adam")], grid, self.search_tasks(h))):
                finite = [(x, lr) for x, lr in zip(res.losses[0], grid) if x is not None]
                if not finite:
                    raise ValueError(f"tuned Adam diverges at every lr of task {self.family.name!r} "
                                     f"({self.family.variant_label} {h:g}, seed {s}): widen the family's lr_grid")
                out[(h, s)] = min(finite)
        return out

    def tuned_baselines(self, methods: Sequence[str] | None = None) -> TunedBaselines:
        """Each gradient baseline (`protocol.GRADIENT_BASELINES` unless `methods` names others) tuned
        on each search instance exactly like Adam in `adam_reference` -- its best loss over the
        family's lr grid, and that lr -- all of them in one batch per horizon."""
        from .protocol import GRADIENT_BASELINES, baseline_genome  # protocol imports this module

        names = list(GRADIENT_BASELINES if methods is None else methods)
        grid = self.family.lr_grid
        out: TunedBaselines = {m: {} for m in names}
        for h in self.setup.horizons:
            results = self.grid_seeds([baseline_genome(m) for m in names], grid, self.search_tasks(h))
            for s, res in zip(self.setup.seeds, results):
                for m, per_lr in zip(names, res.losses):
                    finite = [(x, lr) for x, lr in zip(per_lr, grid) if x is not None]
                    if finite:
                        out[m][(h, s)] = min(finite)
        return out

    def best_reference(self) -> AdamReference:
        """The strongest tuned gradient baseline per search horizon (`strongest` of
        `tuned_baselines`): its (loss, lr) on each search instance."""
        where = f"task {self.family.name!r}, {self.family.variant_label}"
        return strongest(self.tuned_baselines(), self.setup.horizons, self.setup.seeds, where)[0]

    def fitness(self, genomes: Sequence[Genome], adam: AdamReference) -> list[Fitness]:
        """Score genomes against tuned Adam: the geometric mean over search horizons and search
        seeds of loss / Adam's loss, at the candidate's best lr of the grid (lower is better;
        ~1 means Adam-like). `adam` may be any reference of that shape (`best_reference`)."""
        lrs, seeds, horizons = self.setup.lrs, self.setup.seeds, self.setup.horizons
        per_h = {h: self.grid_seeds(genomes, lrs, self.search_tasks(h)) for h in horizons}
        out = []
        for j in range(len(genomes)):
            evaluations = []
            for h, per_seed in per_h.items():
                for s, res in zip(seeds, per_seed):
                    each = res.seconds / max(1, len(genomes) * len(lrs))
                    evaluations += [{"task": self.setup.task, "task_key": self.identity, "horizon": h, "lr": lr, "seed": s, "loss": loss,
                                     "steps": res.steps[j], "seconds": each, "split": "search"}
                                    for lr, loss in zip(lrs, res.losses[j])]
            scored: list[tuple[float, float]] = []
            for i, lr in enumerate(lrs):
                ls = [per_h[h][k].losses[j][i] for h in horizons for k in range(len(seeds))]
                if any(x is None for x in ls):
                    continue
                ref = [adam[(h, s)][0] for h in horizons for s in seeds]
                scored.append((geometric_mean_ratio(ls, ref), lr))  # type: ignore[arg-type]
            best = first_best(scored) if scored else None  # near-ties: the first (smallest) lr
            out.append(Fitness(None, None, evaluations) if best is None else Fitness(best[0], best[1], evaluations))
        return out


# task -> that task's Adam reference (a search on several tasks)
MultiReference = dict[str, AdamReference]


class MultiEvaluator:
    """The search objective over several task families (one `TaskEvaluator` each).

    Fitness: the geometric mean over every (task, variant, seed) of loss / tuned Adam's loss, where
    each task is scored at the candidate's best lr *on that task* (an lr means nothing across tasks
    of different scales); None if some task has no lr with finite losses everywhere. The candidate's
    recorded lr is the one chosen on the first task.
    """

    def __init__(self, evaluators: Sequence[TaskEvaluator]) -> None:
        if not evaluators:
            raise ValueError("a multi-task objective needs at least one task")
        self.evaluators = list(evaluators)
        self.setup = self.evaluators[0].setup  # budget, cache, first task (what a stage reports)

    def adam_reference(self) -> MultiReference:
        return {e.setup.task: e.adam_reference() for e in self.evaluators}

    def best_reference(self) -> MultiReference:
        return {e.setup.task: e.best_reference() for e in self.evaluators}

    def fitness(self, genomes: Sequence[Genome], adam: MultiReference) -> list[Fitness]:
        per_task = [(e, e.fitness(genomes, adam[e.setup.task])) for e in self.evaluators]
        out = []
        for j in range(len(genomes)):
            rows = [row for _, fs in per_task for row in fs[j].evaluations]
            scores = [(fs[j].fitness, len(e.setup.horizons) * len(e.setup.seeds)) for e, fs in per_task]
            known = [(f, n) for f, n in scores if f is not None]
            if len(known) < len(scores):
                out.append(Fitness(None, None, rows))
                continue
            total = sum(n for _, n in known)
            score = math.exp(sum(n * math.log(max(f, 1e-30)) for f, n in known) / total)
            out.append(Fitness(score, per_task[0][1][j].lr, rows))
        return out
