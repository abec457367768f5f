"""Hypothesis properties of the rule "it works, or one line, exit 2, nothing written".

Over genome JSON (the loader), every command's arguments (each command's real entry point,
in-process; its expensive work patched out once the arguments are accepted) and tampered
database rows (every query subcommand on a file some other program wrote into). The default
suite runs a few dozen derandomized examples per property; ``-m slow`` runs many more.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
import sqlite3
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nos import query
from nos.ui.cli import MAX_BUDGET, MAX_HORIZON, MIN_BUDGET, MIN_HORIZON, run_command
from search_space.builtins import BUILTIN_JSON, BUILTINS, builtin
from search_space.genome import Genome, GenomeError, check_valid, loads

from .conftest import assert_one_line_error, make_nos_db, run_entry

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SIDE_FILES = ("-wal", "-shm", "-journal")

# ---------------------------------------------------------------------- strategies

# text a hostile user or file would hold: controls, bidi overrides, line separators, Unicode
# digits, surrogates (undecodable argv bytes), long runs
NASTY = st.sampled_from(["\n", "\r", "\x1b[31m", "\x00", "\u202e", "\u2028", "²", "٣", "n٠", "\udcff", "1_0",
                         " 1 ", "nan", "inf", "-inf", "1e400", "-0", "9" * 25, "Traceback (most recent call last):"])
TEXT = st.one_of(st.text(max_size=30), NASTY, st.builds(lambda a, b: a + b, NASTY, st.text(max_size=10)),
                 st.text(min_size=300, max_size=2000))
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(TEXT, inner, max_size=4)), max_leaves=20)
GENOME_WORDS = st.sampled_from(["nodes", "op", "in", "decay", "args", "update", "sign", "clip", "lr", "noise",
                                "sigma", "scale", "accept", "schedule", "g", "m", "v", "n0", "n1", "n5", "n9",
                                "sign", "neg", "add", "div", "mul", "one_minus", "constant", "linear_up",
                                "cosine_down", "nos_evolved_lr0", "warmup_hold_cosine", "sech2", "momentum",
                                "nesterov", "if_better", "layer_std", "cosine"])


@st.composite
def genome_texts(draw: st.DrawFn) -> str:
    """Genome JSON text: a builtin with a few random edits, arbitrary JSON, or broken text."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return json.dumps(draw(JSON))
    if kind == 2:  # deeply nested text, valid or not
        n = draw(st.integers(1, 5000))
        return "[" * n + draw(st.sampled_from(["", "1", '"x"'])) + "]" * draw(st.integers(0, n))
    g = json.loads(json.dumps(BUILTIN_JSON[draw(st.sampled_from(BUILTINS))]))
    for _ in range(draw(st.integers(1, 4))):
        # walk to a random container, then replace or add one entry
        node: object = g
        path_len = draw(st.integers(0, 4))
        for _ in range(path_len):
            children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
            children = [c for c in children if isinstance(c, (dict, list))]
            if not children:
                break
            node = draw(st.sampled_from(children))
        value = draw(st.one_of(JSON, GENOME_WORDS, st.lists(GENOME_WORDS, max_size=3)))
        if isinstance(node, dict):
            key = draw(st.one_of(st.sampled_from(sorted(node) or ["nodes"]), GENOME_WORDS, TEXT))
            node[key] = value
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = value
    return json.dumps(g, ensure_ascii=draw(st.booleans()))


def check_genome(text: str) -> None:
    try:
        g = loads(text)
    except GenomeError as e:
        msg = str(e)
        assert msg.isprintable() and len(msg) <= 300, msg
        return
    assert isinstance(g, Genome)
    check_valid(g)  # whatever loads accepts is a valid genome (decays in [0, 1] included)
    assert loads(g.dumps()) == g


@FAST
@given(genome_texts())
def test_genome_json(text: str) -> None:
    check_genome(text)


@pytest.mark.slow
@SLOW
@given(genome_texts())
def test_genome_json_slow(text: str) -> None:
    check_genome(text)


# ---------------------------------------------------------------------- the database fixtures


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("props") / "template.sqlite"
    return path, make_nos_db(path)


def assert_rule(result: tuple[int, str, str]) -> None:
    code, out, err = result
    if code == 0:
        assert err == "" or "Traceback" not in err, err
        return
    assert_one_line_error(code, out, err)


# ---------------------------------------------------------------------- query arguments

