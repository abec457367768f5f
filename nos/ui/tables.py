"""The comparison as tables (plain text for terminals, Markdown for summary.md and the README,
booktabs LaTeX for papers).

Tables go through nos.ui.cli.render_table (the one renderer); losses and ratios through `num`.
`versus_grid` and `methods_grid` lay out one or several runs' comparisons as one table each
(`nos query compare RUN RUN ...`, `--format latex`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..evaluation.compare import AGGREGATE, Comparison, MethodResult, VersusRow, method_label
from ..evaluation.protocol import BASELINES, BEFORE, PUBLISHED
from ..tasks.registry import WAVES
from .cli import render_table as render


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
        cells += [_result_cell(cmp.result(name, h, task)) for h in horizons]
        rows.append(cells)
    return render(rows, ["method"] + [f"{_variant(cmp, task)}={h:g}" for h in horizons], fmt)


def _versus_cell(v: VersusRow | None) -> str:
    if v is None:
        return "-"
    s = v.stats
    p = "-" if s.p_value is None else f"{s.p_value:.2g}"
    det = "" if s.detectable_ratio is None else f" det {num(s.detectable_ratio)}x"
    return f"{num(s.gmean_ratio)} [{num(s.ci_low)}, {num(s.ci_high)}] {s.wins}/{s.n} p={p} {v.verdict}{det}"


def versus_table(cmp: Comparison, candidate: str, fmt: str = "plain", task: str | None = None) -> str:
    """Candidate / baseline per horizon of one task: geometric-mean ratio [95% CI], wins k/n, p,
    verdict, the detectable ratio (80% power); and the aggregate over the task's horizons (or, on
    several tasks, the run's aggregates)."""
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


def comparison_text(cmp: Comparison, fmt: str = "plain", parts: Sequence[str] = ("methods", "versus")) -> str:
    """The tables with their captions: per task, methods then each candidate against each baseline;
    on several tasks, the aggregates over tasks last. ``parts``: which of "methods" and "versus"
    (each candidate against each baseline, the aggregates included) to show."""
    seeds = cmp.seeds
    out = [f"test seeds {seeds.test_text()}; every lr / sigma / variant "
           f"chosen on validation seeds {', '.join(map(str, seeds.validation))}"]
    if "methods" in parts:
        out.append("cells: geometric mean [median] of the test losses (k div = diverged runs, counted as the "
                   "initial parameters' loss) @ the validated lr or sigma")
    several = len(cmp.tasks) > 1
    if several:
        out.append(f"search tasks {', '.join(cmp.search_tasks)} (the champion is chosen on their validation seeds); "
                   f"test tasks {', '.join(cmp.test_tasks) or '-'} (never read by any choice)")
    for task in cmp.tasks:
        out += ["", f"task {task}{' (test task)' if task in cmp.test_tasks else ''}" if several else ""]
        if "methods" in parts:
            out.append(methods_table(cmp, fmt, task=task))
        for c in cmp.candidates if "versus" in parts else ():
            out += ["", f"{c}{' (champion)' if c == cmp.champion else ''} vs each baseline: geometric mean of the "
                    "per-seed loss ratios [95% bootstrap CI], seeds won, Wilcoxon p; wins only when the CI is below 1; "
                    "det = the ratio (or its inverse) these seeds detect with 80% power",
                    versus_table(cmp, c, fmt, task=task)]
    if several and "versus" in parts:
        for c in cmp.candidates:
            out += ["", f"{c}{' (champion)' if c == cmp.champion else ''} over tasks x horizons x test seeds: "
                    "geometric mean of the loss ratios [95% stratified bootstrap CI]", aggregate_table(cmp, c, fmt)]
    return "\n".join(line for i, line in enumerate(out) if line or i == 0 or out[i - 1])



# ------------------------------------------------------------------ several runs, one table each

Named = tuple[str, Comparison]  # (run name, its comparison)


def _aggregate_label(label: str) -> str:
    return "all tasks" if label == AGGREGATE else f"test tasks ({label})"


