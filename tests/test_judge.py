"""The judge's pipeline on in-memory storage: every proposal becomes one row with the right
status; duplicates (within a chunk, across chunks, after a sign flip) point at the original; a
failing candidate is isolated; stored slots are read back, not judged again."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from db.memory import MemoryStorage
from nos.evaluation.fitness import Fitness
from nos.search.judge import Judge, Progress, Stage, dedup, form, symbolic_columns
from nos.search.records import Proposal
from search_space.builtins import builtin
from search_space.genome import Genome, from_json
from search_space.mutation import random_genome

SGD = builtin("sgd")
ADAM = builtin("adam")
ASCENT = from_json({"nodes": [{"op": "neg", "in": ["g"]}]})  # passes the sphere check only flipped
RAISES = from_json({"nodes": [{"op": "sign", "in": ["m"]}]})  # the fitness function below fails on it


class CountingFitness:
    """A stand-in fitness *input* for the judge (the judge is what is tested): the number of nodes of
    the update, a fixed lr; raises for any batch holding RAISES, as a buggy op would."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, genomes: Sequence[Genome], reference: object) -> list[Fitness | Exception]:
        if any(symbolic_columns(g)["genome_hash"] == symbolic_columns(RAISES)["genome_hash"] for g in genomes):
            raise RuntimeError("boom")
        self.seen += [symbolic_columns(g)["genome_hash"] for g in genomes]
        return [Fitness(float(len(g.nodes)), 0.01, [{"task": "t", "horizon": 1.0, "lr": 0.01, "seed": 0,
                                                     "loss": float(len(g.nodes)), "steps": 3, "seconds": 0.0,
                                                     "split": "search"}]) for g in genomes]


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


def _judge(storage: MemoryStorage, fit: CountingFitness, stages: int = 1) -> tuple[Judge, int]:
    run_id = storage.create_run("r", {"seed": 0}, 0)
    stage_list = [Stage(fit, {}, promote=0.5)] * (stages - 1) + [Stage(fit, {})]
    return Judge(storage, run_id, stage_list, torch.device("cpu"), Progress()), run_id


def test_every_proposal_becomes_one_row_with_its_status(storage: MemoryStorage) -> None:
    fit = CountingFitness()
    judge, run_id = _judge(storage, fit)
    judge.judge_chunks([[
        Proposal("a", SGD), Proposal("b", SGD),  # b: a duplicate of a, in the same chunk
        Proposal("c", ASCENT),  # flipped, it is SGD: a duplicate too
        Proposal("d", None, invalid="no_op: nothing to mutate", parent_id=None),
        Proposal("e", RAISES), Proposal("f", ADAM),
    ]])
    rows = {r["slot"]: r for r in storage.individuals(run_id)}
    assert set(rows) == set("abcdef")
    assert rows["a"]["status"] == "evaluated" and rows["a"]["fitness"] == 1.0 and rows["a"]["sign"] == 1
    assert rows["b"]["status"] == "duplicate" and rows["b"]["duplicate_of"] == rows["a"]["id"]
    assert rows["c"]["status"] == "duplicate" and rows["c"]["duplicate_of"] == rows["a"]["id"]
    assert rows["c"]["sign"] == -1 and rows["c"]["unflipped_hash"] == symbolic_columns(ASCENT)["genome_hash"]
    assert rows["d"]["status"] == "invalid" and rows["d"]["mutation_kind"] == "no_op" and rows["d"]["genome"] == {}
    assert rows["e"]["status"] == "error" and "boom" in rows["e"]["error"]  # isolated: the others evaluated
    assert rows["f"]["status"] == "evaluated" and rows["f"]["fitness"] == 2.0
    assert sorted(fit.seen).count(symbolic_columns(SGD)["genome_hash"]) == 1  # the duplicates were not trained
    assert storage.get_individual(rows["a"]["id"])["evaluations"][0]["loss"] == 1.0