QUERY_TOKENS = st.one_of(
    st.sampled_from(["runs", "top", "show", "lineage", "stats", "compare", "r1", "1", "2", "3", "0", "-1", "-n", "--format",
                     "json", "csv", "table", "xml", "--db", "--help-not", "-", "--", "9223372036854775807",
                     "9223372036854775808", "99999999999999999999", "²", "٣"]),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    TEXT,
)


def check_query_args(db: Path, argv: list[str]) -> None:
    before = digest(db)
    assert_rule(run_entry(query.main, [*argv, "--db", str(db)]))
    assert digest(db) == before
    assert not any(Path(f"{db}{s}").exists() for s in SIDE_FILES)


@FAST
@given(st.lists(QUERY_TOKENS, min_size=1, max_size=6))
def test_query_arguments(template, argv: list[str]) -> None:
    check_query_args(template[0], argv)


@pytest.mark.slow
@SLOW
@given(st.lists(QUERY_TOKENS, min_size=1, max_size=6))
def test_query_arguments_slow(template, argv: list[str]) -> None:
    check_query_args(template[0], argv)


# ---------------------------------------------------------------------- every command's numbers


class Accepted(Exception):
    """Raised in place of a command's work once its arguments were accepted."""


NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "3", "0.5", "100", "1e6", "1e-300", "nan", "inf", "-inf", "1,2", "1,,2", ",",
                     "0.1,1", "1," * 30, "9" * 5000, "²", "٣", "1_000", " 7 ", "0x10", ""]),
    TEXT,
)

EVOLVE_FLAGS = ["--initial", "--particles", "--timesteps", "--mutations", "--max-tries", "--seed", "--horizons",
                "--budget", "--funnel", "--heldout-horizons", "--search-seeds", "--validation-seeds",
                "--test-seeds", "--sine-pretrain-steps",
                "--sine-width", "--chunk", "--timestep-chunk", "--workers", "--batch-size", "--timeout",
                "--claim-timeout", "--db-retries", "--db-timeout", "--name", "--resume", "--scheduler", "--cache-dir"]
BASELINE_FLAGS = ["--horizons", "--validation-seeds", "--test-seeds", "--budget"]
BENCH_FLAGS = ["--batch-sizes", "--horizons", "--steps", "--naive", "--cache-dir", "--threads"]
INTEGRITY_FLAGS = ["--random", "--seed"]


def evolve_parse(argv: Sequence[str] | None) -> int:
    """evolve's argument handling (parser and config), in place of its main: never searches."""
    evolve = importlib.import_module("nos.evolve")
    args = evolve._parser().parse_args(argv)
    cfg = evolve._config(args)
    for key, value in vars(args).items():  # every accepted number is finite and bounded
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert math.isfinite(v) and 0 <= v < 2**63, (key, v)
                if key not in ("seed", "timeout", "claim_timeout", "db_timeout"):
                    assert v <= MAX_BUDGET, (key, v)
            elif isinstance(v, str):  # names printable; paths at least free of control characters
                assert not any(unicodedata.category(c) == "Cc" for c in v), (key, v)
                assert key in ("db", "cache_dir") or v.isprintable(), (key, v)
    assert MIN_BUDGET <= cfg.budget_fpe <= MAX_BUDGET and cfg.total_steps >= 1
    for h in (*cfg.horizons, *cfg.heldout_horizons):
        assert MIN_HORIZON <= h <= MAX_HORIZON
    return 0


