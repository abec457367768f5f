"""The storage contract (`db.storage.Storage`): the SQL store on an SQLite file and the in-memory
storage behave the same. Each behaviour runs against both backends; where the contract says
results are equal, the two are compared, the SQL store being the reference (timestamps are
checked to be aware UTC datetimes, then left out; the database's name in messages likewise).
"""

from __future__ import annotations

import inspect
import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.memory import MemoryStorage
from db.storage import Storage
from db.store import SlotTakenError, Store, StoreError

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"particles": 2, "lr_grid": [1e-3, 1e-2], "nested": {"b": 1, "a": [1, 2]}}


def evaluation(loss: float | None = 0.5, **values: Any) -> dict:
    row = {"task": "sine", "horizon": 1.0, "lr": 1e-3, "seed": 0, "loss": loss, "steps": 100,
           "seconds": 0.25}
    return {**row, **values}


def individual(run_id: int, slot: str, **values: Any) -> dict:
    row = {"run_id": run_id, "slot": slot, "genome": {"op": "sign", "args": ["g"]},
           "expression": "sign(g)", "genome_hash": slot, "status": "evaluated", "fitness": 1.0}
    return {**row, **values}


def baseline(**values: Any) -> dict:
    row = {"run_id": None, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 0, "loss": 0.2,
           "hparam": 1e-3, "budget": 100, "split": "validation", "protocol": "validation:abc"}
    return {**row, **values}


def open_backend(kind: str, tmp_path: Path) -> Storage:
    return Store(str(tmp_path / f"{kind}.sqlite")) if kind == "sqlite" else MemoryStorage()


