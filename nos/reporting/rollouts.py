"""rollouts.png: target vs the rollout of every method after fine-tuning, retrained on the first
test seed with the run's own task settings (the one part of the report that trains: opt-in)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..evaluation.protocol import BEFORE, METHOD_LABELS  # noqa: E402
from ..tasks.budget import describe  # noqa: E402
from .data import RunData  # noqa: E402
from .plots import METHOD_STYLE, hparam_text, pictured_methods, save_figure  # noqa: E402

if TYPE_CHECKING:  # the training side is imported only when --rollouts asks for it
    import torch

    from ..evaluation.fitness import TaskEvaluator

log = logging.getLogger("nos.report")

@dataclass
class Rollouts:
    """One held-out horizon's target and each method's rollout (None: diverged or not run)."""

    horizon: float
    seed: int
    k: int
    dt: float
    target: torch.Tensor  # [n] on the CPU
    curves: dict[str, tuple[str, torch.Tensor | None, float | None]]  # key -> (label, [n - k], MSE)
    stored: dict[str, float | None] = field(default_factory=dict)  # key -> the funnel's stored test loss


def rollouts(data: RunData, evaluator: TaskEvaluator, horizon: float, seed: int) -> Rollouts:
    """Retrain as the funnel did (same task, seed, budget, validated lr / sigma / layers) and roll
    out every pictured method: the champion, the five tuned baselines, the published optimizers
    the run has, and the pretrained net as it is. This is the only place the report trains
    anything (and only with --rollouts): the numbers themselves are read from the database.

    Each method is trained alone (a batch of one), so a diverging method cannot change another's
    run through the batch's composition."""
    import torch  # the training side: only here, so a report without --rollouts never loads it

    from search_space.genome import from_json

    from ..engine.trainer import train
    from ..evaluation.protocol import baseline_genome
    from ..tasks.budget import randopt_population
    from ..tasks.randopt import DEFAULT_TOP_K, randopt
    from ..tasks.sine import SineTask

    cmp, best = data.comparison, data.champion
    assert best is not None and cmp is not None
    task = evaluator.task(horizon, pretrain_seed=seed, target_seed=seed)
    if not isinstance(task, SineTask):
        raise ValueError("rollouts are drawn for the wave tasks only")
    position = list(cmp.seeds.test).index(seed) if seed in cmp.seeds.test else None
    labels: dict[str, str] = {}
    preds: dict[str, torch.Tensor | None] = {}
    stored: dict[str, float | None] = {}
    for method, key in pictured_methods(data):
        r = cmp.result(method, horizon)
        if r is None:
            continue
        if position is not None:
            stored[key] = r.per_seed[position]
        if method == BEFORE:
            labels[key] = METHOD_LABELS[BEFORE]
            with torch.no_grad():
                preds[key] = task.rollout(task.theta0[None])[0]
            continue
        if method == "randopt":
            labels[key] = f"RandOpt, {r.variant or 'all'} layers (sigma {hparam_text(r)})"
            if r.hparam is not None:
                preds[key] = randopt(task, randopt_population(data.config.budget_fpe), [r.hparam], DEFAULT_TOP_K,
                                     layers=r.variant or "all", seed=seed).ensemble_prediction.to(task.device)
            continue
        name = f"{method}, champion" if key == "best" else METHOD_LABELS.get(method, method)
        labels[key] = f"{name} (lr {hparam_text(r)})"
        if r.hparam is None:
            continue
        genome = from_json(best["genome"]) if key == "best" else baseline_genome(method)
        res = train(task, [genome], [r.hparam], seeds=seed, budget_fpe=data.config.budget_fpe)  # type: ignore[arg-type]
        assert res.params is not None
        with torch.no_grad():
            preds[key] = task.rollout(res.params)[0]
    curves: dict[str, tuple[str, torch.Tensor | None, float | None]] = {}
    for key, label in labels.items():
        pred = preds.get(key)
        if pred is None or not bool(torch.isfinite(pred).all()):
            curves[key] = (label, None, None)
            continue
        with torch.no_grad():
            mse = float(task.loss_of_predictions(pred[None].to(task.target.dtype))[0])
        curves[key] = (label, pred.detach().cpu(), mse)
    return Rollouts(horizon, seed, task.config.k, task.config.dt, task.target.cpu(), curves, stored)


def rollout_horizons(data: RunData) -> list[float]:
    """The held-out horizons the run has results for."""
    return list(data.comparison.horizons) if data.comparison else []


def _mse_text(mse: float, stored: float | None) -> str:
    """The retrained MSE, and the funnel's stored one where they differ (a long chaotic rollout
    can: README "Results", the batch-composition defect)."""
    same = stored is not None and math.isclose(mse, stored, rel_tol=1e-2)
    return f"MSE {mse:.3g}" + ("" if same or stored is None else f" (stored {stored:.3g})")


def rollouts_figure(data: RunData, device: torch.device | str, horizons: Sequence[float],
                    progress: bool = True) -> Figure:
    """rollouts.png: per chosen held-out horizon, the target and the rollouts after fine-tuning
    with every pictured method (`pictured_methods`), on the first test seed."""
    import torch

    cfg = data.config
    seed = cfg.test_seeds[0]
    evaluator = cfg.protocol().evaluator(device)
    fig, axes = plt.subplots(len(horizons), 1, figsize=(10, 3.0 * len(horizons) + 0.6), squeeze=False)
    for ax, h in zip(axes[:, 0], horizons):
        if progress:
            log.info(f"  rollouts at t_max = {h:g} ...")
        ro = rollouts(data, evaluator, h, seed)
        k, t = ro.k, torch.arange(ro.target.numel()) * ro.dt
        ax.axvspan(0.0, float(t[k - 1]), color="0.92", zorder=0)
        ax.plot(t, ro.target, color="k", lw=2.2, label="target")
        ax.plot(t[:k], ro.target[:k], "o", color="k", ms=4, label=f"conditioning ({k} points)")
        for key, (label, pred, mse) in ro.curves.items():
            color, ls, _ = METHOD_STYLE.get(key, ("k", "-", "o"))
            if pred is None or mse is None:
                ax.plot([], [], color=color, ls=ls, label=f"{label}: diverged")
            else:
                ax.plot(t[k:], pred, color=color, ls=ls, lw=2.0 if key == "best" else 1.3,
                        label=f"{label}: {_mse_text(mse, ro.stored.get(key))}")
        lo, hi = float(ro.target.min()), float(ro.target.max())
        pad = 0.6 * (hi - lo) + 0.1
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(0, float(t[-1]) + ro.dt)
        ax.set_title(f"t_max = {h:g} (test seed {seed})", fontsize=10)
        ax.set_ylabel("x(t)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("t")
    fig.suptitle(f"run {data.run['name']!r}: rollouts after fine-tuning ({describe(cfg.budget_fpe)})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_rollouts(data: RunData, path: Path, device: torch.device | str, horizons: Sequence[float],
                  progress: bool = True) -> None:
    save_figure(rollouts_figure(data, device, horizons, progress), path, dpi=110)
