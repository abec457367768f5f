"""Shared fixtures: a tiny MLP regression task in both of its forms.

`MLPTask` implements the trainer's Task protocol (a flat parameter vector per candidate, the
concatenation of a torch module's parameters in `model.parameters()` order), and can also build
the same network as an ordinary `nn.Module` with the same initial weights, so an exported
optimizer and the batched interpreter can be run on literally the same problem.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from db.store import Store
from nos.tasks.segments import Segments
from nos.ui.cli import run_command


class MLPTask:
    """Linear(4, 8) - Tanh - Linear(8, 1) regressing scale * sin(sum(x)) on 32 seeded points."""

    def __init__(self, seed: int = 0, device: str = "cpu", target_scale: float = 1.0) -> None:
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.x = torch.randn(32, 4, generator=gen)
        self.y = target_scale * torch.sin(self.x.sum(dim=1, keepdim=True))
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        bounds, start = [], 0
        for p in self.model.parameters():
            bounds.append((start, start + p.numel()))
            start += p.numel()
        self.segments = Segments(tuple(bounds))
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        self.last_theta: torch.Tensor | None = None  # the parameters of the latest loss() call

    def module_loss(self, out: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, self.y)

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: row[a:b].view(shape)
            for name, (a, b), shape in zip(self.names, self.segments.bounds, self.shapes)
        }

    # -- the trainer's Task protocol
    def init_params(self, n: int) -> torch.Tensor:
        return self.theta0.repeat(n, 1)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """All candidates at once: the network written out with batched matmuls."""
        self.last_theta = theta.detach().clone()
        C = theta.shape[0]
        w1, b1, w2, b2 = (theta[:, a:b].reshape(C, *shape) for (a, b), shape in zip(self.segments.bounds, self.shapes))
        h = torch.tanh(torch.baddbmm(b1[:, None, :], self.x.expand(C, -1, -1), w1.transpose(1, 2)))
        out = torch.baddbmm(b2[:, None, :], h, w2.transpose(1, 2))
        return ((out - self.y) ** 2).mean(dim=(1, 2))

    def loss_one_by_one(self, theta: torch.Tensor) -> torch.Tensor:
        """The reference: each candidate through the torch module itself."""
        return torch.stack(
            [
                self.module_loss(functional_call(self.model, self.unflatten(theta[c]), (self.x,)))
                for c in range(theta.shape[0])
            ]
        )

    # -- the same network as a plain module (for exported optimizers / torch.optim)
    def fresh_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return copy.deepcopy(self.model).to(dtype)

    def data(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.to(dtype), self.y.to(dtype)

    @staticmethod
    def flat(model: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture
def mlp_task() -> MLPTask:
    return MLPTask(seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's tiny tensors: the tests start subprocesses that run in
    parallel on a 2-core machine, and torch's spinning worker threads would fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A command started at once and collected when a test needs its result."""

    def __init__(self, args: list[str], *, cwd: Path = REPO, env: dict | None = None) -> None:
        env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._result: tuple[int, str, str] | None = None

    def result(self, timeout: float = 120) -> tuple[int, str, str]:
        if self._result is None:
            out, err = self.popen.communicate(timeout=timeout)
            self._result = (self.popen.returncode, out, err)
        return self._result

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()


def sigkill_at(proc: subprocess.Popen, db: Path, run: str, individuals: int, timeout: float = 300) -> int:
    """SIGKILL `proc` once run `run` in database `db` holds at least `individuals` rows; waits for
    it and returns how many rows there were (0 if the run finished before it could be killed)."""
    deadline, seen = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if not db.exists():
            continue
        try:
            with Store(str(db), create=False) as store:
                record = store.get_run(run)
                seen = len(store.individuals(record["id"])) if record else 0
        except Exception:  # noqa: BLE001 -- the file may be mid-creation
            continue
        if seen >= individuals:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    return seen if proc.returncode == -signal.SIGKILL else 0


# ---------------------------------------------------------------------- bad input (one rule)


def run_entry(main, argv: list[str]) -> tuple[int, str, str]:
    """A command's entry point (``nos.ui.cli.run_command(main, argv)``) in this process, its
    stdout and stderr captured without pytest fixtures (so hypothesis can call it):
    (exit status, stdout, stderr). An exception that escapes is NOT caught: it fails the test."""
    import contextlib
    import io

    from nos.ui.cli import run_command

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_command(main, argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str, limit: int = 310) -> str:
    """The rule for bad input: exit status 2, nothing on stdout, exactly one line on stderr,
    no traceback, no raw control character, at most ~300 characters. Returns the line."""
    assert code == 2, (code, out[-500:], err[-2000:])
    assert out == "", out[-500:]
    assert err.endswith("\n") and err.count("\n") == 1, err[-2000:]
    line = err[:-1]
    assert line.startswith("error: "), line  # one line, so never a traceback (a quoted one is escaped)
    assert line.isprintable(), line  # escaped: no newline, CR, ESC, bidi override ...
    assert len(line) <= limit, len(line)
    return line