@pytest.fixture(params=["sqlite", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    with open_backend(request.param, tmp_path) as s:
        yield s


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[Storage, Storage]]:
    """(reference SQL store, memory storage)."""
    with open_backend("sqlite", tmp_path) as sql, MemoryStorage() as memory:
        yield sql, memory


def label(s: Storage) -> str:
    return str(s._label)  # type: ignore[attr-defined]  # how its error messages name it


def plain(value: Any, name: str) -> Any:
    """``value`` with timestamps (checked: aware UTC) and the database's name left out."""
    if isinstance(value, datetime):
        assert value.tzinfo is not None and value.utcoffset() == timezone.utc.utcoffset(None)
        return "<time>"
    if isinstance(value, str):
        return value.replace(name, "<db>")
    if isinstance(value, dict):
        return {k: plain(v, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, name) for v in value)
    return value


def outcome(s: Storage, fn: Callable[[Storage], Any]) -> Any:
    """What ``fn(s)`` returns, or the exception it raises, comparable across backends."""
    try:
        return ("ok", plain(fn(s), label(s)))
    except StoreError as exc:
        return (type(exc).__name__, plain(str(exc), label(s)))


def same(both: tuple[Storage, Storage], fn: Callable[[Storage], Any]) -> Any:
    """Run ``fn`` on both backends; they must agree. The (plain) result."""
    sql, memory = (outcome(s, fn) for s in both)
    assert memory == sql
    return sql


def dump(s: Storage) -> dict:
    """Everything a reader can see, through every read method."""
    out: dict[str, Any] = {"runs": s.list_runs(), "baselines": s.baselines(),
                           "heldout_counts": s.heldout_counts()}
    for run in out["runs"]:
        rid = run["id"]
        inds = s.individuals(rid)
        out[f"run {rid}"] = {
            "get_run": [s.get_run(rid), s.get_run(run["name"]), s.get_run(str(rid))],
            "individuals": [s.get_individual(i["id"]) for i in inds],
            "lineages": [[x["id"] for x in s.lineage(i["id"])] for i in inds],
            "by_slot": [s.individual_by_slot(rid, i["slot"]) for i in inds[:3]],
            "by_slots": s.individuals_by_slots(rid, [i["slot"] for i in inds[::2]] + ["nope"]),
            "top": [s.top(rid), s.top(rid, 2), s.top(rid, 0)],
            "hashes": [s.find_hash(rid, h) for h in ("h0", "h1", "h2", "nope")],
            "status_counts": s.status_counts(rid),
            "stats": s.timestep_stats(rid),
            "heldout": [s.heldout_evaluations(rid, t) for t in ("sine", "quad")],
            "claims": [s.claim_state(rid, k) for k in ("k0", "k1", "k2", "k3")],
        }
    return out


# ---------------------------------------------------------------------- the interface


def test_every_abstract_method_is_implemented_alike() -> None:
    abstract = Storage.__abstractmethods__
    assert {"create_run", "add_individuals", "claim", "take_over", "heartbeat", "close"} <= abstract
    for cls in (Store, MemoryStorage):
        assert not cls.__abstractmethods__, cls
        for name in abstract:
            want = inspect.signature(getattr(Storage, name))
            assert inspect.signature(getattr(cls, name)).parameters.keys() == want.parameters.keys(), (cls, name)
    public = {n for n in dir(Store) if not n.startswith("_") and callable(getattr(Store, n))}
    assert public - abstract == {"session"}  # the SQL store's only extra: ad-hoc ORM queries


def test_no_db_module_is_over_400_lines() -> None:
    for path in sorted((REPO / "db").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, (path, lines)


def test_url_readonly_and_context_manager(storage: Storage) -> None:
    assert isinstance(storage.url, str) and storage.readonly is False
    with storage as entered:
        assert entered is storage


# ---------------------------------------------------------------------- runs


def test_runs(storage: Storage) -> None:
    a = storage.create_run("alpha", CONFIG, seed=1)
    b = storage.create_run("beta", {"z": 1}, seed=np.int64(2))  # type: ignore[arg-type]
    assert (a, b) == (1, 2)
    with pytest.raises(StoreError, match="a run named 'alpha' already exists"):
        storage.create_run("alpha", {}, seed=3)
    run = storage.get_run("alpha")
    assert run is not None and run["id"] == a and run["config"] == CONFIG and run["seed"] == 1
    assert run["status"] == "running" and run["finished_at"] is None
    assert storage.get_run(b)["name"] == "beta" and storage.get_run(str(b))["name"] == "beta"  # type: ignore[index]
    assert storage.get_run("nope") is None and storage.get_run(99) is None and storage.get_run(2**70) is None
    storage.add_individuals([individual(a, "0", fitness=0.3), individual(a, "1", fitness=0.1),
                             individual(a, "2", fitness=0.05, fidelity=0),
                             individual(a, "3", status="invalid", fitness=None)])
    listed = storage.list_runs()
    assert [(r["name"], r["n_individuals"], r["n_evaluated"], r["best_fitness"]) for r in listed] == [
        ("alpha", 4, 3, 0.1), ("beta", 0, 0, None)]
    storage.set_run_status(a, "finished")
    done = storage.get_run(a)
    assert done is not None and done["status"] == "finished" and done["finished_at"] >= done["started_at"]
    storage.set_run_status(a, "running")
    assert storage.get_run(a)["finished_at"] is None  # type: ignore[index]
    with pytest.raises(StoreError, match="unknown run status 'exploded'"):
        storage.set_run_status(a, "exploded")
    with pytest.raises(StoreError, match="no run with id 999 in "):
        storage.set_run_status(999, "failed")


def test_runs_alike(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: s.create_run("7", CONFIG, seed=7))
    same(both, lambda s: s.create_run("r2", {}, seed=0))
    same(both, lambda s: [s.get_run("7"), s.get_run("2"), s.get_run(7), s.get_run(True), s.get_run("\udcff")])
    same(both, lambda s: s.set_run_status(2, "interrupted"))
    same(both, dump)


# ---------------------------------------------------------------------- individuals


def test_individuals_lineage_and_duplicates(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: s.create_run("r", CONFIG, seed=0))
    same(both, lambda s: s.add_individuals([
        individual(1, "init:0", evaluations=[evaluation(0.5), evaluation(0.7, horizon=2.0)]),
        individual(1, "init:1", particle=np.int64(1), lr=np.float64(3e-3), genome='{"b": 1, "a": [2]}'),
        individual(1, "p0:t1", timestep=1, parent_slot="init:0", mutation_kind="swap"),
        individual(1, "p0:t2", timestep=2, parent_slot="p0:t1", fitness=float("nan")),
        individual(1, "p0:t2b", status="duplicate", duplicate_of=3, parent_id=2, genome_hash="p0:t1"),
    ]))
    same(both, lambda s: s.add_individuals([individual(1, "p0:t3", parent_slot="p0:t2")]))
    result = same(both, lambda s: [s.lineage(6), s.lineage(5), s.lineage(424242), s.get_individual(5)])
    assert [i["id"] for i in result[1][0]] == [6, 4, 3, 1]
    assert result[1][3]["duplicate_of"] == 3 and result[1][3]["run_name"] == "r"
    same(both, lambda s: s.add_individuals([individual(1, "x", parent_slot="init:404")]))
    same(both, dump)


def test_slot_taken_writes_nothing(storage: Storage) -> None:
    rid = storage.create_run("r", {}, seed=0)
    (first,) = storage.add_individuals([individual(rid, "init:0")])
    before = storage.individuals(rid)
    for batch in ([individual(rid, "init:1", evaluations=[evaluation()]), individual(rid, "init:0")],
                  [individual(rid, "init:2"), individual(rid, "init:3", parent_slot="init:2"),
                   individual(rid, "init:2")]):
        with pytest.raises(SlotTakenError, match="a slot of this batch is already stored"):
            storage.add_individuals(batch)
        assert storage.individuals(rid) == before
    assert storage.get_individual(first)["evaluations"] == []  # type: ignore[index]
    assert storage.add_individuals([individual(rid, "init:1")]) == [first + 1]  # no id was used up
    other = storage.create_run("r2", {}, seed=0)
    storage.add_individuals([individual(other, "init:0")])  # slots are per run


def test_evaluations_and_heldout(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: [s.create_run("a", {}, seed=0), s.create_run("b", {}, seed=0)])
    same(both, lambda s: s.add_individuals([individual(1, f"{i}") for i in range(3)]
                                           + [individual(2, "0")]))
    same(both, lambda s: s.add_evaluations({}))
    same(both, lambda s: s.add_evaluations({
        1: [evaluation(split="validation"), evaluation(split="test", task="quad")],
        2: [evaluation(), evaluation(split="test", loss=float("inf"), task_key="sine@1")],
        4: [evaluation(split="validation")],
    }))
    result = same(both, lambda s: [s.heldout_evaluations(1, "sine"), s.heldout_counts(), s.get_individual(2)])
    assert [ind for ind, _ in result[1][0]] == [1, 2] and result[1][1] == {1: 2, 2: 1}
    same(both, lambda s: s.add_evaluations({3: [evaluation()], 99: [evaluation()]}))  # FK: nothing
    same(both, dump)


def test_top_find_hash_status_counts(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: [s.create_run("a", {}, seed=0), s.create_run("b", {}, seed=0)])
    same(both, lambda s: s.add_individuals([individual(2, "x", genome_hash="h1")]))
    same(both, lambda s: s.add_individuals([
        individual(1, "a", fitness=0.5, genome_hash="h0"),
        individual(1, "b", fitness=0.1, genome_hash="h1", status="duplicate"),
        individual(1, "c", fitness=0.5, genome_hash="h1", status="rejected_integrity"),
        individual(1, "d", fitness=0.01, genome_hash="h1"),
        individual(1, "e", fitness=0.001, fidelity=0),
        individual(1, "f", fitness=None),
        individual(1, "g", fitness=float("inf"), status="error", error="boom"),
        individual(1, "h", fitness=0.5),
    ]))
    limits: list[Any] = [10, 2, 0, -1, "3"]  # a digit string too, as int() takes it
    result = same(both, lambda s: [[i["id"] for i in s.top(1, n)] for n in limits])
    assert result[1] == [[5, 2, 9, 6], [5, 2], [], [], [5, 2, 9]]
    result = same(both, lambda s: [s.find_hash(1, "h1"), s.find_hash(1, "nope"), s.status_counts(1),
                                   s.status_counts(3), s.top(2**70), s.individuals(0)])
    assert result[1][0]["id"] == 4 and result[1][2]["duplicate"] == 1 and sum(result[1][3].values()) == 0


def test_returned_rows_are_copies(storage: Storage) -> None:
    rid = storage.create_run("r", CONFIG, seed=0)
    (iid,) = storage.add_individuals([individual(rid, "a", evaluations=[evaluation()])])
    run, ind = storage.get_run(rid), storage.get_individual(iid)
    assert run is not None and ind is not None
    run["config"]["nested"]["a"].append(3)
    ind["genome"]["args"].append("m")
    ind["evaluations"][0]["loss"] = 9.0
    storage.individuals(rid)[0]["genome"].clear()
    assert storage.get_run(rid)["config"] == CONFIG  # type: ignore[index]
    again = storage.get_individual(iid)
    assert again is not None and again["genome"] == {"op": "sign", "args": ["g"]}
    assert again["evaluations"][0]["loss"] == 0.5


# ---------------------------------------------------------------------- baselines / stats


def test_baselines_idempotent_and_filters(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: s.create_run("r", {}, seed=0))
    rows = [baseline(), baseline(hparam=None, method="before"), baseline(run_id=1, protocol=None),
            baseline(), baseline(seed=1, task_key="sine@x"), baseline(run_id=1, protocol=None)]
    result = same(both, call("add_baselines", rows))
    assert result[1] == [1, 2, 3, 1, 4, 5]
    result = same(both, lambda s: s.add_baselines([baseline(hparam=None, method="before"), baseline(split="test")]))
    assert result[1] == [2, 6]
    same(both, lambda s: s.add_baselines([]))
    same(both, lambda s: [s.baselines(run_id=1), s.baselines(task="sine"), s.baselines(protocol="validation:abc"),
                          s.baselines(task_key="sine@x"), s.baselines(task="nope"), s.baselines()])
    same(both, lambda s: s.add_baselines([baseline(hparam=-1.0, method="before")]))  # -1 is NULL's key
    same(both, lambda s: s.add_baselines([baseline(lr=1.0)]))
    same(both, lambda s: s.add_baselines([baseline(protocol="p2"), baseline(run_id=77, protocol="p2")]))


def test_timestep_stats(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: s.create_run("r", {}, seed=0))
    same(both, lambda s: s.put_timestep_stats(1, {"timestep": 1, "candidates": 10, "passed": 4,
                                                  "best_fitness": 0.3, "median_fitness": 0.6}))
    same(both, lambda s: s.put_timestep_stats(1, {"timestep": 0, "candidates": 8, "passed": 8, "id": 5}))
    same(both, lambda s: s.put_timestep_stats(1, {"timestep": 1, "candidates": 12, "passed": 5,
                                                  "duplicates": 2, "best_fitness": float("nan")}))
    result = same(both, lambda s: s.timestep_stats(1))
    assert [(t["timestep"], t["candidates"], t["median_fitness"]) for t in result[1]] == [(0, 8, None), (1, 12, 0.6)]
    same(both, lambda s: s.put_timestep_stats(1, {"candidates": 1}))
    same(both, lambda s: s.put_timestep_stats(1, {"timestep": 1, "candidates": None}))
    same(both, lambda s: s.put_timestep_stats(1, {"timestep": 2, "candidates": None}))  # default 0
    same(both, lambda s: s.put_timestep_stats(99, {"timestep": 2}))  # no such run: nothing stored
    same(both, lambda s: [s.timestep_stats(1), s.timestep_stats(99)])


# ---------------------------------------------------------------------- claims


def test_claims_take_over_and_heartbeat(both: tuple[Storage, Storage]) -> None:
    same(both, lambda s: [s.create_run("a", {}, seed=0), s.create_run("b", {}, seed=0)])
    result = same(both, lambda s: [s.claim(1, "k0", "dead"), s.claim(1, "k0", "dead"), s.claim(1, "k0", "me"),
                                   s.claim(1, "k1", "dead"), s.claim(2, "k0", "dead"), s.claim(1, "k2", "me"),
                                   s.claim(99, "k0", "me")])
    assert result[1] == [True, True, False, True, True, True, False]
    same(both, lambda s: [s.heartbeat(1, "dead"), s.heartbeat(1, "dead"), s.heartbeat(1, "nobody")])
    result = same(both, lambda s: [s.claim_state(1, "k0"), s.claim_state(1, "k1"), s.claim_state(2, "k0"),
                                   s.claim_state(1, "nope")])
    assert result[1] == [("dead", 2), ("dead", 2), ("dead", 0), None]
    result = same(both, lambda s: [s.take_over(1, "k0", "me", ("dead", 1)), s.take_over(1, "k0", "me", ("x", 2)),
                                   s.take_over(1, "k0", "me", ("dead", 2)), s.take_over(1, "k1", "me", ("dead", 2))])
    assert result[1] == [False, False, True, False]  # k1 came along with k0
    result = same(both, lambda s: [s.claim_state(1, k) for k in ("k0", "k1", "k2")] + [s.claim_state(2, "k0")])
    assert result[1] == [("me", 0), ("me", 0), ("me", 0), ("dead", 0)]
    same(both, lambda s: s.take_over(1, "k0", None, ("me", 0)))  # type: ignore[arg-type]


def test_heartbeat_thread_while_writing() -> None:
    storage = MemoryStorage()
    rid = storage.create_run("r", {}, seed=0)
    assert storage.claim(rid, "k", "me")
    beats, errors = 200, []

    def beat() -> None:
        try:
            for _ in range(beats):
                storage.heartbeat(rid, "me")
        except BaseException as exc:  # surfaced below, in the test thread
            errors.append(exc)

    thread = threading.Thread(target=beat)
    thread.start()
    for b in range(50):
        storage.add_individuals([individual(rid, f"{b}:{i}", evaluations=[evaluation()]) for i in range(4)])
    thread.join()
    assert errors == [] and storage.claim_state(rid, "k") == ("me", beats)
    assert len(storage.individuals(rid)) == 200


# ---------------------------------------------------------------------- bad input

BAD: dict[str, Callable[[Storage], Any]] = {
    "unknown field": lambda s: s.add_individuals([individual(1, "a"), individual(1, "b", colour="red")]),
    "unknown status": lambda s: s.add_individuals([individual(1, "a", status="great")]),
    "missing": lambda s: s.add_individuals([{"run_id": 1, "status": "evaluated"}]),
    "both parents": lambda s: s.add_individuals([individual(1, "a", parent_id=1, parent_slot="b")]),
    "split": lambda s: s.add_individuals([individual(1, "a", evaluations=[evaluation(split="train")])]),
    "evaluation field": lambda s: s.add_evaluations({1: [evaluation(colour=1)]}),
    "no parent": lambda s: s.add_individuals([individual(1, "a"), individual(1, "b", parent_slot="zz")]),
    "parent id": lambda s: s.add_individuals([individual(1, "a", parent_id=999)]),
    "not json": lambda s: s.add_individuals([individual(1, "a", genome={"ops": {1, 2}})]),
    "bad json text": lambda s: s.add_individuals([individual(1, "a", genome="{nope")]),
    "not int": lambda s: s.add_individuals([individual(1, "a", particle=1.5)]),
    "not float": lambda s: s.add_individuals([individual(1, "a", fitness="abc")]),
    "too big": lambda s: s.add_individuals([individual(1, "a", mutation=2**70)]),
    "not null": lambda s: s.add_individuals([individual(1, "a", evaluations=[evaluation(steps=None)])]),
    "no timestamp": lambda s: s.add_individuals([individual(1, "a", created_at=None)]),
    "explicit id": lambda s: s.add_individuals([individual(1, "a", id=3), individual(1, "b", id=3)]),
    "run status": lambda s: s.set_run_status(1, "exploded"),
    "no run": lambda s: s.set_run_status(5, "failed"),
    "run name": lambda s: s.create_run("r", {}, seed=0),
    "run seed": lambda s: s.create_run("r2", {}, seed=None),  # type: ignore[arg-type]
    "baseline field": lambda s: s.add_baselines([baseline(lr=1.0)]),
    "baseline split": lambda s: s.add_baselines([baseline(split="train")]),
    "baseline not null": lambda s: s.add_baselines([baseline(method=None)]),
    "baseline run": lambda s: s.add_baselines([baseline(run_id=5, protocol=None)]),
    "timestep": lambda s: s.put_timestep_stats(1, {"candidates": 1}),
    "stats field": lambda s: s.put_timestep_stats(1, {"timestep": 1, "x": 1}),
    "claim heartbeat": lambda s: s.take_over(1, "k", "me", ("x", "1")),  # type: ignore[arg-type]
    "list config read": lambda s: (s.create_run("l", [1], seed=0), s.get_run("l")),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused_alike(both: tuple[Storage, Storage], case: str) -> None:
    same(both, lambda s: s.create_run("r", {}, seed=0))
    before = same(both, dump)
    kind, message = same(both, BAD[case])
    assert kind in ("StoreError", "SlotTakenError") and "\n" not in message, (kind, message)
    if case != "list config read":
        assert same(both, dump) == before  # nothing of a refused call was stored


# ---------------------------------------------------------------------- one random history


def random_history(rng: random.Random, both: tuple[Storage, Storage], steps: int) -> None:
    """``steps`` random operations, the same on both backends, every result compared (each is
    drawn before it runs, so both backends get the same values)."""
    slots: list[tuple[int, str]] = []
    for step in range(steps):
        runs = same(both, lambda s: [r["id"] for r in s.list_runs()])[1]
        op = rng.choice(["run", "inds", "inds", "inds", "evals", "status", "base", "stats", "claim", "read"])
        if op == "run" or not runs:
            name, config = rng.choice(["a", "b", "c", "d", "1", "2"]), {"step": step, "f": rng_float(rng)}
            same(both, call("create_run", name, config, step))
            continue
        rid = rng.choice(runs)
        if op == "inds":
            batch: list[dict] = []
            for _ in range(rng.randint(0, 4)):
                slot = f"s{rng.randint(0, 30)}"  # collisions: SlotTakenError
                row = individual(rid, slot, genome_hash=f"h{rng.randint(0, 2)}", fitness=rng_float(rng),
                                 status=rng.choice(["evaluated"] * 3 + ["duplicate", "invalid", "error"]),
                                 fidelity=rng.choice([1, 1, 0]), timestep=step,
                                 evaluations=[evaluation(rng_float(rng), split=rng.choice(["search", "test"]),
                                                         task=rng.choice(["sine", "quad"]))
                                              for _ in range(rng.randint(0, 2))])
                own = [s for r, s in slots if r == rid]
                if own and rng.random() < 0.5:
                    row["parent_slot"] = rng.choice(own)
                elif batch and rng.random() < 0.3:
                    row["parent_slot"] = batch[-1]["slot"]
                if rng.random() < 0.2:
                    row["duplicate_of"] = rng.randint(1, 12)  # maybe none such: FK refusal
                if rng.random() < 0.05:
                    row["status"] = "bogus"
                batch.append(row)
            kind, ids = same(both, call("add_individuals", batch))
            if kind == "ok":
                slots += [(rid, r["slot"]) for r in batch]
        elif op == "evals":
            more = {i: [evaluation(rng_float(rng), split="validation")] for i in rng.sample(range(1, 30), 2)}
            same(both, call("add_evaluations", more))
        elif op == "status":
            status, target = rng.choice(["running", "finished", "failed", "interrupted"]), rng.choice([rid, rid, 99])
            same(both, call("set_run_status", target, status))
        elif op == "base":
            rows = [baseline(protocol=rng.choice(["p1", "p2", None]), seed=rng.randint(0, 2),
                             hparam=rng.choice([None, 1e-3, 1e-2]), run_id=rng.choice([None, rid]),
                             loss=rng_float(rng)) for _ in range(rng.randint(1, 4))]
            same(both, call("add_baselines", rows))
        elif op == "stats":
            row = {"timestep": rng.randint(0, 4), rng.choice(["candidates", "passed", "errors"]): rng.randint(0, 9),
                   "best_fitness": rng_float(rng)}
            same(both, call("put_timestep_stats", rid, row))
        elif op == "claim":
            key, owner = f"k{rng.randint(0, 3)}", rng.choice(["p", "q"])
            action = rng.choice(["claim", "claim", "beat", "take"])
            if action == "claim":
                same(both, call("claim", rid, key, owner))
            elif action == "beat":
                same(both, call("heartbeat", rid, owner))
            else:
                state = same(both, call("claim_state", rid, key))[1]
                seen = tuple(state) if state and rng.random() < 0.7 else ("p", 0)
                same(both, call("take_over", rid, key, owner, seen))
        if op == "read" or step % 10 == 0:
            same(both, dump)
    same(both, dump)


def call(method: str, *args: Any) -> Callable[[Storage], Any]:
    """``storage.method(*args)``, for `same`."""
    return lambda s: getattr(s, method)(*args)


def rng_float(rng: random.Random) -> float | None:
    return rng.choice([None, float("nan"), round(rng.random(), 3), rng.random(), float(rng.randint(0, 3))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_history_reads_alike(both: tuple[Storage, Storage], seed: int) -> None:
    random_history(random.Random(seed), both, steps=120)
