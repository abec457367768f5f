"""`python -m nos.export`: standalone optimizer files, checked against torch.optim and against the
interpreter, importable without nos, and a command that fails in one line."""

from __future__ import annotations

import ast
import errno
import importlib.util
import inspect
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch

from db.store import Store
from nos.engine.codegen import Effects, LrChoice, check_class_name, class_name_for, render
from nos.engine.trainer import train
from nos.export import main as export_main
from nos.query import main as query_main
from nos.search.config import SearchConfig
from nos.search.funnel import candidate_id, validated_lrs
from nos.tasks.budget import steps_for
from nos.ui.cli import run_command
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import random_genome
from search_space.symbolic import symbolic

from .conftest import MLPTask, Proc, run_entry

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
TORCH_BUILTINS = ("adam", "sgd", "momentum", "nesterov")


# Imports every exported file where nos cannot be imported, trains 3 steps with each, and reports.
STANDALONE = """
import importlib.util, json, sys

for name in ("nos", "search_space", "db"):  # unimportable even if they were installed
    sys.modules[name] = None
try:
    import nos  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("nos is importable")
import torch

done = []
for i, (cls_name, path) in enumerate(sorted(json.loads(sys.argv[1]).items())):
    spec = importlib.util.spec_from_file_location(f"m{i}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = getattr(mod, cls_name)(net.parameters())
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    done.append([cls_name, any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))])
leaked = [m for m, v in sys.modules.items() if m.split(".")[0] in ("nos", "search_space", "db") and v is not None]
print(json.dumps({"done": done, "leaked": leaked}))
"""


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory, exported_builtins):
    """Start every command of this module in parallel; tests collect what they need."""
    out = tmp_path_factory.mktemp("cli")
    # the exported files, imported by a python where nos cannot be imported (cwd elsewhere,
    # PYTHONPATH empty, and the nos packages blocked in sys.modules)
    script = out / "standalone.py"
    script.write_text(STANDALONE)
    files = {class_name_for(n): str(p) for n, p in exported_builtins.items()}
    standalone = Proc([str(script), json.dumps(files)], cwd=out, env={**os.environ, "PYTHONPATH": ""})
    # one real export through `python -m`; the other builtins go through the same `main` in-process
    # (each interpreter start costs seconds of importing torch)
    procs = {"export adam": Proc(["-m", "nos.export", "--builtin", "adam", "-o", str(out / "adam.py")])}
    procs["bad builtin"] = Proc(["-m", "nos.export", "--builtin", "nope", "-o", str(out / "nope.py")])
    procs["missing db"] = Proc(
        ["-m", "nos.export", "99999", "-o", str(out / "x.py"), "--db", str(out / "no_such_dir" / "none.sqlite")]
    )
    procs["standalone"] = standalone
    # a genome file, through the real command, with the user's lr; and a broken one
    (out / "my_rule.json").write_text(json.dumps(GENOME_FILE))
    procs["export genome"] = Proc(["-m", "nos.export", "--genome", str(out / "my_rule.json"), "--lr", "3e-4",
                                   "-o", str(out / "my_rule.py")])
    (out / "broken.json").write_text('{"nodes": [{"op": "no_such_op", "in": ["g"]}]}')
    procs["broken genome"] = Proc(["-m", "nos.export", "--genome", str(out / "broken.json"), "-o", str(out / "b.py")])
    # bad input through the real command: an output that is a directory, an id beyond 64 bits,
    # a database row that is not JSON
    (out / "a_dir").mkdir()
    procs["output is a directory"] = Proc(["-m", "nos.export", "--builtin", "adam", "-o", str(out / "a_dir")])
    procs["id beyond 64 bits"] = Proc(
        ["-m", "nos.export", "99999999999999999999", "-o", str(out / "big.py"), "--db", str(out / "big.sqlite")]
    )
    db = out / "tampered.sqlite"
    ind = make_db(db)
    tamper(db, "UPDATE individuals SET genome = 'not json {' WHERE id = ?", ind)
    procs["genome not JSON"] = Proc(["-m", "nos.export", str(ind), "-o", str(out / "tampered.py"), "--db", str(db)])
    # a real tiny run with a funnel at two horizons (about 10 s alone)
    procs["funnel run"] = Proc([
        "-m", "nos.evolve", "--db", str(out / "funnel.sqlite"), "--cache-dir", str(out / "cache"), "--name", "r",
        "--initial", "6", "--particles", "1", "--timesteps", "1", "--mutations", "2", "--funnel", "1",
        "--horizons", "1", "--heldout-horizons", "1,2", "--budget", "60", "--search-seeds", "1",
        "--validation-seeds", "2", "--test-seeds", "2", "--sine-pretrain-steps", "50", "--sine-width", "8",
        "--device", "cpu",
    ])
    yield out, procs
    for p in procs.values():
        p.stop()


GENOME_FILE = {"nodes": [{"op": "sign", "in": ["lion_mix"]}], "update": "nesterov",
               "lr": {"schedule": "warmup_cosine"}}


