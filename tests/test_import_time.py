"""Commands that answer at once import no torch, scipy or sympy: parsing, --help, usage errors
and `nos query runs` (checked with `python -X importtime`, in fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.store import Store
from nos.ui.cli import run_command

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "sympy")


def imported(stderr: str) -> set[str]:
    """The modules named in ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name)
    return names


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def importtime(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, imported(proc.stderr)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("import_time") / "nos.sqlite"
    with Store(path) as store:
        store.set_run_status(store.create_run("r1", {"budget_fpe": 600}, seed=3), "finished")
    return path


def test_parser_sees_importtime_lines() -> None:
    """The check itself: a command that does import torch is seen to."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "torch" in heavy(imported(proc.stderr))


@pytest.mark.parametrize("args", [["nos.query", "--help"], ["nos", "--help"], ["nos.db", "--help"],
                                  ["nos", "query", "--help"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    proc, names = importtime(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert names and heavy(names) == []


@pytest.mark.parametrize("args", [["nos.query", "runs"], ["nos", "query", "runs"], ["nos.query", "runs", "--format",
                                                                                       "json"]])
def test_query_runs_imports_nothing_heavy(db: Path, args: list[str]) -> None:
    proc, names = importtime(*args, "--db", str(db))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "r1" in proc.stdout and "finished" in proc.stdout
    assert heavy(names) == []


@pytest.mark.parametrize("args", [["nos.query", "bogus"], ["nos", "bogus"], ["nos.query", "top", "nope"],
                                  ["nos.query", "show", "0"]])
def test_usage_errors_import_nothing_heavy(db: Path, args: list[str]) -> None:
    proc, names = importtime(*args, "--db", str(db))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert proc.stdout == ""
    assert heavy(names) == []


def test_genome_error_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`run_command` names GenomeError without importing it; once raised, it is still exit 2."""
    from search_space.genome import GenomeError

    def main(argv: object) -> int:
        raise GenomeError("node 0: unknown op 'nope'")

    with pytest.raises(SystemExit) as e:
        run_command(main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: node 0: unknown op 'nope'\n"
