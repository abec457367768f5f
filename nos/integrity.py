"""`python -m nos.integrity`: run NOS's shifted-sphere integrity check on genomes.

    python -m nos.integrity --builtin adam
    python -m nos.integrity --genome my_optimizer.json
    python -m nos.integrity --random 1000 --seed 0 --format json
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, read_file
from search_space.mutation import random_genome
from search_space.symbolic import describe

from .engine import integrity
from .ui.cli import (
    ArgumentParser,
    UsageError,
    add_device,
    add_format,
    bounded_int,
    format_table,
    path_arg,
    print_json,
    resolve_device,
    run_command,
    seed_int,
)

MAX_RANDOM = 100_000  # random genomes in one check (1,000 take about 0.5 s on a 2-core CPU)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.integrity", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", choices=[*BUILTINS, "all"], help="a classic optimizer written as a genome")
    src.add_argument("--genome", type=path_arg("genome file"), help="a genome JSON file")
    src.add_argument("--random", type=bounded_int(1, MAX_RANDOM, "a number of genomes"), metavar="N",
                     help=f"N random genomes, 1 to {MAX_RANDOM:,} (prints the pass rate)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for --random (default 0)")
    add_device(p)
    add_format(p)
    return p


def _load(args) -> list[tuple[str, Genome]]:
    if args.builtin:
        names = BUILTINS if args.builtin == "all" else (args.builtin,)
        return [(n, builtin(n)) for n in names]
    if args.genome is not None:
        return [(Path(args.genome).name, read_file(args.genome))]
    if args.random < 1:
        raise UsageError("--random needs N >= 1")
    rng = random.Random(args.seed)
    return [(f"random-{i}", random_genome(rng)) for i in range(args.random)]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    named = _load(args)
    device = resolve_device(args.device)
    start = time.perf_counter()
    results = integrity.check([g for _, g in named], device=device)
    seconds = time.perf_counter() - start
    rows = [
        {"name": n, **r.to_json(), "expression": describe(g)} for (n, g), r in zip(named, results)
    ]
    passed = sum(r.passed for r in results)
    summary = {"candidates": len(rows), "passed": passed, "pass_rate": passed / len(rows), "seconds": seconds}
    if args.format == "json":
        print_json({"results": rows, "summary": summary})
        return 0
    if args.random is None or args.random <= 50:
        print(format_table(rows, ["name", "passed", "final_loss", "lr", "sign_flipped", "expression"]))
    print(
        f"\n{passed}/{len(rows)} passed ({100 * summary['pass_rate']:.1f}%) in {seconds:.2f} s on {device}",
        file=sys.stderr if args.random is None else sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