def make_nos_db(path: Path) -> dict[str, int]:
    """A small nos database written through the Store (no search): run ``r1`` with an initial
    genome, a child and a grandchild (with evaluations), timestep stats and a baseline, and an
    empty finished run ``r2``."""
    from db.store import Store

    genome = {"nodes": [{"op": "sign", "in": ["g"]}], "update": "plain", "sign": 1, "clip": None,
              "lr": {"schedule": "constant", "decay": None},
              "noise": {"sigma": 0.0, "decay": None, "scale": "absolute", "accept": "always"}}
    ev = {"task": "sine", "horizon": 1.0, "lr": 1e-3, "seed": 0, "loss": 0.5, "steps": 200, "seconds": 0.1}
    with Store(path) as store:
        run = store.create_run("r1", {"total_steps": 200, "budget_fpe": 600, "horizons": [1.0]}, seed=0)
        rows = [
            {"run_id": run, "slot": "init:0", "genome": genome, "status": "evaluated", "fitness": 1.5,
             "lr": 1e-3, "expression": "sign(g)", "genome_hash": "h0", "evaluations": [ev]},
            {"run_id": run, "slot": "p0:t1:m0:a0", "parent_slot": "init:0", "genome": genome, "timestep": 1,
             "particle": 0, "status": "evaluated", "fitness": 1.2, "lr": 1e-3, "expression": "sign(g)",
             "genome_hash": "h1", "mutation_kind": "rewire", "evaluations": [ev]},
            {"run_id": run, "slot": "p0:t2:m0:a0", "parent_slot": "p0:t1:m0:a0", "genome": genome, "timestep": 2,
             "particle": 0, "status": "rejected_integrity", "expression": "sign(g)", "genome_hash": "h2"},
        ]
        ids = store.add_individuals(rows)
        for t in range(3):
            store.put_timestep_stats(run, {"timestep": t, "candidates": 1, "passed": int(t < 2)})
        store.add_baselines([{"run_id": run, "method": "adam", "task": "sine", "horizon": 1.0, "seed": 0,
                              "loss": 0.4, "hparam": 1e-3, "budget": 600}])
        store.set_run_status(run, "finished")
        # a finished random-search run beside it (what `query stats` compares a GA run with)
        store.set_run_status(store.create_run("r2", {"algorithm": "random", "budget_fpe": 600}, seed=1), "finished")
    return {"run": run, "initial": ids[0], "child": ids[1], "grandchild": ids[2]}


# ---------------------------------------------------------------------- real searches in subprocesses
# (shared by test_evolve, test_distributed, test_query and test_report)

# a particle search small enough for a test: 10 initial, 2 particles, 2 x 3, no funnel
EVOLVE_TINY = [
    "--promote", "1",  # one stage (test_evolve's PROMOTED runs the cheap first stage)
    "--initial", "10", "--particles", "2", "--timesteps", "2", "--mutations", "3", "--funnel", "0",
    "--horizons", "1", "--budget", "90", "--sine-pretrain-steps", "150", "--sine-width", "16",
    "--device", "cpu",
]


def lineage_key(db: Path, name: str) -> list[tuple]:
    with Store(str(db), create=False) as store:
        run = store.get_run(name)
        assert run is not None
        return [
            (r["slot"], r["genome_hash"], r["status"], None if r["fitness"] is None else round(r["fitness"], 9),
             r["lr"], r["mutation_kind"], r["fidelity"])
            for r in sorted(store.individuals(run["id"]), key=lambda r: r["slot"])
        ]


RUN = "tiny"

# A search small enough for a test (~40 s on a 2-core CPU, held-out funnel included: budget 60
# forward-pass equivalents, an 8-wide MLP) that still has a lineage two timesteps deep.
TINY_EVOLVE = [
    "--initial", "6", "--particles", "2", "--timesteps", "2", "--mutations", "2", "--funnel", "1",
    "--sine-pretrain-steps", "50", "--sine-width", "8", "--horizons", "1", "--budget", "60",
    "--device", "cpu",
]


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` in a real subprocess from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The database of a real tiny ``nos.evolve`` run, made once per test session (test_report
    shares it: the run directory is reused when a previous fixture made it)."""
    base = tmp_path_factory.getbasetemp() / "tiny_search"
    db, done = base / "nos.sqlite", base / "done"
    if not done.exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = run_module("nos.evolve", "--db", str(db), "--cache-dir", str(base / "cache"), "--name", RUN,
                          *TINY_EVOLVE)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done.write_text("ok")
    return db


def in_process(capsys: pytest.CaptureFixture[str], *args: str,
               main: Callable[[Sequence[str] | None], int] | None = None) -> tuple[int, str, str]:
    """A command's entry point (``run_command(main, argv)``) in this process: (status, stdout, stderr)."""
    from nos.query import main as query_main

    capsys.readouterr()
    try:
        code = run_command(main or query_main, list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
