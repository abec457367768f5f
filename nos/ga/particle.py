"""NOS's mutation-only particle GA (Morgan & Hougen, 2024), as an ask / tell strategy.

1. `initial` random genomes (optionally plus the builtins) are proposed; the best `particles` of
   those evaluated become independent particles.
2. For each of `timesteps` timesteps, each particle proposes `mutations` children. A child that
   is invalid, fails the integrity check or duplicates a candidate already judged is replaced by a
   new try (up to `max_tries` attempts). The best evaluated child becomes the particle's next
   position, even when it is worse than its parent (NOS); `elitism` keeps the parent then.

No crossover (NOS has none). The run judges and stores every proposal; this class only decides
what to propose next from what it is told.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import mutate, random_genome

from ..search.config import SearchConfig
from ..search.records import Batch, Candidate, Generation, Maker, Proposal
from .strategy import Strategy


def initial_proposals(cfg: SearchConfig) -> tuple[Proposal, ...]:
    """The initial population: `initial` random genomes, then the builtins if asked for."""
    out = [Proposal(f"init:{i}", lambda rng: (random_genome(rng), None)) for i in range(cfg.initial)]
    if cfg.seed_builtins:
        out += [Proposal(f"builtin:{b}", lambda rng, b=b: (builtin(b), None)) for b in BUILTINS]
    return tuple(out)


def _by_fitness(c: Candidate) -> tuple[float, int]:
    assert c.fitness is not None
    return (c.fitness, c.id)


class ParticleGA(Strategy):
    """Propose the initial population, then each timestep's children, attempt by attempt."""

    def __init__(self, cfg: SearchConfig) -> None:
        from deap import base

        super().__init__(cfg.funnel)
        self.cfg = cfg
        self.toolbox = base.Toolbox()
        self.toolbox.register("mutate", mutate)
        self._told: list[Candidate] = []
        self._finished: list[Generation] = []
        self._plan = self._batches()
        self._next = next(self._plan, None)

    def ask(self) -> Batch | None:
        return self._next

    def _after(self, judged: Sequence[Candidate]) -> list[Generation]:
        self._told, self._finished = list(judged), []
        self._next = next(self._plan, None)  # runs the search up to its next batch
        return self._finished

    def _batches(self) -> Iterator[Batch]:
        """The whole search as a generator: each `yield` hands a batch to the run; `tell` puts the
        judged candidates in `self._told` and resumes it up to the next batch."""
        cfg = self.cfg
        yield Batch("initial population", initial_proposals(cfg))
        initial = self._told
        self._finished.append(self.generation(0, initial))
        positions = sorted((c for c in initial if c.evaluated), key=_by_fitness)[: cfg.particles]
        for t in range(1, cfg.timesteps + 1):
            positions = yield from self._timestep(t, positions)

    def _timestep(self, t: int, positions: list[Candidate]) -> Iterator[Batch]:
        cfg = self.cfg
        pending = [(p, m) for p in range(len(positions)) for m in range(cfg.mutations)]
        children: dict[int, list[Candidate]] = {p: [] for p in range(len(positions))}
        generated: list[Candidate] = []
        parents = [from_json(dict(c.genome)) for c in positions]
        for a in range(cfg.max_tries):
            proposals = tuple(
                Proposal(f"t{t}:p{p}:m{m}:a{a}", self._mutant(parents[p]), timestep=t, attempt=a,
                         parent_id=positions[p].id, particle=p, mutation=m)
                for p, m in pending
            )
            yield Batch(f"timestep {t}/{cfg.timesteps}", proposals)
            still = []
            for (p, m), child in zip(pending, self._told):
                generated.append(child)
                if child.evaluated:
                    children[p].append(child)
                else:
                    still.append((p, m))
            pending = still
            if not pending:
                break
        self._finished.append(self.generation(t, generated))
        return [self._next_position(parent, children[p]) for p, parent in enumerate(positions)]

    def _mutant(self, parent: Genome) -> Maker:
        def make(rng: random.Random) -> tuple[Genome, str | None]:
            return self.toolbox.mutate(parent, rng)

        return make

    def _next_position(self, parent: Candidate, kids: list[Candidate]) -> Candidate:
        kids = sorted(kids, key=_by_fitness)
        if kids and not (self.cfg.elitism and kids[0].fitness >= parent.fitness):  # type: ignore[operator]
            return kids[0]
        return parent
