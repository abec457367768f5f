"""Faults injected on purpose, for real: a full disk, a write error, PostgreSQL stopped and
restarted, a coordinator SIGKILLed while it holds a claim, a Dask worker SIGKILLed mid-batch.

Every fault must end in one clear line and exit 2 (or be ridden through by a retry), leave a
database that passes SQLite's ``PRAGMA quick_check``, and ``nos evolve --resume NAME`` must then
finish with exactly the rows of an uninterrupted run with the same seed (``lineage_key``).

Nothing under test is mocked. Faults come from the kernel and from real servers: a tmpfs mounted
for the test and filled with a ballast file (ENOSPC), a file-size limit set on the running
process with prlimit (EFBIG: SQLite's "disk I/O error"), a private PostgreSQL server stopped with
``pg_ctl -m immediate``. To hit the fault mid-search rather than by luck of timing, the
coordinator is frozen with SIGSTOP once it has stored its first rows, the fault is set up, and
the process continues (SIGCONT) into it. Tests that need root (mount, a PostgreSQL server run as
the ``postgres`` user) skip and say why elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import os
import pwd
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.store import Store, StoreError

from .conftest import EVOLVE_TINY, REPO, lineage_key

SEED = "3"
# several initial chunks (10 candidates, 3 a chunk), so a fault can land between two of them and
# cooperating coordinators can split them
CONFIG = [*EVOLVE_TINY, "--chunk", "3", "--seed", SEED]
RUN = "faulty"


# ---------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    # one intra-op thread: several torch processes share 2 cores (see conftest.single_thread)
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def evolve(*args: str, db: str | Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nos.evolve", "--db", str(db), "--cache-dir", str(cache), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())


def start(*args: str, db: str | Path, cache: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "nos.evolve", "--db", str(db), "--cache-dir", str(cache), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # never leave a search running behind a failed test
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def sqlite_rows(db: Path, run: str) -> int:
    """How many individuals run `run` has, read without writing anything (``mode=ro``): the
    reader must neither take a lock the search needs nor checkpoint its WAL."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            row = conn.execute("SELECT count(*) FROM individuals i JOIN runs r ON r.id = i.run_id "
                               "WHERE r.name = ?", (run,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:  # the schema is not written yet
        return 0
    return int(row[0])


@contextlib.contextmanager
def watching(url: str, proc: subprocess.Popen[str]) -> Iterator[Store]:
    """One store kept open on the server the search writes to, for polling it (opening one per
    poll is slow enough to miss the moment); it waits for the search to create the schema."""
    deadline = time.monotonic() + 120
    while True:
        try:
            store = Store(url, create=False, retries=0)
            break
        except StoreError:
            assert proc.poll() is None and time.monotonic() < deadline, "the search never created its schema"
            time.sleep(0.1)
    try:
        yield store
    finally:
        store.close()


def server_rows(store: Store, run: str) -> int:
    record = store.get_run(run)
    return len(store.individuals(record["id"])) if record else 0


def server_claims(store: Store, run: str) -> dict[str, str]:
    """key -> owner of the run's claims."""
    from db.models import Claim, Run

    with store.session() as session:
        return {str(k): str(o) for k, o in session.execute(
            select(Claim.key, Claim.owner).join(Run, Run.id == Claim.run_id).where(Run.name == run))}


def freeze_at(proc: subprocess.Popen[str], rows: Callable[[], int], n: int, timeout: float = 240) -> int:
    """SIGSTOP `proc` once `rows()` reaches `n` (the search is under way, not finished), so that
    a fault can be set up before it goes on; returns the rows seen. The caller sends SIGCONT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the search ended (status {proc.returncode}) before the fault"
        seen = rows()
        if seen >= n:
            os.kill(proc.pid, signal.SIGSTOP)
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the search never stored {n} rows in {timeout} s")


def error_line(code: int, err: str) -> str:
    """The one line a fault must end in: exit 2, the last stderr line ``error: ...``, the only
    such line, no traceback (progress lines of the search may come before it)."""
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], err[-3000:]
    assert len(lines[-1]) <= 400
    print(f"fault ended in: {lines[-1]}")  # shown with -s: what a user would read
    return lines[-1]


def quick_check(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return " ".join(str(r[0]) for r in conn.execute("PRAGMA quick_check"))
    finally:
        conn.close()


def run_status(db: str | Path, run: str) -> str:
    with Store(str(db), create=False) as store:
        record = store.get_run(run)
        assert record is not None
        return str(record["status"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained networks, on the ordinary disk, shared by the module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> list[tuple]:
    """The uninterrupted single-process run every faulted run must end up equal to."""
    db = tmp_path_factory.mktemp("reference") / "nos.sqlite"
    res = evolve(*CONFIG, "--name", RUN, db=db, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    key = lineage_key(db, RUN)
    assert len(key) > 10  # more than the initial population: a fault after it is mid-search
    return key


def no_slot_twice(key: list[tuple]) -> None:
    slots = [r[0] for r in key]
    assert len(slots) == len(set(slots)), "a slot was stored twice"


# ---------------------------------------------------------------------- a small filesystem


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the test (root only: skips otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where}: {res.stderr.strip()}")
    try:
        yield where
    finally:
        # the searches on it are dead by now (finish() kills); lazy, so a stray handle cannot
        # leave a mount behind that breaks pytest's clean-up of old temporary directories
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(ballast: Path) -> int:
    """Write `ballast` until its filesystem is full (ENOSPC); returns the bytes written."""
    written, block = 0, b"\0" * 65536
    with open(ballast, "wb", buffering=0) as fh:
        while True:
            try:
                n = fh.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return written
                block = block[: len(block) // 2]  # down to the last free byte
                continue
            written += n or 0


def test_full_disk_under_the_database(tmp_path: Path, cache: Path, reference: list[tuple]) -> None:
    """The database's filesystem fills up mid-search: one line naming the full disk, exit 2, a
    database that passes quick_check; space freed, --resume ends exactly like the reference."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        db = disk / "nos.sqlite"
        proc = start(*CONFIG, "--name", RUN, db=db, cache=cache)
        try:
            freeze_at(proc, lambda: sqlite_rows(db, RUN), 3)
            fill(disk / "ballast")
            os.kill(proc.pid, signal.SIGCONT)
        finally:
            code, _, err = finish(proc)
        line = error_line(code, err)
        assert "disk is full" in line or "No space left" in line, line
        assert quick_check(db) == "ok"  # still full: checked before anything is freed
        stored = sqlite_rows(db, RUN)
        assert 3 <= stored < len(reference)

        (disk / "ballast").unlink()
        res = evolve("--resume", RUN, db=db, cache=cache)
        assert res.returncode == 0, res.stderr[-3000:]
        assert quick_check(db) == "ok"
        assert lineage_key(db, RUN) == reference
        assert run_status(db, RUN) == "finished"


@pytest.mark.slow  # the default suite keeps its sibling fault tests; this one is the heavier variant
def test_full_disk_under_the_pretraining_cache(tmp_path: Path, cache: Path, reference: list[tuple]) -> None:
    """The cache's filesystem has room for one pretrained network: the next cache write fails
    with one line, leaves no truncated file (none is ever loaded later) and no *.tmp; with more
    room the run resumes exactly."""
    ref_files = sorted(cache.glob("*.npz"))
    assert len(ref_files) >= 2, "the reference run cached fewer than two networks"
    page = os.sysconf("SC_PAGE_SIZE")
    room = math.ceil(ref_files[0].stat().st_size / page) * page  # exactly one cache file fits
    db = tmp_path / "nos.sqlite"  # the database on the ordinary disk: only the cache is full
    with tmpfs(tmp_path / "disk", str(room)) as disk:
        res = evolve(*CONFIG, "--name", RUN, db=db, cache=disk)
        line = error_line(res.returncode, res.stderr)
        assert "No space left on device" in line, line
        assert quick_check(db) == "ok"
        assert run_status(db, RUN) == "failed"
        written = sorted(disk.iterdir())
        assert written and all(p.suffix == ".npz" for p in written), written  # no stray *.tmp
        for path in written:  # whatever is there is whole: the reference's own weights
            with np.load(path, allow_pickle=False) as got, np.load(cache / path.name, allow_pickle=False) as want:
                assert np.array_equal(got["theta"], want["theta"])

        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
        res = evolve("--resume", RUN, db=db, cache=disk)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "cannot be used" not in res.stderr  # nothing half-written was found and retrained
        assert sorted(p.name for p in disk.iterdir()) == [p.name for p in ref_files]
    assert lineage_key(db, RUN) == reference
    assert run_status(db, RUN) == "finished"


def test_write_error_other_than_a_full_disk(tmp_path: Path, cache: Path, reference: list[tuple]) -> None:
    """A write that fails with EFBIG, not ENOSPC: the kernel's file-size limit, lowered on the
    running search with prlimit(2) to the size its files have now (SQLite reports it as "disk
    I/O error"). One line, exit 2, quick_check ok; resumed without the limit, exactly."""
    db = tmp_path / "nos.sqlite"
    proc = start(*CONFIG, "--name", RUN, db=db, cache=cache)
    try:
        freeze_at(proc, lambda: sqlite_rows(db, RUN), 3)
        # no file of the run may grow any more (Python ignores SIGXFSZ, so write() gets EFBIG)
        biggest = max(os.path.getsize(p) for p in glob.glob(f"{db}*"))
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (biggest, resource.RLIM_INFINITY))
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        code, _, err = finish(proc)
    line = error_line(code, err)
    assert "disk I/O error" in line, line
    assert quick_check(db) == "ok"
    assert 3 <= sqlite_rows(db, RUN) < len(reference)

    res = evolve("--resume", RUN, db=db, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert quick_check(db) == "ok"
    assert lineage_key(db, RUN) == reference
    assert run_status(db, RUN) == "finished"


# ---------------------------------------------------------------------- a private PostgreSQL server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    """A PostgreSQL server of the test's own, on a free loopback port, run as user postgres."""

    bin: Path
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/nos_test"

    def _as_postgres(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        line = " ".join(shlex.quote(c) for c in cmd)
        return subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", line], capture_output=True, text=True,
                              check=check, timeout=120)

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                          "-w", "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: no checkpoint, no goodbye to clients -- as if the server crashed."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop",
                          check=False)


