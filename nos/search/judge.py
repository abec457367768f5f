"""Judging candidates: a pipeline from a strategy's proposals to stored rows, chunk by chunk.

    proposal --form--> Formed --dedup--> Pending --screen--> Pending (sign fixed) --evaluate--> row --store--> Candidate

Every proposal becomes exactly one `individuals` row, whatever happens to it: `invalid` (the
mutation could not produce a valid child), `error` (sympy or the evaluation failed),
`duplicate` (its canonical hash was judged before in this run), `rejected_integrity` (it failed
the shifted-sphere check at every lr and both signs) or `evaluated` (with its fitness). Each step
is a small function of its inputs; `Judge` holds what they need across chunks (the run's rows by
slot, id and hash, and results cached between a speculative pass and the real one).

Determinism and resume: a proposal's genome comes from `random.Random(f"{seed}:{slot}")` and its
parent only (the strategy makes it). Proposals are judged in fixed chunks, and a chunk's rows are
written in one transaction once judged. Judging a chunk whose slots are already in the database
reads them instead -- so a run killed at any moment and resumed ends with the same rows.

Several processes on one run (`nos.search.claims`, used with a shared PostgreSQL database):
because a chunk's rows are a pure function of the seed and of the rows judged before it,
processes split the chunks through claims. Each first evaluates, speculatively, every chunk it
could claim; then all walk the chunks in order, storing their own once every earlier chunk is in
the database (re-deduplicating against them from cached results, so the lineage is exactly the
single-process one) and reading the others' rows. A slot found already stored is read back instead
of written (`SlotTakenError`), and a claim whose owner stopped beating is taken over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from db.storage import JUDGED_STATUSES, SlotTakenError, Storage
from search_space.genome import Genome
from search_space.symbolic import symbolic

from ..engine import integrity
from ..evaluation.fitness import AdamReference, Fitness, MultiReference
from .claims import Claims
from .objective import FitnessFn
from .records import Proposal

ERROR_CHARS = 500  # error texts stored with a row are cut to this length
Row = dict[str, Any]  # an `individuals` row as it is built and stored


@dataclass
class Progress:
    """Callbacks the command line hooks its progress display into (`nos.ui.progress.Stages`); also a
    `nos.ui.progress.Reporter`, so the funnel and the baselines report through it."""

    planned: Callable[[int], None] = lambda n: None  # more candidates planned
    judged: Callable[[list[dict]], None] = lambda rows: None
    message: Callable[[str], None] = lambda msg: None  # what the current stage is doing now
    # a stage of the run starts, with its own fixed count: (name, total or None, unit)
    stage: Callable[[str, int | None, str], None] = lambda name, total, unit: None
    advance: Callable[..., None] = lambda n=1, **postfix: None  # units of the current stage done
    end: Callable[[], None] = lambda: None  # the current stage is over


@dataclass(frozen=True)
class Stage:
    """One fidelity stage as the judge runs it: where its fitness is computed, the Adam reference
    it is normalised by, and the fraction of each chunk promoted past it (1: the last stage)."""

    fitness_fn: FitnessFn
    reference: AdamReference | MultiReference
    promote: float = 1.0

    def fitness(self, genomes: Sequence[Genome]) -> list[Fitness | Exception]:
        return evaluate_isolating(self.fitness_fn, genomes, self.reference)


@dataclass
class Pending:
    """A candidate past deduplication, still to be screened and evaluated (its row grows)."""

    row: Row
    genome: Genome
    hash: str  # its canonical hash before any sign flip


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
                       reference: AdamReference | MultiReference) -> list[Fitness | Exception]:
    """Fitness of a batch; if the batch raises, each genome alone, so only the culprit fails."""
    try:
        return list(fitness_fn(genomes, reference))
    except Exception:  # noqa: BLE001 -- isolate the culprit(s) below
        out: list[Fitness | Exception] = []
        for g in genomes:
            try:
                out.append(fitness_fn([g], reference)[0])
            except Exception as e:  # noqa: BLE001 -- record any failure of a candidate and go on
                out.append(e)
        return out


def error_text(e: BaseException, prefix: str = "") -> str:
    return f"{prefix}{type(e).__name__}: {e}"[:ERROR_CHARS]


def symbolic_columns(genome: Genome) -> Row:
    """The columns of a genome's symbolic form (sympy): its JSON, expression, LaTeX, canonical hash."""
    sym = symbolic(genome)
    return {"genome": genome.to_json(), "expression": sym.text, "latex": sym.latex, "genome_hash": sym.hash}