def task_keys(runs: Sequence[Named]) -> list[str]:
    """The tasks of the runs in order of first appearance, then (for runs on several tasks) the
    aggregate rows' pseudo-tasks: "all tasks", "test tasks (...)"."""
    tasks = list(dict.fromkeys(t for _, cmp in runs for t in cmp.tasks))
    aggs = list(dict.fromkeys(_aggregate_label(a.task) for _, cmp in runs if len(cmp.tasks) > 1
                              for a in cmp.aggregate))
    return tasks + aggs


def _columns(runs: Sequence[Named], tasks: Sequence[str]) -> list[tuple[str, float]]:
    """(variant label, horizon) columns of the given tasks: each label's horizons in order."""
    cols: dict[str, set[float]] = {}
    for _, cmp in runs:
        for t in tasks:
            if t in cmp.task_horizons:
                cols.setdefault(_variant(cmp, t), set()).update(cmp.task_horizons[t])
    return [(label, h) for label, hs in cols.items() for h in sorted(hs)]


def _short_cell(v: VersusRow | None) -> str:
    if v is None:
        return "-"
    s = v.stats
    return f"{num(s.gmean_ratio)} [{num(s.ci_low)}, {num(s.ci_high)}] {v.verdict}"


def _keep(headers: list[str], rows: list[list[str]], drop: set[int]) -> tuple[list[str], list[list[str]]]:
    return ([h for i, h in enumerate(headers) if i not in drop],
            [[c for i, c in enumerate(r) if i not in drop] for r in rows])


