"""Judging candidates: create, screen, deduplicate, evaluate and store them, chunk by chunk.

Every proposal becomes exactly one `individuals` row, whatever happens to it: `invalid` (the
mutation could not produce a valid child), `error` (sympy or the evaluation failed),
`duplicate` (its canonical hash was judged before in this run), `rejected_integrity` (it failed
the shifted-sphere check at every lr and both signs) or `evaluated` (with its fitness).

Determinism and resume: a proposal's genome comes from `random.Random(f"{seed}:{slot}")` and its
parent only. Proposals are judged in fixed chunks, and a chunk's rows are written in one
transaction once judged. Judging a chunk whose slots are already in the database reads them
instead -- so a run killed at any moment and resumed ends with the same rows.

Several processes on one run (`Cooperation`, used with a shared PostgreSQL database): because a
chunk's rows are a pure function of the seed and of the rows judged before it, processes split
the chunks through claims in the database. Each first evaluates, speculatively, every chunk it
could claim; then all walk the chunks in order, storing their own once every earlier chunk is in
the database (re-deduplicating against them from cached results, so the lineage is exactly the
single-process one) and reading the others' rows. A slot found already stored is read back instead
of written (`SlotTakenError`), and a claim whose owner stopped beating is taken over.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from db.store import JUDGED_STATUSES, SlotTakenError, Store
from search_space.genome import Genome
from search_space.mutation import MutationError
from search_space.symbolic import symbolic

from ..engine import integrity
from ..evaluation.fitness import AdamReference, Fitness, MultiEvaluator, TaskEvaluator
from .records import Proposal

# Where fitness is computed: this process (TaskEvaluator.fitness) or e.g. a Dask cluster
# (nos.distributed). It may return an Exception in place of a candidate's Fitness (stored as `error`).
FitnessFn = Callable[[Sequence[Genome], AdamReference], "list[Fitness | Exception]"]
ERROR_CHARS = 500  # error texts stored with a row are cut to this length


@dataclass
class Progress:
    """Callbacks the command line hooks its progress display into (`nos.progress.Stages`); also a
    `nos.progress.Reporter`, so the funnel and the baselines report through it."""

    planned: Callable[[int], None] = lambda n: None  # more candidates planned
    judged: Callable[[list[dict]], None] = lambda rows: None
    message: Callable[[str], None] = lambda msg: None  # what the current stage is doing now
    # a stage of the run starts, with its own fixed count: (name, total or None, unit)
    stage: Callable[[str, int | None, str], None] = lambda name, total, unit: None
    advance: Callable[..., None] = lambda n=1, **postfix: None  # units of the current stage done
    end: Callable[[], None] = lambda: None  # the current stage is over


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


@dataclass
class Stage:
    """One fidelity of the search fitness (successive halving, as in Hyperband / ASHA and the
    funnel of the Lion search): every candidate gets the first stage; the best `promote` fraction
    of each chunk's candidates (at least one) goes on to the next, and the last stage is the full
    search fitness. A single stage is a plain search."""

    evaluator: TaskEvaluator | MultiEvaluator
    adam_reference: Callable[[], Any]  # AdamReference (one task) or MultiReference (several)
    fitness_fn: FitnessFn | None = None  # None: the evaluator's own (looked up at each call)
    promote: float = 1.0

    def fitness(self, genomes: Sequence[Genome]) -> list[Fitness | Exception]:
        fn: FitnessFn = self.fitness_fn or self.evaluator.fitness  # type: ignore[assignment]
        return evaluate_isolating(fn, genomes, self.adam_reference())


def staged_fitness(stages: Sequence[Stage], genomes: Sequence[Genome]) -> list[tuple[Fitness | Exception, int]]:
    """(fitness or exception, fidelity) per genome; fidelity 1 = the full (last) stage's fitness,
    0 = only the first stage's (not promoted). A promoted candidate keeps every stage's rows."""
    out: list[tuple[Fitness | Exception, int]] = [(Exception("not evaluated"), 0)] * len(genomes)
    todo = list(range(len(genomes)))
    for k, stage in enumerate(stages):
        last = k == len(stages) - 1
        for i, fit in zip(todo, stage.fitness([genomes[i] for i in todo])):
            prev = out[i][0]
            if isinstance(fit, Fitness) and isinstance(prev, Fitness):
                fit = Fitness(fit.fitness, fit.lr, prev.evaluations + fit.evaluations)
            out[i] = (fit, 1 if last else 0)
        if last:
            break
        ok = [i for i in todo if isinstance(out[i][0], Fitness) and out[i][0].fitness is not None]  # type: ignore[union-attr]
        n = min(len(ok), max(1, math.ceil(stage.promote * len(ok)))) if ok else 0
        todo = sorted(sorted(ok, key=lambda i: (out[i][0].fitness, i))[:n])  # type: ignore[union-attr]
    return out


def evaluate_isolating(fitness_fn: FitnessFn, genomes: Sequence[Genome],
                       adam: AdamReference) -> list[Fitness | Exception]:
    """Fitness of a batch; if the batch raises, each genome alone, so only the culprit fails."""
    try:
        return list(fitness_fn(genomes, adam))
    except Exception:  # noqa: BLE001 -- isolate the culprit(s) below
        out: list[Fitness | Exception] = []
        for g in genomes:
            try:
                out.append(fitness_fn([g], adam)[0])
            except Exception as e:  # noqa: BLE001 -- record any failure of a candidate and go on
                out.append(e)
        return out


def error_text(e: BaseException, prefix: str = "") -> str:
    return f"{prefix}{type(e).__name__}: {e}"[:ERROR_CHARS]


class Judge:
    """Turns proposals into stored rows for one run (see the module docstring)."""

    def __init__(self, store: Store, run_id: int, seed: int, stages: Sequence[Stage], device: torch.device,
                 progress: Progress, cooperate: Cooperation | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.seed = seed
        self.stages = list(stages)
        self.device = device
        self.progress = progress
        self.coop = cooperate
        # results by slot / hash, so a chunk computed speculatively is not computed twice
        self._made: dict[str, Any] = {}
        self._screened: dict[str, Any] = {}
        self._fits: dict[str, tuple[Fitness | Exception, int]] = {}
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None
        self.rows: dict[str, dict] = {r["slot"]: r for r in store.individuals(run_id)}
        self.by_id: dict[int, dict] = {r["id"]: r for r in self.rows.values()}
        self.by_hash: dict[str, int] = {}
        for r in sorted(self.rows.values(), key=lambda r: r["id"]):
            self._index_hash(r)

    # ------------------------------------------------------------------ judging chunks
    def judge_chunks(self, chunks: Sequence[Sequence[Proposal]]) -> None:
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
    def _chunk_key(planned: Sequence[Proposal]) -> str:
        return f"chunk:{planned[0].slot}"

    def _todo(self, planned: Sequence[Proposal]) -> list[Proposal]:
        return [p for p in planned if p.slot not in self.rows]

    def _judge_one(self, planned: Sequence[Proposal]) -> None:
        todo = self._todo(planned)
        if todo and self.coop is not None:
            slots = [p.slot for p in todo]
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
            for p in todo:
                self._made.pop(p.slot, None)
            if self.coop is None:  # alone, nothing is computed twice: keep no cache
                self._screened.clear()
                self._fits.clear()
        self.progress.judged([self.rows[p.slot] for p in planned])

    # ------------------------------------------------------------------ one chunk's rows
    def _make(self, proposal: Proposal) -> Any:
        """(genome, kind, symbolic columns or the exception) or the MutationError, cached by slot."""
        slot = proposal.slot
        if slot not in self._made:
            try:
                genome, kind = proposal.make(random.Random(f"{self.seed}:{slot}"))
            except MutationError as e:
                self._made[slot] = e
                return e
            try:
                sym: Any = self._symbolic_columns(genome)
            except Exception as e:  # noqa: BLE001 -- a genome sympy cannot handle is recorded, not fatal
                sym = e
            self._made[slot] = (genome, kind, sym)
        return self._made[slot]

    def _compute(self, todo: Sequence[Proposal]) -> list[dict]:
        """The rows of `todo` given what this process knows now (nothing is stored)."""
        rows: list[dict] = []
        pending_hash: dict[str, dict] = {}
        to_screen: list[tuple[dict, Genome, str]] = []
        for proposal in todo:
            row = {"run_id": self.run_id, "slot": proposal.slot, **proposal.columns()}
            rows.append(row)
            made = self._make(proposal)
            if isinstance(made, MutationError):
                parent = self.by_id.get(proposal.parent_id) if proposal.parent_id is not None else None
                row.update(genome=parent["genome"] if parent else {}, status="invalid", error=str(made),
                           mutation_kind=str(made).split(":")[0])
                continue
            genome, kind, sym = made
            row["mutation_kind"] = kind
            if isinstance(sym, Exception):
                row.update(genome=genome.to_json(), status="error", error=error_text(sym, "symbolic form: "))
                continue
            row.update(sym)
            h = row["genome_hash"]
            if h in self.by_hash:
                row.update(status="duplicate", duplicate_of=self.by_hash[h])
            elif h in pending_hash:
                row.update(status="duplicate", dup_slot=pending_hash[h]["slot"])
            else:
                pending_hash[h] = row
                to_screen.append((row, genome, h))
        passed = self._screen(to_screen, pending_hash)
        self._evaluate(passed)
        return rows

    @staticmethod
    def _symbolic_columns(genome: Genome) -> dict:
        sym = symbolic(genome)
        return {"genome": genome.to_json(), "expression": sym.text, "latex": sym.latex, "genome_hash": sym.hash}

    def _screen(self, to_screen: list[tuple[dict, Genome, str]],
                pending_hash: dict[str, dict]) -> list[tuple[dict, Genome]]:
        """Integrity check; flips the sign where only the flipped update passes. Returns the
        rows (and genomes) that passed and are not duplicates of their flipped form."""
        unscreened = [(g, h) for _, g, h in to_screen if h not in self._screened]
        if unscreened:
            results = integrity.check([g for g, _ in unscreened], device=self.device)
            for (_, h), res in zip(unscreened, results):
                self._screened[h] = res
        passed: list[tuple[dict, Genome]] = []
        for row, genome, h in to_screen:
            res = self._screened[h]
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
        return passed

    def _evaluate(self, passed: list[tuple[dict, Genome]]) -> None:
        if not passed:
            return
        new = [(row, g) for row, g in passed if row["genome_hash"] not in self._fits]
        if new:
            for (row, _), result in zip(new, staged_fitness(self.stages, [g for _, g in new])):
                self._fits[row["genome_hash"]] = result
        for row, _ in passed:
            fit, fidelity = self._fits[row["genome_hash"]]
            if isinstance(fit, Exception):
                row.update(status="error", error=error_text(fit))
            elif fit.fitness is None:
                row.update(status="error", error="non-finite loss at every learning rate", evaluations=fit.evaluations)
            else:
                row.update(status="evaluated", fitness=fit.fitness, lr=fit.lr, evaluations=fit.evaluations,
                           fidelity=fidelity)

    # ------------------------------------------------------------------ rows in the database
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

    def _load_slots(self, slots: Sequence[str]) -> bool:
        """Read rows another process stored for `slots`; True once all of them are known."""
        missing = [s for s in slots if s not in self.rows]
        if missing:
            for row in self.store.individuals_by_slots(self.run_id, missing):
                self._remember(row)
        return all(s in self.rows for s in slots)

    def _remember(self, row: dict) -> None:
        self.rows[row["slot"]] = row
        self.by_id[row["id"]] = row
        self._index_hash(row)

    def _index_hash(self, row: dict) -> None:
        if row["status"] in JUDGED_STATUSES and row.get("genome_hash"):
            self.by_hash.setdefault(row["genome_hash"], row["id"])
            if row.get("unflipped_hash"):
                self.by_hash.setdefault(row["unflipped_hash"], row["id"])

    # ------------------------------------------------------------------ claims
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

