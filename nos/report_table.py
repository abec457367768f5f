"""The comparison as tables (plain text for terminals, Markdown for summary.md and the README).

Tables go through nos.cli.render_table (the one renderer); losses and ratios through `num`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import render_table as render
from .evaluation.compare import Comparison, method_label
from .evaluation.protocol import BASELINES, BEFORE, PUBLISHED


def num(x: float | None, digits: int = 2) -> str:
    """A loss or ratio in 2 significant digits (scientific when small or large)."""
    if x is None:
        return "-"
    if x == 0 or 1e-2 <= abs(x) < 1e3:
        return f"{x:.{digits}g}"
    return f"{x:.{max(0, digits - 1)}e}"


def methods_table(cmp: Comparison, fmt: str = "plain", candidates: Sequence[str] | None = None) -> str:
    """Per method and horizon on the test seeds: geometric mean [median] (diverged runs), and the
    validated lr / sigma."""
    shown = list(cmp.candidates if candidates is None else candidates)
    order: list[str] = []
    for m in cmp.methods:
        if m.method not in order and (m.method in shown or m.method in (BEFORE, *BASELINES, *PUBLISHED)):
            order.append(m.method)
    rows = []
    for name in order:
        first = next(m for m in cmp.methods if m.method == name)
        label = method_label(first).split(" (")[0]  # RandOpt's layers may differ by horizon: in the cells
        if name == cmp.champion:
            label += " (champion)"
        cells = [label]
        for h in cmp.horizons:
            r = cmp.result(name, h)
            if r is None:
                cells.append("-")
                continue
            cell = f"{num(r.gmean)} [{num(r.median)}]"
            if r.diverged:
                cell += f" {r.diverged} div"
            if r.hparam is not None:
                cell += f" @{r.hparam:g}" + (f" {r.variant}" if r.variant else "")
            cells.append(cell)
        rows.append(cells)
    return render(rows, ["method"] + [f"t_max={h:g}" for h in cmp.horizons], fmt)


def versus_table(cmp: Comparison, candidate: str, fmt: str = "plain") -> str:
    """Candidate / baseline per horizon: geometric-mean ratio [95% CI], wins k/n, p, verdict."""
    rows = []
    baselines = list(dict.fromkeys(v.baseline for v in cmp.versus if v.candidate == candidate))
    for b in baselines:
        first = next(m for m in cmp.methods if m.method == b)
        cells = [f"vs {method_label(first).split(' (')[0]}"]
        for h in cmp.horizons:
            v = next((x for x in cmp.versus if x.candidate == candidate and x.baseline == b and x.horizon == h), None)
            if v is None:
                cells.append("-")
                continue
            s = v.stats
            p = "-" if s.p_value is None else f"{s.p_value:.2g}"
            cells.append(f"{num(s.gmean_ratio)} [{num(s.ci_low)}, {num(s.ci_high)}] {s.wins}/{s.n} p={p} {v.verdict}")
        rows.append(cells)
    return render(rows, [candidate] + [f"t_max={h:g}" for h in cmp.horizons], fmt)


def comparison_text(cmp: Comparison, fmt: str = "plain") -> str:
    """Both tables with their captions."""
    seeds = cmp.seeds
    out = [f"test seeds {seeds.test[0]}..{seeds.test[-1]} (n = {len(seeds.test)}); every lr / sigma / variant "
           f"chosen on validation seeds {', '.join(map(str, seeds.validation))}",
           "cells: geometric mean [median] of the test losses (k div = diverged runs, counted as the "
           "pretrained net's loss) @ the validated lr or sigma", "",
           methods_table(cmp, fmt)]
    for c in cmp.candidates:
        out += ["", f"{c}{' (champion)' if c == cmp.champion else ''} vs each baseline: geometric mean of the "
                "per-seed loss ratios [95% bootstrap CI], seeds won, Wilcoxon p; wins only when the CI is below 1",
                versus_table(cmp, c, fmt)]
    return "\n".join(out)
