"""`python -m nos.report RUN`: plots and a markdown summary of one search, from stored results.

    python -m nos.report demo                  # writes runs/demo/{summary.md, *.png}, in seconds
    python -m nos.report 3 --out /tmp/rep      # run by id, into another folder
    python -m nos.report demo --rollouts       # also rollouts.png: retrains (minutes per horizon)

Files: fitness.png (each particle's fitness over timesteps), lineage.png (the best individual's
ancestry with the siblings of every step), search.png (best fitness so far, beside a random-search
control when the database holds one) and, when the run has held-out (funnel) results, losses.png
(test loss per horizon of the champion, the five tuned baselines, the published optimizers when
the run has them and the network before fine-tuning: each test seed a dot, the geometric mean a
line) and profile.png (a performance profile); summary.md links them all. The database is opened
read-only and nothing is trained -- except with --rollouts (or --rollout-horizons), which draws
rollouts.png: target vs the rollout of every method after fine-tuning, retrained on the first test
seed with the run's own task settings and each method's validated lr / sigma / layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from db.store import Store  # noqa: E402

from .cli import (  # noqa: E402
    DEFAULT_DB,
    ArgumentParser,
    UsageError,
    add_device,
    add_format,
    add_threads,
    apply_threads,
    print_json,
    resolve_device,
    run_command,
)
from .evaluation.compare import Comparison, MethodResult, method_label  # noqa: E402
from .evaluation.protocol import BASELINES, BEFORE, METHOD_LABELS, PUBLISHED  # noqa: E402
from .evaluation.stats import settle  # noqa: E402
from .report_table import comparison_text  # noqa: E402
from .search import SearchConfig  # noqa: E402
from .search.diagnostics import diagnostics  # noqa: E402
from .search.funnel import candidate_id, candidate_name, comparison  # noqa: E402
from .search.metrics import duplicate_rate, integrity_pass_rate  # noqa: E402
from .tasks.budget import describe  # noqa: E402
from .tasks.registry import WAVES  # noqa: E402

if TYPE_CHECKING:  # the training side is imported only when --rollouts asks for it
    import torch

    from .evaluation.fitness import TaskEvaluator

log = logging.getLogger("nos.report")  # not __name__: it is __main__ under python -m

STATUS_COLORS = {
    "evaluated": "#2ca02c",
    "rejected_integrity": "#ff7f0e",
    "invalid": "#7f7f7f",
    "error": "#d62728",
    "duplicate": "#9467bd",
}
# color, linestyle, marker of each method in rollouts.png / losses.png / profile.png: the
# warmup-cosine variants dashed beside their constant-lr twins, the published optimizers dash-dot
METHOD_STYLE = {
    "best": ("#d62728", "-", "o"),
    "adam": ("#1f77b4", "-", "s"),
    "adam_clip": ("#17becf", "-", "D"),
    "adam_wc": ("#9467bd", "--", "v"),
    "adam_clip_wc": ("#e377c2", "--", "^"),
    "randopt": ("#2ca02c", "-", "P"),
    "nos_opt5": ("#ff7f0e", "-.", "<"),
    "nos_opt6": ("#bcbd22", "-.", ">"),
    "nos_opt7": ("#8c564b", "-.", "h"),
    "nos_adamclip": ("#393b79", "-.", "X"),
    "before": ("#7f7f7f", ":", "."),
}


@dataclass
class RunData:
    """Everything the report reads from the database about one run."""

    run: dict
    config: SearchConfig
    individuals: list[dict]
    counts: dict[str, int]
    stats: list[dict]
    comparison: Comparison | None = None  # the funnel's test-seed comparison (None: no funnel)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # nos.search.diagnostics
    champion: dict | None = None  # the best individual (funnel champion, else best fitness)

    @property
    def by_id(self) -> dict[int, dict]:
        return {r["id"]: r for r in self.individuals}


# ---------------------------------------------------------------------- reading


def load(store: Store, name_or_id: str) -> RunData:
    """Read a run, its individuals, stats and held-out results; UsageError for an unknown run."""
    run = store.get_run(name_or_id)
    if run is None:
        raise UsageError(f"no run named {name_or_id!r} (nor with that id) in {store.url}")
    try:  # re-validated like user input
        cfg = SearchConfig.checked(run["config"])
    except ValueError as e:
        raise UsageError(f"run {run['name']!r}: {e}") from None
    data = RunData(run, cfg, store.individuals(run["id"]), store.status_counts(run["id"]),
                   store.timestep_stats(run["id"]))
    data.comparison = comparison(store, run["id"], cfg)
    # the funnel's own choice (on validation seeds), else the best fitness
    name = data.comparison.champion if data.comparison else None
    best = data.by_id.get(candidate_id(name)) if name is not None else None  # type: ignore[arg-type]
    if best is None:
        top = store.top(run["id"], 1)
        best = top[0] if top else None
    data.champion = best
    return data


def particle_paths(data: RunData) -> dict[int, list[dict]]:
    """Each particle's position at timesteps 0, 1, ... (its row), as the GA chose it: the stored
    candidates replayed through the run's strategy (`ParticleGA.positions`), up to the last
    timestep fully stored. A strategy without particles (random search) has none."""
    from .ga.particle import STRATEGIES, ParticleGA
    from .search.records import Candidate

    strategy = STRATEGIES[data.config.algorithm].of(data.config)
    if not isinstance(strategy, ParticleGA):
        return {}
    by_id = data.by_id
    positions = strategy.positions({r["slot"]: Candidate.from_row(r) for r in data.individuals})
    return {p: [by_id[c.id] for c in pts] for p, pts in positions.items()}


# ---------------------------------------------------------------------- plots


def _particle_colors(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "viridis")
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def search_figure(data: RunData) -> Figure:
    """search.png: the best full-fidelity fitness among the first k judged candidates, for this
    run and -- when the database holds one of the same size -- a random-search control.

    The two curves often coincide (the same initial population, or nothing better found by
    either): the control goes underneath, wide, grey and dashed, the run on top, thin and solid,
    so both stay visible. Without a control the legend and title say so."""
    diag = data.diagnostics
    fig, ax = plt.subplots(figsize=(8, 4.5))
    control = diag.get("control")
    curves: list[tuple[str, list[float | None], dict[str, Any]]] = []
    if control:
        curves.append((f"{control['run']} (random-search control, dashed, underneath)", control["best_so_far"],
                       {"color": "0.45", "ls": "--", "lw": 3.2, "alpha": 0.75, "zorder": 2}))
    curves.append((f"{data.run['name']} ({data.config.algorithm})", diag["best_so_far"],
                   {"color": "#d62728", "ls": "-", "lw": 1.4, "zorder": 3}))
    for label, best, style in curves:
        pts = [(k + 1, b) for k, b in enumerate(best) if b is not None and b > 0]
        if pts:
            ax.step([k for k, _ in pts], [b for _, b in pts], where="post", label=label, **style)
        else:
            ax.plot([], [], label=f"{label}: no judged candidate", **style)
    if not control:
        ax.plot([], [], " ", label="no random-search control of the same size in this database")
    ax.set_yscale("log")
    ax.set_xlabel("judged candidates")
    ax.set_ylabel("best search fitness so far (loss / tuned Adam's)")
    rc = diag["rank_correlation"]
    rho = "n/a" if rc["spearman"] is None else f"{rc['spearman']:.2f}"
    vs = f" vs random-search control {control['run']!r}" if control else " (no random-search control)"
    ax.set_title(f"run {data.run['name']!r}: search progress{vs}\nSpearman(fitness, validation) over "
                 f"{rc['n']} funnel candidate(s) = {rho}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_search(data: RunData, path: Path) -> None:
    _save(search_figure(data), path, dpi=120)


def _save(fig: Figure, path: Path, dpi: int) -> None:
    # bbox "tight": the legends drawn beside the axes are kept in the picture
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def plot_fitness(data: RunData, path: Path) -> None:
    """fitness.png: each particle's position per timestep, every evaluated child faintly.

    Far outliers (a candidate 1e30 times worse than Adam) would flatten everything else: points
    above a cap set by the particles and the bulk of the population are drawn on the cap as ^."""
    paths = particle_paths(data)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = _particle_colors(max(1, len(paths)))
    evaluated = [r for r in data.individuals if r["status"] == "evaluated" and r["fitness"] is not None]
    values = [r["fitness"] for r in evaluated]
    path_values = [r["fitness"] for pts in paths.values() for r in pts if r["fitness"] is not None]
    cap = math.inf
    if values:
        bulk = statistics.quantiles(values, n=4)[2] if len(values) > 1 else values[0]
        cap = 4 * max(path_values + [bulk, 1.0])
    n_out = 0

    def scatter(xs: list[float], ys: list[float], **kw: Any) -> None:
        nonlocal n_out
        inside = [(x, y) for x, y in zip(xs, ys) if y <= cap]
        above = [x for x, y in zip(xs, ys) if y > cap]
        n_out += len(above)
        if inside:
            ax.scatter([x for x, _ in inside], [y for _, y in inside], s=12, lw=0, **kw)
        if above:
            ax.scatter(above, [cap] * len(above), s=18, marker="^", lw=0, clip_on=False,
                       **{k: v for k, v in kw.items() if k != "label"})

    init = [r["fitness"] for r in evaluated if r["timestep"] == 0]
    if init:
        scatter([0.0] * len(init), init, color="0.55", alpha=0.4, label="initial population")
    for p, pts in paths.items():
        c = colors[p % len(colors)]
        kids = [r for r in evaluated if r["particle"] == p and r["timestep"] >= 1]
        jitter = 0.12 * ((p % 7) - 3) / 3
        scatter([r["timestep"] + jitter for r in kids], [r["fitness"] for r in kids], color=c, alpha=0.35)
        xs = [t for t, r in enumerate(pts) if r["fitness"] is not None]
        ys = [min(pts[t]["fitness"], cap) for t in xs]
        ax.plot(xs, ys, "-o", color=c, ms=5, lw=1.8, label=f"particle {p} (from #{pts[0]['id']})")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="tuned Adam = 1")
    shown = [v for v in values if v <= cap] + [1.0]
    if min(shown) > 0 and max(shown) / min(shown) > 20:
        ax.set_yscale("log")
    if n_out:  # leave room for the ^ markers on the cap; otherwise matplotlib's autoscale
        log = ax.get_yscale() == "log"
        low = min(shown)
        ax.set_ylim(low / 1.5 if log else low - 0.05 * (cap - low), cap * 1.5 if log else cap * 1.05)
        ax.text(0.99, 0.99, f"^ {n_out} candidate(s) above {cap:.3g}, drawn at the top", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="0.3")
    if not values:
        ax.text(0.5, 0.5, "no evaluated candidates yet", transform=ax.transAxes, ha="center", va="center")
    last = max([len(p) - 1 for p in paths.values()] or [0])
    ax.set_xticks(range(last + 1))
    ax.set_xlim(-0.5, last + 0.5)
    ax.set_xlabel("timestep")
    ax.set_ylabel("fitness = geo-mean of loss / tuned Adam's (lower is better)")
    ax.set_title(f"run {data.run['name']!r}: particle positions (lines) and evaluated children (dots)",
                 fontsize=10)
    if len(paths) <= 12:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _by_fitness(r: dict) -> tuple[bool, float, int]:
    return (r["fitness"] is None, r["fitness"] or 0.0, r["id"])


def _spread(rows: list[dict], center_taken: bool) -> list[tuple[float, dict]]:
    """Places rows at y = 0 (unless taken), then alternately above and below: nearest first."""
    ys = ([] if center_taken else [0.0]) + [float(d) for n in range(1, len(rows) + 1) for d in (n, -n)]
    return list(zip(ys, rows))


def plot_lineage(data: RunData, store: Store, path: Path) -> None:
    """lineage.png: the best individual's chain back to its initial genome (bold, along the middle),
    each ancestor's other children (the chain's siblings) and the best's own children, as boxes
    colored by status and labelled with id and fitness; chain edges name the mutation."""
    chain: list[dict] = []
    if data.champion is not None:
        chain = list(reversed(store.lineage(data.champion["id"])))  # initial ... best
    children: dict[int, list[dict]] = defaultdict(list)
    for r in data.individuals:
        if r["parent_id"] is not None:
            children[r["parent_id"]].append(r)
    levels: list[list[tuple[float, dict]]] = []  # per level: (y, row); the chain at y = 0
    for i in range(len(chain) + 1):
        if i == 0:
            levels.append([(0.0, chain[0])] if chain else [])
            continue
        parent = chain[i - 1]
        if i < len(chain):
            others = sorted((r for r in children[parent["id"]] if r["id"] != chain[i]["id"]), key=_by_fitness)
            levels.append([(0.0, chain[i]), *_spread(others, center_taken=True)])
        elif children[parent["id"]]:
            levels.append(_spread(sorted(children[parent["id"]], key=_by_fitness), center_taken=False))
    span = max([abs(y) for lvl in levels for y, _ in lvl] or [0.0])
    fig_h = min(30.0, max(3.5, 0.45 * (2 * span + 1) + 1.8))
    fig_w = min(30.0, max(6.0, 2.2 * len(levels) + 1.5))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.axis("off")
    if not chain:
        ax.text(0.5, 0.5, "no evaluated individual: no lineage to draw", ha="center", va="center",
                transform=ax.transAxes)
    chain_ids = {r["id"] for r in chain}
    for i, placed in enumerate(levels):
        for y, r in placed:
            on_chain = r["id"] in chain_ids
            if i > 0:
                beyond = i >= len(chain)  # the best's own children
                ax.plot([i - 1, i], [0.0, y], color="k" if on_chain else "0.7", lw=2.0 if on_chain else 0.7,
                        ls=":" if beyond else "-", zorder=1)
                if on_chain and r.get("mutation_kind"):
                    ax.text(i - 0.5, 0.1, r["mutation_kind"], ha="center", va="bottom", fontsize=7,
                            color="0.2", zorder=3)
            fit = "-" if r["fitness"] is None else f"{r['fitness']:.3g}"
            ax.text(i, y, f"#{r['id']}\n{fit}", ha="center", va="center", fontsize=8 if on_chain else 7,
                    fontweight="bold" if on_chain else "normal", zorder=2,
                    bbox={"boxstyle": "round,pad=0.3", "fc": STATUS_COLORS.get(r["status"], "w"),
                          "ec": "k" if on_chain else "none", "lw": 1.8 if on_chain else 0,
                          "alpha": 0.9 if on_chain else 0.55})
    ax.set_xlim(-0.6, max(0, len(levels) - 1) + 0.6)
    ax.set_ylim(-span - 0.9, span + 0.9)
    for i in range(len(levels)):
        label = ("initial" if i == 0 else f"timestep {chain[i]['timestep']}" if i < len(chain)
                 else "children of the best")
        ax.text(i, span + 0.65, label, ha="center", va="bottom", fontsize=8, color="0.3")
    handles: list[Any] = [Patch(fc=c, alpha=0.7, label=s) for s, c in STATUS_COLORS.items()]
    handles.append(Line2D([], [], color="k", lw=2, label="lineage of the best"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    title = "lineage" if not chain else (
        f"lineage of the best, #{chain[-1]['id']}, and the other children of its ancestors\n"
        "(boxes: id and fitness = loss / tuned Adam's; edges: mutation)")
    ax.set_title(f"run {data.run['name']!r}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pictured_methods(data: RunData) -> list[tuple[str, str]]:
    """The methods drawn in losses.png and rollouts.png, as (method in the comparison, its key in
    METHOD_STYLE): the champion, the five tuned baselines, the published optimizers the run has,
    and the network before fine-tuning -- those with results in the comparison."""
    cmp = data.comparison
    if cmp is None:
        return []
    best = candidate_name(data.champion["id"]) if data.champion else None
    have = {r.method for r in cmp.methods}
    wanted = ([(best, "best")] if best else []) + [(m, m) for m in (*BASELINES, *PUBLISHED, BEFORE)]
    return [(m, key) for m, key in wanted if m in have]


def _label(method: str, key: str, results: Sequence[MethodResult]) -> str:
    """A method's legend label: the champion marked, RandOpt with its layers when one choice."""
    if key == "best":
        return f"{method} (champion)"
    variants = {r.variant for r in results}
    if results and len(variants) == 1:
        return method_label(results[0])
    return f"{METHOD_LABELS.get(method, method)} (layers chosen per horizon)"


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

    from .engine.trainer import train
    from .evaluation.protocol import baseline_genome
    from .tasks.budget import randopt_population
    from .tasks.randopt import DEFAULT_TOP_K, randopt
    from .tasks.sine import SineTask

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
            labels[key] = f"RandOpt, {r.variant or 'all'} layers (sigma {_hp(r)})"
            if r.hparam is not None:
                preds[key] = randopt(task, randopt_population(data.config.budget_fpe), [r.hparam], DEFAULT_TOP_K,
                                     layers=r.variant or "all", seed=seed).ensemble_prediction.to(task.device)
            continue
        name = f"{method}, champion" if key == "best" else METHOD_LABELS.get(method, method)
        labels[key] = f"{name} (lr {_hp(r)})"
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
    _save(rollouts_figure(data, device, horizons, progress), path, dpi=110)


