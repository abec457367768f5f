"""The shifted-sphere integrity check (nos.engine.integrity) and `python -m nos.integrity`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nos.engine.integrity import LRS, STEPS, THRESHOLD, IntegrityResult, check
from nos.integrity import main as integrity_main
from nos.tasks.sphere import SHIFT, X0
from nos.ui.cli import run_command
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import random_genome

from .conftest import Proc

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
F0 = sum((x - b) ** 2 for x, b in zip(X0, SHIFT))  # 7.1525


def G(nodes: list[dict], **rest) -> Genome:
    return from_json({"nodes": nodes, **rest})


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """Start this module's commands in parallel; the tests that read them come last."""
    tmp = tmp_path_factory.mktemp("integrity_cli")
    marker = tmp / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    bad = tmp / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"op": payload, "in": ["g"]}]}))
    procs = {
        "all": Proc(["-m", "nos.integrity", "--builtin", "all", "--format", "json"]),
        "random": Proc(["-m", "nos.integrity", "--random", "50", "--seed", "0", "--format", "json", "--device", "cpu"]),
        "bad genome": Proc(["-m", "nos.integrity", "--genome", str(bad)]),
    }
    yield tmp, procs
    for p in procs.values():
        p.stop()


# =============================================================================================
# the check


def test_constants():
    assert STEPS == 35 and THRESHOLD == 3.5 and LRS == (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    assert F0 == pytest.approx(7.1525)


def test_sgd_by_hand():
    """SGD: x_t - b = (1 - 2 lr)^t (x0 - b); lr 0.1 is best: f = 0.8^70 f(x0)."""
    (r,) = check([builtin("sgd")])
    assert r.passed and not r.sign_flipped and r.lr == 0.1
    assert r.final_loss == pytest.approx(0.8**70 * F0, rel=1e-4)
    # the other rates are worse, as the closed form says
    assert min(abs(1 - 2 * lr) for lr in LRS if lr != 0.1) > 0.8


def test_every_builtin_passes():
    results = check([builtin(n) for n in BUILTINS])
    for name, r in zip(BUILTINS, results):
        assert r.passed, (name, r)
        assert not r.sign_flipped, name
        assert r.final_loss is not None and r.final_loss < THRESHOLD
        assert r.lr in LRS


DEGENERATE = {
    "constant update": [{"op": "mul", "in": ["one", "two"]}],
    "zero update": [{"op": "mul", "in": ["zero", "g"]}],
    "pure noise operand": [{"op": "mul", "in": ["noise", "one"]}],
    "noise and constants": [{"op": "add", "in": ["noise", "two"]}],
    "tiny weight decay": [{"op": "mul", "in": ["w_1e6", "one"]}],
    "sign of a constant": [{"op": "sign", "in": ["one"]}],
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_genomes_fail(case):
    (r,) = check([G(DEGENERATE[case])])
    assert not r.passed
    assert not r.sign_flipped
    assert r.final_loss is None or r.final_loss >= THRESHOLD


def test_a_wrong_sign_is_flipped():
    neg = G([{"op": "neg", "in": ["g"]}])
    (r,) = check([neg])
    assert r.passed and r.sign_flipped
    assert r.final_loss == pytest.approx(0.8**70 * F0, rel=1e-4) and r.lr == 0.1
    kept = r.apply(neg)
    assert kept.sign == -1 and kept.nodes == neg.nodes
    (r2,) = check([kept])
    assert r2.passed and not r2.sign_flipped
    assert r2.final_loss == pytest.approx(r.final_loss, rel=1e-6)
    # a genome that passes as it is keeps its sign
    (r3,) = check([builtin("adam")])
    assert r3.apply(builtin("adam")) == builtin("adam")


def test_result_json():
    r = IntegrityResult(True, 0.5, 0.1, False)
    assert r.to_json() == {"passed": True, "final_loss": 0.5, "lr": 0.1, "sign_flipped": False}
    assert json.loads(json.dumps(r.to_json())) == r.to_json()
    assert check([]) == []


def test_batched_check_equals_one_at_a_time():
    rng = random.Random(0)
    genomes = [random_genome(rng) for _ in range(16)]
    genomes += [builtin("adam"), G(DEGENERATE["zero update"]), G([{"op": "neg", "in": ["g"]}]), builtin("rso")]
    batched = check(genomes)
    assert 0 < sum(r.passed for r in batched) < len(genomes)
    assert any(r.sign_flipped for r in batched)
    for g, b in zip(genomes, batched):
        (a,) = check([g])
        assert (a.passed, a.sign_flipped, a.lr) == (b.passed, b.sign_flipped, b.lr), g.dumps()
        if a.final_loss is None:
            assert b.final_loss is None
        else:
            assert b.final_loss == pytest.approx(a.final_loss, rel=1e-5, abs=1e-9), g.dumps()


def test_check_is_deterministic():
    rng = random.Random(3)
    genomes = [random_genome(rng) for _ in range(8)]
    assert check(genomes) == check(genomes)


# =============================================================================================
# the command, in-process (cheap) ...


def _one_line_exit_2(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_command(integrity_main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_genome_file_in_process(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(builtin("lion").dumps())
    assert integrity_main(["--genome", str(path), "--format", "json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["results"]
    assert row["name"] == "mine.json" and row["passed"] is True and row["sign_flipped"] is False
    assert out["summary"]["candidates"] == 1 and out["summary"]["pass_rate"] == 1.0


def test_table_format(capsys):
    assert integrity_main(["--builtin", "sgd", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "passed", "final_loss", "lr", "sign_flipped", "expression"]
    assert out.splitlines()[2].split()[:2] == ["sgd", "yes"]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--genome", "does/not/exist.json"], "exist.json"),
        (["--random", "0"], "--random"),
        (["--builtin", "nope"], "nope"),
        ([], "required"),
        (["--builtin", "adam", "--random", "3"], "not allowed"),
        (["--random", "x"], "invalid int"),
        (["--builtin", "adam", "--format", "xml"], "xml"),
    ],
)
def test_bad_arguments_in_process(capsys, argv, fragment):
    assert fragment in _one_line_exit_2(capsys, argv)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ('{"nodes": [{"op": "neg", "in": ["n0"]}]}', "earlier node"),
        ('{"nodes": [{"op": "neg", "in": ["g"]}], "noise": {"sigma": NaN}}', "NaN"),
        ("not json", "invalid JSON"),
        ('{"nodes": [{"op": "neg", "in": ["g"]}], "sign": true}', "sign"),
    ],
)
def test_bad_genome_files_in_process(tmp_path, capsys, text, fragment):
    path = tmp_path / "g.json"
    path.write_text(text)
    assert fragment in _one_line_exit_2(capsys, ["--genome", str(path)])


def test_genome_with_a_huge_number_in_process(tmp_path, capsys):
    path = tmp_path / "g.json"
    path.write_text('{"nodes": [{"op": "neg", "in": ["g"]}], "clip": ' + "9" * 5000 + "}")
    _one_line_exit_2(capsys, ["--genome", str(path)])


def test_genome_with_a_dead_node_in_process(tmp_path, capsys):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "neg", "in": ["g"]}], "sign": -1}))
    assert integrity_main(["--genome", str(path), "--format", "json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["passed"] is True


# =============================================================================================
# ... and as real commands (started by the `cli` fixture at the top of the module)


def test_cli_all_builtins(cli):
    _, procs = cli
    rc, out, err = procs["all"].result()
    assert rc == 0, err
    doc = json.loads(out)  # stdout is one JSON document
    names = [r["name"] for r in doc["results"]]
    assert names == list(BUILTINS)
    assert all(r["passed"] for r in doc["results"])
    assert doc["summary"]["passed"] == len(BUILTINS) and doc["summary"]["pass_rate"] == 1.0
    sgd = doc["results"][names.index("sgd")]
    assert sgd["lr"] == 0.1 and sgd["final_loss"] == pytest.approx(0.8**70 * F0, rel=1e-4)
    assert all(isinstance(r["expression"], str) and r["expression"] for r in doc["results"])


def test_cli_random_pass_rate_and_determinism(cli, capsys):
    _, procs = cli
    rc, out, err = procs["random"].result()
    assert rc == 0, err
    doc = json.loads(out)
    rate = doc["summary"]["pass_rate"]
    assert 0.0 < rate < 1.0
    assert doc["summary"]["candidates"] == 50 == len(doc["results"])
    assert rate == pytest.approx(sum(r["passed"] for r in doc["results"]) / 50)
    # the same seed again (here in this process: another hash seed, same answer)
    assert integrity_main(["--random", "50", "--seed", "0", "--format", "json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["results"] == doc["results"]  # everything but the timing
    assert {k: v for k, v in again["summary"].items() if k != "seconds"} == {
        k: v for k, v in doc["summary"].items() if k != "seconds"
    }
    # another seed, other candidates
    assert integrity_main(["--random", "50", "--seed", "1", "--format", "json", "--device", "cpu"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert [r["expression"] for r in other["results"]] != [r["expression"] for r in doc["results"]]


def test_cli_bad_genome_is_one_line_and_runs_nothing(cli):
    tmp, procs = cli
    rc, out, err = procs["bad genome"].result()
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown operation" in lines[0]
    assert out == ""
    assert not (tmp / "pwned").exists()