@contextlib.contextmanager
def private_postgres() -> Iterator[Postgres]:
    """Start a fresh server with database nos_test (skips, saying why, where that cannot be done)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                                          if x.isdigit()])
    if not bins or not os.access(Path(bins[-1]) / "initdb", os.X_OK):
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    if os.geteuid() != 0 or shutil.which("su") is None:
        pytest.skip("starting a private PostgreSQL server needs root (to run it as user postgres)")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no user 'postgres' to run a private PostgreSQL server")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'nos[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="nos-faults-pg-"))  # not under pytest's 0700 root-only tree
    os.chown(root, pw.pw_uid, pw.pw_gid)
    pg = Postgres(Path(bins[-1]), root, _free_port())
    try:
        try:
            pg._as_postgres(str(pg.bin / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
            pg.start()
            pg._as_postgres(str(pg.bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                            "nos_test")
        except subprocess.CalledProcessError as e:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.skip(f"could not start a private PostgreSQL server: {(e.stderr or '').strip()[:200]} {log[-300:]}")
        yield pg
    finally:
        pg.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with private_postgres() as pg:
        yield pg


def test_postgres_restarted_mid_run_is_ridden_through(postgres: Postgres, cache: Path,
                                                        reference: list[tuple]) -> None:
    """The server crashes (immediate stop) mid-search and is back 3 s later: the search's
    retries with back-off (--db-retries 8) carry it through; pooled connections the crash left
    dead are replaced (pool_pre_ping); the rows equal the reference's, none twice."""
    url, name = postgres.url, f"{RUN}-{uuid.uuid4().hex[:6]}"
    proc = start(*CONFIG, "--name", name, "--db-retries", "8", db=url, cache=cache)
    try:
        with watching(url, proc) as store:
            freeze_at(proc, lambda: server_rows(store, name), 3)
        postgres.stop()
        os.kill(proc.pid, signal.SIGCONT)  # it goes on into a database that is not there
        time.sleep(3)
        postgres.start()
    finally:
        code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    key = lineage_key(url, name)  # type: ignore[arg-type]  # a URL works where a path does
    no_slot_twice(key)
    assert key == reference
    assert run_status(url, name) == "finished"