def test_a_later_chunk_dedups_against_stored_rows_and_stored_slots_are_read_back(storage: MemoryStorage) -> None:
    fit = CountingFitness()
    judge, run_id = _judge(storage, fit)
    judge.judge_chunks([[Proposal("a", ADAM)], [Proposal("b", ADAM), Proposal("c", SGD)]])
    rows = {r["slot"]: r for r in storage.individuals(run_id)}
    assert rows["b"]["duplicate_of"] == rows["a"]["id"]
    # a second judge on the same storage (a resumed run): the stored slots are read, nothing trained
    again = CountingFitness()
    judge2 = Judge(storage, run_id, [Stage(again, {})], torch.device("cpu"), Progress())
    heard: list[dict] = []
    judge2.progress = Progress(judged=heard.extend)
    judge2.judge_chunks([[Proposal("a", ADAM)], [Proposal("b", ADAM), Proposal("c", SGD)]])
    assert again.seen == [] and [r["slot"] for r in heard] == ["a", "b", "c"]
    assert len(storage.individuals(run_id)) == 3


def test_a_child_that_cannot_be_made_keeps_its_parents_genome(storage: MemoryStorage) -> None:
    judge, run_id = _judge(storage, CountingFitness())
    judge.judge_chunks([[Proposal("p", ADAM)]])
    parent = storage.individual_by_slot(run_id, "p")
    judge.judge_chunks([[Proposal("k", None, invalid="no_edge: x", timestep=1, parent_id=parent["id"],
                                  lineage={"particle": 0, "mutation": 1})]])
    kid = storage.individual_by_slot(run_id, "k")
    assert kid["status"] == "invalid" and kid["genome"] == parent["genome"] and kid["mutation_kind"] == "no_edge"
    assert (kid["parent_id"], kid["particle"], kid["mutation"], kid["timestep"]) == (parent["id"], 0, 1, 1)


def test_promotion_stages_keep_the_best_fraction_at_full_fidelity(storage: MemoryStorage) -> None:
    judge, run_id = _judge(storage, CountingFitness(), stages=2)
    genomes = [g for g in (random_genome(random.Random(i)) for i in range(12))]
    judge.judge_chunks([[Proposal(f"s{i}", g) for i, g in enumerate(genomes)]])
    done = [r for r in storage.individuals(run_id) if r["status"] == "evaluated"]
    full = [r for r in done if r["fidelity"] == 1]
    assert done and 1 <= len(full) <= (len(done) + 1) // 2 + 1
    assert max(r["fitness"] for r in full) <= min(r["fitness"] for r in done if r["fidelity"] == 0)


def test_pipeline_steps_alone() -> None:
    row, genome = form(Proposal("x", SGD, kind="add_node", timestep=2, attempt=1, parent_id=7,
                                lineage={"particle": 1, "mutation": 0}), 5, None)
    assert genome is SGD and row["mutation_kind"] == "add_node" and row["run_id"] == 5
    assert (row["parent_id"], row["particle"], row["mutation"], row["timestep"], row["attempt"]) == (7, 1, 0, 2, 1)
    known: dict[str, int] = {}
    pending: dict[str, dict] = {}
    assert dedup(row, known, pending) and pending[row["genome_hash"]] is row
    twin, _ = form(Proposal("y", SGD), 5, None)
    assert not dedup(twin, known, pending) and twin["dup_slot"] == "x"
    known[row["genome_hash"]] = 3
    third, _ = form(Proposal("z", SGD), 5, None)
    assert not dedup(third, known, {}) and third["duplicate_of"] == 3


def test_a_slot_another_process_stored_first_is_read_back(storage: MemoryStorage) -> None:
    judge, run_id = _judge(storage, CountingFitness())
    other = Judge(storage, run_id, [Stage(CountingFitness(), {})], torch.device("cpu"), Progress())
    other.judge_chunks([[Proposal("a", ADAM)]])  # stored behind the first judge's back
    judge.judge_chunks([[Proposal("a", ADAM), Proposal("b", SGD)]])
    rows = storage.individuals(run_id)
    assert sorted(r["slot"] for r in rows) == ["a", "b"]
    assert judge.rows["a"]["id"] == other.rows["a"]["id"]
