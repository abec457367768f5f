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
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is first imported (by nos.reporting): files, never a window

from db.store import Store  # noqa: E402

# the report's library (nos/reporting/), its names also reachable as nos.report.X
from .reporting.data import RunData, load, particle_paths  # noqa: E402,F401
from .reporting.plots import (  # noqa: E402,F401
    legend_labels,
    losses_figure,
    plot_fitness,
    plot_lineage,
    plot_losses,
    plot_profile,
    plot_search,
    search_figure,
)
from .reporting.rollouts import plot_rollouts, rollout_horizons, rollouts  # noqa: E402,F401
from .reporting.summary import safe_name, summary_markdown  # noqa: E402
from .search.diagnostics import diagnostics  # noqa: E402
from .tasks.registry import WAVES  # noqa: E402
from .ui.cli import (  # noqa: E402
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

log = logging.getLogger("nos.report")  # not __name__: it is __main__ under python -m

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
        out = args.out or Path("runs") / safe_name(data.run["name"])
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