def _pruned(headers: list[str], rows: list[list[str]], runs: Sequence[Named],
            keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Without the run column for one run, the task column for one task."""
    return _keep(headers, rows, {i for i, drop in ((0, len(runs) == 1), (1, len(keys) == 1)) if drop})


def versus_grid(runs: Sequence[Named], champions_only: bool = True,
                tasks: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One table of each run's champion (or every candidate) against each baseline: rows run /
    task / candidate / baseline, columns the horizons, cells ratio [95% CI] verdict; column "all":
    the aggregate over the run's horizons (on several tasks: rows of the aggregate pseudo-tasks,
    "all tasks" and "test tasks (...)"). The run column is left out for one run, the task
    column for one task."""
    keys = list(tasks or task_keys(runs))
    cols = _columns(runs, keys)
    rows: list[list[str]] = []
    for key in keys:
        for name, cmp in runs:
            multi = len(cmp.tasks) > 1
            aggs = {_aggregate_label(a.task) for a in cmp.aggregate} if multi else set()
            if key not in cmp.tasks and key not in aggs:
                continue
            cands = ([cmp.champion] if cmp.champion else []) if champions_only else list(cmp.candidates)
            for c in cands:
                for b in BASELINES:
                    if key in cmp.tasks:
                        pick = {(x.task, x.horizon): x for x in cmp.versus if x.candidate == c and x.baseline == b}
                        cells = [_short_cell(pick.get((key, h))) if h in cmp.task_horizons.get(key, ())
                                 and label == _variant(cmp, key) else "-" for label, h in cols]
                        agg = None if multi else next((a for a in cmp.aggregate if a.candidate == c
                                                       and a.baseline == b), None)
                    else:
                        cells = ["-"] * len(cols)
                        agg = next((a for a in cmp.aggregate if a.candidate == c and a.baseline == b
                                    and _aggregate_label(a.task) == key), None)
                    if all(x == "-" for x in cells) and agg is None:
                        continue
                    first = next((m for m in cmp.methods if m.method == b), None)
                    label = method_label(first).split(" (")[0] if first else b
                    champ = " (champion)" if c == cmp.champion and not champions_only else ""
                    rows.append([name, key, c + champ, label, *cells, _short_cell(agg)])
    headers = ["run", "task", "candidate", "baseline", *[f"{label}={h:g}" for label, h in cols], "all"]
    if rows and all(r[-1] == "-" for r in rows):  # no aggregate here (a task of a run on several tasks)
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    return _pruned(headers, rows, runs, keys)


def _method_cells(cmp: Comparison, method: str, task: str, cols: Sequence[tuple[str, float]]) -> list[str]:
    return [_result_cell(cmp.result(method, h, task) if label == _variant(cmp, task) else None) for label, h in cols]


def _result_cell(r: MethodResult | None) -> str:
    """A method's test losses at one horizon: "gmean [median] (k div) @lr (variant)", "-" if none."""
    if r is None:
        return "-"
    cell = f"{num(r.gmean)} [{num(r.median)}]"
    if r.diverged:
        cell += f" {r.diverged} div"
    if r.hparam is not None:
        cell += f" @{r.hparam:g}" + (f" {r.variant}" if r.variant else "")
    return cell


def methods_grid(runs: Sequence[Named], champions_only: bool = True,
                 tasks: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One table of test losses: per task, the baselines (and the network before fine-tuning)
    once per set of runs with the very same baseline results (the run column names them all),
    then each run's champion (or every candidate); cells geometric mean [median] (k div) @ the
    validated lr / sigma. The run column is left out for one run, the task column for one task."""
    keys = [k for k in (tasks or task_keys(runs)) if any(k in cmp.tasks for _, cmp in runs)]
    cols = _columns(runs, keys)
    reference = (BEFORE, *BASELINES, *PUBLISHED)
    rows: list[list[str]] = []
    for task in keys:
        here = [(name, cmp) for name, cmp in runs if task in cmp.tasks]
        groups: dict[tuple, list[Named]] = {}  # the same baseline results: shown once
        for name, cmp in here:
            same = tuple(m for m in cmp.methods if m.task == task and m.method in reference)
            groups.setdefault(same, []).append((name, cmp))
        for members in groups.values():
            names, cmp = ", ".join(n for n, _ in members), members[0][1]
            for method in dict.fromkeys(m.method for m in cmp.methods if m.task == task and m.method in reference):
                first = next(m for m in cmp.methods if m.method == method and m.task == task)
                rows.append([names, task, method_label(first).split(" (")[0], *_method_cells(cmp, method, task, cols)])
        for name, cmp in here:
            cands = ([cmp.champion] if cmp.champion else []) if champions_only else list(cmp.candidates)
            for c in cands:
                label = c + (" (champion)" if c == cmp.champion else "")
                rows.append([name, task, label, *_method_cells(cmp, c, task, cols)])
    headers = ["run", "task", "method", *[f"{label}={h:g}" for label, h in cols]]
    return _pruned(headers, rows, runs, keys)


def race_text(race: dict) -> str:
    """The racing funnel of a run (`nos.search.diagnostics.race_diagnostics`) in a few lines:
    each stage's size, seeds, clusters and advancers, the champion's rule, the rank correlations."""
    lines = [f"racing funnel: {race['trainings']} candidate trainings on validation seeds"]
    for s in race["stages"]:
        clusters = "" if s["clusters"] is None else f", {s['clusters']} behaviour cluster(s)"
        nxt = f", {s['advanced']} advanced" if s["advanced"] else ""
        lines.append(f"  stage {s['stage']}: {s['candidates']} candidate(s) on {s['seeds']} seed(s){clusters}{nxt}")
    if race["champion"]:
        lines.append(f"  champion {race['champion']}: the fewest effective nodes among the finalists within one standard "
                     f"error of the best on the last stage's seeds ({', '.join(race['within_noise'])}); "
                     f"finalists from {race['finalist_clusters']} cluster(s)")
    for c in race["correlations"]:
        if c["spearman"] is None:
            continue
        ci = "" if c.get("ci_low") is None else f" [95% CI {c['ci_low']:.2f}, {c['ci_high']:.2f}]"
        lines.append(f"  Spearman({c['between']}, {c['and']}) over {c['n']}: {c['spearman']:.2f}{ci}")
    return "\n".join(lines)
