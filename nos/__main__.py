"""`nos VERB ...` (and `python -m nos VERB ...`): one command for every nos tool.

Each verb is the module of the same name (`nos evolve` runs `python -m nos.evolve`), imported only
when called, so `nos --help` and `nos query` start without loading torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .ui.cli import fail, run_command, set_dispatcher

VERBS = {
    "evolve": "run a search (the particle GA), then the held-out funnel",
    "query": "read the database: runs, top, show, lineage, stats, compare",
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
    # messages then name `nos VERB` (as typed), not the module's own `python -m nos.VERB`
    before = set_dispatcher("python -m nos" if sys.argv[0].endswith("__main__.py") else "nos")
    try:
        module = importlib.import_module(f"nos.{verb}")
        return run_command(module.main, rest)
    finally:
        set_dispatcher(before)  # called in process (tests), the next command names itself again


if __name__ == "__main__":
    sys.exit(main())
