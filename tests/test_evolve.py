"""The particle GA end to end: real searches in subprocesses writing real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.memory import MemoryStorage
from db.store import Store
from nos.search import Proposal, Run, SearchConfig
from nos.search.objective import LocalEvaluator
from search_space.genome import from_json

from .conftest import EVOLVE_TINY, REPO, lineage_key, sigkill_at

ROOT = REPO
TINY = EVOLVE_TINY


def evolve(tmp: Path, *args: str, db: str = "nos.sqlite", check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nos.evolve", "--db", str(tmp / db), "--cache-dir", str(tmp.parent / "cache"), *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


PROMOTED = ["--promote", "0.5"]  # multi-fidelity: a cheap first stage, half of each chunk promoted


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evolve")
    evolve(tmp, *TINY, "--name", "ref", "--seed", "3")
    return tmp / "nos.sqlite"


@pytest.fixture(scope="module")
def finished_promoted_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evolve_promoted")
    evolve(tmp, *TINY, *PROMOTED, "--name", "ref", "--seed", "3")
    return tmp / "nos.sqlite"


def test_lineage_is_complete_and_counts_match_config(finished_run: Path) -> None:
    with Store(str(finished_run), create=False) as store:
        run = store.get_run("ref")
        assert run["status"] == "finished"
        rows = store.individuals(run["id"])
        by_id = {r["id"]: r for r in rows}
        initial = [r for r in rows if r["timestep"] == 0]
        assert len(initial) == 10 and all(r["parent_id"] is None for r in initial)
        children = [r for r in rows if r["timestep"] > 0]
        for r in children:
            parent = by_id[r["parent_id"]]  # in the same run
            assert parent["run_id"] == run["id"]
            # walk back to an initial genome
            chain = store.lineage(r["id"])
            assert chain[0]["id"] == r["id"] and chain[-1]["parent_id"] is None and chain[-1]["timestep"] == 0
        for t in (1, 2):
            first_tries = [r for r in children if r["timestep"] == t and r["attempt"] == 0]
            assert sorted((r["particle"], r["mutation"]) for r in first_tries) == [(p, m) for p in range(2) for m in range(3)]
        stats = store.timestep_stats(run["id"])
        assert [s["timestep"] for s in stats] == [0, 1, 2]
        assert sum(s["candidates"] for s in stats) == len(rows)
        # every evaluated candidate carries its search evaluations (3 lrs x 1 horizon)
        for r in rows:
            ind = store.get_individual(r["id"])
            if r["status"] == "evaluated":
                assert r["fitness"] is not None and r["lr"] in SearchConfig().lrs
                d = SearchConfig()  # 3 lrs x 1 horizon x the search seeds
                assert len([e for e in ind["evaluations"] if e["task"] == "sine"]) == len(d.lrs) * len(d.search_seeds)
            if r["status"] == "duplicate":
                assert not ind["evaluations"], "a duplicate must not be evaluated again"
                original = by_id[r["duplicate_of"]]
                assert r["genome_hash"] in (original["genome_hash"], original["unflipped_hash"])


@pytest.mark.parametrize("fidelity", ["one stage", "promotion stage"])
def test_same_seed_same_lineage_and_sigkill_resume(tmp_path: Path, fidelity: str, request) -> None:
    """A run SIGKILLed mid-way and resumed ends exactly like the uninterrupted run -- also with a
    cheap first stage, killed while the children of a timestep go through the stages."""
    finished_run = request.getfixturevalue("finished_run" if fidelity == "one stage" else "finished_promoted_run")
    extra = [] if fidelity == "one stage" else PROMOTED
    db = tmp_path / "killed.sqlite"
    cmd = [sys.executable, "-m", "nos.evolve", "--db", str(db), "--cache-dir", str(tmp_path.parent / "cache"),
           *TINY, *extra, "--name", "ref", "--seed", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the initial population is in; children are being judged
    assert sigkill_at(proc, db, "ref", 10), "the run finished before it could be killed"
    with Store(str(db), create=False) as store:
        assert store.get_run("ref")["status"] == "running"
        assert store.status_counts(store.get_run("ref")["id"]) != {}
    res = evolve(tmp_path, "--resume", "ref", "--format", "json", db="killed.sqlite")
    assert json.loads(res.stdout)["run"] == "ref"
    assert lineage_key(db, "ref") == lineage_key(finished_run, "ref")
    with Store(str(db), create=False) as store:
        assert store.get_run("ref")["status"] == "finished"


def test_existing_name_and_unknown_resume_are_clear_errors(tmp_path: Path, finished_run: Path) -> None:
    res = evolve(finished_run.parent, *TINY, "--name", "ref", check=False)
    assert res.returncode == 2 and "--resume ref" in res.stderr and "Traceback" not in res.stderr
    res = evolve(tmp_path, "--resume", "nope", check=False)
    assert res.returncode == 2 and "nope" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = evolve(tmp_path, "--particles", "0", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_candidates_that_raise_or_diverge_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = SearchConfig(horizons=(1.0,), budget_fpe=60, sine={"pretrain_steps": 100, "width": 8},
                       cache_dir=str(tmp_path / "cache"))
    class Flaky(LocalEvaluator):
        """Fault injection: evaluating the `sign` genome raises, as a buggy op would."""

        def fitness_fn(self, evaluator):
            real = evaluator.fitness

            def flaky_fitness(genomes, adam_ref):
                if any(g.nodes[-1].op == "sign" for g in genomes):
                    raise RuntimeError("boom")
                return real(genomes, adam_ref)

            return flaky_fitness

    with Store(str(tmp_path / "x.sqlite")) as store:
        search = Run.create(store, "faults", cfg, "cpu", evaluator=Flaky())
        run_id = search.id
        diverge = from_json({"nodes": [{"op": "exp", "in": ["g"]}, {"op": "exp", "in": ["n0"]},
                                       {"op": "mul", "in": ["n1", "two"]}, {"op": "pow_abs", "in": ["n2", "n2"]}],
                             "lr": {"schedule": "constant"}})
        adam = from_json({"nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["m", "n0"]}]})
        raiser = from_json({"nodes": [{"op": "sign", "in": ["m"]}]})
        search.judge().judge_chunks([[
            Proposal("a", diverge), Proposal("b", raiser), Proposal("c", adam), Proposal("d", adam),
        ]])
        rows = {r["slot"]: r for r in store.individuals(run_id)}
        assert rows["b"]["status"] == "error" and "boom" in rows["b"]["error"]
        # Adam scored against tuned Adam: its search lrs are a subset of the reference's grid, on the
        # same task and seed, so its ratio cannot beat 1
        assert rows["c"]["status"] == "evaluated" and rows["c"]["fitness"] >= 1.0 - 1e-9
        assert rows["d"]["status"] == "duplicate" and rows["d"]["duplicate_of"] == rows["c"]["id"]
        assert rows["a"]["status"] in ("error", "rejected_integrity")
        if rows["a"]["status"] == "error":
            assert "non-finite" in rows["a"]["error"]


def _start_and_wait(tmp: Path, db: Path, min_rows: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nos.evolve", "--db", str(db), "--cache-dir", str(tmp.parent / "cache"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with Store(str(db), create=False) as store:
                run = store.get_run("ctrlc")
                if run and len(store.individuals(run["id"])) >= min_rows:
                    return proc
        except Exception:  # noqa: BLE001 -- not created yet
            continue
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_cleanly_and_leaves_a_resumable_run(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C, or SIGTERM from a scheduler or `kill`: the run stops, is marked interrupted, resumes."""
    db = tmp_path / "c.sqlite"
    # six timesteps: plenty left to interrupt once the first rows are in, even on a loaded machine
    proc = _start_and_wait(tmp_path, db, 1, *TINY, "--timesteps", "6", "--name", "ctrlc")
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume ctrlc" in err and "Traceback" not in err
    with Store(str(db), create=False) as store:
        assert store.get_run("ctrlc")["status"] == "interrupted"
    evolve(tmp_path, "--resume", "ctrlc", db="c.sqlite")
    with Store(str(db), create=False) as store:
        assert store.get_run("ctrlc")["status"] == "finished"


