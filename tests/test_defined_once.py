"""Knowledge that is defined once: in the definition it belongs to, read by everything else.

- What the gradient-clip analysis of `nos.engine.codegen` knows about each op and operand is a field of
  the op (`search_space.ops.Op`) and operand (`search_space.operands.Operand`) definitions; the
  analysis gives the same answers as the tables it once kept (re-stated here, independently).
- A stored run config is validated by one function, `SearchConfig.checked`; export reads it
  through there (it accepts exactly the configs `checked` accepts).
- `nos VERB` knows every command module, and each answers `nos VERB --help`.
"""

from __future__ import annotations

import ast
import inspect
import random
import re
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from nos import export
from nos.__main__ import VERBS
from nos.__main__ import main as nos_main
from nos.engine import codegen
from nos.search.config import SearchConfig
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, node_index
from search_space.mutation import random_genome
from search_space.operands import OPERANDS, Response
from search_space.ops import BINARY, OPS, UNARY

NOS = Path(export.__file__).parent  # the nos package (export is a top-level command)

# =============================================================================================
# 1. op and operand metadata: the old tables of nos.engine.codegen, re-stated independently

SAME, SIGNS, ANY = 0, 1, 2
OLD_GRAD_OPERANDS = {"g": SIGNS, "g2": SIGNS, "g3": SIGNS, "sign_g": SAME}
OLD_SIGN_KEEPING = frozenset({
    "neg", "abs", "sqrt_abs", "relu", "min0", "tanh", "atan", "erf", "asinh", "softsign", "reciprocal",
    "bessel_i1e", "clip_by_norm", "dropout50", "dropout30", "dropout10",
})
# operands that do not read the gradient at all (the same at every step, clipped or not)
OLD_NO_GRAD = frozenset({"one", "two", "zero", "w_1e6", "w_1e5", "w_1e4", "w_1e3", "noise"})


def old_operand(name: str) -> int:
    if name in OLD_GRAD_OPERANDS:
        return OLD_GRAD_OPERANDS[name]
    return SAME if name in OLD_NO_GRAD else ANY


def old_node(op: str, inputs: list[int]) -> int:
    if all(x == SAME for x in inputs):
        return SAME
    if op == "sign" and inputs[0] == SIGNS:
        return SAME
    if len(inputs) == 1:
        return SIGNS if op in OLD_SIGN_KEEPING and inputs[0] == SIGNS else ANY
    x, y = inputs
    if op == "mul" and ANY not in inputs:
        return SIGNS
    if op == "clip" and ANY not in inputs:
        return SIGNS
    if op in ("div", "div_sqrt") and x != ANY and y == SAME:
        return SIGNS
    return ANY


def old_gradient_response(genome: Genome) -> int:
    response: dict[int, int] = {}
    for i in genome.reachable():
        n = genome.nodes[i]
        ins = [response[k] if (k := node_index(r)) is not None else old_operand(r) for r in n.inputs]
        response[i] = old_node(n.op, ins)
    return response[genome.root]


def test_operand_responses_are_the_old_table():
    assert {name: int(o.response) for name, o in OPERANDS.items()} == {name: old_operand(name) for name in OPERANDS}
    assert {name for name, o in OPERANDS.items() if not o.uses_grad} == OLD_NO_GRAD
    assert all(isinstance(o.response, Response) for o in OPERANDS.values())


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_passes_responses_on_as_the_old_tables_did(name):
    op = OPS[name]
    for inputs in product((SAME, SIGNS, ANY), repeat=op.arity):
        got = codegen._node_response(op, [Response(x) for x in inputs])
        assert got == old_node(name, list(inputs)), (name, inputs)


def test_op_metadata_is_consistent():
    assert {n for n, op in UNARY.items() if op.keeps_sign and not op.of_signs} == OLD_SIGN_KEEPING
    assert not any(op.scales_first for op in UNARY.values())  # a binary property
    assert all(op.keeps_sign for op in OPS.values() if op.of_signs)  # a function of signs keeps them
    assert {n for n, op in BINARY.items() if op.keeps_sign} == {"mul", "clip"}
    assert {n for n, op in BINARY.items() if op.scales_first} == {"mul", "div", "div_sqrt"}


def test_gradient_response_of_builtins_and_random_genomes_is_unchanged():
    genomes = [builtin(name) for name in BUILTINS]
    genomes += [random_genome(random.Random(i)) for i in range(200)]
    genomes += [random_genome(random.Random(i), max_nodes=8) for i in range(1000, 1200)]
    seen = set()
    for g in genomes:
        got = codegen.gradient_response(g)
        assert got == old_gradient_response(g), g.to_json()
        seen.add(int(got))
    assert seen == {SAME, SIGNS, ANY}  # the sample exercises every answer


def test_codegen_keeps_no_table_of_op_or_operand_names():
    source = inspect.getsource(codegen._node_response) + inspect.getsource(codegen.gradient_response)
    quoted = set(re.findall(r"[\"'](\w+)[\"']", source))
    assert not quoted & (set(OPS) | set(OPERANDS)), quoted & (set(OPS) | set(OPERANDS))
    assert not hasattr(codegen, "_SIGN_KEEPING") and not hasattr(codegen, "_GRAD_OPERANDS")


# =============================================================================================
# 2. one validator of stored configs

