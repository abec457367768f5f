"""What every search strategy shares: the ask / tell protocol over an explicit state, and DEAP at its edge.

A strategy proposes candidates (`ask`) and learns what became of them (`tell`), in the manner of
Optuna's `Study.ask()` / `Study.tell()` -- and, as in evosax, its whole progress is an explicit,
serialisable state passed in and handed back (`init() -> state`, `ask(state)`, `tell(state, judged)
-> (state, generations)`): the strategy object holds only its configuration (and caches), so a
state can be stored, replayed or inspected. It never touches storage: the run
(`nos.search.run.Run`) creates nothing, but screens, deduplicates, evaluates and stores every
proposal, so resume, claims between processes and the database are the run's business, and the
same run loop serves the particle GA, random search and any later strategy.

The strategy also says how the run counts its progress: `total()` slots in all (None: unknown),
how many slots a judged chunk `settled`, and how many will never be proposed (`unreachable`).

DEAP lives here, at the edge: a hall of fame of the best distinct candidates (by canonical hash),
rebuilt from the state's, and per-generation statistics, with DEAP's `creator` classes
registered on first use, not on import.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from ..search.records import Batch, Candidate, Generation
from ._deap import candidate_class

S = TypeVar("S")


class Strategy(ABC, Generic[S]):
    """Base class of the search strategies; `S` is the strategy's state."""

    @abstractmethod
    def init(self) -> S:
        """The state before anything was proposed."""

    @abstractmethod
    def ask(self, state: S) -> Batch | None:
        """The next proposals to judge, or None when the search is over (asking again with the
        same state proposes the same batch)."""

    @abstractmethod
    def tell(self, state: S, judged: Sequence[Candidate]) -> tuple[S, list[Generation]]:
        """The state after the last batch was judged (`judged`: its candidates, in proposal
        order), and the generations this completed (their statistics are stored by the run)."""

    @abstractmethod
    def best(self, state: S) -> list[Candidate]:
        """The best distinct evaluated candidates so far, best first (the hall of fame)."""

    def total(self) -> int | None:
        """The fixed number of slots the search settles (its progress total); None: not known."""
        return None

    def settled(self, judged: Sequence[Candidate]) -> int:
        """How many slots a judged chunk settled (by default every candidate is one)."""
        return len(judged)

    def unreachable(self, state: S) -> int:
        """Slots of `total()` that, as of `state`, will never be proposed (they count as settled)."""
        return 0


def hall_of_fame(size: int, hall: Sequence[Candidate], judged: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """The hall of fame after `judged`: DEAP's, filled from the previous one (`hall`, best first)
    and then updated with the evaluated candidates of `judged`. (Filled worst first, so that the
    order of equal fitnesses is exactly that of one hall updated all along.)"""
    from deap import tools

    hof = tools.HallOfFame(max(1, size), similar=lambda a, b: a.genome_hash == b.genome_hash)
    hof.update([_individual(c) for c in reversed(hall)])
    hof.update([_individual(c) for c in judged if c.evaluated])
    return tuple(ind.candidate for ind in hof)


def generation(t: int, generated: Sequence[Candidate]) -> Generation:
    """Statistics of one generation (DEAP Statistics over its evaluated candidates; best and
    median over those with the full fitness, the only comparable ones)."""
    from deap import tools

    stats = tools.Statistics(key=lambda ind: ind.fitness.values[1])
    for name, fn in (("min", min), ("median", statistics.median), ("mean", statistics.fmean)):
        stats.register(name, fn)
    evaluated = [c for c in generated if c.evaluated]
    full = [_individual(c) for c in evaluated if c.fidelity == 1]
    record: dict[str, Any] = stats.compile(full) if full else {}
    counts = {s: sum(c.status == s for c in generated) for s in ("duplicate", "invalid", "error")}
    return Generation(t, len(generated), len(evaluated), counts["duplicate"], counts["invalid"],
                      counts["error"], record.get("min"), record.get("median"))


def _individual(c: Candidate) -> Any:
    ind = candidate_class()(c)
    ind.fitness.values = (c.fidelity, c.fitness)
    return ind
