"""Progress that tells, anywhere: `nos.ui.progress.Stages` on its own (an injected clock and stream),
and real tiny searches in subprocesses -- stderr a file (timestamped lines) and a pseudo-terminal
(bars with fixed totals) -- plus the seconds of the funnel's stored evaluation rows."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from db.store import Store
from nos.ga.particle import ParticleGA
from nos.search import Progress, Run, SearchConfig
from nos.ui.progress import MIN_GAP, Stages, duration_text, eta_text, every_from_env, reporter

from .conftest import REPO

# a search with a funnel, small enough for seconds: 4 + 1 x 2 x 2 = 8 candidate slots
TINY = ["--promote", "1", "--initial", "4", "--particles", "2", "--timesteps", "1", "--mutations", "2",
        "--funnel", "1", "--horizons", "1", "--heldout-horizons", "1,2", "--validation-seeds", "1",
        "--test-seeds", "2", "--budget", "90", "--sine-pretrain-steps", "150", "--sine-width", "16",
        "--device", "cpu"]
SLOTS = 8
STAMP = r"\[\d\d:\d\d:\d\d\] "
STAGES = ("search", "baselines (validation)", "baselines (test)", "funnel (validation)", "funnel (test)")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def plain(every: float = 10.0) -> tuple[Stages, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return Stages(out, tty=False, every=every, clock=clock, heartbeat=False), out, clock


# ------------------------------------------------------------------ the reporter itself


def test_plain_lines_come_at_most_every_n_seconds_with_a_fixed_total() -> None:
    stages, out, clock = plain(every=10)
    stages.stage("search", 100, "candidates")
    for k in range(61):  # one candidate every half second for 30 s
        clock.t = 100 + 0.5 * k
        stages.advance(1, best="0.31")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[00:00:00] search: started, 100 candidates"
    assert [line[:10] for line in lines] == ["[00:00:00]", "[00:00:10]", "[00:00:20]", "[00:00:30]"]
    # at 10 s: 21 of 100 done, so 79 left at 10/21 s each
    assert lines[1] == f"[00:00:10] search: 21/100 candidates (21%), ETA {eta_text(21, 100, 10)}, best 0.31"
    assert eta_text(21, 100, 10) == "38s"
    assert all("/100 candidates" in line for line in lines[1:])
    # no work done for a while: the line still comes (what the background thread calls)
    clock.t = 145
    stages.tick()
    clock.t = 150
    stages.tick()  # 5 s after the last: nothing
    assert out.getvalue().splitlines()[-1].startswith("[00:00:45] search: 61/100")
    # what the stage is doing now: a line when it changes, never two within a second
    clock.t = 151
    stages.message("timestep 1/2")
    clock.t = 151 + MIN_GAP / 2
    stages.message("timestep 2/2")
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[00:00:51] search (timestep 1/2): 61/100 candidates (61%), ETA 33s, best 0.31"
    clock.t = 160
    stages.end()
    assert out.getvalue().splitlines()[-1] == "[00:01:00] search: stopped, 61/100 candidates in 1m00s, best 0.31"
    assert stages.stage_seconds == {"search": 60.0}


def test_stages_time_adds_up_and_the_summary_names_each() -> None:
    stages, out, clock = plain()
    stages.stage("pretraining", 3, "networks")
    clock.t += 120
    stages.advance(3)
    stages.stage("search", None, "candidates")  # ends pretraining; a count without a total
    clock.t += 4.25
    stages.advance(7)
    stages.stage("pretraining", 1, "networks")  # a stage run again adds up
    clock.t += 30
    assert stages.stage_seconds == {"pretraining": 150.0, "search": 4.25}  # the current one up to now
    stages.print_summary()
    text = out.getvalue()
    assert "pretraining: done, 3/3 networks in 2m00s" in text
    assert "search: started, candidates, count unknown" in text and "search: done, 7 candidates in 4s" in text
    assert text.splitlines()[-1].endswith("time per stage: pretraining 150 s, search 4.2 s")
    assert re.fullmatch(STAMP + r"time per stage: .*", text.splitlines()[-1])


def test_eta_and_duration_texts() -> None:
    assert eta_text(0, 10, 5) == "?" and eta_text(10, 10, 5) == "0s" and eta_text(3, None, 5) == ""
    assert eta_text(1, 3, 65) == "2m10s"
    assert [duration_text(s) for s in (0, 45, 130, 3720)] == ["0s", "45s", "2m10s", "1h02m"]


def test_every_comes_from_the_environment_and_never_below_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOS_PROGRESS_EVERY", "3")
    assert every_from_env() == 3
    monkeypatch.setenv("NOS_PROGRESS_EVERY", "0.01")
    assert every_from_env() == MIN_GAP
    monkeypatch.setenv("NOS_PROGRESS_EVERY", "soon")
    assert every_from_env() == 10
    assert Stages(io.StringIO(), tty=False, every=0).every == MIN_GAP


def test_the_background_thread_writes_while_no_work_completes() -> None:
    out = io.StringIO()
    with Stages(out, tty=False, every=1) as stages:
        stages.stage("funnel (validation)", 5, "horizons")
        time.sleep(2.5)  # one long training: nothing advances
    lines = out.getvalue().splitlines()
    assert any(re.fullmatch(STAMP + r"funnel \(validation\): 0/5 horizons \(0%\), ETA \?", line) for line in lines), lines
    assert lines[-1].startswith("[00:00:0") and "funnel (validation): stopped, 0/5 horizons" in lines[-1]


def test_terminal_bars_keep_their_total_and_notes_do_not_tear_them() -> None:
    out = io.StringIO()
    with Stages(out, tty=True, every=1, heartbeat=False) as stages:
        stages.stage("search", 8, "candidates")
        for _ in range(8):
            stages.advance(1, passed="50%")
            stages.note("a note")
        stages.stage("funnel (test)", 2, "horizons")
        stages.advance(2)
    text = out.getvalue()
    totals = {int(m.group(2)) for m in re.finditer(r"search: +\d+%\|[^|]*\| *(\d+)/(\d+) \[", text)}
    assert totals == {8}
    assert "a note\n" in text and "8/8" in text and "2/2" in text
    assert not re.search(STAMP, text)  # bars, not plain lines


def test_a_plain_callable_hears_the_messages() -> None:
    said: list[str] = []
    rep = reporter(said.append)
    rep.stage("baselines (test)", 6, "trainings")
    rep.advance(3)
    rep.message("t_max = 1")
    assert said == ["baselines (test): 6 trainings", "t_max = 1"]
    assert reporter(Progress()) is not None


def test_search_stage_total_is_fixed_and_reached_even_with_missing_particles(tmp_path: Path) -> None:
    """More particles than the initial population can fill: the child slots of the missing
    particles are counted as settled, so the search stage ends exactly at its fixed total. The
    old positional callbacks still hear every chunk."""
    cfg = SearchConfig(initial=3, particles=4, timesteps=1, mutations=2, funnel=0, horizons=(1.0,), budget_fpe=60,
                       sine={"pretrain_steps": 100, "width": 8}, cache_dir=str(tmp_path / "cache"))
    events: list[tuple] = []
    judged: list[dict] = []
    progress = Progress(lambda n: None, judged.extend, lambda msg: None,
                        stage=lambda name, total, unit: events.append(("stage", name, total)),
                        advance=lambda n=1, **kw: events.append(("advance", n)))
    with Store(str(tmp_path / "x.sqlite")) as store:
        with Run.create(store, "p", cfg, "cpu", strategy=ParticleGA.of(cfg), progress=progress) as run:
            run.optimize()
            run.funnel()
        n_rows = len(store.individuals(run.id))
    total = ParticleGA.of(cfg).total()
    assert [e[1] for e in events if e[0] == "stage"] == ["pretraining", "Adam reference", "search"]
    assert ("stage", "pretraining", len(cfg.search_seeds)) in events  # no funnel: the search seeds' networks
    start = events.index(("stage", "search", total))
    assert total == 3 + 1 * 4 * 2
    assert sum(e[1] for e in events[start:] if e[0] == "advance") == total
    assert len(judged) == n_rows


# ------------------------------------------------------------------ real runs


def evolve_cmd(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nos.evolve", "--db", str(tmp / "nos.sqlite"), "--cache-dir",
            str(tmp.parent / "cache"), *TINY, *args]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """A tiny search with stderr a file (as under nohup or a batch scheduler)."""
    tmp = tmp_path_factory.mktemp("plain")
    err_path = tmp / "stderr.txt"
    with open(err_path, "w") as err:
        res = subprocess.run(evolve_cmd(tmp, "--name", "plain", "--format", "json"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=err, text=True, timeout=300, env={**os.environ, "NOS_PROGRESS_EVERY": "1"})
    stderr = err_path.read_text()
    assert res.returncode == 0, stderr[-3000:]
    return tmp / "nos.sqlite", stderr, json.loads(res.stdout)


def test_without_a_terminal_every_stage_writes_timestamped_lines_with_counts(plain_run) -> None:
    _, stderr, _ = plain_run
    lines = stderr.splitlines()
    assert "\r" not in stderr  # no bar redrawn in a file
    assert f"search: started, {SLOTS} candidates" in stderr
    assert re.search(STAMP + rf"search: done, {SLOTS}/{SLOTS} candidates in \d+s, passed \d+%, dups \d+, best ", stderr)
    for name in STAGES:
        started = [line for line in lines if re.fullmatch(STAMP + re.escape(name) + r": started, \d+ \w+", line)]
        done = [line for line in lines if re.fullmatch(STAMP + re.escape(name) + r": done, (\d+)/\1 \w+ in .*", line)]
        assert len(started) == 1 and len(done) == 1, (name, stderr[-3000:])
    # every progress line of a stage shows the same total
    for name in STAGES:
        totals = set(re.findall(STAMP + re.escape(name) + r"(?: \([^)]*\))?: (?:started, |done, \d+/|\d+/)(\d+) ", stderr))
        assert len(totals) == 1, (name, totals)
    assert lines[-1].startswith("time per stage: ") and all(f"{name} " in lines[-1] for name in STAGES)


def test_json_summary_has_the_seconds_of_every_stage(plain_run) -> None:
    _, _, summary = plain_run
    stage_seconds = summary["stage_seconds"]
    assert set(STAGES) <= set(stage_seconds) <= {*STAGES, "pretraining", "Adam reference"}
    assert all(s >= 0 for s in stage_seconds.values())
    assert sum(stage_seconds.values()) <= summary["seconds"] + 0.05


def test_funnel_rows_store_their_real_seconds(plain_run) -> None:
    db, _, _ = plain_run
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT split, seconds FROM evaluations WHERE split IN ('validation', 'test')").fetchall()
    finally:
        con.close()
    assert {split for split, _ in rows} == {"validation", "test"}
    assert all(s > 0 for _, s in rows), rows


def read_pty(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stderr a pseudo-terminal of 160 columns; (exit status, what it drew)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_in_a_terminal_each_stage_is_a_bar_with_a_fixed_total(tmp_path: Path) -> None:
    rc, drawn = read_pty(evolve_cmd(tmp_path, "--name", "tty"))
    assert rc == 0, drawn[-3000:]
    search = [(int(m.group(1)), int(m.group(2)))
              for m in re.finditer(r"search: +\d+%\|[^|]*\| *(\d+)/(\d+) \[", drawn)]
    assert search and {total for _, total in search} == {SLOTS}, drawn[-3000:]
    assert [n for n, _ in search] == sorted(n for n, _ in search) and search[-1][0] == SLOTS
    for name in STAGES[1:]:
        totals = set(re.findall(re.escape(name) + r": +\d+%\|[^|]*\| *\d+/(\d+) \[", drawn))
        assert len(totals) == 1, (name, totals)
    assert not re.search(STAMP, drawn)  # bars, not the plain lines
    last = [line for line in re.split(r"[\r\n]+", drawn) if line.strip()][-1]
    assert last.startswith("time per stage: ") and "search " in last


def test_baselines_command_reports_its_stages(tmp_path: Path) -> None:
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        res = subprocess.run([sys.executable, "-m", "nos.baselines", "--db", str(tmp_path / "b.sqlite"), "--cache-dir",
                              str(tmp_path / "cache"), "--horizons", "1", "--validation-seeds", "1",
                              "--test-seeds", "1", "--budget", "60", "--sine-pretrain-steps", "100", "--sine-width", "8",
                              "--device", "cpu", "--format", "json"], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stderr = err_path.read_text()
    assert res.returncode == 0, stderr[-3000:]
    assert re.search(STAMP + r"pretraining: started, 2 networks", stderr)
    assert re.search(STAMP + r"baselines \(validation\): started, 5 trainings", stderr)  # 1 gradient batch + 4 RandOpt
    assert re.search(STAMP + r"baselines \(test\): done, 2/2 trainings", stderr)
    assert stderr.splitlines()[-1].startswith("time per stage: pretraining ")
    seconds = json.loads(res.stdout)["stage_seconds"]
    assert set(seconds) == {"pretraining", "baselines (validation)", "baselines (test)"}
