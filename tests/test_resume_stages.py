"""A run SIGKILLed in every stage of its life -- pretraining, the search, the baselines on validation
and test seeds, the funnel on validation and test seeds -- and resumed with ``--resume`` until it
finishes, ends exactly like the uninterrupted run: the same comparison, the same rows (none lost,
none twice), a sound database after every kill, and no unit that was stored before a kill trained
again after it. Real subprocesses, real SQLite files, real SIGKILLs.

How a kill is aimed: the run's stderr is not a terminal, so it carries a timestamped line at the
start and end of every stage (`nos.ui.progress`); a thread reads the child's stderr and the test
SIGKILLs it a random moment after the wanted stage's start line (at the latest at its end line). What "not trained again" means is
read from the progress lines of the run that resumes: each stage starts with its own count of work
(`pretraining: started, 3 networks`, `funnel (validation): started, 2 horizons`), which must be
exactly what the database and the cache held undone at the kill -- and the stored rows and cache
files of before the kill must be the very ones (same ids, same inodes) at the end."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import REPO, run_entry

RUN = "tiny"
# TINY_EVOLVE (tests/conftest.py) with two funnel candidates, and held-out seeds and horizons enough
# for every stage to take about a second (each of the 4 horizons a unit of its own), the whole
# run about 10 s on a 2-core CPU
ARGS = [
    "--initial", "6", "--particles", "2", "--timesteps", "2", "--mutations", "2", "--funnel", "2",
    "--sine-pretrain-steps", "50", "--sine-width", "8", "--horizons", "1", "--budget", "60",
    "--device", "cpu", "--validation-seeds", "3", "--test-seeds", "4", "--heldout-horizons", "1,2,5,10",
]
HORIZONS = (1.0, 2.0, 5.0, 10.0)
NETWORKS = 2 + 3 + 4  # pretrained: one per search, validation and test seed
# every stage of a run, in order (the Adam reference is too short to aim at, but a random kill
# may land in it)
STAGES = ("pretraining", "Adam reference", "search", "baselines (validation)", "baselines (test)",
          "funnel (validation)", "funnel (test)")
ENV = {**os.environ, "NOS_PROGRESS_EVERY": "1", "OMP_NUM_THREADS": "1"}

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (?P<stage>.+?): (?P<what>started|done), (?P<n>\d+)")


# ---------------------------------------------------------------------- a child and its stderr


class Child:
    """``nos evolve`` in a subprocess, its stderr read line by line (with the time each arrived)
    by a thread, so that the test can wait for a stage's line and kill at once."""

    def __init__(self, db: Path, cache: Path, resume: bool) -> None:
        where = ["--db", str(db), "--device", "cpu"]
        args = [*where, "--resume", RUN] if resume else [*where, "--cache-dir", str(cache), "--name", RUN, *ARGS]
        self.popen = subprocess.Popen([sys.executable, "-m", "nos.evolve", *args], cwd=REPO, env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_stage(self, stages: set[str], timeout: float = 240) -> str | None:
        """The first stage of `stages` whose start line appears; None if the child ends first."""
        seen = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = LINE.match(line)
                    if m and m["what"] == "started" and m["stage"] in stages:
                        return m["stage"]
                seen = len(self.lines)
                if self._eof:
                    return None
                left = deadline - time.monotonic()
                assert left > 0, f"no stage of {sorted(stages)} started in {timeout} s:\n{self.text()[-3000:]}"
                self._cond.wait(left)

    def wait_in_stage(self, stage: str, seconds: float) -> None:
        """Wait `seconds`, but no longer than until `stage`'s done line appears (or the child
        ends): a kill aimed inside a stage stays inside it (or at its very end) however much
        faster this run is than the reference whose seconds the aim was scaled by -- the stages
        of the tiny run take tenths of a second, so the jitter of one run is as large as a stage."""
        deadline = time.monotonic() + seconds
        seen = 0
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = LINE.match(line)
                    if m and m["what"] == "done" and m["stage"] == stage:
                        return
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return
                self._cond.wait(left)

    def kill(self) -> bool:
        """SIGKILL it now if it still runs; True if the kill is what ended it."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        return self.finish() == -signal.SIGKILL

    def finish(self, timeout: float = 300) -> int:
        rc = self.popen.wait(timeout)
        self._reader.join(timeout)
        return rc

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stage_lines(self) -> list[tuple[float, str, str, int]]:
        """(arrival, stage, started / done, count) of every stage line, in order."""
        return [(t, m["stage"], m["what"], int(m["n"])) for t, line in self.lines if (m := LINE.match(line))]

    def last_stage(self) -> tuple[str | None, bool]:
        """The stage of the last start line, and whether its done line came after it (a kill
        landed inside the stage when it did not)."""
        stage, done = None, False
        for _, name, what, _ in self.stage_lines():
            if what == "started":
                stage, done = name, False
            elif name == stage:
                done = True
        return stage, done


# ---------------------------------------------------------------------- what is stored


@dataclass
class Snapshot:
    """What a run has stored: in the database and in its cache of pretrained networks."""

    networks: dict[str, tuple[int, int]]  # cache file -> (inode, mtime_ns): a rewrite changes both
    individuals: dict[str, int]  # slot -> id
    baselines: dict[str, set[float]]  # split -> horizons stored under the protocol's keys
    units: set[tuple[str, float]]  # the funnel's stored (split, horizon)
    status: str | None
    evaluations: Counter = field(default_factory=Counter)  # every row's content, without ids
    baseline_rows: Counter = field(default_factory=Counter)
    individual_rows: Counter = field(default_factory=Counter)
    by_id: dict[tuple[str, int], tuple] = field(default_factory=dict)  # (table, id) -> the row's content


def quick_check(db: Path) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    finally:
        con.close()


def snapshot(db: Path, cache: Path) -> Snapshot:
    networks = {}
    for path in sorted(cache.glob("*.npz")):
        # written to a temporary file and renamed: every cache file there is whole, whatever the kill
        with np.load(path, allow_pickle=False) as f:
            assert f["theta"].dtype == np.float32 and f["theta"].ndim == 1, path
        st = path.stat()
        networks[path.name] = (st.st_ino, st.st_mtime_ns)
    con = sqlite3.connect(db)
    try:
        q = con.execute
        status = q("SELECT status FROM runs WHERE name = ?", (RUN,)).fetchone()
        baselines: dict[str, set[float]] = {"validation": set(), "test": set()}
        for split, h in q("SELECT DISTINCT split, horizon FROM baselines WHERE protocol IS NOT NULL"):
            baselines[split].add(h)
        join = "FROM evaluations e JOIN individuals i ON e.individual_id = i.id"
        rows = {
            "evaluations": list(q(f"SELECT e.id, i.slot, e.task, e.split, e.horizon, e.lr, e.seed, e.loss {join}")),
            "baselines": list(q("SELECT id, protocol, task, method, horizon, seed, split, hparam, loss FROM baselines")),
            "individuals": list(q("SELECT id, slot, genome_hash, status, fitness, lr, fidelity FROM individuals")),
        }
        return Snapshot(
            networks=networks,
            individuals=dict(q("SELECT slot, id FROM individuals")),
            baselines=baselines,
            units=set(q(f"SELECT DISTINCT e.split, e.horizon {join} WHERE e.split != 'search'")),
            status=status[0] if status else None,
            evaluations=Counter(tuple(r[1:]) for r in rows["evaluations"]),
            baseline_rows=Counter(tuple(r[1:]) for r in rows["baselines"]),
            individual_rows=Counter(tuple(r[1:]) for r in rows["individuals"]),
            by_id={(table, r[0]): tuple(r[1:]) for table, rs in rows.items() for r in rs},
        )
    finally:
        con.close()


def compare_json(db: Path) -> dict:
    """`nos query compare RUN --format json` (the command's entry point, in this process: seconds
    saved per call), candidates named by slot (ids are the database's)."""
    from nos.query import main as query_main

    code, out, err = run_entry(query_main, ["compare", RUN, "--db", str(db), "--format", "json"])
    assert code == 0, err[-2000:]
    con = sqlite3.connect(db)
    try:
        slot = {f"#{i}": f"#{s}" for i, s in con.execute("SELECT id, slot FROM individuals")}
    finally:
        con.close()
    text = re.sub(r"#\d+", lambda m: slot[m.group(0)], out)
    return json.loads(text)


# ---------------------------------------------------------------------- the uninterrupted run


@dataclass
class Reference:
    db: Path
    cache: Path
    stored: Snapshot
    comparison: dict
    seconds: dict[str, float]  # stage -> its wall seconds, as this test saw the lines arrive
    counts: dict[str, int]  # stage -> the count of its start line (all of its work)
    order: list[str]  # the stages in the order they ran


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("reference")
    child = Child(base / "nos.sqlite", base / "cache", resume=False)
    assert child.finish() == 0, child.text()[-3000:]
    seconds, counts, order, start = {}, {}, [], {}
    for t, stage, what, n in child.stage_lines():
        if what == "started":
            start[stage], counts[stage] = t, n
            order.append(stage)
        else:
            seconds[stage] = t - start[stage]
    assert order == list(STAGES), order
    assert counts["pretraining"] == NETWORKS and counts["funnel (validation)"] == len(HORIZONS)
    return Reference(base / "nos.sqlite", base / "cache", snapshot(base / "nos.sqlite", base / "cache"),
                     compare_json(base / "nos.sqlite"), seconds, counts, order)


def todo(stage: str, stored: Snapshot, ref: Reference) -> int | None:
    """How much of a stage's work (its start line's count) is still undone in `stored`; None for
    a stage whose count does not say (the search's total is fixed, the Adam references few)."""
    if stage == "pretraining":
        return NETWORKS - len(stored.networks)
    if stage.startswith("baselines"):
        split = stage[len("baselines ("):-1]
        per_horizon = ref.counts[stage] // len(HORIZONS)
        return (len(HORIZONS) - len(stored.baselines[split])) * per_horizon
    if stage.startswith("funnel"):
        split = stage[len("funnel ("):-1]
        return len(HORIZONS) - sum((split, h) in stored.units for h in HORIZONS)
    return None


def left_fraction(stage: str, stored: Snapshot, ref: Reference) -> float:
    """The share of a stage's work left in `stored` (to aim a kill inside what is left)."""
    n = todo(stage, stored, ref)
    if n is not None:
        return n / ref.counts[stage]
    if stage == "search":
        return 1 - len(stored.individuals) / len(ref.stored.individuals)
    return 1.0


def check_resumed(child: Child, before: Snapshot, ref: Reference) -> None:
    """The run that resumed after a kill did only what `before` held undone: every stage it ran
    started with exactly the count left, and every stage it went past without starting had
    nothing left (and says what it reused)."""
    lines = child.stage_lines()
    started = {stage: n for _, stage, what, n in lines if what == "started"}
    reached = max((STAGES.index(s) for s in started), default=-1)
    finished = child.popen.returncode == 0
    text = child.text()
    for stage in STAGES:
        left = todo(stage, before, ref)
        if left is None:
            continue
        if stage in started:
            assert started[stage] == left, (stage, started[stage], left, text[-3000:])
        elif finished or STAGES.index(stage) < reached:
            assert left == 0, (stage, left, text[-3000:])
        if (stage in started or finished or STAGES.index(stage) < reached) and left < ref.counts[stage]:
            split = stage[stage.find("(") + 1:-1]
            if stage.startswith("baselines"):
                assert f"reusing stored {split} rows" in text, (stage, text[-3000:])
            elif stage.startswith("funnel"):
                assert f"reusing stored funnel ({split}) rows" in text, (stage, text[-3000:])


@dataclass
class Kill:
    aimed: str  # the stage the kill was aimed at
    landed: str | None  # the stage whose start line came last before the kill
    inside: bool  # no done line of that stage before the kill
    left: dict[str, int]  # stage -> its work left after the kill (counts of the start lines)


def done_units(stage: str, db: Path, cache: Path) -> int:
    """How many units of a stage are stored now (cache files, baseline horizons, funnel units),
    read while the run writes (SQLite's WAL lets a reader in)."""
    if stage == "pretraining":
        return len(list(cache.glob("*.npz")))
    split = stage[stage.find("(") + 1:-1]
    if stage.startswith("baselines"):
        sql = "SELECT COUNT(DISTINCT horizon) FROM baselines WHERE protocol IS NOT NULL AND split = ?"
    else:
        sql = "SELECT COUNT(DISTINCT horizon) FROM evaluations WHERE split = ?"
    con = sqlite3.connect(db, timeout=30)
    try:
        return int(con.execute(sql, (split,)).fetchone()[0])
    finally:
        con.close()


def kill_and_resume(base: Path, plan: list[tuple[str, float | None]], ref: Reference
                    ) -> tuple[list[Kill], list[Snapshot], int]:
    """One run, made in `base`, SIGKILLed once per item of `plan` and resumed after each kill,
    then resumed to the end. An item (stage, u) kills u x the part of that stage's reference time
    still to do after its start line (a stage with nothing left: at the start of the next stage
    that runs); (stage, None) kills a few random milliseconds after the stage has stored a unit
    more than it started with (a kill that leaves the stage partly done). Returns the kills,
    what was stored at each, and the count of runs."""
    db, cache = base / "nos.sqlite", base / "cache"
    kills: list[Kill] = []
    history: list[Snapshot] = []
    stored: Snapshot | None = None
    runs = 0
    rng = random.Random(len(plan))
    for stage, u in plan:
        if stored is not None and stored.status == "finished":
            break  # a kill landed after the run was marked finished: nothing left to resume
        child = Child(db, cache, resume=stored is not None)
        runs += 1
        aim = set(STAGES[STAGES.index(stage):])
        hit = child.wait_stage(aim)
        if hit is not None and u is None:
            first = done_units(hit, db, cache)
            while child.popen.poll() is None and child.last_stage() == (hit, False) \
                    and done_units(hit, db, cache) == first:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))
        elif hit is not None and u is not None:
            frac = 1.0 if stored is None else left_fraction(hit, stored, ref)
            child.wait_in_stage(hit, u * ref.seconds[hit] * frac)
        if not child.kill():
            assert child.popen.returncode == 0, child.text()[-3000:]
            if stored is not None:
                check_resumed(child, stored, ref)
            return kills, history, runs  # it finished before the kill: the plan was longer than the run
        quick_check(db)
        if stored is not None:
            check_resumed(child, stored, ref)
        stored = snapshot(db, cache)
        history.append(stored)
        landed, done = child.last_stage()
        left = {s: n for s in STAGES if (n := todo(s, stored, ref)) is not None}
        kills.append(Kill(stage, landed, landed is not None and not done, left))
    if stored is None or stored.status != "finished":
        child = Child(db, cache, resume=stored is not None)
        runs += 1
        assert child.finish() == 0, child.text()[-3000:]
        if stored is not None:
            check_resumed(child, stored, ref)
    return kills, history, runs


