"""The comparison as tables (plain text for terminals, Markdown for summary.md and the README).

Tables go through nos.cli.render_table (the one renderer); losses and ratios through `num`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import render_table as render
from .evaluation.compare import AGGREGATE, Comparison, VersusRow, method_label
from .evaluation.protocol import BASELINES, BEFORE, PUBLISHED
from .tasks.registry import WAVES


def num(x: float | None, digits: int = 2) -> str:
    """A loss or ratio in 2 significant digits (scientific when small or large)."""
    if x is None:
        return "-"
    if x == 0 or 1e-2 <= abs(x) < 1e3:
        return f"{x:.{digits}g}"
    return f"{x:.{max(0, digits - 1)}e}"


def _variant(cmp: Comparison, task: str) -> str:
    return cmp.labels.get(task) or ("t_max" if task in WAVES else "variant")


def methods_table(cmp: Comparison, fmt: str = "plain", candidates: Sequence[str] | None = None,
                  task: str | None = None) -> str:
    """Per method and horizon on the test seeds of one task (the first by default): geometric mean
    [median] (diverged runs), and the validated lr / sigma."""
    task = task or cmp.task
    horizons = cmp.task_horizons.get(task, cmp.horizons)
    shown = list(cmp.candidates if candidates is None else candidates)
    order: list[str] = []
    for m in cmp.methods:
        if m.task == task and m.method not in order and (m.method in shown or m.method in (BEFORE, *BASELINES, *PUBLISHED)):
            order.append(m.method)
    rows = []
    for name in order:
        first = next(m for m in cmp.methods if m.method == name and m.task == task)
        label = method_label(first).split(" (")[0]  # RandOpt's layers may differ by horizon: in the cells
        if name == cmp.champion:
            label += " (champion)"
        cells = [label]
        for h in horizons:
            r = cmp.result(name, h, task)
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
    return render(rows, ["method"] + [f"{_variant(cmp, task)}={h:g}" for h in horizons], fmt)


def _versus_cell(v: VersusRow | None) -> str:
    if v is None:
        return "-"
    s = v.stats
    p = "-" if s.p_value is None else f"{s.p_value:.2g}"
    return f"{num(s.gmean_ratio)} [{num(s.ci_low)}, {num(s.ci_high)}] {s.wins}/{s.n} p={p} {v.verdict}"


def versus_table(cmp: Comparison, candidate: str, fmt: str = "plain", task: str | None = None) -> str:
    """Candidate / baseline per horizon of one task: geometric-mean ratio [95% CI], wins k/n, p,
    verdict; and the aggregate over the task's horizons (or, on several tasks, the run's aggregates)."""
    task = task or cmp.task
    horizons = cmp.task_horizons.get(task, cmp.horizons)
    several = len(cmp.tasks) > 1
    aggregates = [] if several else [a for a in cmp.aggregate if a.candidate == candidate]
    rows = []
    baselines = list(dict.fromkeys(v.baseline for v in cmp.versus if v.candidate == candidate and v.task == task))
    for b in baselines:
        first = next(m for m in cmp.methods if m.method == b)
        cells = [f"vs {method_label(first).split(' (')[0]}"]
        for h in horizons:
            cells.append(_versus_cell(next((x for x in cmp.versus if x.candidate == candidate and x.baseline == b
                                            and x.horizon == h and x.task == task), None)))
        if aggregates:
            cells.append(_versus_cell(next((a for a in aggregates if a.baseline == b), None)))
        rows.append(cells)
    return render(rows, [candidate] + [f"{_variant(cmp, task)}={h:g}" for h in horizons]
                  + ([f"all {'horizons' if _variant(cmp, task) == 't_max' else 'variants'}"] if aggregates else []), fmt)


def aggregate_table(cmp: Comparison, candidate: str, fmt: str = "plain") -> str:
    """Candidate / baseline over tasks x horizons x test seeds (stratified bootstrap CI)."""
    labels = list(dict.fromkeys(a.task for a in cmp.aggregate))
    rows = []
    for b in dict.fromkeys(a.baseline for a in cmp.aggregate if a.candidate == candidate):
        first = next(m for m in cmp.methods if m.method == b)
        rows.append([f"vs {method_label(first).split(' (')[0]}"]
                    + [_versus_cell(next((a for a in cmp.aggregate if a.candidate == candidate and a.baseline == b
                                          and a.task == t), None)) for t in labels])
    heads = ["all tasks" if t == AGGREGATE else f"test tasks ({t})" for t in labels]
    return render(rows, [candidate] + heads, fmt)


def comparison_text(cmp: Comparison, fmt: str = "plain") -> str:
    """The tables with their captions: per task, methods then each candidate against each baseline;
    on several tasks, the aggregates over tasks last."""
    seeds = cmp.seeds
    out = [f"test seeds {seeds.test[0]}..{seeds.test[-1]} (n = {len(seeds.test)}); every lr / sigma / variant "
           f"chosen on validation seeds {', '.join(map(str, seeds.validation))}",
           "cells: geometric mean [median] of the test losses (k div = diverged runs, counted as the "
           "initial parameters' loss) @ the validated lr or sigma"]
    several = len(cmp.tasks) > 1
    if several:
        out.append(f"search tasks {', '.join(cmp.search_tasks)} (the champion is chosen on their validation seeds); "
                   f"test tasks {', '.join(cmp.test_tasks) or '-'} (never read by any choice)")
    for task in cmp.tasks:
        out += ["", f"task {task}{' (test task)' if task in cmp.test_tasks else ''}" if several else "",
                methods_table(cmp, fmt, task=task)]
        for c in cmp.candidates:
            out += ["", f"{c}{' (champion)' if c == cmp.champion else ''} vs each baseline: geometric mean of the "
                    "per-seed loss ratios [95% bootstrap CI], seeds won, Wilcoxon p; wins only when the CI is below 1",
                    versus_table(cmp, c, fmt, task=task)]
    if several:
        for c in cmp.candidates:
            out += ["", f"{c}{' (champion)' if c == cmp.champion else ''} over tasks x horizons x test seeds: "
                    "geometric mean of the loss ratios [95% stratified bootstrap CI]", aggregate_table(cmp, c, fmt)]
    return "\n".join(line for i, line in enumerate(out) if line or i == 0 or out[i - 1])
