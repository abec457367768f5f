"""summary.md: the run in numbers, with links to its pictures."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..search.funnel import candidate_name
from ..search.metrics import duplicate_rate, integrity_pass_rate
from ..tasks.budget import describe
from ..ui.cli import DEFAULT_DB
from ..ui.tables import comparison_text, race_text
from .data import RunData, particle_paths


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
        if data.diagnostics.get("race"):
            out += ["## Racing funnel", "", "```", race_text(data.diagnostics["race"]), "```", ""]
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


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "run"