def losses_figure(data: RunData) -> Figure:
    """losses.png: test loss per horizon per pictured method: each seed a dot, the geometric mean
    a line (methods spread a little along x so their dots do not hide each other)."""
    cmp = data.comparison
    assert cmp is not None
    shown = pictured_methods(data)
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (method, key) in enumerate(shown):
        color, ls, marker = METHOD_STYLE.get(key, ("k", "-", "o"))
        results = [r for h in cmp.horizons if (r := cmp.result(method, h)) is not None]
        shift = 1 + min(0.03, 0.24 / max(1, len(shown))) * (i - (len(shown) - 1) / 2)  # within +-12%
        best = key == "best"
        ax.plot([r.horizon * shift for r in results], [r.gmean for r in results], color=color, ls=ls,
                marker=marker, ms=6 if best else 5, lw=2.2 if best else 1.4, zorder=4 if best else 3,
                label=_label(method, key, results))
        for r in results:
            ys = [x for x in r.per_seed if x is not None and x > 0]
            ax.scatter([r.horizon * shift] * len(ys), ys, color=color, marker=marker, s=9, alpha=0.35, lw=0,
                       zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(cmp.horizons))
    ax.set_xticklabels([f"{h:g}" for h in cmp.horizons])
    ax.minorticks_off()
    ax.set_xlabel("horizon t_max")
    ax.set_ylabel("test rollout MSE")
    ax.set_title(f"run {data.run['name']!r}: test loss (dots: {len(cmp.seeds.test)} test seeds; line: geometric mean)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_losses(data: RunData, path: Path) -> None:
    _save(losses_figure(data), path, dpi=120)


def legend_labels(fig: Figure) -> list[str]:
    """The labels of every legend of a figure (what a reader can tell apart)."""
    return [t.get_text() for ax in fig.axes if (leg := ax.get_legend()) is not None for t in leg.get_texts()]


def profile_curves(cmp: Comparison, methods: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """A performance profile (Dolan & More, 2002) over every (task, horizon, test seed): for each
    method, the fraction of those problems on which its test loss is within a factor tau of the best
    of `methods` there (diverged runs settled as in the comparison). method -> (taus, fractions)."""
    problems: dict[tuple[str, float, int], dict[str, float]] = {}
    for r in cmp.methods:
        if r.method not in methods:
            continue
        before = cmp.result(BEFORE, r.horizon, r.task)
        fallback = [float(x) for x in before.per_seed if x is not None] if before else []
        losses = settle(r.per_seed, fallback)[0] if len(fallback) == len(r.per_seed) else []
        for i, loss in enumerate(losses):
            problems.setdefault((r.task, r.horizon, i), {})[r.method] = max(loss, 1e-30)
    complete = [p for p in problems.values() if all(m in p for m in methods)]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for m in methods:
        ratios = sorted(p[m] / min(p.values()) for p in complete)
        out[m] = (ratios, [(i + 1) / len(ratios) for i in range(len(ratios))])
    return out


def plot_profile(data: RunData, path: Path) -> None:
    """profile.png: the performance profile of the champion and the five tuned baselines over
    every task x horizon x test seed of the run (higher and further left is better)."""
    cmp = data.comparison
    assert cmp is not None
    best = cmp.champion
    methods = [m for m in (best, "adam", "adam_clip", "adam_wc", "adam_clip_wc", "randopt")
               if m is not None and any(r.method == m for r in cmp.methods)]
    curves = profile_curves(cmp, methods)
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        taus, frac = curves[m]
        if not taus:
            continue
        first = next(r for r in cmp.methods if r.method == m)
        label = f"{m} (champion)" if m == best else method_label(first).split(" (")[0]
        color, ls, _ = METHOD_STYLE.get("best" if m == best else m, ("k", "-", "o"))
        ax.step(taus, frac, where="post", color=color, ls=ls, lw=2.2 if m == best else 1.4, label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("tau: test loss / the best method's loss on the same task, horizon and seed")
    ax.set_ylabel("fraction of problems within tau")
    n = len(next(iter(curves.values()))[0]) if curves else 0
    ax.set_title(f"run {data.run['name']!r}: performance profile over {n} problems "
                 f"({', '.join(cmp.tasks)} x horizons x test seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, path, dpi=120)


def _hp(r: MethodResult | None) -> str:
    return "-" if r is None or r.hparam is None else f"{r.hparam:g}"


# ---------------------------------------------------------------------- summary


def _md_escape(text: str) -> str:
    return re.sub(r"([|*_`])", r"\\\1", text)


def summary_markdown(data: RunData, images: dict[str, str], db_arg: str, skipped: str | None,
                     notes: Sequence[str] = ()) -> str:
    """summary.md: the run, its counts, the best individual, the held-out table and the plots
    (`notes`: one line each under "Plots", e.g. why rollouts.png is missing)."""
    run, cfg, counts = data.run, data.config, data.counts
    total = sum(counts.values())
    pass_rate = integrity_pass_rate(counts) or 0.0
    dup_rate = duplicate_rate(counts) or 0.0
    out = [f"# nos run `{run['name']}` (id {run['id']})", ""]
    out += [f"- status: **{run['status']}**, started {_when(run['started_at'])}, "
            f"finished {_when(run['finished_at'])}",
            f"- candidates: {total} — " + ", ".join(f"{k} {v}" for k, v in counts.items()),
            f"- integrity pass rate: {100 * pass_rate:.1f}% (evaluated + error over candidates that were "
            "screened, i.e. not duplicates or invalid)",
            f"- duplicate rate: {100 * dup_rate:.1f}% of all candidates",
            f"- {describe(cfg.budget_fpe)} per training run"]
    control = data.diagnostics.get("control")
    if control:  # said only when there is one: search.png draws it
        out.append(f"- random-search control: run `{control['run']}` (same size, finished), drawn in search.png")
    out.append("")
    out += ["## Best individual", ""]
    best = data.champion
    if best is None:
        out += ["No evaluated individual yet.", ""]
    else:
        how = ("funnel champion: best validation loss ratio to tuned Adam" if data.comparison
               and data.comparison.champion == candidate_name(best["id"]) else "best search fitness")
        out += [f"**#{best['id']}** ({how})", "",
                f"- fitness: {best['fitness']:.4g} (geometric mean of loss / tuned Adam's loss over the search horizons; "
                "lower is better)" if best["fitness"] is not None else "- fitness: -",
                f"- lr: {best['lr']:g}" if best["lr"] is not None else "- lr: -",
                f"- {_origin(data, best)}",
                f"- expression: `{best['expression']}`", ""]
        if best.get("latex"):
            out += ["$$", best["latex"], "$$", ""]
        db = "" if db_arg == DEFAULT_DB else f" --db {db_arg}"
        out += ["Export it as a PyTorch optimizer:", "", "```",
                f"python -m nos.export {best['id']}{db} -o runs/{run['name']}-{best['id']}.py", "```", ""]
    out += ["## Held-out comparison", ""]
    if data.comparison:
        out += [comparison_text(data.comparison, "markdown"), ""]
    else:
        out += [skipped or "No held-out results.", ""]
    if data.stats:
        out += ["## Timesteps", "", "| timestep | candidates | passed | duplicates | invalid | errors | best | median |",
                "|---|---|---|---|---|---|---|---|"]
        for s in data.stats:
            out.append(f"| {s['timestep']} | {s['candidates']} | {s['passed']} | {s['duplicates']} | "
                       f"{s['invalid']} | {s['errors']} | {_num(s['best_fitness'])} | {_num(s['median_fitness'])} |")
        out.append("")
    out += ["## Plots", ""]
    out += [line for note in notes for line in (note, "")]
    for fname, caption in images.items():
        out += [f"### {caption}", "", f"![{_md_escape(caption)}]({fname})", ""]
    out += ["## Configuration", "", "```json", json.dumps(run["config"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(out)


def _origin(data: RunData, ind: dict) -> str:
    """Where an individual came from, in words."""
    if ind["parent_id"] is None:
        became = [p for p, pts in particle_paths(data).items() if pts and pts[0]["id"] == ind["id"]]
        return "initial population" + (f" (became particle {became[0]})" if became else "")
    return (f"timestep {ind['timestep']}, particle {ind['particle']}, mutation "
            f"{ind.get('mutation_kind') or '-'} of #{ind['parent_id']}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _when(dt: Any) -> str:
    return "-" if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "run"


# ---------------------------------------------------------------------- command


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database path or SQLAlchemy URL ({DEFAULT_DB}); "
                                                    "opened read-only")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<RUN>)")
    p.add_argument("--rollouts", action="store_true",
                   help="also draw rollouts.png. COSTLY: retrains every method (champion, five baselines, "
                        "published ones) at each chosen horizon on one test seed -- minutes per horizon at "
                        "t_max = 20 on a CPU (an hour or more for the default run's five horizons). Without it "
                        "the report reads stored results only and takes seconds")
    p.add_argument("--rollout-horizons", metavar="H,H,...",
                   help="the held-out horizons to draw in rollouts.png (implies --rollouts; default with "
                        "--rollouts: all the run has); each one retrains every method, see --rollouts")
    add_device(p)
    add_threads(p)
    add_format(p)
    return p


def wants_rollouts(args: argparse.Namespace) -> bool:
    """--rollouts, or --rollout-horizons (naming horizons to draw is asking for the drawing)."""
    return bool(args.rollouts or args.rollout_horizons is not None)


def _wanted_horizons(text: str | None, data: RunData) -> list[float]:
    """The horizons for rollouts.png: --rollout-horizons, checked against the run's results."""
    if data.comparison is None or data.champion is None:
        raise UsageError("--rollouts: the run has no held-out (funnel) results to draw rollouts of "
                         "(`python -m nos.evolve --funnel N` with N >= 1 makes them)")
    if data.config.tasks[0] not in WAVES:
        raise UsageError(f"--rollouts: rollouts are pictures of the wave tasks; this run's first task is "
                         f"{data.config.task_name(data.config.tasks[0])!r}")
    have = rollout_horizons(data)
    if text is None:
        return have
    try:
        wanted = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--rollout-horizons: expected comma-separated numbers, got {text!r}") from None
    if not wanted or any(h not in have for h in wanted):
        shown = ", ".join(f"{h:g}" for h in have) or "none"
        raise UsageError(f"--rollout-horizons: the run has held-out results at t_max = {shown} only")
    return wanted


def rollouts_command(run: str, db: str, out: Path | None) -> str:
    """The command that draws rollouts.png for this report (same run, database and folder)."""
    words = ["python", "-m", "nos.report", run] + ([] if db == DEFAULT_DB else ["--db", db])
    words += ([] if out is None else ["--out", str(out)]) + ["--rollouts"]
    return " ".join(shlex.quote(w) for w in words)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    draw_rollouts = wants_rollouts(args)
    store = Store(args.db, readonly=True)  # a report only reads: read-only files and folders work
    try:
        data = load(store, args.run)
        heldout = data.comparison is not None and data.champion is not None
        horizons = _wanted_horizons(args.rollout_horizons, data) if draw_rollouts else []
        out = args.out or Path("runs") / _safe_name(data.run["name"])
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {out}: {e.strerror or e}") from None
        data.diagnostics = diagnostics(store, data.run, data.individuals, data.comparison)  # as loaded
        control = data.diagnostics["control"]
        images = {"fitness.png": "Fitness over timesteps per particle",
                  "lineage.png": "Lineage of the best individual",
                  "search.png": "Best fitness so far against judged candidates" + (
                      f", beside the random-search control `{control['run']}`" if control else "")}
        plot_fitness(data, out / "fitness.png")
        plot_lineage(data, store, out / "lineage.png")
        plot_search(data, out / "search.png")
    finally:
        store.close()
    skipped, notes = None, []
    if heldout:
        if horizons:
            threads = apply_threads(args)
            log.info(f"fine-tuning every method for rollouts.png at t_max = {', '.join(f'{h:g}' for h in horizons)} "
                     f"on {device} ({threads} thread(s)) ...")
            plot_rollouts(data, out / "rollouts.png", device, horizons)
            images["rollouts.png"] = (f"Rollouts after fine-tuning (test seed {data.config.test_seeds[0]}, "
                                      f"t_max = {', '.join(f'{h:g}' for h in horizons)})")
        elif data.config.tasks[0] in WAVES:  # rollouts are pictures of the wave tasks
            notes.append("rollouts.png was not drawn (it retrains every method at each held-out horizon, "
                         "minutes per horizon on a CPU); draw it with "
                         f"`{rollouts_command(args.run, args.db, args.out)}`.")
        plot_losses(data, out / "losses.png")
        plot_profile(data, out / "profile.png")
        images["losses.png"] = f"Held-out loss per horizon (task {data.config.task_name(data.config.tasks[0])})"
        images["profile.png"] = "Performance profile: champion and the five tuned baselines over tasks x horizons x test seeds"
    else:
        skipped = ("The run has no held-out (funnel) results, so losses.png and profile.png were not made "
                   "(`python -m nos.evolve --funnel N` with N >= 1 makes them).")
    (out / "summary.md").write_text(summary_markdown(data, images, args.db, skipped, notes), encoding="utf-8")
    files = [str(out / f) for f in [*images, "summary.md"]]
    log.info(f"report written to {out}")
    if args.format == "json":
        print_json({"out": str(out), "files": files})
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
