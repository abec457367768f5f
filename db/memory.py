"""`MemoryStorage`: the `db.storage.Storage` interface held in the process, for unit tests.

It answers as the SQL store does on an SQLite file (`db.store.Store`, the reference): the same
ids (1, 2, ... per table), rows with the same keys and value types, the same order, the same
refusals with the same one-line StoreError (its database named ``memory://``). Incoming rows
are checked by `db.rows`, as the SQL store checks them; values are stored with SQLite's rules
(`db.memory_tables`). Every method holds one lock, so a heartbeat thread may call `heartbeat`
while another thread writes; a failing method leaves nothing of its call behind. Nothing is
kept when the process ends; `close` keeps the data (as closing a Store keeps the file).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

from db.errors import FINAL_RUN_STATUSES, JUDGED_STATUSES, SlotTakenError, StoreError
from db.memory_tables import DIALECT, Failed, Integrity, Table, Undo, bind, read
from db.models import (
    BASELINE_KEY,
    INDIVIDUAL_STATUSES,
    RUN_STATUSES,
    Baseline,
    Claim,
    Evaluation,
    Individual,
    Run,
    StoredValueError,
    TimestepStat,
    utcnow,
)
from db.rows import (
    baseline_index_key,
    baseline_key,
    baseline_values,
    check_choice,
    cut,
    digits_id,
    evaluation_values,
    fits_id,
    individual_values,
    one_line,
    run_lookup,
    timestep_values,
    top_limit,
)
from db.storage import Storage

SLOT = ("run_id", "slot")


class MemoryStorage(Storage):
    """Runs, individuals, evaluations, baselines, timestep stats and claims in memory."""

    def __init__(self) -> None:
        self.url = "memory://"
        self.readonly = False
        self._label = self.url
        self._lock = threading.RLock()
        tables: dict[str, Table] = {}
        self._runs = tables["runs"] = Table(Run, tables)
        self._inds = tables["individuals"] = Table(Individual, tables)
        self._evals = tables["evaluations"] = Table(Evaluation, tables)
        self._bases = tables["baselines"] = Table(Baseline, tables, ("uq_baselines_key", baseline_index_key))
        self._stats = tables["timestep_stats"] = Table(TimestepStat, tables)
        self._claims = tables["claims"] = Table(Claim, tables)

    def __repr__(self) -> str:
        return "MemoryStorage()"

    def close(self) -> None:
        """Nothing to release."""

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[Undo]:
        """One transaction: under the lock, undone on any exception, failures told as the SQL
        store tells them (`db.sql_engine.SQLBase._retry`)."""
        with self._lock:
            undo: Undo = []
            try:
                yield undo
            except BaseException as exc:
                for step in reversed(undo):
                    step()
                if isinstance(exc, Failed):
                    raise StoreError(f"{self._label}: {what} failed: {one_line(exc)}") from exc
                if isinstance(exc, StoredValueError):
                    raise StoreError(f"{self._label}: {what}: damaged stored value: {exc}") from exc
                if isinstance(exc, (ValueError, OverflowError, RecursionError)):
                    raise StoreError(
                        f"{self._label}: {what}: unreadable stored value ({cut(str(exc) or type(exc).__name__)})"
                    ) from exc
                raise

    # ------------------------------------------------------------------ runs

    def create_run(self, name: str, config: dict, seed: int) -> int:
        with self._tx("create_run") as undo:
            if self._runs.by_unique(("name",), name=name) is not None:
                raise StoreError(f"a run named {name!r} already exists in {self._label}")
            values = {"name": name, "config": config, "seed": seed, "status": "running",
                      "started_at": utcnow()}
            (run_id,) = self._runs.insert([values], undo, nulls=False)
            assert run_id is not None
            return run_id

    def _find_run(self, name_or_id: str | int) -> dict[str, Any] | None:
        name, run_id = run_lookup(name_or_id)
        if name is None:
            return None if run_id is None else self._runs.get(run_id)
        run = self._runs.by_unique(("name",), name=name)
        if run is None and (run_id := digits_id(name)) is not None:
            run = self._runs.get(run_id)
        return run

    def get_run(self, name_or_id: str | int) -> dict | None:
        with self._tx("get_run"):
            run = self._find_run(name_or_id)
            return None if run is None else self._runs.out(run)

    def list_runs(self) -> list[dict]:
        with self._tx("list_runs"):
            counts: dict[int, list[Any]] = {}  # run id -> [individuals, evaluated, best fitness]
            for ind in self._inds.rows.values():
                c = counts.setdefault(ind["run_id"], [0, 0, None])
                c[0] += 1
                if ind["status"] == "evaluated":
                    c[1] += 1
                    if ind["fidelity"] == 1 and ind["fitness"] is not None:
                        c[2] = ind["fitness"] if c[2] is None else min(c[2], ind["fitness"])
            return [
                {**self._runs.out(run), "n_individuals": n, "n_evaluated": n_eval, "best_fitness": best}
                for run in self._runs.find()
                for n, n_eval, best in [counts.get(run["id"], [0, 0, None])]
            ]

    def set_run_status(self, run_id: int, status: str) -> None:
        check_choice("run status", status, RUN_STATUSES)
        with self._tx("set_run_status") as undo:
            run = self._runs.get(run_id)
            if run is None:
                raise StoreError(f"no run with id {run_id} in {self._label}")
            finished = utcnow() if status in FINAL_RUN_STATUSES else None
            self._runs.update([run], {"status": status, "finished_at": finished}, undo)

    # ------------------------------------------------------------------ individuals

    def add_individuals(self, rows: list[dict]) -> list[int]:
        prepared = [individual_values(r, f"individual row {i}") for i, r in enumerate(rows)]
        try:
            with self._tx("add_individuals") as undo:
                return self._add_individuals(prepared, undo)
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, Integrity) and "individuals.run_id, individuals.slot" in str(cause):
                raise SlotTakenError(
                    f"{self._label}: add_individuals: a slot of this batch is already stored "
                    f"({one_line(cause)})"
                ) from cause
            raise

    def _add_individuals(self, prepared: list[tuple[dict, str | None, list[dict]]], undo: Undo) -> list[int]:
        """As the SQL store does it: rows go in batches, split where a row's parent (by
        slot) is a row of the batch not inserted yet."""
        ids: list[int] = []
        by_slot: dict[tuple[Any, Any], int] = {}  # ids of this batch's rows, once inserted
        pending: list[dict] = []
        pending_slots: set[tuple[Any, Any]] = set()

        def insert_pending() -> None:
            new = [i for i in self._inds.insert(pending, undo) if i is not None]
            by_slot.update(((self._inds.rows[i]["run_id"], self._inds.rows[i]["slot"]), i) for i in new)
            # matched back by the stored (run_id, slot), as the SQL store does: a KeyError for a
            # slot SQLite stored as other text (an int slot), as there
            ids.extend(by_slot[(v["run_id"], v["slot"])] for v in pending)
            pending.clear()
            pending_slots.clear()

        for i, (values, parent_slot, _) in enumerate(prepared):
            if parent_slot is not None:
                key = (values["run_id"], parent_slot)
                if key in pending_slots:
                    insert_pending()
                parent = self._inds.by_unique(SLOT, run_id=key[0], slot=key[1])
                parent_id = by_slot.get(key) or (None if parent is None else parent["id"])
                if parent_id is None:
                    raise StoreError(
                        f"individual row {i}: no parent with slot {parent_slot!r} in run {key[0]}"
                    )
                values = {**values, "parent_id": parent_id}
            pending.append(values)
            pending_slots.add((values["run_id"], values["slot"]))
        if pending:
            insert_pending()
        evaluations = [{**e, "individual_id": ind_id}
                       for ind_id, (_, _, evals) in zip(ids, prepared) for e in evals]
        if evaluations:
            self._evals.insert(evaluations, undo)
        return ids

    def add_evaluations(self, by_individual: dict[int, list[dict]]) -> int:
        values = evaluation_values(by_individual)
        if not values:
            return 0
        with self._tx("add_evaluations") as undo:
            self._evals.insert(values, undo)
            return len(values)

    def individuals(self, run_id: int) -> list[dict]:
        if not fits_id(run_id):
            return []
        with self._tx("individuals"):
            return [self._inds.out(r) for r in self._inds.find(run_id=run_id)]

    def individual_by_slot(self, run_id: int, slot: str) -> dict | None:
        with self._tx("individual_by_slot"):
            ind = self._inds.by_unique(SLOT, run_id=run_id, slot=slot)
            return None if ind is None else self._inds.out(ind)

    def individuals_by_slots(self, run_id: int, slots: list[str]) -> list[dict]:
        if not slots:
            return []
        with self._tx("individuals_by_slots"):
            wanted = {bind(self._inds.column["slot"], s) for s in slots if s is not None}
            return [self._inds.out(r) for r in self._inds.find(run_id=run_id) if r["slot"] in wanted]

    def heldout_evaluations(self, run_id: int, task: str) -> list[tuple[int, dict]]:
        with self._tx("heldout_evaluations"):
            of_run = {r["id"] for r in self._inds.find(run_id=run_id)}
            return [(e["individual_id"], self._evals.out(e)) for e in self._evals.find(task=task)
                    if e["individual_id"] in of_run and e["split"] not in (None, "search")]

    def heldout_counts(self) -> dict[int, int]:
        with self._tx("heldout_counts"):
            judged: dict[int, set[int]] = {}
            for e in self._evals.rows.values():
                ind = self._inds.rows.get(e["individual_id"])
                if ind is not None and e["split"] not in (None, "search"):
                    judged.setdefault(ind["run_id"], set()).add(ind["id"])
            return {int(r): len(judged[r]) for r in sorted(judged)}

    def get_individual(self, ind_id: int) -> dict | None:
        if not fits_id(ind_id):
            return None
        with self._tx("get_individual"):
            ind = self._inds.get(ind_id)
            if ind is None:
                return None
            run = self._runs.get(ind["run_id"])
            return {
                **self._inds.out(ind),
                "run_name": read("runs", self._runs.column["name"], None if run is None else run["name"]),
                "evaluations": [self._evals.out(e) for e in self._evals.find(individual_id=ind["id"])],
            }

    def lineage(self, ind_id: int) -> list[dict]:
        if not fits_id(ind_id):
            return []
        with self._tx("lineage"):
            chain: list[dict] = []
            seen: set[int] = set()
            ind = self._inds.get(ind_id)
            while ind is not None and ind["id"] not in seen:  # `seen` guards cycles
                seen.add(ind["id"])
                chain.append(self._inds.out(ind))
                ind = None if ind["parent_id"] is None else self._inds.get(ind["parent_id"])
            return chain

    def top(self, run_id: int, n: int = 10) -> list[dict]:
        if not fits_id(run_id):
            return []
        n = top_limit(n)
        with self._tx("top"):
            found = [r for r in self._inds.find(run_id=run_id)
                     if r["status"] == "evaluated" and r["fitness"] is not None]
            found.sort(key=lambda r: (-r["fidelity"], r["fitness"], r["id"]))
            return [self._inds.out(r) for r in found[:n]]

    def find_hash(self, run_id: int, genome_hash: str) -> dict | None:
        with self._tx("find_hash"):
            for r in self._inds.find(run_id=run_id, genome_hash=genome_hash):
                if r["status"] in JUDGED_STATUSES:
                    return self._inds.out(r)
            return None

    def status_counts(self, run_id: int) -> dict[str, int]:
        with self._tx("status_counts"):
            counts = dict.fromkeys(INDIVIDUAL_STATUSES, 0)
            for r in self._inds.find(run_id=run_id):
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            return counts

    # ------------------------------------------------------------------ baselines / stats

    def add_baselines(self, rows: list[dict]) -> list[int]:
        values = baseline_values(rows)
        if not values:
            return []
        with self._tx("add_baselines") as undo:
            ids: dict[int, int] = {}
            keyed: list[int] = []
            # runs of keyed / unkeyed rows in order, so new rows get ids in the order given
            for has_key, run in itertools.groupby(range(len(values)), lambda i: values[i]["protocol"] is not None):
                batch = list(run)
                got = self._bases.insert([values[i] for i in batch], undo, skip_conflicts=has_key)
                if has_key:
                    keyed += batch
                else:
                    ids.update((i, row_id) for i, row_id in zip(batch, got) if row_id is not None)
            if keyed:  # the id of each key, whoever stored it
                protocols = {bind(self._bases.column["protocol"], p)
                             for p in sorted({values[i]["protocol"] for i in keyed})}
                stored: dict[tuple, int] = {}
                for r in self._bases.find():
                    if r["protocol"] in protocols:
                        stored.setdefault(tuple(r[c] for c in BASELINE_KEY), r["id"])
                for i in keyed:
                    key = baseline_key(values[i], DIALECT)
                    if key not in stored:
                        raise StoreError(f"baseline row {i}: stored, but not found again by its key")
                    ids[i] = stored[key]
            return [ids[i] for i in range(len(values))]

    def baselines(self, run_id: int | None = None, task: str | None = None,
                  protocol: str | None = None, task_key: str | None = None) -> list[dict]:
        where = {k: v for k, v in (("task_key", task_key), ("run_id", run_id), ("task", task),
                                   ("protocol", protocol)) if v is not None}
        with self._tx("baselines"):
            return [self._bases.out(r) for r in self._bases.find(**where)]

    def put_timestep_stats(self, run_id: int, row: dict) -> None:
        values = timestep_values(run_id, row)
        with self._tx("put_timestep_stats") as undo:
            where = {"run_id": run_id, "timestep": values["timestep"]}
            if not self._stats.find(**where):
                try:  # the SQL store's insert, then update if that fails
                    self._stats.insert([values], undo, nulls=False)
                    return
                except Integrity:
                    pass
            self._stats.update(self._stats.find(**where), values, undo)

    def timestep_stats(self, run_id: int) -> list[dict]:
        with self._tx("timestep_stats"):
            found = sorted(self._stats.find(run_id=run_id), key=lambda r: r["timestep"])
            return [self._stats.out(r) for r in found]

    # ------------------------------------------------------------------ claims

    def claim(self, run_id: int, key: str, owner: str) -> bool:
        with self._tx("claim") as undo:
            try:
                self._claims.insert([{"run_id": run_id, "key": key, "owner": owner, "heartbeat": 0,
                                      "claimed_at": utcnow()}], undo, nulls=False)
                return True
            except Integrity:
                found = self._claims.find(run_id=run_id, key=key)
                return (found[0]["owner"] if found else None) == owner

    def claim_state(self, run_id: int, key: str) -> tuple[str, int] | None:
        with self._tx("claim_state"):
            found = self._claims.find(run_id=run_id, key=key)
            if not found:
                return None
            out = self._claims.out(found[0])
            return out["owner"], out["heartbeat"]

    def take_over(self, run_id: int, key: str, owner: str, seen: tuple[str, int]) -> bool:
        stale_owner, stale_beat = seen[0], seen[1]
        taken = {"owner": owner, "heartbeat": 0, "claimed_at": utcnow()}
        with self._tx("take_over") as undo:
            found = self._claims.find(run_id=run_id, key=key, owner=stale_owner, heartbeat=stale_beat)
            if self._claims.update(found, taken, undo) != 1:
                return False
            self._claims.update(self._claims.find(run_id=run_id, owner=stale_owner), taken, undo)
            return True

    def heartbeat(self, run_id: int, owner: str) -> None:
        with self._tx("heartbeat") as undo:
            for r in self._claims.find(run_id=run_id, owner=owner):
                self._claims.update([r], {"heartbeat": r["heartbeat"] + 1}, undo)