def test_export_genome_file(cli):
    """`nos export --genome FILE.json` writes a file whose class carries the genome, named after the
    file, with the lr given; it computes what the interpreter computes."""
    out, procs = cli
    rc, _, stderr = procs["export genome"].result()
    assert rc == 0, stderr
    mod = load(out / "my_rule.py")
    assert "class NosMyRule" in stderr
    genome = from_json(GENOME_FILE)
    opt = mod.NosMyRule([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["total_steps"] == steps_for(genome, 600)
    doc = mod.__doc__
    assert "my_rule.json" in doc and "given on the command line" in doc
    _interpreter_vs_export(mod, "NosMyRule", genome, 1e-3)


def test_export_broken_genome_file_is_one_line(cli):
    out, procs = cli
    rc, stdout, stderr = procs["broken genome"].result()
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "broken.json" in stderr and "no_such_op" in stderr
    assert not (out / "b.py").exists()


@pytest.mark.parametrize("args", [["--genome", "x.json", "--builtin", "adam"], ["--genome", "x.json", "--horizon", "2"],
                                  ["--builtin", "adam", "--horizon", "2"]])
def test_export_sources_are_exclusive(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        run_command(export_main, [*args, "-o", str(tmp_path / "x.py")])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x.py").exists()


def test_discovered_erf_sign_is_the_seed0_initial_genome():
    """The shipped champion is no transcription: the initial genome of slot init:3 under run seed 0
    is exactly it (what the default run and the task-mix runs chose)."""
    assert builtin("discovered_erf_sign") == random_genome(random.Random("0:init:3"))
    for name in ("discovered_erf_sign", "discovered_sign_interp", "discovered_lion_interp"):
        assert name in BUILTINS


def test_exported_schedule_warns_once_past_total_steps(exported_builtins):
    """A rule that depends on t / total_steps warns at the first step past it (and only then); a
    rule that does not (Adam) never warns."""
    import warnings

    for name, cls_name, warns in [("discovered_erf_sign", "DiscoveredErfSign", True), ("adam", "Adam", False)]:
        cls = getattr(load(exported_builtins[name]), cls_name)
        w = torch.nn.Parameter(torch.ones(3))
        opt = cls([w], total_steps=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 8):
                opt.zero_grad()
                (w ** 2).sum().backward()
                opt.step()
                if step == 3:
                    assert not caught
        assert len(caught) == (1 if warns else 0)
        if warns:
            assert "past total_steps=3" in str(caught[0].message)
        doc = " ".join(load(exported_builtins[name]).__doc__.split())  # unwrapped
        assert ("warns once" in doc) == warns and ("does not matter here" in doc) == (not warns)


def _exported_by_cli(cli, name: str) -> Path:
    out, procs = cli
    rc, stdout, stderr = procs[f"export {name}"].result()
    assert rc == 0, stderr
    path = out / f"{name}.py"
    assert path.is_file()
    assert f"class {class_name_for(name)}" in stderr  # "wrote FILE (class Adam)"
    return path


_loaded = 0


def load(path: Path) -> ModuleType:
    global _loaded
    _loaded += 1
    spec = importlib.util.spec_from_file_location(f"nos_exported_{_loaded}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exported_builtins(tmp_path_factory) -> dict[str, Path]:
    """Every builtin exported through the command's main function (in-process: fast)."""
    out = tmp_path_factory.mktemp("builtins")
    paths = {}
    for name in BUILTINS:
        path = out / f"{name}.py"
        assert export_main(["--builtin", name, "-o", str(path)]) == 0
        paths[name] = path
    return paths


def render_to(tmp_path: Path, genome: Genome, name: str, lr: float, total_steps: int) -> ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(render(genome, class_name="Exported", lr=lr, total_steps=total_steps, provenance={"test": name}))
    return load(path)


# =============================================================================================
# exported builtins == torch.optim


TORCH_OPTIMS = {
    "adam": (1e-2, lambda p, lr: torch.optim.Adam(p, lr=lr)),
    "sgd": (0.1, lambda p, lr: torch.optim.SGD(p, lr=lr)),
    "momentum": (0.05, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
    "nesterov": (0.05, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
}


def _train_module(task: MLPTask, make_opt, steps: int, dtype=torch.float64) -> tuple[list[torch.Tensor], list[float]]:
    model = task.fresh_model(dtype)
    x, y = task.data(dtype)
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return [p.detach().clone() for p in model.parameters()], losses


@pytest.mark.parametrize("name", TORCH_BUILTINS)
def test_exported_builtin_matches_torch_optim(exported_builtins, name):
    _check_against_torch(load(exported_builtins[name]), name)


def _check_against_torch(mod: ModuleType, name: str) -> None:
    cls = getattr(mod, class_name_for(name))
    assert issubclass(cls, torch.optim.Optimizer)
    lr, make_torch = TORCH_OPTIMS[name]
    task = MLPTask(seed=3)
    ours, our_losses = _train_module(task, lambda p: cls(p, lr=lr), 100)
    ref, ref_losses = _train_module(task, lambda p: make_torch(p, lr), 100)
    start = [p.detach().double() for p in task.model.parameters()]
    assert max(float((r - s).abs().max()) for r, s in zip(ref, start)) > 1e-2  # it trained
    assert ref_losses[-1] < 0.9 * ref_losses[0]
    for a, b in zip(ours, ref):
        assert float((a - b).norm() / b.norm()) < 1e-5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    assert our_losses == pytest.approx(ref_losses, rel=1e-5)


def test_exported_adam_defaults_are_torchs(exported_builtins):
    cls = load(exported_builtins["adam"]).Adam
    opt = cls([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["lr"] == torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    assert opt.defaults["total_steps"] >= 1 and opt.defaults["seed"] == 0


def test_exported_adam_matches_torch_past_total_steps(exported_builtins):
    cls = load(exported_builtins["adam"]).Adam
    task = MLPTask(seed=3)
    ours, _ = _train_module(task, lambda p: cls(p, lr=1e-2, total_steps=20), 40)
    ref, _ = _train_module(task, lambda p: torch.optim.Adam(p, lr=1e-2), 40)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


# =============================================================================================
# interpreter == exported file


INTERP_LR = {
    "sgd": 0.05, "momentum": 0.02, "nesterov": 0.02, "adam": 1e-2, "adam_clip": 1e-2, "rmsprop": 1e-2,
    "lion": 1e-3, "powersign": 0.02, "addsign": 0.02, "rso": 1.0,
}
DEFAULT_INTERP_LR = 1e-2  # builtins added later (e.g. NOS's published optimizers)
STEPS = 30

FEATURES = {
    "dropout": {"nodes": [{"op": "dropout50", "in": ["g"]}, {"op": "add", "in": ["n0", "m"]}]},
    "noise operand": {"nodes": [{"op": "add", "in": ["g", "noise"]}],
                      "lr": {"schedule": "warmup_cosine", "decay": "exp_down"}},
    "clip_by_norm": {"nodes": [{"op": "clip_by_norm", "in": ["g"]}], "update": "nesterov"},
    "stateful + edge decays": {"nodes": [
        {"op": "ema", "in": ["g"]},
        {"op": "delta", "in": ["m"]},
        {"op": "running_max", "in": ["g2"]},
        {"op": "sqrt_abs", "in": ["n2"]},
        {"op": "add", "in": ["n0", "n1"], "decay": ["cosine_down", {"op": "mul", "args": ["linear_down", "exp_up"]}]},
        {"op": "div", "in": ["n4", "n3"]},
    ]},
    "noise absolute": {"nodes": [{"op": "mul", "in": ["g", "one"]}],
                       "noise": {"sigma": 0.01, "decay": "cosine_down", "scale": "absolute"}},
    "noise layer_std + clip": {"nodes": [{"op": "sign", "in": ["g"]}], "update": "momentum", "clip": 0.5,
                               "noise": {"sigma": 0.05, "scale": "layer_std"}},
    "dead node + sign": {"nodes": [{"op": "dropout30", "in": ["qh_gm"]}, {"op": "tanh", "in": ["qh_gm"]},
                                   {"op": "neg", "in": ["n1"]}], "sign": -1, "lr": {"schedule": "linear"}},
    "if_better noise on a gradient rule": {
        "nodes": [{"op": "sub", "in": ["aggmo", "w_1e3"]}],
        "noise": {"sigma": 0.1, "decay": {"op": "mean", "args": ["cyclic_cosine", "demon"]}, "accept": "if_better"}},
}


def _interpreter_vs_export(mod: ModuleType, cls_name: str, genome: Genome, lr: float) -> None:
    task = MLPTask(seed=0, target_scale=5.0)
    res = train(task, [genome], [lr], seeds=0, steps=STEPS)
    assert res.losses[0] is not None
    interp = task.last_theta[0]

    model = task.fresh_model()
    opt = getattr(mod, cls_name)(model.parameters(), lr=lr, total_steps=STEPS, seed=0)

    def closure():
        opt.zero_grad()
        loss = task.module_loss(model(task.x))
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    exported = MLPTask.flat(model)
    assert float((interp - task.theta0).abs().max()) > 1e-3  # the optimizer did something
    torch.testing.assert_close(exported, interp, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert float(task.module_loss(model(task.x))) == pytest.approx(res.losses[0], rel=1e-4)


@pytest.mark.parametrize("name", BUILTINS)
def test_interpreter_equals_exported_builtin(exported_builtins, name):
    mod = load(exported_builtins[name])
    _interpreter_vs_export(mod, class_name_for(name), builtin(name), INTERP_LR.get(name, DEFAULT_INTERP_LR))


@pytest.mark.parametrize("case", list(FEATURES))
def test_interpreter_equals_exported_genome(tmp_path, case):
    g = from_json(FEATURES[case])
    _interpreter_vs_export(render_to(tmp_path, g, "feature", 0.01, STEPS), "Exported", g, 0.01)


def test_adam_clip_really_clips():
    """adam_clip is only tested above if clipping is active on that task."""
    a, b = MLPTask(seed=0, target_scale=5.0), MLPTask(seed=0, target_scale=5.0)
    train(a, [builtin("adam")], [1e-2], steps=STEPS)
    train(b, [builtin("adam_clip")], [1e-2], steps=STEPS)
    assert float((a.last_theta - b.last_theta).abs().max()) > 1e-4


# =============================================================================================
# the file itself


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    return names


def _check_file(path: Path, cls_name: str) -> str:
    text = path.read_text()
    tree = ast.parse(text)
    assert _imports(tree) <= {"torch", "math", "warnings"}, _imports(tree)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"eval", "exec", "compile", "__import__", "open"}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == [cls_name]
    assert ast.unparse(classes[0].bases[0]) == "torch.optim.Optimizer"
    methods = {n.name for n in classes[0].body if isinstance(n, ast.FunctionDef)}
    assert {"__init__", "step"} <= methods
    doc = ast.get_docstring(tree)
    assert doc and "u_t = " in doc and "Provenance" in doc and "Learning-rate schedule" in doc
    return doc


@pytest.mark.parametrize("name", BUILTINS)
def test_exported_file_imports_only_torch_and_math(exported_builtins, name):
    doc = _check_file(exported_builtins[name], class_name_for(name))
    assert f"builtin: {name}" in doc
    if name == "rso":
        assert "closure" in doc


def test_random_genome_files_import_only_torch_and_math(tmp_path):
    import random

    from search_space.mutation import random_genome

    rng = random.Random(0)
    for i in range(12):
        g = random_genome(rng)
        path = tmp_path / f"r{i}.py"
        path.write_text(render(g, class_name=f"R{i}", lr=0.01, total_steps=10, provenance={"run": "x"}))
        _check_file(path, f"R{i}")
        mod = load(path)
        w = torch.nn.Parameter(torch.randn(3, 2))
        opt = getattr(mod, f"R{i}")([w])

        def closure(w=w, opt=opt):
            opt.zero_grad()
            loss = (w**2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        assert w.shape == (3, 2)


def test_exported_file_text_does_not_depend_on_hash_order(exported_builtins):
    """A set literal prints in PYTHONHASHSEED order: exporting twice could give different files."""
    for path in exported_builtins.values():
        assert not any(isinstance(n, ast.Set) for n in ast.walk(ast.parse(path.read_text()))), path


def test_class_names():
    assert class_name_for("adam") == "Adam"
    assert class_name_for("adam_clip") == "AdamClip"
    assert class_name_for("run3-id42") == "Run3Id42"
    assert class_name_for("42") == "Nos42"
    assert class_name_for("!!!") == "Discovered"
    assert class_name_for("class").isidentifier()


def test_constructor_validates_and_closure_rules(exported_builtins):
    adam = load(exported_builtins["adam"]).Adam
    w = torch.nn.Parameter(torch.ones(2))
    for bad in (dict(lr=-1.0), dict(lr=float("nan")), dict(total_steps=0), dict(total_steps=1.5), dict(seed="0")):
        with pytest.raises(ValueError):
            adam([w], **bad)
    opt = adam([w], lr=0.1)
    assert opt.step() is None  # no closure: returns None; no grad: nothing happens
    assert torch.equal(w.detach(), torch.ones(2))
    (w**2).sum().backward()
    opt.step()
    assert float(w.detach()[0]) == pytest.approx(1 - 0.1, rel=1e-5)  # Adam's first step is lr * sign(g)

    rso = load(exported_builtins["rso"]).Rso
    v = torch.nn.Parameter(torch.randn(10, generator=torch.Generator().manual_seed(0)))
    opt = rso([v])
    (v**2).sum().backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()

    def closure():
        opt.zero_grad()
        loss = (v**2).sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(20)]
    # a perturbation is kept only if the loss improves
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]


def test_rejected_perturbation_restores_the_weights_exactly(exported_builtins):
    rso = load(exported_builtins["rso"]).Rso
    v = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    v0 = v.detach().clone()
    opt = rso([v])

    def closure():  # minimal at v0: every perturbation is rejected
        opt.zero_grad()
        loss = ((v - v0) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert torch.equal(v.detach(), v0)


def test_clipped_optimizer_steps_without_gradients(exported_builtins):
    w = torch.nn.Parameter(torch.ones(3))
    opt = load(exported_builtins["adam_clip"]).AdamClip([w])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))


# =============================================================================================
# standalone: the files work where nos cannot be imported


def test_cli_export_adam(cli, exported_builtins):
    path = _exported_by_cli(cli, "adam")
    _check_file(path, "Adam")
    # the command's file (another process, another hash seed) is byte for byte the in-process one
    assert path.read_text() == exported_builtins["adam"].read_text()
    _check_against_torch(load(path), "adam")


def test_exported_files_import_without_nos(cli, exported_builtins):
    _, procs = cli
    rc, stdout, stderr = procs["standalone"].result()
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["leaked"] == []
    changed = dict(report["done"])
    assert sorted(changed) == sorted(class_name_for(n) for n in exported_builtins)
    # every optimizer moved the weights (rso may rightly reject all of its 3 perturbations)
    assert all(v for k, v in changed.items() if k != "Rso"), changed


# =============================================================================================
# errors: one line, exit 2


def _one_line_error(rc: int, stdout: str, stderr: str) -> str:
    assert rc == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert lines[0].isprintable() and len(lines[0]) <= 320, lines[0]  # control characters escaped
    return lines[0]


def test_unknown_builtin_is_one_line(cli):
    out, procs = cli
    line = _one_line_error(*procs["bad builtin"].result())
    assert "nope" in line
    assert not (out / "nope.py").exists()


def test_missing_database_is_one_line(cli):
    out, procs = cli
    line = _one_line_error(*procs["missing db"].result())
    assert "none.sqlite" in line
    assert not (out / "x.py").exists()
    assert not (out / "no_such_dir").exists()  # nothing was created on the way


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "x.py"],  # neither an id nor --builtin
        ["7", "--builtin", "adam", "-o", "x.py"],  # both
        ["--builtin", "adam"],  # no -o
        ["abc", "-o", "x.py"],  # id not an int
        ["99999999999999999999", "-o", "x.py"],  # beyond 64 bits: no OverflowError
        ["0", "-o", "x.py"],
        ["--builtin", "adam", "-o", "x.py", "--class-name", "my-opt"],  # would not import
        ["--builtin", "adam", "-o", "x.py", "--class-name", "class"],  # a keyword
        ["--builtin", "adam", "-o", "x.py", "--class-name", "torch"],  # shadows the import
        ["--builtin", "adam", "-o", "x.py", "--class-name", "min"],  # shadows a builtin step() calls
        ["--builtin", "adam", "-o", "x.py", "--class-name", "decay_curve"],  # shadows a helper
        ["--builtin", "adam", "-o", "x.py", "--class-name", "A\x1b[31m" + "b" * 400],  # escaped, cut
    ],
)
def test_bad_arguments_in_process(tmp_path, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_command(export_main, argv)
    assert e.value.code == 2
    _one_line_error(2, "", capsys.readouterr().err)
    assert not (tmp_path / "x.py").exists()


def test_class_name_option(tmp_path):
    (tmp_path / "sub").mkdir()  # the output's directory must exist: export creates nothing else
    path = tmp_path / "sub" / "opt.py"
    assert export_main(["--builtin", "lion", "-o", str(path), "--class-name", "MyLion"]) == 0
    _check_file(path, "MyLion")
    assert load(path).MyLion.__name__ == "MyLion"


# =============================================================================================
# bad input: either it works, or one line on stderr, exit 2, and nothing written


def make_db(path: Path, *, genome: Genome | None = None, config: dict | None = None, lr: float = 3e-3,
            run_name: str = "demo") -> int:
    """A real nos database holding one evaluated individual; returns its id."""
    with Store(path) as store:
        run_id = store.create_run(run_name, {"budget_fpe": 600} if config is None else config, 0)
        [ind] = store.add_individuals([{
            "run_id": run_id, "slot": "init:0", "genome": (genome or builtin("adam")).to_json(),
            "status": "evaluated", "lr": lr, "sign": 1, "fitness": 0.9, "particle": 0, "timestep": 0,
        }])
    return ind


def tamper(path: Path, sql: str, *params: object) -> None:
    """Change a row behind nos's back, as another program could."""
    con = sqlite3.connect(path)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys) -> str:
    """Run the command in-process; it must fail in one line with exit status 2."""
    with pytest.raises(SystemExit) as e:
        run_command(export_main, argv)
    return _one_line_error(e.value.code, "", capsys.readouterr().err)


def test_bad_input_through_the_real_command(cli):
    out, procs = cli
    line = _one_line_error(*procs["output is a directory"].result())
    assert "a_dir" in line and "directory" in line
    assert list((out / "a_dir").iterdir()) == []
    line = _one_line_error(*procs["id beyond 64 bits"].result())
    assert "99999999999999999999" in line and "Overflow" not in line
    assert not (out / "big.py").exists() and not (out / "big.sqlite").exists()
    _one_line_error(*procs["genome not JSON"].result())
    assert not (out / "tampered.py").exists()


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this user cannot create files in: its mode for anyone, also immutable for
    root (whom modes do not stop); skipped where neither works."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK):
        chattr = shutil.which("chattr")
        if chattr and subprocess.run([chattr, "+i", str(d)], capture_output=True).returncode == 0:
            immutable = True
        else:
            d.chmod(0o755)
            pytest.skip("cannot make a directory unwritable here (root without chattr +i)")
    yield d
    if immutable:
        subprocess.run([shutil.which("chattr") or "chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


@pytest.mark.parametrize("case", ["directory", "parent is a file", "unwritable", "long name", "no parent", "the db"])
def test_bad_output_path_is_refused_before_any_work(tmp_path, capsys, monkeypatch, request, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing.py").write_text("x = 1\n")
    (tmp_path / "a_dir").mkdir()
    db = tmp_path / "nos.sqlite"
    ind = make_db(db)
    output = {
        "directory": "a_dir",
        "parent is a file": "existing.py/sub.py",
        "unwritable": "unwritable/x.py",
        "long name": "a" * 300 + ".py",
        "no parent": "no_such_dir/x.py",
        "the db": "nos.sqlite",
    }[case]
    if case == "unwritable":
        os.symlink(request.getfixturevalue("unwritable_dir"), tmp_path / "unwritable")
    before = _files(tmp_path)
    # an id that is not in the database: the output is checked first, before the database
    line = _refused([str(ind + 1), "-o", output, "--db", str(db)], capsys)
    assert "output" in line and "no individual" not in line
    assert _files(tmp_path) == before
    assert not (tmp_path / "no_such_dir").exists()
    line = _refused(["--builtin", "adam", "-o", output], capsys) if case != "the db" else line
    assert _files(tmp_path) == before


def test_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The file system refuses half-way (a full disk): no partial file, no temporary file, and
    a file that was there already is left as it was."""
    import nos.export

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nos.export.os, "replace", full)
    line = _refused(["--builtin", "adam", "-o", str(tmp_path / "new.py")], capsys)
    assert "No space left" in line
    assert _files(tmp_path) == {}
    (tmp_path / "old.py").write_text("old\n")
    _refused(["--builtin", "adam", "-o", str(tmp_path / "old.py")], capsys)
    assert _files(tmp_path) == {"old.py": b"old\n"}


NEST = "[" * 3000 + "]" * 3000
TAMPERED = {
    "genome not JSON": ("UPDATE individuals SET genome = 'not json {'", ()),
    "genome nested 3000 deep": ("UPDATE individuals SET genome = ?", (NEST,)),
    "genome decay nested 3000 deep": ("UPDATE individuals SET genome = ?", (
        json.dumps({"nodes": [{"op": "neg", "in": ["g"], "decay": ["X"]}]}).replace('"X"', '{"op": "sqrt", "args": [' * 3000 + '"constant"' + "]}" * 3000),)),
    "genome not a genome": ("UPDATE individuals SET genome = ?", ('{"nodes": [{"op": "__import__", "in": ["g"]}]}',)),
    "genome a string": ("UPDATE individuals SET genome = ?", ('"adam"',)),
    "lr inf": ("UPDATE individuals SET lr = 9e999", ()),
    "lr -inf": ("UPDATE individuals SET lr = -9e999", ()),
    "lr nan text": ("UPDATE individuals SET lr = 'nan'", ()),
    "lr negative": ("UPDATE individuals SET lr = -0.01", ()),
    "lr zero": ("UPDATE individuals SET lr = 0", ()),
    "lr text": ("UPDATE individuals SET lr = 'abc'", ()),
    "lr missing": ("UPDATE individuals SET lr = NULL", ()),
    "config not JSON": ("UPDATE runs SET config = '[1'", ()),
    "config a list": ("UPDATE runs SET config = '[1, 2]'", ()),
    "config nested 3000 deep": ("UPDATE runs SET config = ?", (NEST,)),
    "budget not a number": ("UPDATE runs SET config = ?", ('{"budget_fpe": "600", "total_steps": 200}',)),
    "budget a bool": ("UPDATE runs SET config = ?", ('{"budget_fpe": true}',)),
    "budget zero": ("UPDATE runs SET config = ?", ('{"budget_fpe": 0}',)),
    "budget huge": ("UPDATE runs SET config = ?", ('{"budget_fpe": 1e400}',)),
    "total_steps not a number": ("UPDATE runs SET config = ?", ('{"total_steps": "abc"}',)),
    "total_steps a float": ("UPDATE runs SET config = ?", ('{"total_steps": 1.5}',)),
    "status unknown": ("UPDATE individuals SET status = 'pending'", ()),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_database_rows_are_one_line(tmp_path, capsys, case):
    """Values read back from the database are checked like user input; the database itself is
    never written (its bytes do not change)."""
    db = tmp_path / "nos.sqlite"
    ind = make_db(db)
    sql, params = TAMPERED[case]
    if case == "status unknown":  # the CHECK constraint stops honest writers; not a tamperer
        sql = "PRAGMA ignore_check_constraints = ON; " + sql
        con = sqlite3.connect(db)
        con.executescript(sql + f" WHERE id = {ind};")
        con.close()
    else:
        tamper(db, sql + (" WHERE id = ?" if sql.startswith("UPDATE individuals") else ""),
               *params, *((ind,) if sql.startswith("UPDATE individuals") else ()))
    stored = db.read_bytes()
    out = tmp_path / "out.py"
    line = _refused([str(ind), "-o", str(out), "--db", str(db)], capsys)
    assert f"{ind}" in line or "run" in line or "individual" in line
    assert not out.exists()
    assert db.read_bytes() == stored


def _load_docstring_safe(path: Path) -> ModuleType:
    raw = path.read_bytes()
    assert b"\x00" not in raw and all(b >= 32 or b == 10 for b in raw), "control byte in the file"
    return load(path)


HOSTILE = 'a\x00b\x1b[31mred\r\n"""\\x41\\\'\'\'\u202eevil\u2028end"'


def test_hostile_run_name_and_stored_text_give_an_importable_file(tmp_path):
    """A run name (and other stored text) with a NUL byte, control characters, triple quotes and
    backslashes lands in the docstring escaped: the file always imports, and says what was there."""
    db = tmp_path / "nos.sqlite"
    ind = make_db(db)
    tamper(db, "UPDATE runs SET name = ?", HOSTILE)
    tamper(db, "UPDATE individuals SET mutation_kind = ?, slot = ? WHERE id = ?", HOSTILE, HOSTILE, ind)
    out = tmp_path / "hostile.py"
    assert export_main([str(ind), "-o", str(out), "--db", str(db)]) == 0
    mod = _load_docstring_safe(out)
    doc = mod.__doc__
    assert r"a\x00b\x1b[31mred\r\n" in doc and r"\u202eevil\u2028end" in doc
    assert "\x00" not in doc and "\x1b" not in doc
    cls = getattr(mod, f"NosOptimizer{ind}")
    w = torch.nn.Parameter(torch.ones(2))
    (w**2).sum().backward()
    cls([w]).step()
    assert float(w.detach()[0]) < 1.0


def test_render_escapes_every_provenance_string(tmp_path):
    prov = {"title": HOSTILE, HOSTILE: HOSTILE, "surrogate": "x\ud800y", "number": float("nan")}
    path = tmp_path / "r.py"
    path.write_text(render(builtin("sgd"), class_name="R", lr=0.1, total_steps=10, provenance=prov),
                    encoding="utf-8")
    doc = _load_docstring_safe(path).__doc__
    assert r"x\ud800y" in doc and "number: nan" in doc and doc.count(r"\x00") == 3


def test_render_refuses_what_would_not_import():
    g = builtin("sgd")
    for bad in (dict(class_name="my-opt"), dict(class_name="None"), dict(class_name="math"),
                dict(lr=float("inf")), dict(lr=float("nan")), dict(lr=-1.0), dict(lr=True), dict(lr="0.1"),
                dict(total_steps=0), dict(total_steps=True), dict(total_steps=2.0)):
        kwargs = dict(class_name="Ok", lr=0.1, total_steps=10, provenance={}) | bad
        with pytest.raises(ValueError):
            render(g, **kwargs)


def test_class_name_check():
    for ok in ("MyOpt", "_Opt", "Opt2", "match", "Ωpt"):
        check_class_name(ok)
    for bad in ("", "2opt", "my-opt", "a b", "class", "None", "torch", "math", "min", "float",
                "rng_normal", "update_moments", "ﬁ", "x\x00"):
        with pytest.raises(ValueError):
            check_class_name(bad)


# =============================================================================================
# total_steps: the steps the genome was trained for


IF_BETTER = {"nodes": [{"op": "mul", "in": ["g", "one"]}], "noise": {"sigma": 0.01, "accept": "if_better"}}


@pytest.mark.parametrize(
    "genome, config, expected",
    [
        ("adam", {"budget_fpe": 600, "total_steps": 200}, 200),
        ("if_better", {"budget_fpe": 600, "total_steps": 200}, 150),  # one more forward a step
        ("if_better", {"budget_fpe": 300}, 75),
        ("adam", {"total_steps": 77}, 77),  # no budget: the stored steps
        ("if_better", {}, 150),  # neither: the default budget
    ],
)
def test_exported_total_steps_are_the_trained_steps(tmp_path, genome, config, expected):
    g = builtin("adam") if genome == "adam" else from_json(IF_BETTER)
    if "budget_fpe" in config:
        assert steps_for(g, config["budget_fpe"]) == expected
    db = tmp_path / "nos.sqlite"
    ind = make_db(db, genome=g, config=config)
    out = tmp_path / "o.py"
    assert export_main([str(ind), "-o", str(out), "--db", str(db)]) == 0
    cls = getattr(load(out), f"NosOptimizer{ind}")
    assert inspect.signature(cls).parameters["total_steps"].default == expected
    assert inspect.signature(cls).parameters["lr"].default == 3e-3


def test_exported_builtin_total_steps(exported_builtins):
    for name, path in exported_builtins.items():
        cls = getattr(load(path), class_name_for(name))
        assert inspect.signature(cls).parameters["total_steps"].default == steps_for(builtin(name))
    # RSO never reads the gradient: a forward per step, plus one for its if_better test
    assert inspect.signature(load(exported_builtins["rso"]).Rso).parameters["total_steps"].default == 300


# =============================================================================================
# the constructor and step(), like torch.optim


def test_constructor_lr_like_torch_optim(exported_builtins):
    adam = load(exported_builtins["adam"]).Adam

    def one_step(lr):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = adam([w], lr=lr)
        for _ in range(3):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
        return w.detach()

    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=torch.tensor(0.1))  # torch takes it too
    assert torch.equal(one_step(torch.tensor(0.1)), one_step(0.1))
    assert torch.equal(one_step(1), one_step(1.0))
    w = torch.nn.Parameter(torch.ones(2))
    for bad in (True, False, torch.tensor([0.1, 0.2]), "0.1", None, -1.0, float("nan"), float("inf"),
                torch.tensor(float("nan")), torch.tensor(-1.0)):
        with pytest.raises(ValueError):
            adam([w], lr=bad)
    for bad in (dict(total_steps=True), dict(seed=True), dict(seed=2**64), dict(seed=1.0)):
        with pytest.raises(ValueError):
            adam([w], **bad)


@pytest.mark.parametrize("name", ["adam", "sgd", "momentum", "adam_clip", "rso", "lion"])
def test_sparse_gradients_are_refused_like_torch_optim(exported_builtins, name):
    cls = getattr(load(exported_builtins[name]), class_name_for(name))
    torch.manual_seed(0)
    dense = torch.nn.Linear(3, 1)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    params = list(dense.parameters()) + list(emb.parameters())
    before = [p.detach().clone() for p in params]
    opt = cls(params)

    def closure():
        opt.zero_grad()
        loss = dense(emb(torch.tensor([1, 2, 3]))).pow(2).sum()
        loss.backward()
        return loss

    closure()
    with pytest.raises(RuntimeError, match=f"{class_name_for(name)} does not support sparse gradients"):
        opt.step(closure)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))  # nothing was changed
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        torch.optim.Adam(params).step(closure)  # the message we copy


# =============================================================================================
# the lr: the search's by default, the funnel's validated one with --horizon, both documented


@pytest.fixture(scope="module")
def funnel_run(cli) -> dict:
    """The tiny run of `cli` ("funnel run") and its champion, as `nos query compare` names it."""
    out, procs = cli
    rc, _, stderr = procs["funnel run"].result(timeout=600)
    assert rc == 0, stderr[-3000:]
    db = out / "funnel.sqlite"
    rc, stdout, stderr = run_entry(query_main, ["compare", "r", "--db", str(db), "--format", "json"])
    assert rc == 0, stderr
    champion = candidate_id(json.loads(stdout)["champion"])
    assert champion is not None
    with Store(str(db), create=False) as store:
        ind = store.get_individual(champion)
        run = store.get_run(ind["run_id"])
        validated = validated_lrs(store, run["id"], SearchConfig.from_json(run["config"]), champion)
        others = [i["id"] for i in store.individuals(run["id"]) if i["status"] == "evaluated" and i["id"] != champion]
    return {"db": db, "id": champion, "search_lr": ind["lr"], "validated": validated, "others": others}


def _doc_lrs(doc: str) -> dict[float, float]:
    """The per-horizon validated lrs listed in a docstring."""
    found = re.findall(r"^ +t_max = (\S+): lr = (\S+?)(?:  \(the default\))?$", doc, re.MULTILINE)
    return {float(h): float(lr) for h, lr in found}


def _export_champion(run: dict, tmp_path: Path, *extra: str) -> tuple[type, str]:
    path = tmp_path / f"champion{len(extra)}.py"
    assert export_main([str(run["id"]), "-o", str(path), "--db", str(run["db"]), *extra]) == 0
    mod = load(path)
    doc = _check_file(path, f"NosOptimizer{run['id']}")
    return getattr(mod, f"NosOptimizer{run['id']}"), doc


def _default_lr(cls: type) -> float:
    return inspect.signature(cls).parameters["lr"].default


def test_exported_champion_lists_the_validated_lrs(funnel_run, tmp_path):
    run = funnel_run
    assert sorted(run["validated"]) == [1.0, 2.0]  # the run's held-out horizons
    cls, doc = _export_champion(run, tmp_path)
    assert _doc_lrs(doc) == run["validated"]
    assert _default_lr(cls) == run["search_lr"]  # without --horizon: the lr chosen in the search
    flat = " ".join(doc.split())
    assert f"the default lr={run['search_lr']!r} is the lr chosen in the search, on its search seeds" in flat
    assert "(fitness over t_max = 1)" in flat and "--horizon H" in flat and "(the default)" not in doc
    assert f"defaults: lr={run['search_lr']!r}" in doc


@pytest.mark.parametrize("horizon", [1.0, 2.0])
def test_horizon_makes_the_validated_lr_the_default(funnel_run, tmp_path, horizon):
    run = funnel_run
    cls, doc = _export_champion(run, tmp_path, "--horizon", f"{horizon:g}")
    lr = run["validated"][horizon]
    assert _default_lr(cls) == lr
    assert _doc_lrs(doc) == run["validated"]
    assert re.search(rf"^ +t_max = {horizon:g}: lr = {re.escape(repr(lr))}  \(the default\)$", doc, re.MULTILINE)
    flat = " ".join(doc.split())
    assert f"the default lr={lr!r} is the lr chosen on the validation seeds for rollout horizon t_max = {horizon:g}" in flat
    assert f"lr chosen in the search, on its search seeds (fitness over t_max = 1): {run['search_lr']!r}" in flat
    assert f"defaults: lr={lr!r}" in doc
    # the default is only a default: the file's step is the same function of lr
    w = torch.nn.Parameter(torch.ones(3))
    opt = cls([w])
    assert opt.defaults["lr"] == lr


def test_horizon_without_a_validated_lr_is_one_line(funnel_run, tmp_path, capsys):
    run = funnel_run
    out = tmp_path / "x.py"
    line = _refused([str(run["id"]), "-o", str(out), "--db", str(run["db"]), "--horizon", "7"], capsys)
    assert "t_max = 7" in line and "t_max = 1, 2" in line
    if run["others"]:  # a candidate that never reached the funnel
        line = _refused([str(run["others"][0]), "-o", str(out), "--db", str(run["db"]), "--horizon", "1"], capsys)
        assert "not in the funnel" in line and "without --horizon" in line
    line = _refused(["--builtin", "adam", "-o", str(out), "--horizon", "1"], capsys)
    assert "--horizon" in line and "only with an ID" in line
    for bad in ("nan", "inf", "-inf", "0", "-1", "abc", "1e999", "", "1,2"):
        line = _refused([str(run["id"]), "-o", str(out), "--db", str(run["db"]), "--horizon", bad], capsys)
        assert "--horizon" in line
    assert not out.exists()


def test_horizon_of_an_individual_of_a_run_without_funnel(tmp_path, capsys):
    db = tmp_path / "nos.sqlite"
    ind = make_db(db)
    line = _refused([str(ind), "-o", str(tmp_path / "x.py"), "--db", str(db), "--horizon", "2"], capsys)
    assert "not in the funnel" in line
    path = tmp_path / "ok.py"
    assert export_main([str(ind), "-o", str(path), "--db", str(db)]) == 0
    doc = load(path).__doc__
    assert "no lr was chosen on the validation seeds" in doc and _doc_lrs(doc) == {}


@pytest.mark.parametrize("sql", [
    "UPDATE evaluations SET lr = -0.01 WHERE individual_id = ? AND split = 'validation'",
    "UPDATE evaluations SET lr = 9e999 WHERE individual_id = ? AND split = 'validation'",
    "UPDATE evaluations SET lr = 'abc' WHERE individual_id = ? AND split = 'validation'",
    "UPDATE evaluations SET horizon = 'abc' WHERE individual_id = ? AND split = 'validation'",
])
def test_tampered_funnel_rows_are_one_line(funnel_run, tmp_path, capsys, sql):
    db = tmp_path / "copy.sqlite"
    shutil.copy(funnel_run["db"], db)
    tamper(db, sql, funnel_run["id"])
    out = tmp_path / "x.py"
    _refused([str(funnel_run["id"]), "-o", str(out), "--db", str(db)], capsys)
    assert not out.exists()


def test_render_refuses_an_lr_that_is_not_the_documented_default():
    choice = LrChoice(search=3e-3, validated={1.0: 1e-2}, horizon=1.0)
    assert render(builtin("sgd"), class_name="Ok", lr=1e-2, total_steps=10, provenance={}, lr_choice=choice)
    with pytest.raises(ValueError):
        render(builtin("sgd"), class_name="Ok", lr=3e-3, total_steps=10, provenance={}, lr_choice=choice)


# =============================================================================================
# the docstring describes only what has an effect; the code still runs every gene


def _doc(genome: Genome) -> str:
    doc = ast.get_docstring(ast.parse(render(genome, class_name="D", lr=0.01, total_steps=10, provenance={})))
    assert doc is not None
    return doc


def _sections(doc: str) -> tuple[str, str]:
    """(what the optimizer does, the genes listed as having no effect)."""
    head = doc.split("\n\n")[1]
    does, _, inert = head.partition("No effect here")
    return does, inert


# genome (clip 0.01 added) -> whether the clip can change the update
CLIP_CASES = {
    "sign op on g": ({"nodes": [{"op": "sign", "in": ["g"]}], "update": "momentum"}, False),
    "the README's champion": ({"nodes": [{"op": "dropout30", "in": ["sign_g"]},
                                         {"op": "erf", "in": ["n0"], "decay": ["linear_restart"]}],
                               "update": "nesterov", "lr": {"schedule": "cosine"}}, False),
    "sign of a product of gradient powers": ({"nodes": [{"op": "mul", "in": ["g", "g3"]},
                                                        {"op": "sign", "in": ["n0"]}]}, False),
    "sign of g clipped to |g^2|, through tanh": ({"nodes": [{"op": "clip", "in": ["g", "g2"]}, {"op": "tanh", "in": ["n0"]},
                                                            {"op": "sign", "in": ["n1"]}]}, False),
    "sign of g over a constant": ({"nodes": [{"op": "div", "in": ["g", "two"]}, {"op": "sign", "in": ["n0"]}]}, False),
    "weights and noise only": ({"nodes": [{"op": "add", "in": ["w_1e3", "noise"]}]}, False),
    "g cancels out": ({"nodes": [{"op": "sub", "in": ["g", "g"]}, {"op": "add", "in": ["n0", "w_1e4"]}]}, False),
    "g": ({"nodes": [{"op": "neg", "in": ["g"]}]}, True),
    "tanh(g): signs kept, magnitudes not": ({"nodes": [{"op": "tanh", "in": ["g"]}]}, True),
    "sign(m): an EMA of differently clipped steps": ({"nodes": [{"op": "sign", "in": ["m"]}]}, True),
    "sign_m": ({"nodes": [{"op": "neg", "in": ["sign_m"]}]}, True),
    "sign of a stateful op": ({"nodes": [{"op": "ema", "in": ["g"]}, {"op": "sign", "in": ["n0"]}]}, True),
    "sign(g + 1)": ({"nodes": [{"op": "add", "in": ["g", "one"]}, {"op": "sign", "in": ["n0"]}]}, True),
    "sign(1 / g)": ({"nodes": [{"op": "div", "in": ["one", "g"]}, {"op": "sign", "in": ["n0"]}]}, True),
    "sign(g) * g": ({"nodes": [{"op": "mul", "in": ["sign_g", "g"]}]}, True),
}


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_docstring_mentions_a_clip_only_where_it_can_act(case):
    spec, acts = CLIP_CASES[case]
    g = from_json({**spec, "clip": 0.01})
    does, inert = _sections(_doc(g))
    clipped = "clipped to global L2 norm 0.01" in does
    assert clipped == acts, does
    assert ("gradient clip to global L2 norm 0.01" in inert) == (not acts), inert
    assert Effects.of(g, symbolic(g)).clip == acts


@pytest.mark.parametrize("case", ["sign op on g", "the README's champion"])
def test_a_clip_without_effect_is_still_in_the_code(tmp_path, case):
    """The docstring drops the clip, the file still runs it: its steps are the interpreter's."""
    g = from_json({**CLIP_CASES[case][0], "clip": 0.01})
    path = tmp_path / "c.py"
    path.write_text(render(g, class_name="Exported", lr=0.01, total_steps=STEPS, provenance={}))
    assert "clip_coef = min(1.0, 0.01 /" in path.read_text()
    _interpreter_vs_export(load(path), "Exported", g, 0.01)
    # and the clip really did nothing: the same training without it gives the same weights
    a, b = MLPTask(seed=0, target_scale=5.0), MLPTask(seed=0, target_scale=5.0)
    train(a, [g], [0.01], seeds=0, steps=STEPS)
    train(b, [g.with_(clip=None)], [0.01], seeds=0, steps=STEPS)
    assert torch.equal(a.last_theta, b.last_theta)


def test_clips_called_without_effect_change_nothing_on_random_genomes():
    """Soundness of the analysis on random genomes: with a clip (0.01, far below the gradient's
    norm on this task), every genome whose docstring calls the clip ineffective trains to exactly
    the weights it reaches without the clip; most of the others do not."""
    rng = random.Random(0)
    inert, acting = [], []
    while len(inert) < 120 or len(acting) < 60:
        g = random_genome(rng).with_(clip=0.01)
        (acting if Effects.of(g, symbolic(g)).clip else inert).append(g)
    genomes = inert[:120] + acting[:60]
    a, b = MLPTask(seed=0, target_scale=5.0), MLPTask(seed=0, target_scale=5.0)
    with_clip = train(a, genomes, [1e-2] * len(genomes), seeds=0, steps=20).losses
    without = train(b, [g.with_(clip=None) for g in genomes], [1e-2] * len(genomes), seeds=0, steps=20).losses
    same = [x == y for x, y in zip(with_clip, without)]
    assert all(same[:120]), [g.dumps() for g, s in zip(genomes, same) if not s]
    assert sum(with_clip[k] is not None for k in range(120)) > 100
    assert sum(not s for s in same[120:]) > 40  # the clip is active on this task


def test_noise_that_is_zero_at_every_step_is_not_described_as_noise(tmp_path):
    zero = {"op": "sub", "args": ["constant", "constant"]}
    g = from_json({"nodes": [{"op": "mul", "in": ["g", "one"]}], "noise": {"sigma": 0.1, "decay": zero}})
    does, inert = _sections(_doc(g))
    assert "Noise: none." in does and "the noise rule" in inert
    _interpreter_vs_export(render_to(tmp_path, g, "zero_noise", 0.01, STEPS), "Exported", g, 0.01)
    g = from_json({"nodes": [{"op": "mul", "in": ["g", "one"]}],
                   "noise": {"sigma": 0.1, "decay": zero, "accept": "if_better"}})
    does, _ = _sections(_doc(g))
    assert "Noise: none." in does and "still needs a closure" in does  # the code still asks for one


def test_an_lr_decay_of_one_is_not_described():
    one = {"op": "mul", "args": ["constant", "constant"]}
    for schedule, line in (("cosine", "lr_t = lr * cosine(t, T)\n"), ("constant", "lr_t = lr (constant)\n")):
        g = from_json({"nodes": [{"op": "neg", "in": ["g"]}], "lr": {"schedule": schedule, "decay": one}})
        assert f"Learning-rate schedule: {line}" in _doc(g)
    g = from_json({"nodes": [{"op": "neg", "in": ["g"]}], "lr": {"decay": "linear_down"}})
    assert "Learning-rate schedule: lr_t = lr * linear_down(tau)" in _doc(g)


@pytest.mark.parametrize("spec", [
    {"nodes": [{"op": "mul", "in": ["g", "zero"]}], "update": "momentum", "clip": 1.0},  # u = 0
    {"nodes": [{"op": "neg", "in": ["m"]}], "clip": 1.0, "lr": {"decay": {"op": "sub", "args": ["constant", "constant"]}}},
])
def test_no_gradient_step_is_described_as_none(spec):
    does, inert = _sections(_doc(from_json(spec)))
    assert "none: no gradient step" in does and "Operands:" not in does and "b_t" not in does
    assert "clipped" not in does and "gradient clip to global L2 norm 1: there is no gradient step" in inert


def test_operands_that_cancel_out_are_not_listed():
    g = from_json({"nodes": [{"op": "sub", "in": ["m", "m"]}, {"op": "add", "in": ["n0", "g"]}]})
    does, _ = _sections(_doc(g))
    assert "Operands: g = gradient\n" in does and "m = " not in does
