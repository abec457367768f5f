"""The held-out comparison: candidates beside tuned baselines on seeds the search never saw.

`heldout_comparison` is the funnel's final table (and `python -m nos.baselines`): candidates
beside tuned Adam, Adam with gradient clipping and tuned RandOpt on pretraining seeds and targets
the search never saw, every method with the same budget and its lr / sigma tuned per horizon on
the mean over seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from search_space.builtins import builtin
from search_space.genome import Genome

from ..tasks.budget import randopt_population
from ..tasks.randopt import DEFAULT_TOP_K, randopt
from .sine import HELDOUT_SEEDS, HORIZONS, LR_GRID, SIGMAS, SineEvaluator, _finite


@dataclass
class MethodResult:
    name: str
    horizon: float
    losses: list[float | None]  # per held-out seed, at the chosen hyperparameter
    hparam: float | None  # lr or sigma chosen on the mean over seeds

    @property
    def mean(self) -> float | None:
        xs = [x for x in self.losses if x is not None]
        return statistics.fmean(xs) if len(xs) == len(self.losses) and xs else None

    @property
    def std(self) -> float | None:
        xs = [x for x in self.losses if x is not None]
        return statistics.pstdev(xs) if len(xs) == len(self.losses) and xs else None


def _pick(per_seed: list[list[float | None]], options: Sequence[float]) -> tuple[list[float | None], float | None]:
    """Choose the option with the best mean over seeds; per_seed[seed][option]."""
    best: tuple[float, int] | None = None
    for i in range(len(options)):
        xs = [s[i] for s in per_seed]
        if any(x is None for x in xs):
            continue
        m = statistics.fmean(xs)  # type: ignore[arg-type]
        if best is None or m < best[0]:
            best = (m, i)
    if best is None:
        return [None] * len(per_seed), None
    return [s[best[1]] for s in per_seed], options[best[1]]


def heldout_comparison(
    evaluator: SineEvaluator,
    candidates: dict[str, Genome],
    *,
    horizons: Sequence[float] = HORIZONS,
    seeds: Sequence[int] = HELDOUT_SEEDS,
    lrs: Sequence[float] = LR_GRID,
    sigmas: Sequence[float] = SIGMAS,
    randopt_layers: Sequence[str] = ("all",),
    include_adam: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[float, MethodResult]]:
    """method -> horizon -> result, on held-out (pretraining seed, target seed) pairs.

    Methods: "before" (no fine-tuning), "adam", "adam_clip", "randopt_<layers>", and each
    candidate by name. Every method gets `evaluator.setup.budget_fpe`; lr / sigma chosen per horizon.
    """
    methods = dict(candidates)
    if include_adam:
        methods = {"adam": builtin("adam"), "adam_clip": builtin("adam_clip"), **methods}
    names = list(methods)
    out: dict[str, dict[float, MethodResult]] = {}
    budget_n = randopt_population(evaluator.setup.budget_fpe)
    for h in horizons:
        grad_losses: dict[str, list[list[float | None]]] = {n: [] for n in names}
        ro_losses: dict[str, list[list[float | None]]] = {layers: [] for layers in randopt_layers}
        if progress:
            progress(f"held-out horizon {h:g}")
        tasks = [evaluator.task(h, pretrain_seed=s, target_seed=s) for s in seeds]
        with torch.no_grad():
            before = [_finite(float(t.loss(t.theta0[None])[0])) for t in tasks]
        for res in evaluator.grid_seeds([methods[n] for n in names], lrs, tasks):
            for n, row in zip(names, res.losses):
                grad_losses[n].append(row)
        for task, s in zip(tasks, seeds):
            for layers in randopt_layers:
                ro = randopt(task, budget_n, sigmas, DEFAULT_TOP_K, layers=layers, seed=s)
                ro_losses[layers].append([_finite(ro.ensemble_losses[sig]) for sig in sigmas])
        out.setdefault("before", {})[h] = MethodResult("before", h, before, None)
        for layers, per_seed in ro_losses.items():
            chosen, sig = _pick(per_seed, sigmas)
            out.setdefault(f"randopt_{layers}", {})[h] = MethodResult(f"randopt_{layers}", h, chosen, sig)
        for n in names:
            chosen, lr = _pick(grad_losses[n], lrs)
            out.setdefault(n, {})[h] = MethodResult(n, h, chosen, lr)
    return out

