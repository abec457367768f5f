"""The report's pictures of stored results: the search, each particle's fitness, the champion's
lineage, held-out losses per horizon and a performance profile (nothing is trained here)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from db.store import Store  # noqa: E402

from ..evaluation.compare import Comparison, MethodResult, method_label  # noqa: E402
from ..evaluation.protocol import BASELINES, BEFORE, METHOD_LABELS, PUBLISHED  # noqa: E402
from ..evaluation.stats import settle  # noqa: E402
from ..search.funnel import candidate_name  # noqa: E402
from .data import RunData, particle_paths  # noqa: E402

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
    if rc["spearman"] is not None and rc.get("ci_low") is not None:
        rho += f" [95% CI {rc['ci_low']:.2f}, {rc['ci_high']:.2f}]"
    vs = f" vs random-search control {control['run']!r}" if control else " (no random-search control)"
    ax.set_title(f"run {data.run['name']!r}: search progress{vs}\nSpearman(fitness, validation) over "
                 f"{rc['n']} funnel candidate(s) = {rho}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_search(data: RunData, path: Path) -> None:
    save_figure(search_figure(data), path, dpi=120)


def save_figure(fig: Figure, path: Path, dpi: int) -> None:
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
    ax.set_title(f"run {data.run['name']!r}: test loss (dots: test seeds {cmp.seeds.test_text()}; line: geometric mean)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_losses(data: RunData, path: Path) -> None:
    save_figure(losses_figure(data), path, dpi=120)


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
    save_figure(fig, path, dpi=120)


def hparam_text(r: MethodResult | None) -> str:
    return "-" if r is None or r.hparam is None else f"{r.hparam:g}"
