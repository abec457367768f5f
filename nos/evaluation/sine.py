"""Evaluate optimizers on the sine-rollout post-training task.

- `SineEvaluator.grid`: many genomes x an lr grid trained in one batch per horizon.
- `fitness`: the search objective. Each horizon's loss is divided by tuned Adam's loss at that
  horizon and the ratios are combined by their geometric mean, so horizons weigh alike whatever
  their scale (a 10x gain counts the same at t_max = 1 as at t_max = 20); the candidate's lr is
  the grid point with the best score (NOS picks each candidate's lr from a sweep too). Lower is
  better; Adam itself scores about 1.

The held-out comparison of methods lives beside this module, in `compare.py`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from search_space.builtins import builtin
from search_space.genome import Genome

from ..engine.trainer import train
from ..tasks.budget import DEFAULT_BUDGET_FPE, steps_for
from ..tasks.sine import DEFAULT_CACHE_DIR, SineConfig, SineTask, StackedSineTask

HORIZONS = (1.0, 2.0, 5.0, 10.0, 20.0)
# ANCHORS section 8 tuned Adam on {1e-4 ... 1e-2}; we go lower because Adam kept picking the grid's low end
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SEARCH_LRS = (3e-5, 3e-4, 3e-3)
HELDOUT_SEEDS = (1001, 1002, 1003)
# RandOpt's sigma grid: the post's 0.002 and below (the long horizons picked the grid's low end)
SIGMAS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)
MAX_ROWS = 2048  # candidates x lrs trained in one batch; more are split into chunks


@dataclass(frozen=True)
class SearchSetup:
    """Everything that defines the search objective (stored with a run's config).

    `seeds`: the search seeds; seed s is the network pretrained with seed s fine-tuned on the
    target trajectory of seed s."""

    horizons: tuple[float, ...] = (2.0, 10.0)
    lrs: tuple[float, ...] = SEARCH_LRS
    budget_fpe: int = DEFAULT_BUDGET_FPE
    seeds: tuple[int, ...] = (0,)
    sine: SineConfig = field(default_factory=SineConfig)
    cache_dir: str = DEFAULT_CACHE_DIR
    task: str = "sine"  # the `task` of its evaluation rows ("sine_cheap": a multi-fidelity first stage)


# (horizon, search seed) -> (tuned Adam's loss, its lr): the fitness normaliser
AdamReference = dict[tuple[float, int], tuple[float, float]]


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


def geometric_mean_ratio(losses: Sequence[float], reference: Sequence[float]) -> float:
    """exp(mean(log(loss / reference))): 1.0 means "as good as the reference" on average."""
    tiny = 1e-30  # a loss of exactly 0 is a perfect fit, not a log error
    return math.exp(statistics.fmean(math.log(max(x, tiny) / max(r, tiny)) for x, r in zip(losses, reference)))


class SineEvaluator:
    """Trains batches of candidates on the search tasks (one SineTask per horizon, cached)."""

    def __init__(self, setup: SearchSetup, device: torch.device | str = "cpu") -> None:
        self.setup = setup
        self.device = torch.device(device)
        self._tasks: dict[tuple[int, int, float], SineTask] = {}

    def task(self, horizon: float, pretrain_seed: int | None = None, target_seed: int | None = None) -> SineTask:
        ps = self.setup.seeds[0] if pretrain_seed is None else pretrain_seed
        ts = ps if target_seed is None else target_seed
        key = (ps, ts, horizon)
        if key not in self._tasks:
            self._tasks[key] = SineTask(self.setup.sine, ps, ts, horizon, self.device, self.setup.cache_dir)
        return self._tasks[key]

    def grid(self, genomes: Sequence[Genome], lrs: Sequence[float], task: SineTask) -> GridResult:
        """Train every genome at every lr on `task` within the budget; losses [genome][lr]."""
        return self.grid_seeds(genomes, lrs, [task])[0]

    def grid_seeds(self, genomes: Sequence[Genome], lrs: Sequence[float], tasks: Sequence[SineTask]) -> list[GridResult]:
        """`grid` on several tasks of one horizon at once (seeds stacked on the candidate axis).

        Returns one GridResult per task. Each task's rows use its own target seed for random ops.
        Batches above MAX_ROWS rows are split.
        """
        start = time.perf_counter()
        combos = [(t, g, lr) for t in range(len(tasks)) for g in genomes for lr in lrs]
        losses: list[float | None] = []
        for i in range(0, len(combos), MAX_ROWS):
            chunk = combos[i : i + MAX_ROWS]
            stack = StackedSineTask(list(tasks), torch.tensor([t for t, _, _ in chunk]))
            res = train(stack, [g for _, g, _ in chunk], [lr for _, _, lr in chunk],
                        seeds=[tasks[t].target_seed for t, _, _ in chunk], budget_fpe=self.setup.budget_fpe)
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

    def search_tasks(self, horizon: float) -> list[SineTask]:
        return [self.task(horizon, s, s) for s in self.setup.seeds]

    def adam_reference(self) -> AdamReference:
        """Tuned Adam on each search task: its best loss over the full LR_GRID, and that lr."""
        out: AdamReference = {}
        for h in self.setup.horizons:
            for s, res in zip(self.setup.seeds, self.grid_seeds([builtin("adam")], LR_GRID, self.search_tasks(h))):
                out[(h, s)] = min((x, lr) for x, lr in zip(res.losses[0], LR_GRID) if x is not None)
        return out

    def fitness(self, genomes: Sequence[Genome], adam: AdamReference) -> list[Fitness]:
        """Score genomes against tuned Adam: the geometric mean over search horizons and search
        seeds of loss / Adam's loss, at the candidate's best lr of the grid (lower is better;
        ~1 means Adam-like)."""
        lrs, seeds, horizons = self.setup.lrs, self.setup.seeds, self.setup.horizons
        per_h = {h: self.grid_seeds(genomes, lrs, self.search_tasks(h)) for h in horizons}
        out = []
        for j in range(len(genomes)):
            evaluations = []
            for h, per_seed in per_h.items():
                for s, res in zip(seeds, per_seed):
                    each = res.seconds / max(1, len(genomes) * len(lrs))
                    evaluations += [{"task": self.setup.task, "horizon": h, "lr": lr, "seed": s, "loss": loss,
                                     "steps": res.steps[j], "seconds": each, "split": "search"}
                                    for lr, loss in zip(lrs, res.losses[j])]
            best: tuple[float, float] | None = None
            for i, lr in enumerate(lrs):
                ls = [per_h[h][k].losses[j][i] for h in horizons for k in range(len(seeds))]
                if any(x is None for x in ls):
                    continue
                ref = [adam[(h, s)][0] for h in horizons for s in seeds]
                score = geometric_mean_ratio(ls, ref)  # type: ignore[arg-type]
                if best is None or score < best[0]:
                    best = (score, lr)
            out.append(Fitness(None, None, evaluations) if best is None else Fitness(best[0], best[1], evaluations))
        return out