def entry(name: str, *patched: str) -> Callable[[list[str]], tuple[int, str, str]]:
    """``nos.<name>.main`` (imported on first use) with ``patched`` functions of the module
    raising Accepted: what runs is the argument handling up to the command's work."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        module = importlib.import_module(f"nos.{name}")
        main = module.main
        patches = [mock.patch.object(module, p, side_effect=Accepted) for p in patched]
        for p in patches:
            p.start()
        try:
            return run_entry(main, argv)
        except Accepted:
            return 0, "", ""
        finally:
            for p in patches:
                p.stop()

    return run


COMMANDS = {
    "evolve": (lambda argv: run_entry(evolve_parse, argv), EVOLVE_FLAGS),
    "baselines": (entry("baselines", "resolve_device"), BASELINE_FLAGS),
    "bench": (entry("bench", "resolve_device"), BENCH_FLAGS),
    "integrity": (entry("integrity", "resolve_device"), INTEGRITY_FLAGS),
}


@st.composite
def command_args(draw: st.DrawFn) -> tuple[str, list[str]]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    flags = COMMANDS[name][1]
    argv: list[str] = ["--random", "3"] if name == "integrity" else []
    for _ in range(draw(st.integers(1, 4))):
        argv += [draw(st.sampled_from(flags)), draw(NUMBER)]
    return name, argv


def check_command(name: str, argv: list[str], tmp: Path) -> None:
    with mock.patch("nos.integrity.random_genome", lambda rng: builtin("sgd")):
        result = COMMANDS[name][0]([*argv, "--device", "cpu"])
    assert_rule(result)


@FAST
@given(command_args())
def test_command_arguments(case: tuple[str, list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_command(*case, Path(tmp))


@pytest.mark.slow
@SLOW
@given(command_args())
def test_command_arguments_slow(case: tuple[str, list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_command(*case, Path(tmp))


def test_accepted_arguments_really_run_the_patched_work() -> None:
    """The property's "accepted" branch is real: a valid command reaches its (patched) work."""
    for name, argv in (("baselines", ["--horizons", "1,2", "--budget", "3"]), ("bench", ["--steps", "2"]),
                       ("integrity", ["--random", "2"])):
        with mock.patch("nos.integrity.random_genome", lambda rng: builtin("sgd")):
            assert COMMANDS[name][0]([*argv, "--device", "cpu"]) == (0, "", "")
    assert run_command(evolve_parse, ["--budget", "3", "--horizons", "0.5"]) == 0


# ---------------------------------------------------------------------- tampered database rows

COLUMNS = {
    "runs": ["name", "config", "status", "seed", "started_at", "finished_at"],
    "individuals": ["run_id", "parent_id", "particle", "timestep", "mutation", "attempt", "slot", "genome",
                    "expression", "latex", "genome_hash", "status", "fitness", "lr", "sign", "mutation_kind",
                    "duplicate_of", "error", "created_at"],
    "evaluations": ["individual_id", "task", "horizon", "lr", "seed", "loss", "steps", "seconds"],
    "timestep_stats": ["timestep", "candidates", "passed", "duplicates", "invalid", "errors", "best_fitness",
                       "median_fitness"],
    "meta": ["key", "value"],
}
STORED = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    TEXT,
    st.binary(max_size=20),
    JSON.map(json.dumps),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(["NaN", '{"x": Infinity}', "2020-13-45 99:99:99", "finished", "evaluated", "nos", "2", "r1"]),
)


@st.composite
def tamperings(draw: st.DrawFn) -> list[tuple[str, str, object, bool]]:
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from(sorted(COLUMNS)))
        edits.append((table, draw(st.sampled_from(COLUMNS[table])), draw(STORED), draw(st.booleans())))
    return edits


def check_tampered(template: tuple[Path, dict[str, int]], edits: list[tuple[str, str, object, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nos.sqlite"
        shutil.copyfile(template[0], path)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA ignore_check_constraints = ON")  # another program need not obey them
        for table, column, value, all_rows in edits:
            where = "" if all_rows else " WHERE rowid = (SELECT min(rowid) FROM " + table + ")"
            slot = "?"
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # stored as TEXT that is not UTF-8
                    value, slot = value.encode("utf-8", "surrogateescape"), "CAST(? AS TEXT)"
            try:
                with conn:
                    conn.execute(f"UPDATE {table} SET {column} = {slot}{where}", (value,))
            except sqlite3.IntegrityError:  # NOT NULL / UNIQUE: SQLite itself refuses this edit
                pass
        conn.close()
        before = digest(path)
        ids = template[1]
        for args in (["runs"], ["runs", "--format", "json"], ["top", "r1", "--format", "csv"], ["top", "1"],
                     ["show", str(ids["child"])], ["show", str(ids["initial"]), "--format", "json"],
                     ["lineage", str(ids["grandchild"])], ["stats", "r1"], ["stats", "1", "--format", "json"],
                     ["compare", "r1"]):
            assert_rule(run_entry(query.main, [*args, "--db", str(path)]))
        assert digest(path) == before
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["nos.sqlite"]


@FAST
@given(tamperings())
def test_tampered_rows(template, edits: list[tuple[str, str, object, bool]]) -> None:
    check_tampered(template, edits)


@pytest.mark.slow
@SLOW
@given(tamperings())
def test_tampered_rows_slow(template, edits: list[tuple[str, str, object, bool]]) -> None:
    check_tampered(template, edits)
