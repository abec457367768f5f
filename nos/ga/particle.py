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
from collections.abc import Generator, Sequence
from functools import partial

from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import mutate, random_genome

from ..search.config import SearchConfig
from ..search.records import Batch, Candidate, Generation, Proposal
from .strategy import Strategy


def _random(rng: random.Random) -> tuple[Genome, str | None]:
    return random_genome(rng), None


def _builtin(name: str, rng: random.Random) -> tuple[Genome, str | None]:
    return builtin(name), None


def initial_proposals(cfg: SearchConfig) -> tuple[Proposal, ...]:
    """The initial population: `initial` random genomes, then the builtins if asked for."""
    out = [Proposal(f"init:{i}", _random) for i in range(cfg.initial)]
    if cfg.seed_builtins:
        out += [Proposal(f"builtin:{b}", partial(_builtin, b)) for b in BUILTINS]
    return tuple(out)


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
        self._parents: dict[int, Genome] = {}  # position id -> its genome
        self._plan = self._batches()
        self._next = next(self._plan, None)

    def ask(self) -> Batch | None:
        return self._next

    def _after(self, judged: Sequence[Candidate]) -> list[Generation]:
        self._told, self._finished = list(judged), []
        self._next = next(self._plan, None)  # runs the search up to its next batch
        return self._finished

    def _batches(self) -> Generator[Batch, None, None]:
        """The whole search as a generator: each `yield` hands a batch to the run; `tell` puts the
        judged candidates in `self._told` and resumes it up to the next batch."""
        cfg = self.cfg
        yield Batch("initial population", initial_proposals(cfg))
        initial = self._told
        self._finished.append(self.generation(0, initial))
        positions = sorted((c for c in initial if c.evaluated), key=Candidate.rank)[: cfg.particles]
        for t in range(1, cfg.timesteps + 1):
            positions = yield from self._timestep(t, positions)

    def _timestep(self, t: int, positions: list[Candidate]) -> Generator[Batch, None, list[Candidate]]:
        cfg = self.cfg
        pending = [(p, m) for p in range(len(positions)) for m in range(cfg.mutations)]
        children: dict[int, list[Candidate]] = {p: [] for p in range(len(positions))}
        generated: list[Candidate] = []
        for a in range(cfg.max_tries):
            proposals = tuple(self._child(t, p, m, a, positions[p]) for p, m in pending)
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

    def _child(self, t: int, p: int, m: int, a: int, parent: Candidate) -> Proposal:
        """Try `a` of mutation `m` of particle `p` at timestep `t`: a mutant of its position."""
        genome = self._parents.get(parent.id)
        if genome is None:  # parsed once per position, not once per child and attempt
            genome = self._parents[parent.id] = from_json(dict(parent.genome))

        def make(rng: random.Random) -> tuple[Genome, str | None]:
            return self.toolbox.mutate(genome, rng)

        return Proposal(f"t{t}:p{p}:m{m}:a{a}", make, timestep=t, attempt=a, parent_id=parent.id, particle=p,
                        mutation=m)

    def _next_position(self, parent: Candidate, kids: list[Candidate]) -> Candidate:
        kids = sorted(kids, key=Candidate.rank)
        if kids and not (self.cfg.elitism and kids[0].rank()[:2] >= parent.rank()[:2]):
            return kids[0]
        return parent


class RandomSearch(ParticleGA):
    """The control for any claim that evolution found something: the GA's exact schedule of
    proposals (the same initial population, then `particles x mutations` slots per timestep, each
    retried up to `max_tries` times until it is evaluated) -- but every proposal is a fresh random
    genome, never a mutant. Screening, deduplication, fitness stages and the funnel are the run's,
    so both strategies judge the same number of candidates under the same rules."""

    def _child(self, t: int, p: int, m: int, a: int, parent: Candidate) -> Proposal:
        return Proposal(f"t{t}:r{p}.{m}:a{a}", _random, timestep=t, attempt=a)

    def _next_position(self, parent: Candidate, kids: list[Candidate]) -> Candidate:
        return parent  # positions only count slots here; nothing is mutated from them


STRATEGIES = {"ga": ParticleGA, "random": RandomSearch}