# ---------------------------------------------------------------------- the pipeline's steps
def form(proposal: Proposal, run_id: int, parent: Row | None,
         columns: Callable[[Genome], Row] = symbolic_columns) -> tuple[Row, Genome | None]:
    """Step 1: the proposal's row with its symbolic form (`columns`) -- or, for a child the
    mutation could not make or sympy cannot read, its final row (`invalid`, `error`) and no genome."""
    row: Row = {"run_id": run_id, "slot": proposal.slot, **proposal.columns()}
    if proposal.genome is None:  # stored with the parent's genome, so the row says what was mutated
        text = proposal.invalid or "invalid"
        row.update(genome=parent["genome"] if parent else {}, status="invalid", error=text,
                   mutation_kind=text.split(":")[0])
        return row, None
    row["mutation_kind"] = proposal.kind
    try:
        row.update(columns(proposal.genome))
    except Exception as e:  # noqa: BLE001 -- a genome sympy cannot handle is recorded, not fatal
        row.update(genome=proposal.genome.to_json(), status="error", error=error_text(e, "symbolic form: "))
        return row, None
    return row, proposal.genome


def dedup(row: Row, known: dict[str, int], pending: dict[str, Row], genome_hash: str | None = None) -> bool:
    """Step 2: mark the row a duplicate of a candidate judged before in this run (`known`: hash ->
    id) or earlier in this chunk (`pending`: hash -> row, its id not known yet). True: it is new
    (and now pending under that hash)."""
    h = genome_hash or row["genome_hash"]
    if h in known:
        row.update(status="duplicate", duplicate_of=known[h])
        return False
    if h in pending:
        row.update(status="duplicate", dup_slot=pending[h]["slot"])
        return False
    pending[h] = row
    return True


def screen(candidates: Sequence[Pending], results: dict[str, integrity.IntegrityResult],
           known: dict[str, int], pending: dict[str, Row]) -> list[Pending]:
    """Step 3: the integrity check's verdict (`results` by hash). A candidate that passes only
    with its update's sign flipped is flipped (new symbolic form and hash) and deduplicated again.
    Returns those that passed and are new."""
    passed: list[Pending] = []
    for c in candidates:
        res, row = results[c.hash], c.row
        row["sign"] = -1 if res.sign_flipped else 1
        if not res.passed:
            row["status"] = "rejected_integrity"
            row["error"] = f"sphere loss {res.final_loss} >= {integrity.THRESHOLD} at every lr and both signs"
            continue
        genome = c.genome
        if res.sign_flipped:
            genome = res.apply(genome)
            row.update(symbolic_columns(genome))
            row["unflipped_hash"] = c.hash
            if not dedup(row, known, pending):
                continue
        passed.append(Pending(row, genome, c.hash))
    return passed


def record_fitness(row: Row, fit: Fitness | Exception, fidelity: int) -> None:
    """Step 4 (after `staged_fitness`): the row's final status from its fitness."""
    if isinstance(fit, Exception):
        row.update(status="error", error=error_text(fit))
    elif fit.fitness is None:
        row.update(status="error", error="non-finite loss at every learning rate", evaluations=fit.evaluations)
    else:
        row.update(status="evaluated", fitness=fit.fitness, lr=fit.lr, evaluations=fit.evaluations, fidelity=fidelity)