def assert_same_as_reference(base: Path, history: list[Snapshot], ref: Reference) -> Snapshot:
    """Everything the killed and resumed run stored is what the uninterrupted one stored, and what
    was stored at each kill is still there, the very same rows (ids) and cache files (inodes):
    the runs that resumed read them, they did not remove and write them again."""
    db, cache = base / "nos.sqlite", base / "cache"
    quick_check(db)
    final = snapshot(db, cache)
    assert final.status == "finished"
    assert compare_json(db) == ref.comparison
    for what in ("evaluations", "baseline_rows", "individual_rows"):
        got, want = getattr(final, what), getattr(ref.stored, what)
        assert got == want, (what, "lost", list((want - got).items())[:5], "twice or new", list((got - want).items())[:5])
    assert sorted(final.networks) == sorted(ref.stored.networks)
    for k, before in enumerate(history):
        kept = {key: row for key, row in before.by_id.items() if final.by_id.get(key) == row}
        assert kept == before.by_id, (k, sorted(set(before.by_id) - set(kept))[:5])
        assert all(final.networks[name] == st for name, st in before.networks.items()), k
    return final


# ---------------------------------------------------------------------- the tests


# the default suite: one kill in each of four stages (the search's kills are test_evolve's; all
# stages are the slow test's)
AIMED = ("pretraining", "baselines (validation)", "funnel (validation)", "funnel (test)")


