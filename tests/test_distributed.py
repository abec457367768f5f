"""Scale out: real Dask workers (LocalCluster processes), a real PostgreSQL server, provoked faults.

PostgreSQL tests need NOS_TEST_POSTGRES_URL (`.ci/run` starts a server on loopback and sets it);
without a reachable server they skip and say why.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from db.store import Store, StoreError

from .conftest import EVOLVE_TINY as TINY
from .conftest import REPO as ROOT
from .conftest import lineage_key

distributed = pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install 'nos[distributed]')")

SEED = "3"
CHUNK = ["--chunk", "3"]  # several initial chunks, so cooperating processes can split them


def evolve(tmp: Path, *args: str, db: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nos.evolve", "--db", db, "--cache-dir", str(tmp.parent / "cache"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def same_lineage(a: list[tuple], b: list[tuple]) -> None:
    """Slots, hashes, statuses, lrs and mutation kinds exactly; fitness to 1e-6 relative."""
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in a] == [(r[0], r[1], r[2], r[4], r[5]) for r in b]
    for x, y in zip(a, b):
        assert (x[3] is None) == (y[3] is None)
        if x[3] is not None:
            assert math.isclose(x[3], y[3], rel_tol=1e-6), (x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple]:
    """The single-process run every scaled-out run must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    res = evolve(tmp, *TINY, *CHUNK, "--name", "ref", "--seed", SEED, db=str(tmp / "nos.sqlite"))
    assert res.returncode == 0, res.stderr[-3000:]
    return lineage_key(tmp / "nos.sqlite", "ref")


def test_two_local_workers_give_the_single_process_lineage(tmp_path: Path, reference: list[tuple]) -> None:
    res = evolve(tmp_path, *TINY, *CHUNK, "--name", "ref", "--seed", SEED, "--workers", "2", "--batch-size", "2",
                 db=str(tmp_path / "nos.sqlite"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluating on Dask" in res.stderr
    same_lineage(lineage_key(tmp_path / "nos.sqlite", "ref"), reference)


@pytest.mark.slow  # a Dask cluster, a fault, a restart: the heaviest end-to-end tests
def test_killed_worker_loses_nothing(tmp_path: Path) -> None:
    import random

    from distributed import Client, LocalCluster

    from nos.evaluation.fitness import SearchSetup, TaskEvaluator
    from nos.search.distributed import DaskFitness, _executing_keys
    from nos.tasks.sine import SineConfig
    from search_space.mutation import random_genome

    setup = SearchSetup(horizons=(1.0,), budget_fpe=300, sine=SineConfig(width=16, pretrain_steps=150),
                        cache_dir=str(tmp_path / "cache"))
    local = TaskEvaluator(setup, "cpu")
    adam = local.adam_reference()
    genomes = [random_genome(random.Random(f"kill:{i}")) for i in range(12)]
    expected = [local.fitness([g], adam)[0] for g in genomes]

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        fitness = DaskFitness(client, setup, "cpu", batch_size=1, timeout_s=120)
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(fitness(genomes, adam)))
        worker.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            busy = [w for w, keys in client.run(_executing_keys, on_error="ignore").items()
                    if isinstance(keys, list) and keys]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)  # mid-batch, no goodbye
                killed = busy[0]
            time.sleep(0.05)
        worker.join(timeout=240)
        assert killed is not None, "no worker was ever seen executing"
        assert not worker.is_alive()
    assert len(out) == len(genomes)
    for got, want in zip(out, expected):
        assert not isinstance(got, Exception), got
        assert (got.fitness is None) == (want.fitness is None)
        if want.fitness is not None:
            assert math.isclose(got.fitness, want.fitness, rel_tol=1e-6) and got.lr == want.lr


@pytest.mark.slow  # a Dask cluster, a fault, a restart: the heaviest end-to-end tests
def test_hanging_candidate_times_out_as_error(tmp_path: Path, reference: list[tuple]) -> None:
    db = tmp_path / "nos.sqlite"
    res = evolve(tmp_path, *TINY, *CHUNK, "--name", "hang", "--seed", SEED, "--workers", "2", "--batch-size", "1",
                 "--timeout", "10", db=str(db), env={"NOS_TEST_HANG_OP": "tanh"})
    assert res.returncode == 0, res.stderr[-3000:]
    with Store(str(db), create=False) as store:
        rows = store.individuals(store.get_run("hang")["id"])
    hung = [r for r in rows if r["status"] == "error" and "timed out after 10 s" in (r["error"] or "")]
    assert hung, "no candidate was recorded as timed out"
    assert all('"tanh"' in json.dumps(r["genome"]) for r in hung)
    # nobody else was harmed: every evaluated candidate without the op is in the reference
    ref = {r[0]: r for r in reference}
    for r in rows:
        if r["status"] == "evaluated" and r["slot"] in ref:
            assert ref[r["slot"]][2] == "evaluated"


