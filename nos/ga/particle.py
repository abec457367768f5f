"""NOS's mutation-only particle GA (Morgan & Hougen, 2024) and its random-search control, as ask /
tell strategies over an explicit state.

Both follow one schedule (`Schedule`):

1. `initial` random genomes (optionally plus the builtins) are proposed; the best `particles` of
   those evaluated (by `Candidate.rank`: full fidelity first, then fitness, then age) set how many
   lanes of slots each timestep has.
2. For each of `timesteps` timesteps, each lane has `mutations` slots. A slot whose candidate is
   not evaluated (invalid, failed the integrity check, duplicate of a candidate already judged) is
   tried again (up to `max_tries` attempts).

The GA (`ParticleGA`) makes each lane a particle: its slots are mutants of the particle's position,
and the best evaluated child becomes the particle's next position, even when it is worse than its
parent (NOS); `elitism` keeps the parent then. No crossover (NOS has none). The control
(`RandomSearch`) proposes a fresh random genome in every slot: no particles, no parents.

The strategy makes every genome itself, with `random.Random(f"{seed}:{slot}")`, so a slot's
candidate depends only on the seed and the state. The run judges and stores every proposal; a
strategy only decides what to propose next from its state and what it is told, and `replay` feeds
stored candidates back through the same steps (the report's particle positions).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self, TypeVar

from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import MutationError, mutate, random_genome

from ..search.config import SearchConfig
from ..search.records import Batch, Candidate, Generation, Proposal
from .strategy import Strategy, generation, hall_of_fame

# make(rng) -> (genome, mutation kind or None); raises search_space.mutation.MutationError
Maker = Callable[[random.Random], "tuple[Genome, str | None]"]

INITIAL, SEARCH, DONE = "initial", "search", "done"  # the phases of a schedule's state


@dataclass(frozen=True)
class GAConfig:
    """What the GA's schedule needs of a run's configuration (`of` reads it from a SearchConfig):
    its sizes, `seed` (the run's: the genome of slot s is made with Random(f"{seed}:{s}")) and
    `hall` (the size of the hall of fame: the candidates the funnel validates)."""

    initial: int = 12
    particles: int = 2
    timesteps: int = 2
    mutations: int = 3
    max_tries: int = 4
    elitism: bool = False
    seed_builtins: bool = False
    seed: int = 0
    hall: int = 5

    @classmethod
    def of(cls, cfg: SearchConfig) -> GAConfig:
        return cls(initial=cfg.initial, particles=cfg.particles, timesteps=cfg.timesteps, mutations=cfg.mutations,
                   max_tries=cfg.max_tries, elitism=cfg.elitism, seed_builtins=cfg.seed_builtins, seed=cfg.seed,
                   hall=cfg.funnel)


@dataclass(frozen=True)
class ScheduleState:
    """Where a schedule stands. `phase`: "initial" (the initial population is asked for),
    "search" (timestep `timestep`, try `attempt`; `pending`: the (lane, mutation) slots not settled
    yet, `generated`: the candidates judged in this timestep so far) or "done". `lanes`: the slot
    rows of each timestep (fewer than `particles` when fewer initial candidates were evaluated).
    `hall`: the hall of fame, best first. `to_json` / `from_json` round-trip it."""

    phase: str = INITIAL
    timestep: int = 0
    attempt: int = 0
    lanes: int = 0
    pending: tuple[tuple[int, int], ...] = ()
    generated: tuple[Candidate, ...] = ()
    hall: tuple[Candidate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "timestep": self.timestep, "attempt": self.attempt, "lanes": self.lanes,
                "pending": [list(pm) for pm in self.pending], "generated": _candidates_json(self.generated),
                "hall": _candidates_json(self.hall)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Self:
        return cls(**cls._fields_of(d))

    @classmethod
    def _fields_of(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {"phase": str(d["phase"]), "timestep": int(d["timestep"]), "attempt": int(d["attempt"]),
                "lanes": int(d["lanes"]), "pending": tuple((int(p), int(m)) for p, m in d["pending"]),
                "generated": _candidates(d["generated"]), "hall": _candidates(d["hall"])}


@dataclass(frozen=True)
class GAState(ScheduleState):
    """A schedule's state plus the GA's own: each particle's `positions` (one per lane) and, per
    particle, its `children` evaluated so far in this timestep."""

    positions: tuple[Candidate, ...] = ()
    children: tuple[tuple[Candidate, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "positions": _candidates_json(self.positions),
                "children": [_candidates_json(kids) for kids in self.children]}

    @classmethod
    def _fields_of(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields_of(d), "positions": _candidates(d["positions"]),
                "children": tuple(_candidates(kids) for kids in d["children"])}


def _candidates_json(cs: Sequence[Candidate]) -> list[dict[str, Any]]:
    return [c.to_json() for c in cs]


def _candidates(ds: Sequence[Mapping[str, Any]]) -> tuple[Candidate, ...]:
    return tuple(Candidate.from_row(d) for d in ds)


St = TypeVar("St", bound=ScheduleState)


class Schedule(Strategy[St]):
    """The schedule both strategies share (see the module docstring): the initial population, then
    per timestep `lanes x mutations` slots, each tried until evaluated or `max_tries` tries. A
    subclass names and makes each slot's candidate (`_slot`, `_child`) and may keep more state
    (`_started`, `_told`, `_moved`)."""

    def __init__(self, cfg: GAConfig) -> None:
        self.cfg = cfg

    @classmethod
    def of(cls, cfg: SearchConfig) -> Self:
        """The strategy of a run's configuration."""
        return cls(GAConfig.of(cfg))

    # ------------------------------------------------------------------ ask / tell
    def ask(self, state: St) -> Batch | None:
        cfg = self.cfg
        if state.phase == INITIAL:
            return Batch("initial population", tuple(self._propose(slot, make) for slot, make in self._initial()),
                         initial=True)
        if state.phase == SEARCH:
            t, a = state.timestep, state.attempt
            return Batch(f"timestep {t}/{cfg.timesteps}", tuple(self._child(state, t, p, m, a) for p, m in state.pending))
        return None

    def tell(self, state: St, judged: Sequence[Candidate]) -> tuple[St, list[Generation]]:
        cfg = self.cfg
        judged = list(judged)
        hall = hall_of_fame(cfg.hall, state.hall, judged)
        if state.phase == INITIAL:
            ranked = sorted((c for c in judged if c.evaluated), key=Candidate.rank)[: cfg.particles]
            state = self._started(replace(state, hall=hall, lanes=len(ranked)), ranked)
            return self._timestep(state, 1, [generation(0, judged)])
        if state.phase != SEARCH:
            raise ValueError("the search is over: no batch was asked for")
        if len(judged) != len(state.pending):
            raise ValueError(f"told {len(judged)} candidate(s) for a batch of {len(state.pending)}")
        done = [(p, c) for (p, _), c in zip(state.pending, judged) if c.evaluated]
        still = tuple(pm for pm, c in zip(state.pending, judged) if not c.evaluated)
        state = self._told(replace(state, hall=hall, attempt=state.attempt + 1, pending=still,
                                   generated=state.generated + tuple(judged)), done)
        if still and state.attempt < cfg.max_tries:
            return state, []  # the next try of the slots still pending
        finished = generation(state.timestep, state.generated)
        return self._timestep(self._moved(state), state.timestep + 1, [finished])

    def best(self, state: St) -> list[Candidate]:
        return list(state.hall)

    def _timestep(self, state: St, t: int, finished: list[Generation]) -> tuple[St, list[Generation]]:
        """The state at the start of timestep `t` (or done), and the generations finished."""
        cfg = self.cfg
        while t <= cfg.timesteps and cfg.max_tries <= 0:  # no try at all: an empty generation
            finished.append(generation(t, ()))
            t += 1
        if t > cfg.timesteps:
            return replace(state, phase=DONE, attempt=0, pending=(), generated=()), finished
        pending = tuple((p, m) for p in range(state.lanes) for m in range(cfg.mutations))
        return replace(state, phase=SEARCH, timestep=t, attempt=0, pending=pending, generated=()), finished

    # ------------------------------------------------------------------ progress
    def total(self) -> int:
        """Slots the schedule settles: the initial population, then particles x mutations child
        slots per timestep. A slot is settled once a try of it is evaluated or its last try
        (`max_tries`) is judged, so retries never make the total grow."""
        cfg = self.cfg
        return len(self._initial()) + cfg.timesteps * cfg.particles * cfg.mutations

    def settled(self, judged: Sequence[Candidate]) -> int:
        last_try = self.cfg.max_tries - 1
        return sum(c.timestep == 0 or c.evaluated or c.attempt >= last_try for c in judged)

    def unreachable(self, state: St) -> int:
        """The child slots of the particles the initial population could not fill (fewer
        evaluated initial candidates than particles): never proposed."""
        cfg = self.cfg
        return 0 if state.phase == INITIAL else (cfg.particles - state.lanes) * cfg.mutations * cfg.timesteps

    # ------------------------------------------------------------------ replay
    def replay(self, by_slot: Mapping[str, Candidate]) -> list[St]:
        """Feed stored candidates (by slot) through init / ask / tell, as the run did: the state
        after each generation (timestep 0, 1, ...), up to the first batch with a slot not stored
        (a partial run). Makes no genome."""
        state, states = self.init(), []
        while (slots := self._slots(state)) is not None and all(s in by_slot for s in slots):
            state, finished = self.tell(state, [by_slot[s] for s in slots])
            states += [state] * len(finished)
        return states

    def _slots(self, state: St) -> list[str] | None:
        """The slots of `ask(state)`, without making their candidates."""
        if state.phase == INITIAL:
            return [slot for slot, _ in self._initial()]
        if state.phase == SEARCH:
            return [self._slot(state.timestep, p, m, state.attempt) for p, m in state.pending]
        return None

    # ------------------------------------------------------------------ making candidates
    def _initial(self) -> list[tuple[str, Maker]]:
        """The initial population: `initial` random genomes, then the builtins if asked for."""
        out: list[tuple[str, Maker]] = [(f"init:{i}", _random) for i in range(self.cfg.initial)]
        if self.cfg.seed_builtins:
            out += [(f"builtin:{b}", _builtin(b)) for b in BUILTINS]
        return out

    def _propose(self, slot: str, make: Maker, timestep: int = 0, attempt: int = 0, parent_id: int | None = None,
                 lineage: Mapping[str, int] | None = None) -> Proposal:
        """The proposal of `slot`, its genome made with Random(f"{seed}:{slot}") (or, when the
        mutation cannot make a child, the reason)."""
        cols: dict[str, Any] = {"timestep": timestep, "attempt": attempt, "parent_id": parent_id,
                                "lineage": dict(lineage or {})}
        try:
            genome, kind = make(random.Random(f"{self.cfg.seed}:{slot}"))
        except MutationError as e:
            return Proposal(slot, None, invalid=str(e), **cols)
        return Proposal(slot, genome, kind, **cols)

    @abstractmethod
    def _slot(self, t: int, p: int, m: int, a: int) -> str:
        """The name of try `a` of slot `m` of lane `p` at timestep `t`."""

    @abstractmethod
    def _child(self, state: St, t: int, p: int, m: int, a: int) -> Proposal:
        """The proposal of try `a` of slot `m` of lane `p` at timestep `t`."""

    def _started(self, state: St, ranked: list[Candidate]) -> St:
        """The state once the initial population is judged (`ranked`: its best evaluated, one per lane)."""
        return state

    def _told(self, state: St, evaluated: list[tuple[int, Candidate]]) -> St:
        """The state after a try (`evaluated`: its evaluated candidates and their lanes)."""
        return state

    def _moved(self, state: St) -> St:
        """The state once a timestep is over (before the next starts)."""
        return state


class ParticleGA(Schedule[GAState]):
    """Each lane a particle: its slots are mutants of its position (see the module docstring)."""

    def __init__(self, cfg: GAConfig) -> None:
        from deap import base

        super().__init__(cfg)
        self.toolbox = base.Toolbox()
        self.toolbox.register("mutate", mutate)
        self._parents: dict[int, Genome] = {}  # a cache: position id -> its parsed genome

    def init(self) -> GAState:
        return GAState()

    def positions(self, by_slot: Mapping[str, Candidate]) -> dict[int, list[Candidate]]:
        """Each particle's positions at timesteps 0, 1, ... as `replay` of the stored candidates
        finds them (what the GA chose; up to the last timestep fully stored)."""
        states = self.replay(by_slot)
        return {p: [s.positions[p] for s in states] for p in range(states[0].lanes)} if states else {}

    def _slot(self, t: int, p: int, m: int, a: int) -> str:
        return f"t{t}:p{p}:m{m}:a{a}"

    def _child(self, state: GAState, t: int, p: int, m: int, a: int) -> Proposal:
        """Try `a` of mutation `m` of particle `p` at timestep `t`: a mutant of its position."""
        parent = state.positions[p]
        genome = self._parents.get(parent.id)
        if genome is None:  # parsed once per position, not once per child and attempt
            genome = self._parents[parent.id] = from_json(dict(parent.genome))
        parsed = genome
        return self._propose(self._slot(t, p, m, a), lambda rng: self.toolbox.mutate(parsed, rng), timestep=t,
                             attempt=a, parent_id=parent.id, lineage={"particle": p, "mutation": m})

    def _started(self, state: GAState, ranked: list[Candidate]) -> GAState:
        return replace(state, positions=tuple(ranked), children=((),) * len(ranked))

    def _told(self, state: GAState, evaluated: list[tuple[int, Candidate]]) -> GAState:
        children = [list(kids) for kids in state.children]
        for p, child in evaluated:
            children[p].append(child)
        return replace(state, children=tuple(tuple(kids) for kids in children))

    def _moved(self, state: GAState) -> GAState:
        positions = tuple(self._next_position(parent, list(kids)) for parent, kids in zip(state.positions, state.children))
        return replace(state, positions=positions, children=((),) * len(positions))

    def _next_position(self, parent: Candidate, kids: list[Candidate]) -> Candidate:
        kids = sorted(kids, key=Candidate.rank)
        if kids and not (self.cfg.elitism and kids[0].rank()[:2] >= parent.rank()[:2]):
            return kids[0]
        return parent


class RandomSearch(Schedule[ScheduleState]):
    """The control for any claim that evolution found something: the GA's exact schedule of
    proposals (the same initial population, then `particles x mutations` slots per timestep, each
    retried up to `max_tries` times until it is evaluated) -- but every proposal is a fresh random
    genome, never a mutant: no particle, no parent. Screening, deduplication, fitness stages and
    the funnel are the run's, so both strategies judge the same number of candidates under the
    same rules."""

    def init(self) -> ScheduleState:
        return ScheduleState()

    def _slot(self, t: int, p: int, m: int, a: int) -> str:
        return f"t{t}:r{p}.{m}:a{a}"

    def _child(self, state: ScheduleState, t: int, p: int, m: int, a: int) -> Proposal:
        return self._propose(self._slot(t, p, m, a), _random, timestep=t, attempt=a)


def _random(rng: random.Random) -> tuple[Genome, str | None]:
    return random_genome(rng), None


def _builtin(name: str) -> Maker:
    def make(rng: random.Random) -> tuple[Genome, str | None]:
        return builtin(name), None

    return make


STRATEGIES: dict[str, type[ParticleGA] | type[RandomSearch]] = {"ga": ParticleGA, "random": RandomSearch}