def test_sigkill_in_four_stages_resumes_exactly(tmp_path: Path, reference: Reference) -> None:
    plan: list[tuple[str, float | None]] = [(stage, None) for stage in AIMED]  # each after a unit of the stage
    kills, history, runs = kill_and_resume(tmp_path, plan, reference)
    assert [k.aimed for k in kills] == list(AIMED), kills
    assert [(k.landed, k.inside) for k in kills] == [(s, True) for s in AIMED], kills  # each inside its stage
    assert runs == len(AIMED) + 1
    assert_same_as_reference(tmp_path, history, reference)
    for k in kills:  # with -s: what each kill left undone (what the next run had to do, and did)
        print(f"\n  killed in {k.landed:<24} left {k.left}", end="")


@pytest.mark.slow
def test_sigkill_at_twenty_random_moments(tmp_path: Path, reference: Reference) -> None:
    """20 kills at random moments spread over the whole run (uniform over the reference run's
    timeline, from the first stage's start to the last one's end), each resumed."""
    seed = int(os.environ.get("NOS_KILL_SEED", "20"))
    rng = random.Random(seed)
    spans, t = [], 0.0
    for stage in reference.order:
        spans.append((stage, t, t + reference.seconds[stage]))
        t += reference.seconds[stage]
    plan: list[tuple[str, float | None]] = []
    for moment in sorted(rng.uniform(0, t) for _ in range(20)):
        stage, a, b = next(s for s in spans if s[1] <= moment < s[2])
        plan.append((stage, (moment - a) / (b - a)))
    start = time.monotonic()
    kills, history, runs = kill_and_resume(tmp_path, plan, reference)
    final = assert_same_as_reference(tmp_path, history, reference)
    per_stage = Counter(k.landed for k in kills)
    print(f"\n20-kill test (seed {seed}): {len(kills)} kills in {runs} runs, {time.monotonic() - start:.0f} s; "
          f"kills per stage {dict(per_stage)}; inside a stage {sum(k.inside for k in kills)}; rows: "
          f"{sum(final.evaluations.values())} evaluations, {sum(final.baseline_rows.values())} baselines, "
          f"{sum(final.individual_rows.values())} individuals, {len(final.networks)} networks")
    for k in kills:
        print(f"  aimed {k.aimed:<24} landed {k.landed!s:<24} inside {k.inside!s:<5} left {k.left}")
    assert len(kills) >= 18, kills  # the last moments may fall after the resumed run's end
    assert len(per_stage) >= 5, per_stage