# ------------------------------------------------------------------ one PostgreSQL run, two processes


def postgres_url() -> str:
    url = os.environ.get("NOS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set NOS_TEST_POSTGRES_URL=postgresql+psycopg://... (.ci/run does)")
    try:
        Store(url, retries=0).close()
    except StoreError as e:
        pytest.skip(f"PostgreSQL at NOS_TEST_POSTGRES_URL is unreachable: {e}")
    return url


def test_two_processes_share_one_postgres_run(tmp_path: Path, reference: list[tuple]) -> None:
    url = postgres_url()
    from nos.evolve import _config, _parser

    name = f"coop-{uuid.uuid4().hex[:8]}"
    # The run is registered as `--name` would (same config), then two processes `--resume` it at
    # once: both start together, so both get a share of the chunks.
    cfg = _config(_parser().parse_args([*TINY, *CHUNK, "--seed", SEED, "--cache-dir", str(tmp_path.parent / "cache")]))
    with Store(url) as store:
        store.create_run(name, cfg.to_json(), cfg.seed)
    base = [sys.executable, "-m", "nos.evolve", "--db", url, "--device", "cpu", "--resume", name]
    first = subprocess.Popen(base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out2, err2 = second.communicate(timeout=300)
        out1, err1 = first.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 0, err2[-3000:]
    with Store(url) as store:
        run = store.get_run(name)
        assert run["status"] == "finished"
        rows = store.individuals(run["id"])
        ids = {r["id"] for r in rows}
        slots = [r["slot"] for r in rows]
        assert len(slots) == len(set(slots)), "a slot was stored twice"
        assert sum(r["timestep"] == 0 for r in rows) == 10
        for r in rows:
            assert (r["parent_id"] is None) == (r["timestep"] == 0)
            assert r["parent_id"] is None or r["parent_id"] in ids
            assert r["duplicate_of"] is None or r["duplicate_of"] in ids
        with store.session() as s:
            from db.models import Claim

            owners = {c.owner for c in s.query(Claim).filter(Claim.run_id == run["id"], Claim.key.like("chunk:%"))}
        stats = store.timestep_stats(run["id"])
        assert sum(s["candidates"] for s in stats) == len(rows)
        adam = [b for b in store.baselines(run["id"], task="sine_search") if b["method"] == "adam"]
        # one row per (search horizon, search seed): tuned once, not once per process
        assert len(adam) == len(cfg.horizons) * len(cfg.search_seeds), "the Adam reference was tuned twice"
    key = [(r["slot"], r["genome_hash"], r["status"], None if r["fitness"] is None else round(r["fitness"], 9),
            r["lr"], r["mutation_kind"]) for r in sorted(rows, key=lambda r: r["slot"])]
    same_lineage(key, reference)
    print(f"chunks judged by {len(owners)} process(es)")


# ------------------------------------------------------------------ database faults, via the command


def one_line_exit_2(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    start = time.monotonic()
    res = evolve(tmp_path, *TINY, "--db-retries", "2", db="postgresql+psycopg://x@127.0.0.1:1/none", timeout=120)
    line = one_line_exit_2(res)
    assert "after 3 attempts" in line
    assert time.monotonic() - start < 60


def test_locked_sqlite_gives_up_after_bounded_retries(tmp_path: Path) -> None:
    db = tmp_path / "nos.sqlite"
    Store(str(db)).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        res = evolve(tmp_path, *TINY, "--db-retries", "1", "--db-timeout", "0.3", db=str(db), timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = one_line_exit_2(res)
    assert "locked" in line and "after 2 attempts" in line


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_corrupt_or_foreign_sqlite_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "other.sqlite"
    if kind == "corrupt":
        db.write_bytes(b"this is not a database\x00" * 50)
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
            conn.execute("INSERT INTO photos (path) VALUES ('cat.jpg')")
        conn.close()
    before = db.read_bytes()
    line = one_line_exit_2(evolve(tmp_path, *TINY, db=str(db), timeout=120))
    assert "refusing to modify it" in line
    assert db.read_bytes() == before
    assert not Path(str(db) + "-wal").exists()
