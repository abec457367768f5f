"""`python -m nos.export`: standalone optimizer files, checked against torch.optim and against the
interpreter, importable without nos, and a command that fails in one line."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from nos.cli import run_command
from nos.codegen import class_name_for, render
from nos.engine.trainer import train
from nos.export import main as export_main
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json

from .conftest import MLPTask, Proc

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
    yield out, procs
    for p in procs.values():
        p.stop()


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
    _interpreter_vs_export(mod, class_name_for(name), builtin(name), INTERP_LR[name])


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
    assert _imports(tree) <= {"torch", "math"}, _imports(tree)
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
    ],
)
def test_bad_arguments_in_process(tmp_path, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_command(export_main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "x.py").exists()


def test_class_name_option(tmp_path):
    path = tmp_path / "sub" / "opt.py"
    assert export_main(["--builtin", "lion", "-o", str(path), "--class-name", "MyLion"]) == 0
    _check_file(path, "MyLion")
    assert load(path).MyLion.__name__ == "MyLion"