# ---------------------------------------------------------------------- a partial funnel


def _copy(ref: Reference, dest: Path, *sql: str) -> Path:
    """The reference database copied, changed by `sql` as a kill (or another program) could."""
    db = dest / "nos.sqlite"
    dest.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(ref.db)
    out = sqlite3.connect(db)
    try:
        src.backup(out)
        for statement in sql:
            out.execute(statement)
        out.commit()
    finally:
        src.close()
        out.close()
    return db


def _resume(db: Path) -> tuple[subprocess.Popen, Path]:
    """``nos evolve --resume`` started on `db`; its stderr goes to a file beside it (a pipe nobody
    reads until the end could fill and stall it)."""
    err = db.with_suffix(".stderr")
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nos.evolve", "--db", str(db), "--device", "cpu", "--resume",
                                 RUN], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=f, text=True)
    return proc, err


def test_a_partial_funnel_is_not_reached_and_resumes_only_its_missing_units(
        tmp_path: Path, reference: Reference, capsys: pytest.CaptureFixture[str]) -> None:
    """The states a kill can leave the funnel in, made exactly: two test units missing (every
    reader says "not reached yet"; the resumed run trains those two alone), every unit stored but
    the run not marked finished (the resumed run trains nothing and finishes), and -- what no kill
    can leave -- a unit short of one row (one line, the database is damaged; nothing written)."""
    from db.store import Store
    from nos.search.config import SearchConfig
    from nos.search.funnel import comparison, validated_lrs

    from .conftest import in_process

    unit = "DELETE FROM evaluations WHERE split = 'test' AND horizon IN (5.0, 10.0)"
    interrupted = "UPDATE runs SET status = 'interrupted'"
    partial = _copy(reference, tmp_path / "partial", unit, interrupted)  # killed in the funnel (test)
    whole = _copy(reference, tmp_path / "whole", interrupted)  # killed after its last unit, before "finished"
    broken = _copy(reference, tmp_path / "broken", interrupted,  # a unit not whole: changed behind nos's back
                   "DELETE FROM evaluations WHERE id = (SELECT max(id) FROM evaluations WHERE split = 'validation' "
                   "AND horizon = 2.0)")
    procs = {name: _resume(db) for name, db in (("partial", partial), ("whole", whole), ("broken", broken))}
    try:
        # every reader: a partial funnel is "not reached yet", never a partial table
        with Store(str(partial), create=False, readonly=True) as store:
            run = store.get_run(RUN)
            cfg = SearchConfig.from_json(run["config"])
            assert comparison(store, run["id"], cfg) is None
            champion = reference.comparison["champion"][1:]  # named by its slot: its id in this copy
            ind = next(i for i in store.individuals(run["id"]) if i["slot"] == champion)
            assert validated_lrs(store, run["id"], cfg, ind["id"]) == {}
        code, out, err = in_process(capsys, "compare", RUN, "--db", str(broken))
        assert code == 2 and out == "" and "not whole" in err and len(err.strip().splitlines()) == 1, err
        results = {name: (p.wait(300), err.read_text()) for name, (p, err) in procs.items()}
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    rc, err = results["partial"]
    assert rc == 0, err[-3000:]
    assert "funnel (test): started, 2 horizons" in err and "funnel (validation): started" not in err, err
    assert "reusing stored funnel (validation) rows" in err and "reusing stored funnel (test) rows" in err
    assert "baselines (validation): started" not in err and "pretraining: started" not in err
    rc, err = results["whole"]
    assert rc == 0, err[-3000:]
    assert "funnel (validation): started" not in err and "funnel (test): started" not in err, err
    for db in (partial, whole):
        after = snapshot(db, reference.cache)
        assert after.status == "finished"
        assert after.evaluations == reference.stored.evaluations
        assert after.baseline_rows == reference.stored.baseline_rows
        assert compare_json(db) == reference.comparison
    rc, err = results["broken"]  # one line, the run not finished, no row written
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "not whole" in last and "Traceback" not in err, err[-3000:]
    after = snapshot(broken, reference.cache)
    assert sum(after.evaluations.values()) == sum(reference.stored.evaluations.values()) - 1
    assert after.status != "finished"


