"""A researcher's own task, as the README shows it: the file is written from the README's code block
and searched, killed with SIGKILL, resumed exactly, queried and exported -- real subprocesses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from db.store import Store

from .conftest import assert_one_line_error, lineage_key, sigkill_at

ROOT = Path(__file__).resolve().parents[1]
# small enough for the default suite: 6 initial genomes, one particle, 60 FPE per training run
SMALL = ["--initial", "6", "--particles", "1", "--timesteps", "1", "--mutations", "3", "--funnel", "1",
         "--validation-seeds", "1", "--test-seeds", "2", "--budget", "60", "--chunk", "2", "--threads", "1"]


def readme_task() -> str:
    """The README's "your own task" code block, verbatim."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```python\n(# my_task\.py.*?)```", text, re.S)
    assert m, "the README lost its 'your own task' example"
    return m.group(1)


def nos(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "nos", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mytask")
    (d / "my_task.py").write_text(readme_task())
    return d


@pytest.fixture(scope="module")
def finished(workdir: Path) -> Path:
    """The README's command, uninterrupted (small settings)."""
    nos(workdir, "evolve", "--task", "my_task.py:make", "--name", "mine", "--db", "ref.sqlite", *SMALL, "--seed", "5")
    return workdir / "ref.sqlite"


def test_a_file_task_is_searched_killed_resumed_exactly_queried_and_exported(workdir: Path, finished: Path) -> None:
    db = workdir / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "nos", "evolve", "--task", "my_task.py:make", "--name", "mine",
                             "--db", str(db), *SMALL, "--seed", "5"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # some chunks are in, the search goes on
    assert sigkill_at(proc, db, "mine", 2), "the run finished before it could be killed"

    # resuming needs the user's file named again (it is never imported from the database)
    res = nos(workdir, "evolve", "--resume", "mine", "--db", str(db), check=False)
    assert "--task my_task.py:make" in assert_one_line_error(res.returncode, res.stdout, res.stderr)
    # named again by another path (from another directory): the run finds its task by identity
    other = workdir / "other"
    other.mkdir(exist_ok=True)
    nos(other, "evolve", "--resume", "mine", "--task", f"{workdir / 'my_task.py'}:make", "--db", str(db),
        "--threads", "1")
    assert lineage_key(db, "mine") == lineage_key(finished, "mine")
    with Store(str(db), create=False) as store:
        run = store.get_run("mine")
        assert run["status"] == "finished" and run["config"]["tasks"] == ["my_task.py:make"]
        tasks = {e["task"] for i in store.individuals(run["id"]) for e in (store.get_individual(i["id"]) or {})
                 .get("evaluations", [])}
    assert tasks <= {"sinsum", "sinsum_cheap"} and "sinsum" in tasks

    # query and export read the stored rows only: run them where the task file is not importable
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    doc = json.loads(nos(elsewhere, "query", "compare", "mine", "--db", str(db), "--format", "json").stdout)
    assert doc["tasks"] == {"search": ["sinsum"], "test": []}
    assert {m["task"] for m in doc["methods"]} == {"sinsum"}
    assert {m["horizon"] for m in doc["methods"]} == {0.0, 0.1}
    assert {"adam", "adam_clip", "adam_wc", "adam_clip_wc", "randopt"} <= {m["method"] for m in doc["methods"]}
    assert any(v["task"] == "all" and v["horizon"] is None and v["n"] == 4 for v in doc["versus"])
    champion = int(doc["champion"].lstrip("#"))
    out = elsewhere / "mine_opt.py"
    nos(elsewhere, "export", str(champion), "-o", str(out), "--db", str(db))
    code = out.read_text()
    assert "noise of task sinsum" in code and "import torch" in code
    # the exported optimizer trains the README's model
    check = (
        "import importlib.util, torch, sys\n"
        f"spec = importlib.util.spec_from_file_location('opt', {str(out)!r}); m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        f"sys.path.insert(0, {str(workdir)!r}); import my_task\n"
        "net = my_task.model(0); x, y = my_task.data(0.0, 0)\n"
        "cls = next(v for v in vars(m).values() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)"
        " and v is not torch.optim.Optimizer)\n"
        "opt = cls(net.parameters())\n"
        "loss = lambda: torch.nn.functional.mse_loss(net(x), y)\n"
        "first = float(loss())\n"
        "for _ in range(20):\n"
        "    opt.zero_grad(); l = loss(); l.backward(); opt.step(lambda: loss())\n"
        "print(first, float(loss()))\n"
    )
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    first, last = map(float, res.stdout.split())
    assert last < first


def test_bad_task_specs_are_one_line(workdir: Path) -> None:
    (workdir / "not_a_task.py").write_text("def make():\n    return 42\n")
    (workdir / "raises.py").write_text("def make():\n    raise RuntimeError('no data here')\n")
    cases = [
        (["--task", "nope.py:make"], "does not exist"),
        (["--task", "my_task.py:missing"], "no callable 'missing'"),
        (["--task", "not_a_task.py:make"], "not a nos.tasks.api.TaskFamily"),
        (["--task", "raises.py:make"], "no data here"),
        (["--task", "no_such_task"], "unknown task"),
        (["--task", "sine", "--tasks", "sine,square"], "give one"),
        (["--tasks", "sine,sine"], "twice"),
    ]
    for args, message in cases:
        res = nos(workdir, "evolve", *args, "--db", "bad.sqlite", check=False)
        assert message in assert_one_line_error(res.returncode, res.stdout, res.stderr), (args, res.stderr)
    assert not (workdir / "bad.sqlite").exists()


@pytest.mark.slow
def test_dask_workers_train_a_file_task(workdir: Path) -> None:
    """Workers resolve the user's task from the spec the coordinator sends (a local cluster)."""
    nos(workdir, "evolve", "--task", "my_task.py:make", "--name", "dask", "--db", "dask.sqlite", "--workers", "2",
        "--initial", "4", "--particles", "1", "--timesteps", "1", "--mutations", "2", "--funnel", "1",
        "--validation-seeds", "1", "--test-seeds", "2", "--budget", "45", "--threads", "1")
    with Store(str(workdir / "dask.sqlite"), create=False) as store:
        run = store.get_run("dask")
        assert run["status"] == "finished"
        rows = [e for i in store.individuals(run["id"]) for e in (store.get_individual(i["id"]) or {}).get("evaluations", [])]
    assert rows and {e["task"] for e in rows} <= {"sinsum", "sinsum_cheap"}
    assert {e["task_key"] for e in rows} == {rows[0]["task_key"]} and rows[0]["task_key"].startswith("sinsum@")