@pytest.mark.slow  # Dask waits 30 s for the scheduler
def test_unreachable_scheduler_leaves_no_run(tmp_path: Path) -> None:
    """The cluster is reached before the run exists: an unreachable one leaves no `running` run
    that would block the name."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = evolve(tmp_path, *TINY, "--name", "lost", "--scheduler", f"tcp://127.0.0.1:{port}", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    with Store(str(tmp_path / "nos.sqlite"), create=False) as store:
        assert store.get_run("lost") is None


STANDALONE = """
import sys
sys.modules["nos"] = None  # make `import nos` fail: the file must not need it
sys.modules["search_space"] = None
sys.modules["db"] = None
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("discovered", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
try:
    import nos  # noqa: F401
    raise SystemExit("nos was importable")
except ImportError:
    pass
data = json.loads(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
model.load_state_dict({k: torch.tensor(v) for k, v in data["init"].items()})
x, y = torch.tensor(data["x"]), torch.tensor(data["y"])
opt = getattr(mod, data["cls"])(model.parameters(), lr=data["lr"], total_steps=data["steps"], seed=0)
def closure():
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss
for _ in range(data["steps"]):
    opt.step(closure)
print(json.dumps(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()))
"""


def test_exported_discovered_optimizer_trains_without_nos_and_matches_interpreter(tmp_path: Path, finished_run: Path) -> None:
    from nos.engine.trainer import train

    from .conftest import MLPTask

    with Store(str(finished_run), create=False) as store:
        best = store.top(store.get_run("ref")["id"], 1)[0]
    out = tmp_path / "discovered.py"
    res = subprocess.run([sys.executable, "-m", "nos.export", str(best["id"]), "-o", str(out), "--db", str(finished_run)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert f"individual: {best['id']}" in text and "run: ref" in text
    assert f"lr={best['lr']!r}" in text  # the tuned lr is the default

    task, steps = MLPTask(seed=0, target_scale=3.0), 25
    interp = train(task, [from_json(best["genome"])], [best["lr"]], seeds=0, steps=steps)
    data = {
        "cls": f"NosOptimizer{best['id']}", "lr": best["lr"], "steps": steps,
        "init": {k: v.tolist() for k, v in task.model.state_dict().items()},
        "x": task.x.tolist(), "y": task.y.tolist(),
    }
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    res = subprocess.run([sys.executable, str(script), str(out), json.dumps(data)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr
    import torch

    exported = torch.tensor(json.loads(res.stdout))
    assert float((exported - task.theta0).abs().max()) > 1e-4  # it trained
    torch.testing.assert_close(exported, interp.params[0], rtol=1e-4, atol=1e-6)


def test_promotion_follows_the_configured_rule(finished_promoted_run: Path) -> None:
    """Each chunk: every screened candidate gets the cheap stage (task sine_cheap: 1 search seed,
    the shortest horizon); the best half by cheap fitness (rounded up) get the full fitness."""
    with Store(str(finished_promoted_run), create=False) as store:
        run = store.get_run("ref")
        assert run["config"]["fidelity"] == {"seeds": 1, "horizons": [1.0], "budget_fpe": 90, "promote": 0.5}
        rows = [store.get_individual(r["id"]) for r in store.individuals(run["id"])]
        cheap_ref = {(b["horizon"], b["seed"]): b["loss"] for b in store.baselines(run["id"], task="sine_search_cheap")}
    assert list(cheap_ref) == [(1.0, 0)]
    chunks: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        cheap = [e for e in r["evaluations"] if e["task"] == "sine_cheap"]
        assert {e["seed"] for e in cheap} <= {0} and {e["horizon"] for e in cheap} <= {1.0}
        finite = [e["loss"] for e in cheap if e["loss"] is not None]
        if not finite:  # not screened in, or no finite cheap loss: nothing to promote
            continue
        # the cheap fitness, recomputed from its rows: the best lr's loss ratio to tuned Adam
        r["cheap"] = min(finite) / cheap_ref[(1.0, 0)]
        r["promoted"] = any(e["task"] == "sine" for e in r["evaluations"])
        assert r["status"] != "evaluated" or r["fidelity"] == (1 if r["promoted"] else 0)
        chunks.setdefault((r["timestep"], r["attempt"]), []).append(r)
    assert any(not r["promoted"] for c in chunks.values() for r in c), "nothing was left at the cheap stage"
    for chunk in chunks.values():
        ranked = sorted(chunk, key=lambda r: (r["cheap"], r["id"]))
        n = max(1, -(-len(chunk) // 2))  # ceil(0.5 * n), at least one
        assert {r["id"] for r in chunk if r["promoted"]} == {r["id"] for r in ranked[:n]}


class SignalledStorage(MemoryStorage):
    """A real in-memory storage on which a signal lands while a status is being written: the
    moment that, unguarded, rolls the write back and leaves a stopped run `running`."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__()
        self.sig = sig
        self.armed = False

    def set_run_status(self, run_id: int, status: str) -> None:
        if self.armed:
            self.armed = False
            signal.raise_signal(self.sig)  # Python runs the handler here, before the write
        super().set_run_status(run_id, status)


@pytest.fixture
def stop_handlers() -> Iterator[None]:
    """The handlers `nos.evolve` installs (Ctrl-C and SIGTERM raise KeyboardInterrupt), restored after."""
    from nos.evolve import _stop_on_sigterm

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _stop_on_sigterm()
    yield
    for s, h in before.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_run_is_marked_finished_leaves_it_finished(tmp_path: Path, sig: signal.Signals,
                                                                      stop_handlers: None) -> None:
    storage = SignalledStorage(sig)
    cfg = SearchConfig(horizons=(1.0,), budget_fpe=60, funnel=0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):  # the signal is delivered, once the status is written
        with Run.create(storage, "late", cfg, "cpu") as run:
            storage.armed = True
    assert storage.get_run("late")["status"] == "finished" and run.status == "finished"
    assert not storage.armed and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_while_the_run_is_marked_interrupted_still_marks_it(tmp_path: Path,
                                                                           stop_handlers: None) -> None:
    storage = SignalledStorage(signal.SIGINT)
    cfg = SearchConfig(horizons=(1.0,), budget_fpe=60, funnel=0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        with Run.create(storage, "twice", cfg, "cpu") as run:
            storage.armed = True
            raise KeyboardInterrupt  # the first Ctrl-C; the second lands inside the status write
    assert storage.get_run("twice")["status"] == "interrupted" and run.status == "interrupted"


def test_interrupts_deferred_delivers_each_signal_once_after_the_block(stop_handlers: None) -> None:
    from nos.search.run import interrupts_deferred

    got: list[int] = []
    counting = lambda signum, frame: got.append(signum)  # noqa: E731 -- the process's own handlers here
    signal.signal(signal.SIGINT, counting)
    signal.signal(signal.SIGTERM, counting)
    with interrupts_deferred():
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            signal.raise_signal(sig)
        assert got == []  # held back, and the block is not cut short
    assert got == [signal.SIGTERM, signal.SIGINT]  # each once, a terminate first
    assert signal.getsignal(signal.SIGINT) is counting and signal.getsignal(signal.SIGTERM) is counting
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            reached.append("end of block")
    assert reached == ["end of block"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_a_run_is_resumed_leaves_it_interrupted(tmp_path: Path, stop_handlers: None) -> None:
    """Marking a run `running` again is not held back: a Ctrl-C inside that write stops the
    resume before the run is running, so it stays `interrupted` (resumable)."""
    storage = SignalledStorage(signal.SIGINT)
    cfg = SearchConfig(horizons=(1.0,), budget_fpe=60, funnel=0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        with Run.create(storage, "again", cfg, "cpu"):
            raise KeyboardInterrupt
    assert storage.get_run("again")["status"] == "interrupted"
    storage.armed = True
    with pytest.raises(KeyboardInterrupt):
        Run.resume(storage, "again")
    assert storage.get_run("again")["status"] == "interrupted"
    with Run.resume(storage, "again") as run:  # and it resumes
        assert storage.get_run("again")["status"] == "running"
    assert run.status == "finished"