# ---------------------------------------------------------------------- the pretraining cache


def _tiny_config():
    from nos.tasks.sine import SineConfig

    return SineConfig(width=8, pretrain_steps=5, pretrain_batch=16)  # milliseconds a pretraining


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _damaged(good: bytes, cfg) -> dict[str, bytes]:
    """A cache file as a kill, a full disk, bit rot or another program could leave it."""
    import dataclasses

    theta = np.load(io.BytesIO(good), allow_pickle=False)["theta"]
    other = json.dumps({**json.loads(json.dumps(dataclasses.asdict(cfg))), "width": 9})
    flipped = bytearray(good)
    flipped[good.find(theta.tobytes()[:8]) + 5] ^= 0xFF
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("theta.npy", b"not an npy file")
        z.writestr("config.npy", b"nor this")
    npy = io.BytesIO()
    np.save(npy, theta)
    config = json.dumps(dataclasses.asdict(cfg))
    return {
        "empty": b"",
        "truncated to 1 byte": good[:1],
        "truncated to half": good[: len(good) // 2],
        "truncated by 1 byte": good[:-1],
        "garbage bytes": bytes(random.Random(0).randrange(256) for _ in range(len(good))),
        "a flipped bit in the weights": bytes(flipped),
        "an npy, not an npz": npy.getvalue(),
        "a zip of other files": zipped.getvalue(),
        "weights of the wrong shape": _npz(theta=theta[:-1], config=config),
        "weights of another dtype": _npz(theta=theta.astype(np.float64), config=config),
        "weights not finite": _npz(theta=np.full_like(theta, np.nan), config=config),
        "no config": _npz(theta=theta),
        "another config": _npz(theta=theta, config=other),
        "a pickled object": _npz(theta=np.array([{"x": 1}], dtype=object), config=config),
    }


def test_a_damaged_cache_file_is_never_loaded_but_pretrained_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, single_thread: None) -> None:
    """Truncated, garbage, the wrong shape or config, an npz that fails to load: each is detected,
    pretrained again to the very same weights (pretraining is deterministic) with one warning
    naming the file, and replaced by a good file; `pretrain_missing` counts it as missing."""
    from nos.tasks.sine import cache_path, pretrain_cached, pretrain_missing
    from nos.ui.progress import Reporter

    cfg = _tiny_config()
    want, loaded = pretrain_cached(cfg, 0, tmp_path)
    assert not loaded
    path = cache_path(cfg, 0, tmp_path)
    good = path.read_bytes()

    class Count(Reporter):
        def __init__(self) -> None:
            self.totals: list[int | None] = []

        def stage(self, name: str, total: int | None, unit: str) -> None:
            self.totals.append(total)

        def advance(self, n: int = 1, **postfix: object) -> None:
            pass

        def message(self, msg: str) -> None:
            pass

    for what, data in _damaged(good, cfg).items():
        for via_missing in (False, True):
            path.write_bytes(data)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="nos.tasks.sine"):
                if via_missing:  # what a run's "pretraining" stage counts
                    counted = Count()
                    assert pretrain_missing([(cfg, 0, tmp_path)], "cpu", counted) == 1, what
                    assert counted.totals == [1], what
                    got, loaded = pretrain_cached(cfg, 0, tmp_path)
                    assert loaded, what
                else:
                    got, loaded = pretrain_cached(cfg, 0, tmp_path)
                    assert not loaded, what
            assert torch.equal(got, want), what
            warnings = [r.getMessage() for r in caplog.records]
            assert len(warnings) == 1 and str(path) in warnings[0] and "pretraining them again" in warnings[0], \
                (what, warnings)
            assert "\n" not in warnings[0] and "Traceback" not in warnings[0], warnings
            assert path.read_bytes() == good, what  # replaced by the file a clean pretraining writes
    assert pretrain_missing([(cfg, 0, tmp_path)], "cpu", Count()) == 0  # a good file is not pretrained again
    assert not list(tmp_path.glob("*.tmp"))


