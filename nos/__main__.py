"""`nos VERB ...` (and `python -m nos VERB ...`): one command for every nos tool.

Each verb is the module of the same name (`nos evolve` runs `python -m nos.evolve`), imported only
when called, so `nos --help` and `nos query` start without loading torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .cli import fail, run_command

VERBS = {
    "evolve": "run a search (the particle GA), then the held-out funnel",
    "query": "read the database: runs, top, show, lineage, stats",
    "export": "write a discovered or builtin optimizer as a standalone PyTorch file (torch.optim)",
    "report": "plots and a markdown summary of one run",
    "baselines": "the sine-rollout table: Adam, Adam + clip, RandOpt, tuned per horizon",
    "integrity": "the shifted-sphere integrity check of genomes",
    "bench": "throughput of candidate evaluation (ratios measured in one run)",
    "calibrate": "measure the choices behind the search defaults (search seeds, fidelity)",
    "db": "upgrade an older database in place (backup first)",
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: nos VERB [ARGS ...]   (nos VERB --help for a verb's arguments)", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {what}" for verb, what in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        fail(f"nos: unknown verb {verb!r}; choose from {', '.join(VERBS)} (see nos --help)")
    module = importlib.import_module(f"nos.{verb}")
    return run_command(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
