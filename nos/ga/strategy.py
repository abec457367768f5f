"""What every search strategy shares: the ask / tell protocol, and DEAP at its edge.

A strategy proposes candidates (`ask`) and learns what became of them (`tell`), in the manner of
Optuna's `Study.ask()` / `Study.tell()` and a sampler's `after_trial`. It never touches storage: the
run (`nos.search.run.Run`) creates, screens, deduplicates, evaluates and stores every proposal, so
resume, claims between processes and the database are the run's business, and the same run loop
serves the particle GA, random search and any later strategy.

DEAP lives here, at the edge: a hall of fame of the best distinct candidates (by canonical hash)
and per-generation statistics, with DEAP's `creator` classes registered on first use, not on import.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from .._deap import candidate_class
from ..search.records import Batch, Candidate, Generation


class Strategy(ABC):
    """Base class: subclasses implement `ask` and `_after` (what to do with judged candidates)."""

    def __init__(self, hall_size: int) -> None:
        from deap import tools

        self.hall = tools.HallOfFame(max(1, hall_size), similar=lambda a, b: a.genome_hash == b.genome_hash)
        self.stats = tools.Statistics(key=lambda ind: ind.fitness.values[1])
        for name, fn in (("min", min), ("median", statistics.median), ("mean", statistics.fmean)):
            self.stats.register(name, fn)
        self.logbook = tools.Logbook()
        self.logbook.header = ["timestep", "candidates", "evaluated", "duplicates", "min", "median"]

    @abstractmethod
    def ask(self) -> Batch | None:
        """The next proposals to judge, or None when the search is over."""

    def tell(self, judged: Sequence[Candidate]) -> list[Generation]:
        """Learn the fate of the last batch (in proposal order); returns the generations this
        completed (their statistics are stored by the run)."""
        self.hall.update([_individual(c) for c in judged if c.evaluated])
        return self._after(judged)

    @abstractmethod
    def _after(self, judged: Sequence[Candidate]) -> list[Generation]:
        """What the strategy does with the judged candidates of its last batch."""

    def best(self) -> list[Candidate]:
        """The hall of fame: the best distinct evaluated candidates so far, best first."""
        return [ind.candidate for ind in self.hall]

    def generation(self, t: int, generated: Sequence[Candidate]) -> Generation:
        """Statistics of one generation (DEAP Statistics over its evaluated candidates; best and
        median over those with the full fitness, the only comparable ones)."""
        evaluated = [c for c in generated if c.evaluated]
        full = [_individual(c) for c in evaluated if c.fidelity == 1]
        record: dict[str, Any] = self.stats.compile(full) if full else {}
        counts = {s: sum(c.status == s for c in generated) for s in ("duplicate", "invalid", "error")}
        self.logbook.record(timestep=t, candidates=len(generated), evaluated=len(evaluated),
                            duplicates=counts["duplicate"], **record)
        return Generation(t, len(generated), len(evaluated), counts["duplicate"], counts["invalid"],
                          counts["error"], record.get("min"), record.get("median"))


def _individual(c: Candidate) -> Any:
    ind = candidate_class()(c)
    ind.fitness.values = (c.fidelity, c.fitness)
    return ind
