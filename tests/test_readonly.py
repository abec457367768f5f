"""Every reader works on a database it cannot write: a file mode 0444 in a folder mode 0555.

The readers (`nos query`, `nos report`, `nos export`) run as real subprocesses with the file
permissions enforced. This machine (and CI) runs tests as root, which writes through file modes;
so as root the child runs without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (`setpriv`), which makes
the kernel check modes exactly as it does for any other user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, RUN, tiny_search

UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes cannot be enforced")
    return UNPRIVILEGED + cmd


def _state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def readonly_db(tmp_path_factory: pytest.TempPathFactory):
    src = tiny_search(tmp_path_factory)
    folder = tmp_path_factory.mktemp("ro") / "db"
    folder.mkdir()
    db = folder / "nos.sqlite"
    shutil.copyfile(src, db)
    db.chmod(0o444)
    folder.chmod(0o555)
    yield db
    folder.chmod(0o755)
    db.chmod(0o644)


def test_the_child_really_cannot_write(readonly_db: Path) -> None:
    """The check itself: the unprivileged child is refused a write into the folder."""
    code = "import sys; open(sys.argv[1], 'a')"
    proc = subprocess.run(_as_user([sys.executable, "-c", code, str(readonly_db)]), capture_output=True, text=True)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


@pytest.mark.parametrize("args", [
    ["nos.query", "runs"],
    ["nos.query", "top", RUN],
    ["nos.query", "stats", RUN],
    ["nos.query", "compare", RUN],
    ["nos.query", "lineage", "1"],
    ["nos.report", RUN, "--out", "{out}/rep"],
    ["nos.export", "CHAMPION", "-o", "{out}/one.py"],
    ["nos.export", "CHAMPION", "--horizon", "1", "-o", "{out}/one_t1.py"],
], ids=lambda a: " ".join(a[:2]))
def test_reader_on_a_readonly_database(readonly_db: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # the funnel's champion: evaluated, with an lr validated per horizon
    argv = [_champion(readonly_db) if a == "CHAMPION" else a.format(out=out) for a in args]
    before = _state(readonly_db.parent)
    proc = subprocess.run(_as_user([sys.executable, "-m", *argv, "--db", str(readonly_db)]), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _state(readonly_db.parent) == before  # no journal, no -wal / -shm, no byte changed
    if argv[0] == "nos.report":
        assert (out / "rep" / "summary.md").exists()
    if argv[0] == "nos.export":
        assert any(out.glob("*.py"))


def _champion(db: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "nos.query", "compare", RUN, "--format", "json", "--db", str(db)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    champion = json.loads(proc.stdout)["champion"]
    return champion.lstrip("#")
