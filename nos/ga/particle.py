"""NOS's mutation-only particle GA (Morgan & Hougen, 2024), on DEAP, with every candidate in SQL.

1. `initial` random genomes (optionally plus the builtins) are screened by the integrity check,
   deduplicated by canonical hash and evaluated on the sine task; the best `particles` become
   independent particles.
2. For each of `timesteps` timesteps, each particle makes `mutations` children. A child that is
   invalid, fails the integrity check or duplicates a hash already judged in this run is recorded
   and replaced by a new try (up to `max_tries`). The best evaluated child becomes the particle's
   next position, even when it is worse than its parent (NOS); `elitism` keeps the parent then.
3. The funnel: the best distinct candidates are re-evaluated on held-out seeds at all horizons
   beside tuned Adam, Adam + clipping and tuned RandOpt.

Determinism and resume: each candidate has a *slot* name ("init:17", "t2:p3:m5:a1") and its
genome comes from `random.Random(f"{seed}:{slot}")` and its parent only. Candidates are judged in
fixed chunks, and a chunk's rows are written in one transaction once judged. Resuming replays the
same loops, reads the slots already in the database instead of recomputing them, and evaluates the
rest in the same chunks -- so a run killed at any moment ends with the same lineage and fitnesses.

Several processes on one run (`Cooperation`, used with a shared PostgreSQL database): because a
chunk's rows are a pure function of the seed and of the rows judged before it, processes split the
chunks through claims in the database. Each first evaluates, speculatively, every chunk it could
claim; then all walk the chunks in order, storing their own once every earlier chunk is in the
database (re-deduplicating against them from cached results, so the lineage is exactly the
single-process one) and reading the others' rows. A slot found already stored is read back instead
of written (`SlotTakenError`), and a claim whose owner stopped beating is taken over.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from deap import base, creator, tools

from db.store import SlotTakenError, Store
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import MutationError, mutate, random_genome
from search_space.symbolic import symbolic

from ..engine import integrity
from ..engine.evaluate import (
    HELDOUT_SEEDS,
    HORIZONS,
    Fitness,
    SearchSetup,
    SineEvaluator,
    heldout_comparison,
)
from ..tasks.sine import SineConfig

JUDGED = ("evaluated", "rejected_integrity", "invalid", "error")

if not hasattr(creator, "NosFitness"):
    creator.create("NosFitness", base.Fitness, weights=(-1.0,))
    creator.create("NosCandidate", dict, fitness=creator.NosFitness)


@dataclass
class SearchConfig:
    initial: int = 12
    particles: int = 2
    timesteps: int = 2
    mutations: int = 3
    max_tries: int = 4
    seed: int = 0
    seed_builtins: bool = False
    elitism: bool = False
    chunk: int = 64  # initial candidates judged (and written) together
    timestep_chunk: int = 0  # children of one timestep attempt judged together (0: all of them)
    horizons: tuple[float, ...] = (2.0, 10.0)  # one where Adam shines, one where it struggles
    lrs: tuple[float, ...] = (3e-5, 3e-4, 3e-3)
    budget_fpe: int = 600
    funnel: int = 1
    heldout_seeds: tuple[int, ...] = HELDOUT_SEEDS
    heldout_horizons: tuple[float, ...] = HORIZONS
    sine: dict[str, Any] = field(default_factory=dict)  # SineConfig overrides (tests use a small one)
    cache_dir: str = "runs/cache"

    @property
    def total_steps(self) -> int:
        return self.budget_fpe // 3

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("horizons", "lrs", "heldout_seeds", "heldout_horizons"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def setup(self) -> SearchSetup:
        return SearchSetup(
            horizons=self.horizons,
            lrs=self.lrs,
            budget_fpe=self.budget_fpe,
            sine=SineConfig(**self.sine),
            cache_dir=self.cache_dir,
        )


@dataclass
class Progress:
    """Callbacks the command line hooks a progress bar into."""

    planned: Callable[[int], None] = lambda n: None  # more candidates planned
    judged: Callable[[list[dict]], None] = lambda rows: None
    message: Callable[[str], None] = lambda msg: None


FitnessFn = Callable[[Sequence[Genome], dict[float, tuple[float, float]]], "list[Fitness | Exception]"]


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Cooperation:
    """How this process shares a run with others (claims in the run's database).

    `stale_s`: a claim whose heartbeat has not moved for this long belongs to a dead process and
    is taken over. The owner beats every `heartbeat_s`; others look every `poll_s`.
    """

    owner: str = field(default_factory=_default_owner)
    stale_s: float = 60.0
    poll_s: float = 0.5

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, min(5.0, self.stale_s / 4))


class ParticleSearch:
    def __init__(self, store: Store, run_id: int, config: SearchConfig, device: torch.device | str,
                 progress: Progress | None = None, fitness_fn: FitnessFn | None = None,
                 cooperate: Cooperation | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.config = config
        self.device = torch.device(device)
        self.progress = progress or Progress()
        self.evaluator = SineEvaluator(config.setup(), self.device)
        # where fitness is computed: this process (default) or e.g. a Dask cluster (nos.distributed);
        # it may return an Exception in place of a candidate's Fitness (recorded as `error`)
        # (None: looked up at each call, so the evaluator's method can be swapped)
        self.fitness_fn: FitnessFn | None = fitness_fn
        self.coop = cooperate
        # results by slot / hash, so a chunk computed speculatively is not computed twice
        self._made: dict[str, Any] = {}
        self._screened: dict[str, Any] = {}
        self._fits: dict[str, Fitness | Exception] = {}
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None
        self.rows: dict[str, dict] = {r["slot"]: r for r in store.individuals(run_id)}
        self.by_id: dict[int, dict] = {r["id"]: r for r in self.rows.values()}
        self.by_hash: dict[str, int] = {}
        for r in sorted(self.rows.values(), key=lambda r: r["id"]):
            if r["status"] in JUDGED and r["genome_hash"]:
                self.by_hash.setdefault(r["genome_hash"], r["id"])
                if r["unflipped_hash"]:
                    self.by_hash.setdefault(r["unflipped_hash"], r["id"])
        self.toolbox = base.Toolbox()
        self.toolbox.register("mutate", mutate)
        self.toolbox.register("screen", integrity.check, device=self.device)
        self.stats = tools.Statistics(key=lambda ind: ind.fitness.values[0])
        for name, fn in (("min", min), ("median", statistics.median), ("mean", statistics.fmean)):
            self.stats.register(name, fn)
        self.logbook = tools.Logbook()
        self.logbook.header = ["timestep", "candidates", "evaluated", "duplicates", "min", "median"]
        self.hall = tools.HallOfFame(max(1, config.funnel), similar=lambda a, b: a["genome_hash"] == b["genome_hash"])
        self._adam: dict[float, tuple[float, float]] | None = None

    # ------------------------------------------------------------------ reference
    def adam_reference(self) -> dict[float, tuple[float, float]]:
        """Tuned Adam on the search task (fitness normaliser), stored once per run."""
        if self._adam is None:
            def stored_adam() -> list[dict]:
                return [b for b in self.store.baselines(self.run_id, task="sine_search") if b["method"] == "adam"]

            stored = stored_adam()
            if not stored and self.coop is not None and not self.claim_or_wait("adam", lambda: bool(stored_adam())):
                stored = stored_adam()  # another process tuned it
            if stored:
                self._adam = {b["horizon"]: (b["loss"], b["hparam"]) for b in stored}
            else:
                self.progress.message("tuning Adam on the search task")
                self._adam = self.evaluator.adam_reference()
                self.store.add_baselines(
                    [
                        {"run_id": self.run_id, "method": "adam", "task": "sine_search", "horizon": h, "seed": 0,
                         "loss": loss, "hparam": lr, "budget": self.config.budget_fpe}
                        for h, (loss, lr) in self._adam.items()
                    ]
                )
        return self._adam

    # ------------------------------------------------------------------ judging a chunk
    def _rng(self, slot: str) -> random.Random:
        return random.Random(f"{self.config.seed}:{slot}")

    def judge(self, planned: Sequence[tuple[str, Callable[[random.Random], tuple[Genome, str | None]], dict]]) -> None:
        """Create, screen, dedup, evaluate and store the candidates of one chunk.

        `planned`: (slot, make(rng) -> (genome, mutation kind), fixed columns such as parent_id).
        Slots already in the database are skipped: this is what makes resume exact.
        """
        self.judge_chunks([planned])

    def judge_chunks(self, chunks: Sequence[Sequence[tuple[str, Callable, dict]]]) -> None:
        """Judge consecutive chunks; with `cooperate`, split them with the other processes.

        Alone: each chunk in turn. Cooperating: first evaluate every chunk this process can claim
        (speculatively: earlier chunks may still be unknown), then walk the chunks in order --
        store our own once all earlier ones are known (deduplication redone, evaluations taken
        from the cache), read the others' from the database.
        """
        if self.coop is not None:
            for planned in chunks:
                todo = self._todo(planned)
                if todo and self.store.claim(self.run_id, self._chunk_key(planned), self.coop.owner):
                    self._compute(todo)
        for planned in chunks:
            self._judge_one(planned)

    @staticmethod
    def _chunk_key(planned: Sequence[tuple[str, Callable, dict]]) -> str:
        return f"chunk:{planned[0][0]}"

    def _todo(self, planned: Sequence[tuple[str, Callable, dict]]) -> list[tuple[str, Callable, dict]]:
        return [p for p in planned if p[0] not in self.rows]

    def _judge_one(self, planned: Sequence[tuple[str, Callable, dict]]) -> None:
        todo = self._todo(planned)
        if todo and self.coop is not None:
            slots = [slot for slot, _, _ in todo]
            if self.claim_or_wait(self._chunk_key(planned), lambda: self._load_slots(slots)):
                self._load_slots(slots)  # a dead owner may have stored part of it
                todo = self._todo(planned)
            else:
                todo = []
        if todo:
            rows = self._compute(todo)
            # Duplicates of a candidate judged in this same chunk need its id: store them second.
            # (If killed in between, resume regenerates them and finds the original in the database.)
            first = [r for r in rows if "dup_slot" not in r]
            later = [r for r in rows if "dup_slot" in r]
            self._store(first)
            for row in later:
                row["duplicate_of"] = self.rows[row.pop("dup_slot")]["id"]
            self._store(later)
            for slot, _, _ in todo:
                self._made.pop(slot, None)
            if self.coop is None:  # alone, nothing is computed twice: keep no cache
                self._screened.clear()
                self._fits.clear()
        self.progress.judged([self.rows[slot] for slot, _, _ in planned])

    def _make(self, slot: str, make: Callable[[random.Random], tuple[Genome, str | None]]) -> Any:
        """(genome, kind, symbolic columns or the exception) or the MutationError, cached by slot."""
        if slot not in self._made:
            try:
                genome, kind = make(self._rng(slot))
            except MutationError as e:
                self._made[slot] = e
                return e
            try:
                sym: Any = self._symbolic_columns(genome)
            except Exception as e:  # noqa: BLE001 -- a genome sympy cannot handle is recorded, not fatal
                sym = e
            self._made[slot] = (genome, kind, sym)
        return self._made[slot]

    def _compute(self, todo: Sequence[tuple[str, Callable, dict]]) -> list[dict]:
        """The rows of `todo` given what this process knows now (nothing is stored)."""
        rows: list[dict] = []
        pending_hash: dict[str, dict] = {}
        to_screen: list[tuple[dict, Genome, str]] = []
        for slot, make, fixed in todo:
            row = {"run_id": self.run_id, "slot": slot, **fixed}
            made = self._make(slot, make)
            if isinstance(made, MutationError):
                parent = self.rows_by_id(fixed.get("parent_id"))
                row.update(genome=parent["genome"] if parent else {}, status="invalid", error=str(made),
                           mutation_kind=str(made).split(":")[0])
                rows.append(row)
                continue
            genome, kind, sym = made
            row["mutation_kind"] = kind
            if isinstance(sym, Exception):
                row.update(genome=genome.to_json(), status="error", error=f"symbolic form: {type(sym).__name__}: {sym}"[:500])
                rows.append(row)
                continue
            row.update(sym)
            h = row["genome_hash"]
            if h in self.by_hash:
                row.update(status="duplicate", duplicate_of=self.by_hash[h])
                rows.append(row)
            elif h in pending_hash:
                row.update(status="duplicate", dup_slot=pending_hash[h]["slot"])
                rows.append(row)
            else:
                pending_hash[h] = row
                to_screen.append((row, genome, h))
                rows.append(row)
        self._screen_and_evaluate(to_screen, pending_hash)
        return rows

    def _load_slots(self, slots: Sequence[str]) -> bool:
        """Read rows another process stored for `slots`; True once all of them are known."""
        missing = [s for s in slots if s not in self.rows]
        if missing:
            for row in self.store.individuals_by_slots(self.run_id, missing):
                self._remember(row)
        return all(s in self.rows for s in slots)

    def claim_or_wait(self, key: str, ready: Callable[[], bool]) -> bool:
        """True: this process holds the claim on `key` and must do the work. False: `ready()`
        became true because another process did it. A claim whose heartbeat stands still for
        `stale_s` (its owner died) is taken over."""
        assert self.coop is not None
        self.start_heartbeat()
        seen: tuple[str, int] | None = None
        since = time.monotonic()
        while True:
            if self.store.claim(self.run_id, key, self.coop.owner):
                return True
            if ready():
                return False
            state = self.store.claim_state(self.run_id, key)
            if state != seen:
                seen, since = state, time.monotonic()
            elif state is not None and time.monotonic() - since > self.coop.stale_s:
                if self.store.take_over(self.run_id, key, self.coop.owner, state):
                    self.progress.message(f"took over {key} from {state[0]} (no heartbeat for {self.coop.stale_s:g} s)")
                    return True
            time.sleep(self.coop.poll_s)

    def start_heartbeat(self) -> None:
        """Keep this process's claims fresh from a background thread (cooperating runs only)."""
        if self.coop is None or self._beat is not None:
            return
        coop = self.coop

        def beat() -> None:
            while not self._stop_beat.wait(coop.heartbeat_s):
                try:
                    self.store.heartbeat(self.run_id, coop.owner)
                except Exception:  # noqa: BLE001 -- a missed beat only risks a take-over; retry
                    pass

        self._beat = threading.Thread(target=beat, name="nos-heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        """Stop the heartbeat (a process that stops working must let others take over)."""
        self._stop_beat.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None

    def _store(self, rows: list[dict]) -> None:
        if not rows:
            return
        try:
            ids = self.store.add_individuals(rows)
        except SlotTakenError:
            # Another process on this run stored some of these slots first (same seed, same
            # rows): read theirs back and store only what is still missing.
            self._load_slots([r["slot"] for r in rows])
            rest = [r for r in rows if r["slot"] not in self.rows]
            if len(rest) == len(rows):
                raise
            self._store(rest)
            return
        for row, i in zip(rows, ids):
            row["id"] = i
            self._remember(row)

    def rows_by_id(self, ind_id: int | None) -> dict | None:
        return self.by_id.get(ind_id) if ind_id is not None else None

    def _remember(self, row: dict) -> None:
        self.rows[row["slot"]] = row
        self.by_id[row["id"]] = row
        if row["status"] in JUDGED and row.get("genome_hash"):
            self.by_hash.setdefault(row["genome_hash"], row["id"])
            if row.get("unflipped_hash"):
                self.by_hash.setdefault(row["unflipped_hash"], row["id"])

    @staticmethod
    def _symbolic_columns(genome: Genome) -> dict:
        sym = symbolic(genome)
        return {"genome": genome.to_json(), "expression": sym.text, "latex": sym.latex, "genome_hash": sym.hash}

    def _screen_and_evaluate(self, to_screen: list[tuple[dict, Genome, str]], pending_hash: dict[str, dict]) -> None:
        if not to_screen:
            return
        unscreened = [(g, h) for _, g, h in to_screen if h not in self._screened]
        if unscreened:
            for (_, h), res in zip(unscreened, self.toolbox.screen([g for g, _ in unscreened])):
                self._screened[h] = res
        results = [self._screened[h] for _, _, h in to_screen]
        passed: list[tuple[dict, Genome]] = []
        for (row, genome, h), res in zip(to_screen, results):
            row["sign"] = -1 if res.sign_flipped else 1
            if not res.passed:
                row["status"] = "rejected_integrity"
                row["error"] = f"sphere loss {res.final_loss} >= {integrity.THRESHOLD} at every lr and both signs"
                continue
            if res.sign_flipped:
                genome = res.apply(genome)
                row.update(self._symbolic_columns(genome))
                row["unflipped_hash"] = h
                flipped = row["genome_hash"]
                if flipped in self.by_hash:
                    row.update(status="duplicate", duplicate_of=self.by_hash[flipped])
                    continue
                if flipped in pending_hash:  # the flipped form is judged earlier in this chunk
                    row.update(status="duplicate", dup_slot=pending_hash[flipped]["slot"])
                    continue
                pending_hash[flipped] = row
            passed.append((row, genome))
        if not passed:
            return
        new = [(row, g) for row, g in passed if row["genome_hash"] not in self._fits]
        fitness_fn = self.fitness_fn or self.evaluator.fitness
        if new:
            try:
                fresh: list[Fitness | Exception] = list(fitness_fn([g for _, g in new], self.adam_reference()))
            except Exception:
                # isolate the culprit(s): evaluate one at a time
                fresh = []
                for _, g in new:
                    try:
                        fresh.append(fitness_fn([g], self.adam_reference())[0])
                    except Exception as e:  # noqa: BLE001 -- record any failure of a candidate and go on
                        fresh.append(e)
            for (row, _), fit in zip(new, fresh):
                self._fits[row["genome_hash"]] = fit
        fits = [self._fits[row["genome_hash"]] for row, _ in passed]
        for (row, _), fit in zip(passed, fits):
            if isinstance(fit, Exception):
                row.update(status="error", error=f"{type(fit).__name__}: {fit}"[:500])
            elif fit.fitness is None:
                row.update(status="error", error="non-finite loss at every learning rate", evaluations=fit.evaluations)
            else:
                row.update(status="evaluated", fitness=fit.fitness, lr=fit.lr, evaluations=fit.evaluations)

    # ------------------------------------------------------------------ the search
    def run(self) -> list[dict]:
        """Initial population + timesteps; returns the hall of fame (best distinct evaluated rows)."""
        cfg = self.config
        slots = [(f"init:{i}", lambda rng: (random_genome(rng), None)) for i in range(cfg.initial)]
        if cfg.seed_builtins:
            slots += [(f"builtin:{b}", lambda rng, b=b: (builtin(b), None)) for b in BUILTINS]
        self.progress.planned(len(slots))
        self.adam_reference()
        self.progress.message("initial population")
        self.judge_chunks([[(s, make, {"timestep": 0, "attempt": 0}) for s, make in slots[i : i + cfg.chunk]]
                           for i in range(0, len(slots), cfg.chunk)])
        initial = [self.rows[s] for s, _ in slots]
        self._log(0, initial)
        evaluated = sorted((r for r in initial if r["status"] == "evaluated"), key=lambda r: (r["fitness"], r["id"]))
        positions = evaluated[: cfg.particles]
        for p, row in enumerate(positions):
            row["particle"] = p
        for t in range(1, cfg.timesteps + 1):
            self.progress.planned(len(positions) * cfg.mutations)
            self.progress.message(f"timestep {t}/{cfg.timesteps}")
            positions = self._timestep(t, positions)
        return self._hall_of_fame()

    def _timestep(self, t: int, positions: list[dict]) -> list[dict]:
        cfg = self.config
        pending = [(p, m) for p in range(len(positions)) for m in range(cfg.mutations)]
        children: dict[int, list[dict]] = {p: [] for p in range(len(positions))}
        generated: list[dict] = []
        for a in range(cfg.max_tries):
            if a > 0:
                self.progress.planned(len(pending))
            planned = []
            for p, m in pending:
                parent = positions[p]
                parent_genome = from_json(parent["genome"])

                def make(rng: random.Random, g: Genome = parent_genome) -> tuple[Genome, str]:
                    return self.toolbox.mutate(g, rng)

                fixed = {"parent_id": parent["id"], "particle": p, "timestep": t, "mutation": m, "attempt": a}
                planned.append((f"t{t}:p{p}:m{m}:a{a}", make, fixed))
            size = cfg.timestep_chunk or len(planned) or 1
            self.judge_chunks([planned[i : i + size] for i in range(0, len(planned), size)])
            still = []
            for (p, m), (slot, _, _) in zip(pending, planned):
                row = self.rows[slot]
                generated.append(row)
                if row["status"] == "evaluated":
                    children[p].append(row)
                else:
                    still.append((p, m))
            pending = still
            if not pending:
                break
        self._log(t, generated)
        new_positions = []
        for p, parent in enumerate(positions):
            kids = sorted(children[p], key=lambda r: (r["fitness"], r["id"]))
            if kids and not (cfg.elitism and kids[0]["fitness"] >= parent["fitness"]):
                new_positions.append(kids[0])
            else:
                new_positions.append(parent)
        return new_positions

    def _log(self, t: int, generated: list[dict]) -> None:
        evaluated = [r for r in generated if r["status"] == "evaluated"]
        population = [self._candidate(r) for r in evaluated]
        record = self.stats.compile(population) if population else {}
        counts = {s: sum(r["status"] == s for r in generated) for s in ("duplicate", "invalid", "error")}
        self.logbook.record(timestep=t, candidates=len(generated), evaluated=len(evaluated),
                            duplicates=counts["duplicate"], **record)
        self.store.put_timestep_stats(
            self.run_id,
            {"timestep": t, "candidates": len(generated), "passed": len(evaluated), "duplicates": counts["duplicate"],
             "invalid": counts["invalid"], "errors": counts["error"], "best_fitness": record.get("min"),
             "median_fitness": record.get("median")},
        )

    @staticmethod
    def _candidate(row: dict) -> Any:
        ind = creator.NosCandidate(row)
        ind.fitness.values = (row["fitness"],)
        return ind

    def _hall_of_fame(self) -> list[dict]:
        self.hall.clear()
        self.hall.update([self._candidate(r) for r in self.rows.values() if r["status"] == "evaluated"])
        return [dict(ind) for ind in self.hall]

    # ------------------------------------------------------------------ the funnel
    def funnel(self, best: list[dict], progress: Callable[[str], None] | None = None):
        """Held-out comparison of the hall of fame vs Adam, Adam + clip and RandOpt."""
        cfg = self.config
        candidates = {f"#{r['id']}": from_json(r["genome"]) for r in best}
        return heldout_comparison(
            self.evaluator, candidates, horizons=cfg.heldout_horizons, seeds=cfg.heldout_seeds, progress=progress
        )
