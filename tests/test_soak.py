"""Soak: three coordinators on one run, random SIGKILLs of random coordinators, each restarted
with ``--resume`` after its kill, until the run finishes -- on one PostgreSQL database and,
separately, on one SQLite file (``--cooperate``).

The run must end with exactly the rows of a single-process run with the same seed
(``lineage_key``), no individual, evaluation or baseline stored twice, every process ending
cleanly. The figures (coordinators, kills, rows, seconds) are printed (``-s`` shows them) and
recorded as junit properties. Every test is ``slow`` and bounded (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Baseline, Claim, Evaluation, Individual, Run
from db.store import Store, StoreError

from .conftest import EVOLVE_TINY, lineage_key
from .test_faults import evolve, private_postgres, quick_check, register_run, run_status, start

pytestmark = pytest.mark.slow

# Small chunks (2 initial candidates, 2 children of a timestep), so that three coordinators
# share many claims, and sixteen timesteps, so that the kills land all over the search.
CONFIG = [*EVOLVE_TINY, "--initial", "16", "--particles", "3", "--timesteps", "16", "--chunk", "2",
          "--timestep-chunk", "2", "--seed", "5"]
COORDINATORS = 3
MAX_KILLS = 25
CLAIM_TIMEOUT = "2"  # seconds: a killed coordinator's claims are taken over quickly
BOUND_S = 300  # the whole soak, kills and finish; the test fails past it


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[list[tuple], dict]:
    """The single-process run with the same seed, and its per-table counts."""
    db = tmp_path_factory.mktemp("reference") / "nos.sqlite"
    res = evolve(*CONFIG, "--name", "soak", db=db, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    return lineage_key(db, "soak"), counts(str(db), "soak")


def counts(db: str, name: str) -> dict:
    """What "stored twice" would show in: evaluations per slot, baselines per (method, task,
    horizon, seed, split), timestep stats per timestep."""
    with Store(db, create=False) as store, store.session() as s:
        run_id = s.scalar(select(Run.id).where(Run.name == name))
        evaluations = dict(s.execute(
            select(Individual.slot, func.count(Evaluation.id)).join(Evaluation, Evaluation.individual_id == Individual.id)
            .where(Individual.run_id == run_id).group_by(Individual.slot)).all())
        baselines = Counter(s.execute(
            select(Baseline.method, Baseline.task, Baseline.horizon, Baseline.seed, Baseline.split)
            .where(Baseline.run_id == run_id)).all())
        stats = Counter(t["timestep"] for t in store.timestep_stats(run_id))
    return {"evaluations": evaluations, "baselines": dict(baselines), "timestep_stats": dict(stats)}


def soak(db: str, name: str, cache: Path, extra: list[str], seed: int) -> dict:
    """Three coordinators on run `name`; SIGKILL a random one at random moments (at most
    MAX_KILLS), restarting it with --resume, until the run is finished and all have exited."""
    rng = random.Random(seed)
    args = ["--resume", name, "--claim-timeout", CLAIM_TIMEOUT, "--db-retries", "8", *extra]
    procs: list[subprocess.Popen[str] | None] = [start(*args, db=db, cache=cache) for _ in range(COORDINATORS)]
    ended: list[tuple[int, str]] = []  # (status, stderr) of every process that is over
    kills, t0 = 0, time.monotonic()
    next_kill = t0 + rng.uniform(0.5, 3.0)

    def finished() -> bool:
        try:
            return run_status(db, name) == "finished"
        except StoreError:  # locked for a moment by a writer: not finished as far as we know
            return False

    try:
        while True:
            assert time.monotonic() - t0 < BOUND_S, f"the soak did not end in {BOUND_S} s ({kills} kills)"
            for i, p in enumerate(procs):
                if p is not None and p.poll() is not None:
                    ended.append((p.returncode, p.communicate()[1]))
                    procs[i] = None
            live = [i for i, p in enumerate(procs) if p is not None]
            if not live:
                break
            if kills < MAX_KILLS and time.monotonic() >= next_kill and not finished():
                i = rng.choice(live)
                victim = procs[i]
                assert victim is not None
                os.kill(victim.pid, signal.SIGKILL)  # no goodbye: its claims stay, its heartbeat stops
                victim.communicate()
                kills += 1
                procs[i] = start(*args, db=db, cache=cache)
                next_kill = time.monotonic() + rng.uniform(0.5, 3.0)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    seconds = time.monotonic() - t0
    # Every process ends cleanly: 0, or -- restarted just as another finished the run -- the one
    # line saying it is finished already.
    for code, err in ended:
        assert code == 0 or (code == 2 and "already finished" in err), (code, err[-3000:])
    took_over = sum(err.count("took over chunk:") for _, err in ended)
    # late starts: restarted just as the run finished; take-over lines are thinned (one a second)
    return {"coordinators": COORDINATORS, "kills": kills, "processes": COORDINATORS + kills,
            "seconds": round(seconds, 1), "take_over_lines": took_over,
            "late_starts": sum(code == 2 for code, _ in ended)}


def check(db: str, name: str, reference: tuple[list[tuple], dict], figures: dict,
          record_property, label: str) -> None:
    key = lineage_key(db, name)  # type: ignore[arg-type]  # a URL works where a path does
    slots = [r[0] for r in key]
    assert len(slots) == len(set(slots)), "a slot was stored twice"
    assert key == reference[0]
    assert counts(db, name) == reference[1], "an evaluation, baseline or timestep was stored twice"
    assert run_status(db, name) == "finished"
    with Store(db, create=False) as store, store.session() as s:
        owners = set(s.scalars(select(Claim.owner).join(Run, Run.id == Claim.run_id).where(Run.name == name)))
    figures = {**figures, "rows": len(key), "claim_owners_at_end": len(owners)}
    print(f"soak {label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for k, v in figures.items():
        record_property(f"{label}_{k}", v)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """NOS_TEST_POSTGRES_URL when set (CI's server), else a private server of the test's own."""
    url = os.environ.get("NOS_TEST_POSTGRES_URL")
    if url:
        try:
            Store(url, retries=0).close()
        except StoreError as e:
            pytest.skip(f"PostgreSQL at NOS_TEST_POSTGRES_URL is unreachable: {e}")
        yield url
        return
    with private_postgres() as pg:
        yield pg.url


def test_soak_three_coordinators_one_postgres_run(postgres_url: str, cache: Path,
                                                   reference: tuple[list[tuple], dict], record_property) -> None:
    name = f"soak-{uuid.uuid4().hex[:8]}"
    register_run(postgres_url, name, cache, CONFIG)
    figures = soak(postgres_url, name, cache, [], seed=1)
    check(postgres_url, name, reference, figures, record_property, "postgres")


def test_soak_three_coordinators_one_sqlite_file(tmp_path: Path, cache: Path,
                                                  reference: tuple[list[tuple], dict], record_property) -> None:
    db = tmp_path / "nos.sqlite"
    register_run(db, "soak", cache, CONFIG)
    figures = soak(str(db), "soak", cache, ["--cooperate"], seed=2)
    assert quick_check(db) == "ok"
    check(str(db), "soak", reference, figures, record_property, "sqlite")