@pytest.mark.slow  # the default suite keeps its sibling fault tests; this one is the heavier variant
def test_postgres_gone_for_good_is_one_line_then_resumes(postgres: Postgres, cache: Path,
                                                          reference: list[tuple]) -> None:
    """The server stays down longer than the retries last: one line ("after 2 attempts"), exit
    2; back up, --resume finishes exactly. The dead process's claims on its unstored chunks are
    taken over all at once, after one --claim-timeout (not one per chunk: that was minutes)."""
    url, name = postgres.url, f"{RUN}-{uuid.uuid4().hex[:6]}"
    proc = start(*CONFIG, "--name", name, "--db-retries", "1", db=url, cache=cache)
    try:
        with watching(url, proc) as store:
            # Initial chunks are claimed and judged ahead, one after the other, and stored only
            # then: frozen at the third claim, it holds three chunks and has stored none.
            freeze_at(proc, lambda: int("chunk:init:6" in server_claims(store, name)), 1)
            held, stored = server_claims(store, name), server_rows(store, name)
        postgres.stop()
        os.kill(proc.pid, signal.SIGCONT)
        code, _, err = finish(proc)
    finally:
        postgres.start()
    line = error_line(code, err)
    assert "after 2 attempts" in line, line
    dead = held["chunk:init:6"]
    assert stored == 0 and {"chunk:init:0", "chunk:init:3", "chunk:init:6"} <= {
        k for k, o in held.items() if o == dead}, (stored, held)

    res = evolve("--resume", name, "--db-retries", "8", "--claim-timeout", "3", db=url, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    # One take-over for all of them (its progress line may be thinned out, so at most one is
    # seen; one per chunk would be a --claim-timeout each).
    assert res.stderr.count("took over chunk:") <= 1, res.stderr[-3000:]
    with Store(url, create=False) as store:
        owners = server_claims(store, name)
    assert dead not in owners.values() and len(set(owners.values())) == 1, owners  # all the resumed one's
    key = lineage_key(url, name)  # type: ignore[arg-type]
    no_slot_twice(key)
    assert key == reference
    assert run_status(url, name) == "finished"


# ---------------------------------------------------------------------- claims and workers


def claims(db: Path, run: str) -> list[tuple[str, str]]:
    """(key, owner) of the run's claims, read without writing."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return [(str(k), str(o)) for k, o in conn.execute(
            "SELECT c.key, c.owner FROM claims c JOIN runs r ON r.id = c.run_id WHERE r.name = ?", (run,))]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def stored_slots(db: Path, run: str) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return {str(s) for (s,) in conn.execute(
            "SELECT i.slot FROM individuals i JOIN runs r ON r.id = i.run_id WHERE r.name = ?", (run,))}
    finally:
        conn.close()


def register_run(db: str | Path, name: str, cache: Path, config: list[str] = CONFIG) -> None:
    """Create the run as ``--name`` would (the same config), for coordinators to ``--resume``
    together: each of them then starts at once, so all get a share of the chunks."""
    from nos.evolve import _config, _parser

    cfg = _config(_parser().parse_args([*config, "--cache-dir", str(cache)]))
    with Store(str(db)) as store:
        store.create_run(name, cfg.to_json(), cfg.seed)


def test_coordinator_killed_holding_a_claim_is_taken_over(tmp_path: Path, cache: Path,
                                                           reference: list[tuple]) -> None:
    """Two coordinators on one SQLite file (--cooperate). One is SIGKILLed while it holds the
    claim on a chunk it has not stored; the other sees the heartbeat stand still for
    --claim-timeout, takes the chunk over and finishes the run exactly."""
    db = tmp_path / "nos.sqlite"
    register_run(db, RUN, cache)
    coop = ["--resume", RUN, "--cooperate", "--claim-timeout", "2"]
    victim, survivor = start(*coop, db=db, cache=cache), None
    try:
        held: list[str] = []
        deadline = time.monotonic() + 240
        while not held:  # the victim's first chunk claimed, its rows not stored
            assert victim.poll() is None, f"the victim ended (status {victim.returncode}) before the kill"
            assert time.monotonic() < deadline, "the victim never claimed a chunk"
            time.sleep(0.02)
            if not any(k.startswith("chunk:") for k, _ in claims(db, RUN)):
                continue
            os.kill(victim.pid, signal.SIGSTOP)  # frozen while its claims and rows are read
            done = stored_slots(db, RUN)
            held = [k for k, owner in claims(db, RUN)  # chunk:SLOT, SLOT the chunk's first
                    if f":{victim.pid}:" in owner and k.startswith("chunk:") and k[6:] not in done]
            if not held:
                os.kill(victim.pid, signal.SIGCONT)
        # Frozen, its heartbeat stands still as a dead process's would. The survivor starts
        # beside it (on an idle machine the run takes seconds: started together, one would often
        # judge everything before the other had claimed anything), and once the survivor is at
        # work -- a claim of its own -- the victim dies without a goodbye.
        survivor = start(*coop, db=db, cache=cache)
        while not any(f":{survivor.pid}:" in owner for _, owner in claims(db, RUN)):
            assert survivor.poll() is None, f"the survivor ended (status {survivor.returncode}) at once"
            assert time.monotonic() < deadline, "the survivor never claimed a chunk"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
        code, _, err = finish(survivor) if survivor is not None else (-1, "", "no survivor started")
    assert code == 0, err[-3000:]
    # the survivor took the dead coordinator's chunks over (its progress line saying so may be
    # thinned out: at most one a second), and judged them itself
    owners = dict(claims(db, RUN))
    assert all(f":{survivor.pid}:" in owners[k] for k in held), (held, owners)
    assert quick_check(db) == "ok"
    key = lineage_key(db, RUN)
    no_slot_twice(key)
    assert key == reference
    assert run_status(db, RUN) == "finished"
    print(f"claims held by the killed coordinator: {held}")


def test_a_stale_owner_loses_all_its_claims_at_once(tmp_path: Path) -> None:
    """The store's side of a take-over: the claim as seen goes, and the stale owner's other
    claims of the run with it; a claim that moved since it was seen stays where it is."""
    with Store(tmp_path / "nos.sqlite") as store:
        run = store.create_run("r", {}, seed=0)
        other = store.create_run("other", {}, seed=0)
        for key in ("chunk:a", "chunk:b", "chunk:c"):
            assert store.claim(run, key, "dead")
        assert store.claim(other, "chunk:a", "dead")
        assert store.claim(run, "chunk:d", "alive")
        seen = store.claim_state(run, "chunk:a")
        assert seen == ("dead", 0)
        store.heartbeat(run, "alive")
        assert not store.take_over(run, "chunk:d", "me", ("alive", 0))  # it beat since: not stale
        assert store.take_over(run, "chunk:a", "me", seen)
        assert not store.take_over(run, "chunk:a", "third", seen)  # only one process wins it
        assert [store.claim_state(run, k) for k in ("chunk:a", "chunk:b", "chunk:c", "chunk:d")] == [
            ("me", 0), ("me", 0), ("me", 0), ("alive", 1)]
        assert store.claim(run, "chunk:b", "me") and not store.claim(run, "chunk:b", "dead")
        assert store.claim_state(other, "chunk:a") == ("dead", 0)  # another run's claims stay


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f).read_text().split()]
    return out


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _dask_workers(pid: int) -> list[int]:
    """The worker processes of a coordinator's LocalCluster: its children spawned by
    multiprocessing (not the resource tracker)."""
    out = []
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out


@pytest.mark.slow  # a local Dask cluster of two processes and a kill: ~40 s on 2 cores
def test_dask_worker_killed_mid_batch_loses_nothing(tmp_path: Path, cache: Path, reference: list[tuple]) -> None:
    """`--workers 2`: a worker process busy evaluating (its CPU time moving) is SIGKILLed; Dask
    re-runs its batch elsewhere and the run ends with the single-process rows."""
    pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install 'nos[distributed]')")
    db = tmp_path / "nos.sqlite"
    proc = start(*CONFIG, "--name", RUN, "--workers", "2", "--batch-size", "1", db=db, cache=cache)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            workers = _dask_workers(proc.pid)
            if len(workers) < 2 or sqlite_rows(db, RUN) < 1:  # evaluating: the first chunk is in
                time.sleep(0.1)
                continue
            before = {w: _cpu_ticks(w) for w in workers}
            time.sleep(0.2)
            busy = [w for w in workers if _cpu_ticks(w) > before[w]]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
    finally:
        code, _, err = finish(proc)
    assert killed is not None, "no worker was ever seen busy"
    assert code == 0, err[-3000:]
    print(f"killed Dask worker process {killed} while it was busy")
    key = lineage_key(db, RUN)
    no_slot_twice(key)
    # workers compute in other processes: the same numbers up to float rounding
    assert [r[:3] + r[4:] for r in key] == [r[:3] + r[4:] for r in reference]
    for got, want in zip(key, reference):
        assert (got[3] is None) == (want[3] is None)
        assert got[3] is None or math.isclose(got[3], want[3], rel_tol=1e-6), (got, want)