class Judge:
    """Turns proposals into stored rows for one run (see the module docstring)."""

    def __init__(self, storage: Storage, run_id: int, stages: Sequence[Stage], device: torch.device,
                 progress: Progress, claims: Claims | None = None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.stages = list(stages)
        self.device = device
        self.progress = progress
        self.claims = claims
        # results by slot / hash, so a chunk computed speculatively is not computed twice
        self._symbolic: dict[str, Row | Exception] = {}
        self._screened: dict[str, integrity.IntegrityResult] = {}
        self._fits: dict[str, tuple[Fitness | Exception, int]] = {}
        self.rows: dict[str, Row] = {}
        self.by_id: dict[int, Row] = {}
        self.by_hash: dict[str, int] = {}
        for r in sorted(storage.individuals(run_id), key=lambda r: r["id"]):
            self._remember(r)

    # ------------------------------------------------------------------ judging chunks
    def judge_chunks(self, chunks: Sequence[Sequence[Proposal]]) -> None:
        """Judge consecutive chunks; with claims, split them with the other processes.

        Alone: each chunk in turn. Cooperating: first evaluate every chunk this process can claim
        (speculatively: earlier chunks may still be unknown), then walk the chunks in order --
        store our own once all earlier ones are known (deduplication redone, evaluations taken
        from the cache), read the others' from the database.
        """
        if self.claims is not None:
            for planned in chunks:
                todo = self._todo(planned)
                if todo and self.claims.claim(_chunk_key(planned)):
                    self.compute(todo)
        for planned in chunks:
            self._judge_one(planned)

    def _todo(self, planned: Sequence[Proposal]) -> list[Proposal]:
        return [p for p in planned if p.slot not in self.rows]

    def _judge_one(self, planned: Sequence[Proposal]) -> None:
        todo = self._todo(planned)
        if todo and self.claims is not None:
            slots = [p.slot for p in todo]
            if self.claims.claim_or_wait(_chunk_key(planned), lambda: self._load_slots(slots)):
                self._load_slots(slots)  # a dead owner may have stored part of it
                todo = self._todo(planned)
            else:
                todo = []
        if todo:
            rows = self.compute(todo)
            # Duplicates of a candidate judged in this same chunk need its id: store them second.
            # (If killed in between, resume regenerates them and finds the original in the database.)
            first = [r for r in rows if "dup_slot" not in r]
            later = [r for r in rows if "dup_slot" in r]
            self._store(first)
            for row in later:
                row["duplicate_of"] = self.rows[row.pop("dup_slot")]["id"]
            self._store(later)
            for p in todo:
                self._symbolic.pop(p.slot, None)
            if self.claims is None:  # alone, nothing is computed twice: keep no cache
                self._screened.clear()
                self._fits.clear()
        self.progress.judged([self.rows[p.slot] for p in planned])

    def compute(self, todo: Sequence[Proposal]) -> list[Row]:
        """The rows of `todo` given what this process knows now (nothing is stored): the pipeline
        form -> dedup -> screen -> evaluate over one chunk."""
        rows: list[Row] = []
        pending: dict[str, Row] = {}
        fresh: list[Pending] = []
        for proposal in todo:
            parent = self.by_id.get(proposal.parent_id) if proposal.parent_id is not None else None
            row, genome = form(proposal, self.run_id, parent, self._columns_of(proposal.slot))
            rows.append(row)
            if genome is not None and dedup(row, self.by_hash, pending):
                fresh.append(Pending(row, genome, row["genome_hash"]))
        unscreened = list({c.hash: c.genome for c in fresh if c.hash not in self._screened}.items())
        if unscreened:
            for (h, _), res in zip(unscreened, integrity.check([g for _, g in unscreened], device=self.device)):
                self._screened[h] = res
        passed = screen(fresh, self._screened, self.by_hash, pending)
        new = [c for c in passed if c.row["genome_hash"] not in self._fits]
        for c, result in zip(new, staged_fitness(self.stages, [c.genome for c in new])):
            self._fits[c.row["genome_hash"]] = result
        for c in passed:
            record_fitness(c.row, *self._fits[c.row["genome_hash"]])
        return rows

    def _columns_of(self, slot: str) -> Callable[[Genome], Row]:
        """`symbolic_columns`, kept by slot until the slot is stored (sympy is the slow part)."""
        def columns(genome: Genome) -> Row:
            if slot not in self._symbolic:
                try:
                    self._symbolic[slot] = symbolic_columns(genome)
                except Exception as e:  # noqa: BLE001 -- raised again below, recorded by `form`
                    self._symbolic[slot] = e
            sym = self._symbolic[slot]
            if isinstance(sym, Exception):
                raise sym
            return sym

        return columns

    # ------------------------------------------------------------------ rows in the database
    def _store(self, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            ids = self.storage.add_individuals(rows)
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
            for row in self.storage.individuals_by_slots(self.run_id, missing):
                self._remember(row)
        return all(s in self.rows for s in slots)

    def _remember(self, row: Row) -> None:
        self.rows[row["slot"]] = row
        self.by_id[row["id"]] = row
        if row["status"] in JUDGED_STATUSES and row.get("genome_hash"):
            self.by_hash.setdefault(row["genome_hash"], row["id"])
            if row.get("unflipped_hash"):
                self.by_hash.setdefault(row["unflipped_hash"], row["id"])


def _chunk_key(planned: Sequence[Proposal]) -> str:
    return f"chunk:{planned[0].slot}"
