"""`python -m nos.baselines`: the sine-rollout table of "When does RandOpt work?" with our numbers.

Rows: before fine-tuning, Adam and Adam + gradient clipping (lr tuned per horizon), RandOpt
perturbing all / first / middle / last layer (sigma tuned per horizon). Columns: horizons
t_max = 1 2 5 10 20. Mean +- std over held-out pretraining seeds and target trajectories, every
method with the same budget in forward-pass equivalents.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from db.store import Store

from .cli import (
    ArgumentParser,
    add_device,
    add_format,
    number_list,
    positive_int,
    print_json,
    resolve_device,
    run_command,
)
from .evaluation.compare import heldout_comparison
from .evaluation.sine import HELDOUT_SEEDS, HORIZONS, SearchSetup, SineEvaluator
from .report_table import comparison_json, comparison_table
from .tasks.budget import DEFAULT_BUDGET_FPE, describe

LAYERS = ("all", "first", "middle", "last")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--horizons", default=",".join(f"{h:g}" for h in HORIZONS), help="comma-separated t_max values")
    p.add_argument("--seeds", default=",".join(map(str, HELDOUT_SEEDS)), help="held-out pretraining/target seeds")
    p.add_argument("--budget", type=positive_int, default=DEFAULT_BUDGET_FPE, help="forward-pass equivalents per method")
    p.add_argument("--quick", action="store_true", help="horizons 1,2,5 and one seed")
    p.add_argument("--db", help="also store the table in this database (path or SQLAlchemy URL)")
    add_device(p)
    add_format(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        horizons = number_list(args.horizons)
        seeds = number_list(args.seeds, int)
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        horizons, seeds = tuple(h for h in horizons if h <= 5) or (1.0,), seeds[:1]
    if not horizons or not seeds or any(h <= 0 for h in horizons):
        p.error("need at least one positive horizon and one seed")
    device = resolve_device(args.device)
    setup = SearchSetup(budget_fpe=args.budget)
    evaluator = SineEvaluator(setup, device)
    start = time.perf_counter()
    bar = tqdm(total=len(horizons) * len(seeds), desc="baselines", file=sys.stderr, disable=None)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    results = heldout_comparison(evaluator, {}, horizons=horizons, seeds=seeds, randopt_layers=LAYERS, progress=progress)
    bar.close()
    seconds = time.perf_counter() - start
    if args.db:
        with Store(args.db) as store:
            store.add_baselines(
                [
                    {"method": name, "task": "sine_heldout", "horizon": h, "seed": s, "loss": x,
                     "hparam": r.hparam, "budget": args.budget}
                    for name, per_h in results.items()
                    for h, r in per_h.items()
                    for s, x in zip(seeds, r.losses)
                ]
            )
    caption = f"{describe(args.budget)}; seeds {', '.join(map(str, seeds))}; {seconds:.0f} s on {device}"
    if args.format == "json":
        print_json({"budget_fpe": args.budget, "seeds": list(seeds), "seconds": seconds, "results": comparison_json(results)})
    else:
        print(comparison_table(results))
        print(f"\nMSE of the autoregressive rollout, mean +- std over held-out seeds. {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