_WRITER = """
import io, sys, time
import numpy as np
from nos.tasks.sine import SineConfig, pretrain_cached

real_savez = np.savez


def slow_savez(file, **arrays):
    # the very bytes np.savez writes, written 64 at a time with a pause between: a kill at a random
    # moment lands mid-write most of the time (a real cache file is written in microseconds)
    buf = io.BytesIO()
    real_savez(buf, **arrays)
    data = buf.getvalue()
    for i in range(0, len(data), 64):
        file.write(data[i : i + 64])
        file.flush()
        time.sleep(0.002)


np.savez = slow_savez
cfg = SineConfig(width=8, pretrain_steps=5, pretrain_batch=16)
start = int(sys.argv[2])
pretrain_cached(cfg, start, sys.argv[1])  # torch's first call is slow: the kills aim at the loop
print("ready", flush=True)
for seed in range(start + 1, 10_000):
    pretrain_cached(cfg, seed, sys.argv[1])
"""


@pytest.mark.slow  # the default suite keeps its sibling fault tests; this one is the heavier variant
def test_sigkill_while_writing_the_cache_never_leaves_a_truncated_file(tmp_path: Path) -> None:
    """Pretraining writes its cache file to a temporary file and renames it: SIGKILLs at random
    moments of a process that does nothing but pretrain and write cache files (slowly, so that
    the kills land mid-write) leave every cache file whole -- at most a stray temporary file,
    which is never loaded -- and every file loads afterwards without a retraining."""
    from nos.tasks.sine import cache_path, pretrain_cached

    cfg = _tiny_config()
    rng = random.Random(7)
    seed, stray = 0, 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(seed)], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        files = sorted(tmp_path.glob("*.npz"))
        for path in files:
            with np.load(path, allow_pickle=False) as f:
                assert f["theta"].shape == (cfg_params(cfg),), path
        seed = len(files)  # written in seed order: the next process goes on from the first missing
        stray = len(list(tmp_path.glob("*.tmp")))  # the kills that landed mid-write
    assert seed >= 5 and stray >= 1, (seed, stray)
    print(f"\n{seed} cache files written, {stray} kill(s) of 5 mid-write (a temporary file left)")
    for s in range(seed):  # what a resumed run reads: every file loads, none is trained again
        assert pretrain_cached(cfg, s, tmp_path)[1]
    assert not cache_path(cfg, seed, tmp_path).exists()


def cfg_params(cfg) -> int:
    from nos.tasks.sine import ParamLayout

    return ParamLayout.for_config(cfg).n_params