VALID = SearchConfig().to_json()
CONTRACT = {"identity": "mine@0123456789ab", "name": "mine", "variant_label": "size", "search_variants": [1.0],
            "variants": [1.0, 2.0], "search_lrs": [1e-3], "lr_grid": [1e-3, 1e-2], "sigmas": [0.01],
            "randopt_layers": ["all"]}
USER = "my_task.py:make"  # a user's task, known only by the contract the run stored
CONFIGS: dict[str, Any] = {
    "none (an old run)": None,
    "empty": {},
    "a written config": VALID,
    "budget only": {"budget_fpe": 300},
    "old: total_steps only": {"total_steps": 77},
    "unknown keys are ignored": {"budget_fpe": 600, "made_up": [1, 2]},
    "budget text": {"budget_fpe": "600", "total_steps": 200},
    "budget a bool": {"budget_fpe": True},
    "budget zero": {"budget_fpe": 0},
    "budget a float": {"budget_fpe": 600.5},
    "total_steps a float": {"total_steps": 1.5},
    "total_steps zero": {"total_steps": 0},
    "horizons text": {"horizons": ["a"]},
    "horizons empty": {"horizons": []},
    "seeds overlap": {"search_seeds": [1], "validation_seeds": [1]},
    "unknown algorithm": {"algorithm": "annealing"},
    "unknown task": {"tasks": ["no_such_task"]},
    "a user task without its contract": {"tasks": [USER]},
    "a user task with its contract": {"tasks": [USER], "task_info": {USER: CONTRACT}},
    "a user task with unreadable search variants": {"tasks": [USER],
                                                    "task_info": {USER: {**CONTRACT, "search_variants": ["x"]}}},
    "a user task with unreadable variants": {"tasks": [USER], "task_info": {USER: {**CONTRACT, "variants": [None]}}},
    "a list": [1, 2],
}


def _db(path: Path, config) -> int:
    with Store(path) as store:
        run_id = store.create_run("demo", {}, 0)
        [ind] = store.add_individuals([{
            "run_id": run_id, "slot": "init:0", "genome": builtin("adam").to_json(), "status": "evaluated",
            "lr": 3e-3, "sign": 1, "fitness": 0.9, "particle": 0, "timestep": 0,
        }])
    return ind


@pytest.mark.parametrize("case", list(CONFIGS))
def test_export_accepts_exactly_the_configs_checked_accepts(tmp_path, monkeypatch, case):
    raw = CONFIGS[case]
    try:
        SearchConfig.checked({} if raw is None else raw)
        ok = True
    except ValueError:
        ok = False
    calls = []
    real = SearchConfig.checked.__func__

    def spy(cls, value):
        calls.append(value)
        return real(cls, value)

    ind = _db(tmp_path / "nos.sqlite", raw)
    monkeypatch.setattr(Store, "get_run", lambda self, run_id: {"id": run_id, "name": "demo", "config": raw})
    monkeypatch.setattr(SearchConfig, "checked", classmethod(spy))
    store = Store(tmp_path / "nos.sqlite", readonly=True)
    try:
        if ok:
            ex = export.export_individual(store, ind)
            assert ex.total_steps == (77 if case.startswith("old") else 100 if case == "budget only" else 200)
        else:
            with pytest.raises(export.UsageError) as e:
                export.export_individual(store, ind)
            assert "\n" not in str(e.value) and "damaged" in str(e.value)
    finally:
        store.close()
    assert calls, "export read the stored config without SearchConfig.checked"


def test_export_keeps_no_validator_of_its_own_for_configs():
    source = Path(export.__file__).read_text()
    assert "SearchConfig.from_json" not in source  # the unchecked constructor: for configs in hand
    assert "_stored_horizons" not in source and "_stored_int" not in source


# =============================================================================================
# 3. every command is a verb


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def _defines_main(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def command_modules() -> set[str]:
    """The rule: a command module is a top-level module of nos whose docstring starts with
    "`python -m nos.NAME" (its own name); it defines `main`. `__main__` is the dispatcher; library
    modules live in subpackages (`test_the_top_level_of_nos_holds_only_commands`)."""
    found = set()
    for path in sorted(NOS.glob("*.py")):
        name = path.stem
        if name == "__main__":
            continue
        if _docstring(path).startswith(f"`python -m nos.{name}"):
            assert _defines_main(path), f"nos/{path.name} says it is a command but defines no main"
            found.add(name)
    return found


def test_verbs_are_the_command_modules():
    modules = command_modules()
    assert {"evolve", "query", "export", "report", "baselines", "integrity", "bench"} <= modules
    assert set(VERBS) == modules
    for path in NOS.glob("*.py"):  # and a module with a main of its own is a command
        if path.stem != "__main__" and _defines_main(path):
            assert path.stem in modules, f"nos/{path.name} defines main but is not a documented command"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_answers_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        nos_main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.lower().startswith("usage:") and f"nos {verb}" in out


def test_the_top_level_of_nos_holds_only_commands() -> None:
    """A door or a room by its place: every top-level module of nos is a command (or the
    dispatcher); the libraries are subpackages (ui, engine, search, ga, evaluation, tasks)."""
    top = {p.stem for p in NOS.glob("*.py")} - {"__init__", "__main__"}
    assert top == command_modules()
