"""One rule for every command, argument and database state: it works, or one line on stderr
(escaped, at most ~300 characters), exit 2, no traceback -- and nothing written.

Each case listed in the issue "Every bad input gets one line, and a damaged database is never
written" has a regression test here; the hypothesis properties are in test_bad_input_props.py.
Commands run in-process through their real entry point (`run_command(main, argv)`) where that
is enough; `python -m nos.evolve` runs as real subprocesses, which must fail before any work.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from db.store import Store, StoreError
from nos import query
from nos.ui.cli import MAX_LINE, escape, fail, one_line
from search_space import decay as decay_mod
from search_space.genome import GenomeError, from_json, loads, node_index

from .conftest import REPO, Proc, assert_one_line_error, make_nos_db, run_entry

SIDE_FILES = ("-wal", "-shm", "-journal")


def command(name: str):
    """``nos.<name>.main``, imported when a test needs it (the heavier commands pull in the
    evaluation machinery; a test of one command does not depend on the others importing)."""
    return importlib.import_module(f"nos.{name}").main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def side_files(path: Path) -> list[str]:
    return [s for s in SIDE_FILES if Path(f"{path}{s}").exists()]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("bad_input") / "template.sqlite"
    return path, make_nos_db(path)


@pytest.fixture
def db(template, tmp_path: Path) -> Path:
    """A fresh copy of the small nos database (no -wal: it was closed cleanly)."""
    path = tmp_path / "nos.sqlite"
    shutil.copyfile(template[0], path)
    return path


def q(db: Path, *args: str) -> tuple[int, str, str]:
    return run_entry(query.main, [*args, "--db", str(db)])


def tamper(path: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()
    for s in SIDE_FILES:  # as if another program wrote it and went away
        Path(f"{path}{s}").unlink(missing_ok=True)


# ---------------------------------------------------------------------- the error line itself


def test_fail_escapes_control_characters_and_caps_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    evil = "key\nTraceback (most recent call last):\r\x1b[31mred\u202eevil\u2028" + "x" * 5000
    with pytest.raises(SystemExit) as exit_:
        fail(evil)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    line = assert_one_line_error(2, out, err)
    assert len(line) <= len("error: ") + MAX_LINE
    assert "\\n" in line and "\\r" in line and "\\x1b" in line and "\\u202e" in line and "\\u2028" in line
    assert line.endswith("...")
    assert escape("plain text, ünïcödé ok") == "plain text, ünïcödé ok"
    assert one_line("a\x00b") == "a\\x00b"


# ---------------------------------------------------------------------- the database


def corrupt_db(tmp_path: Path) -> Path:
    """A run file with 4 KB of random bytes in its middle (PRAGMA integrity_check fails)."""
    path = tmp_path / "corrupt.sqlite"
    make_nos_db(path)
    with Store(path) as store:
        run = store.get_run("r1")["id"]
        store.add_individuals([{"run_id": run, "slot": f"x:{i}", "genome": {"pad": "p" * 300}, "status": "invalid",
                                "expression": "e" * 200} for i in range(600)])
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(os.urandom(4096))
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        report = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError:
        report = [("malformed",)]
    conn.close()
    assert report != [("ok",)]
    for s in SIDE_FILES:
        Path(f"{path}{s}").unlink(missing_ok=True)
    return path


def test_corrupt_database_is_refused_and_never_written(tmp_path: Path) -> None:
    path = corrupt_db(tmp_path)
    before = digest(path)
    for args in (["runs"], ["top", "r1"], ["show", "1"], ["stats", "r1"], ["lineage", "2"]):
        line = assert_one_line_error(*q(path, *args))
        assert "damaged" in line or "malformed" in line, line
    for kwargs in ({}, {"create": False}, {"readonly": True}):
        with pytest.raises(StoreError, match="damaged|malformed|not a database") as err:
            Store(path, **kwargs)
        assert "\n" not in str(err.value)
    assert digest(path) == before and side_files(path) == []


def test_create_false_never_creates_a_file_or_a_schema(tmp_path: Path) -> None:
    missing = tmp_path / "no_dir" / "nos.sqlite"
    with pytest.raises(StoreError, match="does not exist"):
        Store(missing, create=False)
    assert not missing.parent.exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    for kwargs in ({"create": False}, {"readonly": True}):
        with pytest.raises(StoreError, match="empty database"):
            Store(empty, **kwargs)
        assert empty.stat().st_size == 0 and side_files(empty) == []
    line = assert_one_line_error(*q(missing, "runs"))
    assert "does not exist" in line and not missing.parent.exists()


@pytest.mark.parametrize("var", ["NOS_UPDATE", "NOS_ROLLOUT"])
def test_a_bad_kernel_choice_is_one_line_before_anything_is_written(tmp_path: Path, var: str) -> None:
    db = tmp_path / "nos.sqlite"
    proc = Proc(["-m", "nos.evolve", "--db", str(db), "--device", "cpu", "--initial", "4"],
                env={**os.environ, var: "turbo"})
    line = assert_one_line_error(*proc.result())
    assert f"{var} must be one of fused, eager" in line and not db.exists()


def test_evolve_resume_never_creates_or_modifies_a_database(tmp_path: Path) -> None:
    """The run-lifecycle half is the run object's; this is the database half, through the real
    command: --resume on a missing path, an empty file or a damaged file is one line and
    leaves every file as it was (the damaged one is not marked `failed`)."""
    corrupt = corrupt_db(tmp_path)
    before = digest(corrupt)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    missing = tmp_path / "missing" / "nos.sqlite"
    procs = {name: Proc(["-m", "nos.evolve", "--resume", "r1", "--db", str(path), "--device", "cpu"])
             for name, path in (("corrupt", corrupt), ("empty", empty), ("missing", missing))}
    try:
        lines = {name: assert_one_line_error(*p.result(timeout=120)) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()
    assert "damaged" in lines["corrupt"] and digest(corrupt) == before and side_files(corrupt) == []
    assert empty.stat().st_size == 0 and side_files(empty) == []
    assert not missing.parent.exists()


def test_readonly_store_reads_and_cannot_write(db: Path) -> None:
    """mode=ro is enforced by SQLite itself (so also for root): a raw write fails."""
    with Store(db, readonly=True) as store:
        assert store.get_run("r1")["status"] == "finished"
        with store.session() as session:
            assert session.connection().exec_driver_sql("PRAGMA query_only").scalar() == 1
        with pytest.raises(StoreError, match="read-only"):
            store.create_run("new", {}, seed=0)
        with pytest.raises(Exception, match="readonly|read-only|query_only"):
            with store.session() as session:
                session.connection().exec_driver_sql("PRAGMA query_only = OFF")
                session.connection().exec_driver_sql("DELETE FROM runs")
    assert side_files(db) == []


def test_readonly_sees_a_live_writer(db: Path) -> None:
    """While a writer holds the file (a -wal exists) the reader uses mode=ro, not immutable:
    it sees the writer's committed rows, and leaves only the writer's own files."""
    with Store(db, readonly=True) as reader:  # opened before the writer: no -wal yet
        assert reader.get_run("live") is None
        with Store(db) as writer:
            writer.create_run("live", {}, seed=1)
            assert Path(f"{db}-wal").exists()
            assert reader.get_run("live") is not None
            with Store(db, readonly=True) as late:
                assert late.get_run("live") is not None
    assert side_files(db) == []


def test_readonly_file_in_readonly_directory(template, tmp_path: Path) -> None:
    """Every query subcommand works on a read-only file in a read-only directory and leaves
    nothing behind: in-process (as root, so the check is the absence of side files and an
    unchanged file) and, when we are root, in a subprocess that drops to `nobody`, for whom
    the file really is read-only (before the fix: "attempt to write a readonly database")."""
    base = Path(tempfile.mkdtemp(prefix="nos-ro-"))
    ro_dir = base / "ro"
    ro_dir.mkdir()
    path = ro_dir / "nos.sqlite"
    shutil.copyfile(template[0], path)
    path.chmod(0o444)
    ro_dir.chmod(0o555)
    base.chmod(0o755)
    try:
        before, listing = digest(path), sorted(os.listdir(ro_dir))
        ids = template[1]
        commands = [["runs"], ["top", "r1"], ["show", str(ids["child"])], ["lineage", str(ids["grandchild"])],
                    ["stats", "r1"]]
        for args in commands:
            code, out, err = q(path, *args)
            assert code == 0 and err == "", err
        if os.geteuid() == 0:
            code = (  # everything imported while root (the interpreter lives under /root), then drop
                "import contextlib, io, json, os, sys\n"
                "import sqlite3, sqlalchemy.dialects.sqlite.pysqlite\n"
                "from nos import query\n"
                "import nos.search.config, nos.search.diagnostics, nos.search.metrics  # stats: lazy\n"
                "from nos.ui.cli import run_command\n"
                "import db.store, db.models\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "assert not os.access(sys.argv[1], os.W_OK) and not os.access(os.path.dirname(sys.argv[1]), os.W_OK)\n"
                "results = []\n"
                "for a in json.loads(sys.argv[2]):\n"
                "    out, err = io.StringIO(), io.StringIO()\n"
                "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
                "        try:\n"
                "            rc = run_command(query.main, [*a, '--db', sys.argv[1]])\n"
                "        except SystemExit as e:\n"
                "            rc = e.code\n"
                "    results.append((rc, out.getvalue(), err.getvalue()))\n"
                "print(json.dumps(results))\n"
            )
            proc = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(commands)], cwd=REPO,
                                  capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            results = json.loads(proc.stdout)
            for args, (rc, out, err) in zip(commands, results):
                assert rc == 0 and out and err == "", (args, err)
            assert "r1" in results[0][1]
        assert digest(path) == before and sorted(os.listdir(ro_dir)) == listing == ["nos.sqlite"]
    finally:
        ro_dir.chmod(0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------------- query arguments


@pytest.mark.parametrize(
    "args, expect",
    [
        (["top", "²"], "no run named"),  # Unicode digits: isdigit() is true, int() fails
        (["top", "٣"], "no run named"),
        (["stats", "¹²"], "no run named"),
        (["show", "99999999999999999999"], "individual id"),  # beyond 64 bits
        (["lineage", "99999999999999999999"], "individual id"),
        (["show", "9223372036854775808"], "individual id"),  # 2**63
        (["show", "٣"], "individual id"),
        (["top", "r1", "-n", "99999999999999999999"], "count"),
        (["top", "r1", "-n", "1_0"], "count"),
        (["top", "a\nTraceback\x1b[31m"], "control characters"),
        (["top", "\udcff\udcfe"], "not valid UTF-8"),  # undecodable argv bytes
        (["runs", "--db", "a\x00b"], "expected a path"),
        (["top", "x" * 5000], "1 to 255"),
    ],
)
def test_query_bad_arguments(db: Path, args: list[str], expect: str) -> None:
    before = digest(db)
    line = assert_one_line_error(*q(db, *args))
    assert expect in line
    assert digest(db) == before and side_files(db) == []


def test_query_largest_id_is_fine(db: Path) -> None:
    line = assert_one_line_error(*q(db, "show", "9223372036854775807"))
    assert "no individual with id 9223372036854775807" in line
    code, out, _ = q(db, "top", "r1", "-n", "9223372036854775807", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 2


# ---------------------------------------------------------------------- tampered rows


def deep(n: int) -> str:
    return "[" * n + "]" * n


TAMPERED = {
    "genome not JSON": ("UPDATE individuals SET genome = 'not json {'", "individuals.genome"),
    "genome nested 3000 deep": (f"UPDATE individuals SET genome = '{deep(3000)}'", "nested deeper"),
    "genome nested 100 deep": (f"UPDATE individuals SET genome = '{deep(100)}'", "nested deeper"),
    "genome NaN": ("UPDATE individuals SET genome = '{\"x\": NaN}'", "NaN"),
    "genome a blob": ("UPDATE individuals SET genome = X'00FF'", "individuals.genome"),
    "fitness text": ("UPDATE individuals SET fitness = 'abc'", "number"),
    "fitness blob": ("UPDATE individuals SET fitness = X'00'", "number"),
    "timestep text": ("UPDATE individuals SET timestep = 'x'", "individuals.timestep"),
    "created_at garbage": ("UPDATE individuals SET created_at = 'yesterday'", "date-time"),
    "expression blob": ("UPDATE individuals SET expression = X'0102'", "individuals.expression"),
    "config not JSON": ("UPDATE runs SET config = '{'", "runs.config"),
    "config a number": ("UPDATE runs SET config = '1'", "runs.config: expected a JSON object"),
    "genome a list": ("UPDATE individuals SET genome = '[1, 2]'", "individuals.genome: expected a JSON object"),
    "config budget text": ("UPDATE runs SET config = '{\"budget_fpe\": \"x\", \"total_steps\": \"y\"}'", "stored config"),
    "config horizons text": ("UPDATE runs SET config = '{\"horizons\": [\"a\"]}'", "stored config"),
    "config seeds huge": ("UPDATE runs SET config = '{\"search_seeds\": [1e400]}'", "stored config"),
    "run name blob": ("UPDATE runs SET name = X'41' WHERE name = 'r1'", "runs.name"),
    "stats text": ("UPDATE timestep_stats SET passed = 'many'", "timestep_stats.passed"),
    "loss text": ("UPDATE evaluations SET loss = 'low'", "number"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_rows_are_one_line(db: Path, template, case: str) -> None:
    sql, expect = TAMPERED[case]
    tamper(db, sql)
    before = digest(db)
    ids = template[1]
    results = {tuple(a): q(db, *a) for a in (["runs"], ["top", "r1"], ["show", str(ids["child"])],
                                             ["lineage", str(ids["grandchild"])], ["stats", "r1"])}
    failed = []
    for code, out, err in results.values():
        if code != 0:
            failed.append(assert_one_line_error(code, out, err))
    assert failed, f"{case}: every subcommand accepted the tampered row"
    assert any(expect in line for line in failed), failed
    assert digest(db) == before and side_files(db) == []


def test_stored_text_with_control_characters_is_escaped_in_tables(db: Path, template) -> None:
    """A tampered name or expression cannot forge lines or drive the terminal; JSON keeps it exact."""
    evil = "x\nTraceback (most recent call last):\x1b[2J"
    tamper(db, "UPDATE runs SET name = ? WHERE name = 'r1'", evil)
    tamper(db, "UPDATE individuals SET expression = ?", evil)
    code, out, err = q(db, "runs")
    assert code == 0 and "\x1b" not in out and "Traceback" in out
    assert all(not line.startswith("Traceback") for line in out.splitlines())
    code, out, _ = q(db, "show", str(template[1]["child"]))
    assert code == 0 and "\x1b" not in out
    code, out, _ = q(db, "runs", "--format", "json")
    assert code == 0 and json.loads(out)[0]["name"] == evil


def test_store_ids_beyond_64_bits_are_absent(db: Path) -> None:
    with Store(db, readonly=True) as store:
        assert store.get_individual(10**20) is None and store.lineage(10**20) == []
        assert store.get_run(10**20) is None and store.get_run("²") is None
        assert store.get_run("99999999999999999999") is None and store.get_run("\udcff") is None
        assert store.top(10**20) == [] and len(store.top(1, 10**30)) == 2


def test_json_written_too_deep_is_refused(db: Path) -> None:
    with Store(db) as store:
        run = store.get_run("r1")["id"]
        with pytest.raises(StoreError, match="nested deeper"):
            store.add_individuals([{"run_id": run, "slot": "deep", "genome": json.loads(deep(200)),
                                    "status": "invalid"}])


# ---------------------------------------------------------------------- the genome loader


def test_unknown_genome_key_cannot_forge_lines() -> None:
    for key in ("a\nTraceback (most recent call last):", "a\rb", "\x1b[31mred", "\u202eevil", "k" * 10000):
        with pytest.raises(GenomeError) as err:
            from_json({"nodes": [{"op": "sign", "in": ["g"]}], key: 1})
        msg = str(err.value)
        assert msg.isprintable() and len(msg) < 200, msg
        assert "unknown key" in msg
    with pytest.raises(GenomeError) as err:
        from_json({"nodes": [{"op": "sign", "in": ["g"]}], **{f"k{i}\n": i for i in range(1000)}})
    assert len(str(err.value)) < 200 and "more" in str(err.value)


def nested_decay(depth: int) -> object:
    d: object = "constant"
    for _ in range(depth):
        d = {"op": "one_minus", "args": [d]}
    return d


@pytest.mark.parametrize("depth", [3, 300, 480, 3000, 50_000])
def test_deep_decay_is_one_short_line(depth: int) -> None:
    g = {"nodes": [{"op": "sign", "in": ["g"], "decay": [nested_decay(depth)]}]}
    with pytest.raises(GenomeError, match="at most 2 operations") as err:
        from_json(g)
    assert len(str(err.value)) < 120
    if depth <= 480:  # through JSON text as well (deeper JSON is refused by the parser)
        text = '{"op": "one_minus", "args": [' * depth + '"constant"' + "]}" * depth
        with pytest.raises(GenomeError, match="at most 2 operations|nested too deeply") as err:
            loads('{"nodes": [{"op": "sign", "in": ["g"], "decay": [' + text + "]}]}")
        assert len(str(err.value)) < 120


@pytest.mark.parametrize(
    "where, decay",
    [
        ("edge", {"op": "add", "args": ["constant", "constant"]}),  # = 2
        ("edge", {"op": "sub", "args": ["linear_up", "constant"]}),  # < 0
        ("lr", {"op": "add", "args": ["cosine_up", "constant"]}),
        ("noise", "nos_evolved_lr0"),  # a published curve that alone reaches 1.96
    ],
)
def test_decays_leaving_unit_interval_are_refused_at_load(where: str, decay: object) -> None:
    assert not decay_mod.is_valid(decay)
    g: dict = {"nodes": [{"op": "sign", "in": ["g"]}]}
    if where == "edge":
        g["nodes"][0]["decay"] = [decay]
    elif where == "lr":
        g["lr"] = {"schedule": "constant", "decay": decay}
    else:
        g["noise"] = {"sigma": 0.1, "decay": decay}
    with pytest.raises(GenomeError, match=r"leaves \[0, 1\]"):
        from_json(g)
    valid = {"op": "sub", "args": ["constant", "linear_up"]}
    assert from_json({"nodes": [{"op": "sign", "in": ["g"], "decay": [valid]}]}).nodes[0].decays == (valid,)


def test_node_refs_are_ascii_digits() -> None:
    assert node_index("n0") == 0 and node_index("n٠") is None and node_index("n²") is None
    with pytest.raises(GenomeError, match="unknown operand 'n\\\\u0660'|unknown operand 'n٠'"):
        from_json({"nodes": [{"op": "sign", "in": ["g"]}, {"op": "neg", "in": ["n٠"]}]})
    assert from_json({"nodes": [{"op": "sign", "in": ["g"]}, {"op": "neg", "in": ["n0"]}]}).nodes[1].inputs == ("n0",)


# ---------------------------------------------------------------------- integrity, baselines, bench


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--random", "0"], "--random"),
        (["--random", "99999999999999999999999999"], "number of genomes"),
        (["--random", "٣"], "number of genomes"),
        (["--random", "5", "--seed", "-1"], "seed"),
        (["--random", "5", "--seed", "1e3"], "seed"),
        (["--genome", "a\x00b"], "expected a path"),
    ],
)
def test_integrity_bad_arguments(args: list[str], expect: str) -> None:
    assert expect in assert_one_line_error(*run_entry(command("integrity"), [*args, "--device", "cpu"]))


def test_integrity_bad_genome_files(tmp_path: Path) -> None:
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps({"nodes": [{"op": "sign", "in": ["g"]}], "x\nTraceback (most recent call last):\x1b[31m": 1}))
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 200_000)
    for path, expect in ((evil, "unknown key"), (tmp_path, "not a regular file"), (tmp_path / "none.json", "No such file"),
                         (big, "at most 100,000 bytes"), (Path("/dev/zero"), "not a regular file")):
        line = assert_one_line_error(*run_entry(command("integrity"), ["--genome", str(path), "--device", "cpu"]))
        assert expect in line, line


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--horizons", "nan"], "finite"),
        (["--horizons", "inf"], "finite"),
        (["--horizons", "1,0.1"], "outside"),
        (["--horizons", "1e300"], "outside"),
        (["--test-seeds", "0"], "--test-seeds"),
        (["--validation-seeds", "99999999999999999999"], "--validation-seeds"),
        (["--test-seeds", "1.5"], "--test-seeds"),
        (["--budget", "1"], "budget"),
        (["--budget", "99999999999999999999"], "budget"),
        (["--db", "a\x00b"], "expected a path"),
    ],
)
def test_baselines_bad_arguments(args: list[str], expect: str) -> None:
    assert expect in assert_one_line_error(*run_entry(command("baselines"), [*args, "--device", "cpu"]))


def test_baselines_refuses_a_bad_database_before_the_work(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n")
    corrupt = corrupt_db(tmp_path)
    before = digest(corrupt)
    for path in (foreign, corrupt):
        line = assert_one_line_error(*run_entry(command("baselines"), ["--db", str(path), "--device", "cpu", "--quick"]))
        assert "not an SQLite database" in line or "damaged" in line
    assert foreign.read_text() == "not a database\n" and digest(corrupt) == before


@pytest.mark.parametrize(
    "args",
    [["--batch-sizes", "0"], ["--batch-sizes", "99999999999"], ["--batch-sizes", "8,x"], ["--horizons", "nan"],
     ["--horizons", "0"], ["--steps", "0"], ["--steps", "99999999999999999999"], ["--naive", "10000000"],
     ["--cache-dir", "a\x00b"], ["--threads", "0"], ["--threads", "99999"], ["--threads", "1.5"]],
)
def test_bench_bad_arguments(args: list[str]) -> None:
    assert_one_line_error(*run_entry(command("bench"), [*args, "--device", "cpu"]))


# ---------------------------------------------------------------------- evolve (real processes)

EVOLVE_BAD = {
    "horizons nan": (["--horizons", "nan"], "--horizons"),
    "horizons inf": (["--horizons", "1,inf"], "--horizons"),
    "db-timeout nan": (["--db-timeout", "nan"], "--db-timeout"),
    "timeout nan": (["--timeout", "nan"], "--timeout"),
    "budget 1": (["--budget", "1"], "--budget"),
    "initial huge": (["--initial", "99999999999999999999999999"], "--initial"),
    "name invalid UTF-8": (["--name", os.fsdecode(b"run\xff\xfe")], "--name"),
    "name forging lines": (["--name", "a\nTraceback (most recent call last):\x1b[31m"], "--name"),
    "name with a slash": (["--name", "../../etc"], "--name"),
    "seed beyond 64 bits": (["--seed", "99999999999999999999"], "--seed"),
    "particles 0": (["--particles", "0"], "--particles"),
    "mutations huge": (["--mutations", "1000000000"], "--mutations"),
    "timesteps huge": (["--timesteps", "1000000000"], "--timesteps"),
    "heldout horizons": (["--heldout-horizons", "1,-2"], "--heldout-horizons"),
    "test seeds huge": (["--test-seeds", "99999999999999999999"], "--test-seeds"),
    "db-retries huge": (["--db-retries", "1000000"], "--db-retries"),
    "claim-timeout inf": (["--claim-timeout", "inf"], "--claim-timeout"),
    "resume invalid UTF-8": (["--resume", os.fsdecode(b"\xff")], "--resume"),
    "cache-dir NUL": (["--cache-dir", "a\x00b"], "--cache-dir"),
}
# each real process imports torch (seconds of CPU): these few go through `python -m`, all of
# EVOLVE_BAD through the same entry point in-process
EVOLVE_PROCESSES = ("horizons nan", "budget 1", "initial huge", "name invalid UTF-8", "name forging lines")


def test_evolve_bad_arguments_in_real_processes(tmp_path: Path) -> None:
    """`python -m nos.evolve` with a bad number or name: exit 2, one line, before any work
    (no database, no cache directory created)."""
    procs = {}
    for case in EVOLVE_PROCESSES:
        args, _ = EVOLVE_BAD[case]
        d = tmp_path / case.replace(" ", "_")
        d.mkdir()
        argv = ["-m", "nos.evolve", *args, "--db", str(d / "nos.sqlite"), "--cache-dir", str(d / "cache"),
                "--device", "cpu"]
        procs[case] = (d, Proc([os.fsencode(a) for a in argv]))  # bytes: argv as a shell passes it
    try:
        for case, (d, proc) in procs.items():
            line = assert_one_line_error(*proc.result(timeout=120))
            assert EVOLVE_BAD[case][1] in line, (case, line)
            assert os.listdir(d) == [], (case, os.listdir(d))
    finally:
        for _, proc in procs.values():
            proc.stop()


@pytest.mark.parametrize("case", EVOLVE_BAD)
def test_evolve_bad_arguments(case: str, tmp_path: Path) -> None:
    args, expect = EVOLVE_BAD[case]
    argv = [*args, "--db", str(tmp_path / "nos.sqlite"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    line = assert_one_line_error(*run_entry(command("evolve"), argv))
    assert expect in line, line
    assert os.listdir(tmp_path) == []


def test_evolve_smallest_budget_gives_a_step() -> None:
    from nos import evolve

    cfg = evolve._config(evolve._parser().parse_args(["--budget", "3", "--horizons", "0.5,100"]))
    assert cfg.budget_fpe == 3 and cfg.total_steps >= 1
    assert cfg.horizons == (0.5, 100.0)
