"""The search space: ops, operands, decay curves, schedules, the genome, mutation and symbolic form.

References are independent where one exists: sympy's closed forms of the ops, hand-computed
curve values, the optimizer algebra written out by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import sympy as sp
import torch
from sympy.core.function import AppliedUndef

from search_space import decay as decay_mod
from search_space.builtins import BUILTIN_JSON, BUILTINS, builtin
from search_space.genome import (
    MAX_JSON_BYTES,
    MAX_NODES,
    Genome,
    GenomeError,
    check_valid,
    from_json,
    loads,
    node_index,
    prune,
)
from search_space.mutation import MutationError, mutate, random_decay, random_genome
from search_space.operands import OPERANDS, update_moments
from search_space.ops import BINARY, EPS_SYMBOL, OPS, UNARY
from search_space.schedules import lr_schedule, lr_values
from search_space.symbolic import canonical_hash, symbolic

pytestmark = pytest.mark.usefixtures("single_thread")

SGD = {"nodes": [{"op": "mul", "in": ["g", "one"]}]}


def G(nodes: list[dict], **rest) -> Genome:
    return from_json({"nodes": nodes, **rest})


# =============================================================================================
# ops


EXTREMES = [0.0, 1e-30, -1e-30, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38]


def _extreme_inputs(arity: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rand = (torch.randn(16, generator=gen) * 10.0 ** torch.randint(-30, 30, (16,), generator=gen)).tolist()
    vals = EXTREMES + rand
    cols = list(zip(*itertools.product(vals, repeat=arity)))
    return [torch.tensor(c, dtype=torch.float32) for c in cols]


def _call_op(name: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every output of the op on xs (for a stateful op: first step, then steps with a state)."""
    op = OPS[name]
    if op.needs == "uniform":
        u = torch.rand(xs[0].shape, generator=torch.Generator().manual_seed(1))
        return [op.call(xs[0], u)]
    if op.needs == "norm":
        x = xs[0]
        return [op.fn(x, torch.linalg.vector_norm(x).expand_as(x)), op.fn(x, torch.abs(x))]
    if op.needs == "state":
        outs = []
        y, state = op.fn(xs[0], None)
        outs += [y, state]
        for prev in _extreme_inputs(1)[0]:
            y, state = op.fn(xs[0], torch.full_like(xs[0], float(prev)))
            outs += [y, state]
        return outs
    return [op.call(*xs)]


@pytest.mark.parametrize(
    "name",
    list(OPS),
)
def test_ops_finite_on_extreme_inputs(name):
    """ops.py promises: on finite inputs no operation returns NaN or inf (float32, as trained)."""
    op = OPS[name]
    xs = _extreme_inputs(op.arity)
    for out in _call_op(name, xs):
        assert out.shape == xs[0].shape
        bad = ~torch.isfinite(out)
        assert not bad.any(), f"{name} non-finite at inputs {[x[bad][:4].tolist() for x in xs]}"


def test_ops_partition_and_arity():
    assert set(UNARY).isdisjoint(BINARY)
    assert all(op.arity == 1 for op in UNARY.values())
    assert all(op.arity == 2 for op in BINARY.values())
    assert {"sign", "sqrt_abs", "div", "exp", "ema", "dropout50", "clip_by_norm"} <= set(OPS)


_X, _Y = sp.symbols("x y", real=True)
CLOSED_FORM = [
    n for n, op in OPS.items() if not (op.sym(_X) if op.arity == 1 else op.sym(_X, _Y)).atoms(AppliedUndef)
]


def test_closed_form_ops_cover_the_arithmetic():
    assert {"neg", "log_abs", "sqrt_abs", "exp", "sigmoid", "softplus", "reciprocal", "add", "sub",
            "mul", "div", "div_sqrt", "interp", "pow_abs", "sign"} <= set(CLOSED_FORM)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_op_agrees_with_its_sympy_form(name):
    op = OPS[name]
    expr = op.sym(_X) if op.arity == 1 else op.sym(_X, _Y)
    f = sp.lambdify((_X, _Y, EPS_SYMBOL), expr, modules="mpmath")
    rng = random.Random(sum(map(ord, name)))
    for _ in range(40):
        a = rng.choice([-1, 1]) * rng.uniform(0.1, 3.0)
        b = rng.choice([-1, 1]) * rng.uniform(0.1, 3.0)
        ref = float(f(a, b, 1e-8))
        ts = [torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)]
        got = float(op.call(*ts[: op.arity]))
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-12), (name, a, b)


def test_opaque_ops_by_hand():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert OPS["relu"].fn(x).tolist() == [0.0, 0.0, 0.0, 0.5, 2.0]
    assert OPS["min0"].fn(x).tolist() == [-2.0, -0.5, 0.0, 0.0, 0.0]
    assert OPS["max"].fn(x, -x).tolist() == [2.0, 0.5, 0.0, 0.5, 2.0]
    assert OPS["min"].fn(x, -x).tolist() == [-2.0, -0.5, 0.0, -0.5, -2.0]
    assert OPS["clip"].fn(x, torch.full_like(x, -1.0)).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    # i1e(x) = exp(-|x|) I1(x); I1(1) = 0.565159103992485
    assert float(OPS["bessel_i1e"].fn(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(
        math.exp(-1) * 0.565159103992485, rel=1e-9
    )
    # clip_by_norm: scale to norm 1 only when the norm exceeds 1
    v = torch.tensor([3.0, 4.0])
    assert OPS["clip_by_norm"].fn(v, torch.full_like(v, 5.0)).tolist() == pytest.approx([0.6, 0.8])
    assert OPS["clip_by_norm"].fn(v / 10, torch.full_like(v, 0.5)).tolist() == pytest.approx([0.3, 0.4])
    # stateful ops, step by step
    one, three = torch.tensor([1.0]), torch.tensor([3.0])
    y, s = OPS["ema"].fn(one, None)
    assert float(y) == pytest.approx(0.1)
    y, s = OPS["ema"].fn(three, s)
    assert float(y) == pytest.approx(0.9 * 0.1 + 0.1 * 3)
    y, s = OPS["delta"].fn(one, None)
    assert float(y) == 1.0
    y, s = OPS["delta"].fn(three, s)
    assert float(y) == 2.0
    y, s = OPS["running_max"].fn(three, None)
    y, s = OPS["running_max"].fn(one, s)
    assert float(y) == 3.0


@pytest.mark.parametrize("name,p", [("dropout50", 0.5), ("dropout30", 0.3), ("dropout10", 0.1)])
def test_dropout_rate_and_scaling(name, p):
    x = torch.full((20000,), 2.0)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3))
    y = OPS[name].call(x, u)
    zero = (y == 0).float().mean().item()
    assert zero == pytest.approx(p, abs=0.015)
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / (1 - p)))
    assert y.mean().item() == pytest.approx(2.0, rel=0.03)  # inverted dropout keeps the mean


# =============================================================================================
# operands


def test_moments_by_hand():
    g1, g2 = torch.tensor([2.0]), torch.tensor([-1.0])
    state: dict = {}
    s = update_moments(state, g1, 1, {"m", "v", "y", "m99"})
    assert float(s["m"]) == pytest.approx(2.0)  # bias-corrected first step = g
    assert float(s["v"]) == pytest.approx(4.0)
    assert float(s["y"]) == pytest.approx(8.0)
    assert float(s["m99_prev"]) == 0.0
    assert float(s["m99"]) == pytest.approx(0.02)
    s = update_moments(state, g2, 2, {"m", "v", "y", "m99"})
    m_raw = 0.9 * 0.1 * 2 + 0.1 * -1
    assert float(s["m"]) == pytest.approx(m_raw / (1 - 0.9**2))
    v_raw = 0.999 * 0.001 * 4 + 0.001 * 1
    assert float(s["v"]) == pytest.approx(v_raw / (1 - 0.999**2))
    assert float(s["m99_prev"]) == pytest.approx(0.02)
    # lion_mix uses the slow EMA *before* this step
    assert float(OPERANDS["lion_mix"].fn(g2, g2, s)) == pytest.approx(0.1 * -1 + 0.9 * 0.02)
    assert float(OPERANDS["aggmo"].fn(g2, g2, s)) == pytest.approx((-1 + float(s["m"]) + float(s["m99"])) / 3)


def test_update_moments_only_advances_what_is_needed():
    state: dict = {}
    update_moments(state, torch.ones(3), 1, {"v"})
    assert set(state) == {"v"}


def test_operand_needs_match_their_functions():
    g, w = torch.randn(5), torch.randn(5)
    s = update_moments({}, g, 1, {"m", "v", "y", "m99", "v99"})
    s["noise"] = torch.zeros(5)
    for name, o in OPERANDS.items():
        out = o.fn(g, w, {k: s[k] for k in s if k in o.needs or (k == "m99_prev" and "m99" in o.needs)})
        assert out.shape == g.shape, name
        # operands that claim not to use the gradient do not change with it
        if not o.uses_grad:
            assert torch.equal(out, o.fn(g * 7 + 1, w, {"noise": s["noise"]})), name


# =============================================================================================
# decay curves and schedules


def test_curves_hand_values():
    c = decay_mod.decay_curve
    assert c("constant", 0.3) == 1.0
    assert c("linear_down", 0.25) == pytest.approx(0.75)
    assert c("linear_up", 0.25) == pytest.approx(0.25)
    assert c("cosine_down", 0.5) == pytest.approx(0.5)
    assert c("cosine_down", 0.0) == pytest.approx(1.0)
    assert c("cosine_up", 0.0) == pytest.approx(0.0)
    assert c("cyclic_cosine", 1 / 8) == pytest.approx(0.0, abs=1e-12)  # 4 cycles: trough at 1/8
    assert c("cyclic_cosine", 1 / 4) == pytest.approx(1.0)
    assert c("cosine_restart", 0.25) == pytest.approx(1.0)  # restart after a quarter
    assert c("cosine_restart", 0.125) == pytest.approx(0.5)
    assert c("linear_restart_up", 0.3) == pytest.approx(0.2)
    assert c("linear_restart", 0.3) == pytest.approx(0.8)
    assert c("exp_down", 0.5) == pytest.approx(0.1)
    assert c("exp_up", 1.0) == pytest.approx(0.99)
    assert c("demon", 0.0) == pytest.approx(1.0)
    assert c("demon", 0.5) == pytest.approx(0.5 / (0.1 + 0.45))
    assert c("demon_up", 0.5) == pytest.approx(1 - 0.5 / 0.55)
    with pytest.raises(KeyError):
        c("nope", 0.1)


@pytest.mark.parametrize("name", decay_mod.CURVES)
def test_every_base_curve_is_valid_and_matches_its_sympy_form(name):
    assert decay_mod.is_valid(name)
    vals = decay_mod.values(name, 100)
    assert len(vals) == 100 and all(0.0 <= v <= 1.0 + 1e-12 for v in vals)
    expr = decay_mod.to_sympy(name)
    for t in (0.0, 0.03, 0.2, 0.37, 0.5, 0.61, 0.999):
        assert _sympy_at(expr, t) == pytest.approx(decay_mod.evaluate(name, t), abs=1e-9)


def _sympy_at(expr: sp.Expr, tau: float) -> float:
    # substitution, not lambdify: sympy's printer drops the parentheses of Mod inside a product
    return float(expr.subs(decay_mod.TAU, sp.Rational(str(tau))))


def _eval_decay_code(code: str, tau: float) -> float:
    # test-only: the exporter emits this expression; evaluate it in a namespace with only the
    # names it may use, to check that it computes the same curve as `decay.evaluate`.
    namespace = {"__builtins__": {"min": min, "max": max}, "decay_curve": decay_mod.decay_curve, "math": math}
    return eval(compile(code, "<decay>", "eval"), namespace, {"tau": tau})


def _decay_samples() -> list:
    rng = random.Random(5)
    samples = list(decay_mod.CURVES)
    samples += [{"op": op, "args": ["cosine_down"] * decay_mod.DECAY_OPS[op][0]} for op in decay_mod.DECAY_OPS]
    samples += [random_decay(rng) for _ in range(40)]
    samples.append({"op": "mul", "args": [{"op": "sqrt", "args": ["demon"]}, "linear_up"]})
    return samples


def test_decay_code_and_sympy_match_evaluate():
    for d in _decay_samples():
        code = decay_mod.to_code(d)
        expr = decay_mod.to_sympy(d)
        for t in (0.0, 0.1, 0.33, 0.5, 0.77, 0.99):
            want = decay_mod.evaluate(d, t)
            assert _eval_decay_code(code, t) == pytest.approx(want, abs=1e-12), d
            assert _sympy_at(expr, t) == pytest.approx(want, abs=1e-9), d
    assert decay_mod.to_code(None) == "1.0"


def test_random_decays_are_valid():
    rng = random.Random(0)
    for _ in range(200):
        d = random_decay(rng)
        decay_mod.validate_decay(d)
        assert decay_mod.is_valid(d)


def test_decay_duplicates_by_curve_distance():
    dup = decay_mod.is_duplicate
    assert dup({"op": "mul", "args": ["constant", "cosine_down"]}, ["cosine_down"])
    assert dup({"op": "one_minus", "args": ["linear_down"]}, ["linear_up"])
    assert dup({"op": "min", "args": ["constant", "exp_down"]}, ["linear_up", "exp_down"])
    assert dup("constant", [None])  # no decay is the constant curve
    assert not dup("cosine_down", ["linear_down", "cosine_up", None])
    assert not dup({"op": "square", "args": ["linear_down"]}, ["linear_down"])
    assert decay_mod.distance("linear_down", "linear_up") > 1.0


def test_decay_validity_rule():
    assert not decay_mod.is_valid({"op": "add", "args": ["constant", "constant"]})  # = 2
    assert not decay_mod.is_valid({"op": "sub", "args": ["linear_up", "constant"]})  # < 0
    assert decay_mod.is_valid({"op": "sub", "args": ["constant", "linear_up"]})  # = 1 - tau
    assert decay_mod.is_valid({"op": "mean", "args": ["cosine_up", "exp_down"]})


@pytest.mark.parametrize(
    "bad",
    [
        "not_a_curve",
        {"op": "exec", "args": ["constant"]},
        {"op": "mul", "args": ["constant"]},
        {"op": "one_minus", "args": "constant"},
        {"op": "one_minus", "args": ["constant"], "extra": 1},
        {"op": "one_minus", "args": [{"op": "one_minus", "args": [{"op": "one_minus", "args": ["tanh"]}]}]},
        {"op": "one_minus", "args": [{"op": "one_minus", "args": [{"op": "one_minus", "args": ["constant"]}]}]},
        ["constant"],
        3,
    ],
)
def test_validate_decay_rejects(bad):
    with pytest.raises(decay_mod.DecayError) as e:
        decay_mod.validate_decay(bad)
    assert "\n" not in str(e.value)


def test_lr_schedules_by_hand():
    assert lr_schedule("constant", 7, 100) == 1.0
    assert lr_schedule("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_schedule("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_schedule("linear", 25, 100) == pytest.approx(0.75)
    # warm-up over ceil(5% of T) = 5 steps
    assert [lr_schedule("warmup_constant", t, 100) for t in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1])
    assert lr_schedule("warmup_cosine", 0, 100) == pytest.approx(0.2)
    assert lr_schedule("warmup_cosine", 50, 100) == pytest.approx(0.5)
    g = G(SGD["nodes"], lr={"schedule": "linear", "decay": "exp_down"})
    vals = lr_values(g.lr, 10)
    assert vals == pytest.approx([(1 - t / 10) * 0.01 ** (t / 10) for t in range(10)])
    with pytest.raises(KeyError):
        lr_schedule("nope", 0, 10)


# =============================================================================================
# the genome: JSON round trip and safety


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_round_trip(name):
    g = builtin(name)
    check_valid(g)
    assert loads(g.dumps()) == g
    assert from_json(json.loads(json.dumps(BUILTIN_JSON[name]))) == g
    assert loads(json.dumps(g.to_json()).encode()) == g


def test_builtin_set_and_unknown():
    assert {"sgd", "momentum", "nesterov", "adam", "rmsprop", "lion", "powersign", "addsign"} <= set(BUILTINS)
    with pytest.raises(KeyError, match="unknown builtin"):
        builtin("nope")


def test_random_genomes_round_trip():
    rng = random.Random(1)
    for _ in range(300):
        g = random_genome(rng)
        check_valid(g)
        text = g.dumps()
        assert loads(text) == g
        assert loads(text).dumps() == text  # the JSON text is canonical too


def test_genome_defaults():
    g = G([{"op": "sign", "in": ["g"]}])
    assert (g.update, g.sign, g.clip, g.lr.schedule, g.lr.decay, g.noise.active) == (
        "plain", 1, None, "constant", None, False)


def _nodes(n: int) -> list[dict]:
    return [{"op": "neg", "in": ["g"]}] + [{"op": "neg", "in": [f"n{i}"]} for i in range(n - 1)]


def _genome_text(**over) -> str:
    obj = {"nodes": [{"op": "neg", "in": ["g"]}], **over}
    return json.dumps(obj)


BAD_GENOMES = {
    "invalid json": ('{"nodes": [', "invalid JSON"),
    "trailing garbage": ('{"nodes": [{"op": "neg", "in": ["g"]}]} x', "invalid JSON"),
    "empty text": ("", "invalid JSON"),
    "NaN literal": (_genome_text()[:-1] + ', "noise": {"sigma": NaN}}', "NaN"),
    "Infinity literal": (_genome_text()[:-1] + ', "clip": Infinity}', "Infinity"),
    "-Infinity literal": (_genome_text()[:-1] + ', "clip": -Infinity}', "Infinity"),
    "overflowing float": (_genome_text()[:-1] + ', "noise": {"sigma": 1e999}}', "sigma"),
    "not an object": ("[1, 2]", "expected an object"),
    "a string": ('"adam"', "expected an object"),
    "unknown op": ('{"nodes": [{"op": "__import__", "in": ["g"]}]}', "unknown operation"),
    "op not a string": ('{"nodes": [{"op": ["neg"], "in": ["g"]}]}', "unknown operation"),
    "unknown operand": ('{"nodes": [{"op": "neg", "in": ["os.system"]}]}', "unknown operand"),
    "operand not a string": ('{"nodes": [{"op": "neg", "in": [1]}]}', "expected a name"),
    "arity low": ('{"nodes": [{"op": "add", "in": ["g"]}]}', "takes 2 input"),
    "arity high": ('{"nodes": [{"op": "neg", "in": ["g", "m"]}]}', "takes 1 input"),
    "self reference": ('{"nodes": [{"op": "neg", "in": ["n0"]}]}', "earlier node"),
    "forward reference": (
        '{"nodes": [{"op": "neg", "in": ["n1"]}, {"op": "neg", "in": ["n0"]}]}', "earlier node"),
    "node ref out of pattern": ('{"nodes": [{"op": "neg", "in": ["n10"]}]}', "unknown operand"),
    "too many nodes": (json.dumps({"nodes": _nodes(MAX_NODES + 1)}), "at most"),
    "no nodes": ('{"nodes": []}', "non-empty"),
    "nodes missing": ('{"update": "plain"}', "missing"),
    "nodes not a list": ('{"nodes": {"op": "neg"}}', "non-empty list"),
    "node not an object": ('{"nodes": ["neg"]}', "expected an object"),
    "in not a list": ('{"nodes": [{"op": "neg", "in": "g"}]}', "takes 1 input"),
    "unknown top key": (_genome_text(exec="print(1)"), "unknown key"),
    "unknown node key": ('{"nodes": [{"op": "neg", "in": ["g"], "code": "x"}]}', "unknown key"),
    "unknown noise key": (_genome_text(noise={"sigma": 0.1, "fn": "os.system"}), "unknown key"),
    "sigma as string": (_genome_text(noise={"sigma": "0.1"}), "expected a number"),
    "sigma too big": (_genome_text(noise={"sigma": 2.0}), "outside"),
    "sigma negative": (_genome_text(noise={"sigma": -0.1}), "outside"),
    "sigma bool": (_genome_text(noise={"sigma": True}), "expected a number"),
    "sign bool": (_genome_text(sign=True), "sign"),
    "sign 2": (_genome_text(sign=2), "sign"),
    "sign string": (_genome_text(sign="-1"), "sign"),
    "clip string": (_genome_text(clip="1"), "expected a number"),
    "clip zero": (_genome_text(clip=0), "outside"),
    "update type": (_genome_text(update="adam"), "update"),
    "lr schedule": (_genome_text(lr={"schedule": "os.system"}), "schedule"),
    "lr not object": (_genome_text(lr=0.1), "expected an object"),
    "noise scale": (_genome_text(noise={"sigma": 0.1, "scale": "huge"}), "scale"),
    "noise accept": (_genome_text(noise={"sigma": 0.1, "accept": "maybe"}), "accept"),
    "decay name": ('{"nodes": [{"op": "neg", "in": ["g"], "decay": ["exec"]}]}', "unknown decay curve"),
    "decay op": (
        '{"nodes": [{"op": "neg", "in": ["g"], "decay": [{"op": "eval", "args": ["constant"]}]}]}',
        "unknown decay operation"),
    "decay arity": (
        '{"nodes": [{"op": "neg", "in": ["g"], "decay": [{"op": "mul", "args": ["constant"]}]}]}',
        "argument"),
    "decay list length": ('{"nodes": [{"op": "neg", "in": ["g"], "decay": [null, null]}]}', "entries"),
    "decay not a list": ('{"nodes": [{"op": "neg", "in": ["g"], "decay": "constant"}]}', "entries"),
    "lr decay structure": (_genome_text(lr={"decay": {"op": "mul"}}), "decay"),
    "noise decay name": (_genome_text(noise={"sigma": 0.1, "decay": "tanh"}), "unknown decay curve"),
    "deep array nesting": ("[" * 5000 + "]" * 5000, "nested too deeply"),
    "deep decay nesting": (
        '{"nodes": [{"op": "neg", "in": ["g"], "decay": ['
        + '{"op": "one_minus", "args": [' * 200 + '"constant"' + "]}" * 200 + "]}]}",
        "decay"),
    "huge input": (_genome_text(update="x" * (MAX_JSON_BYTES + 10)), "larger than"),
    "not utf-8": (b"\xff\xfe{}", "UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_GENOMES))
def test_loads_rejects_with_one_line(case):
    text, fragment = BAD_GENOMES[case]
    with pytest.raises(GenomeError) as e:
        loads(text)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg and 0 < len(msg) < 2000
    assert type(e.value) is GenomeError


def test_loads_rejects_a_huge_integer_literal():
    with pytest.raises(GenomeError):
        loads('{"nodes": [{"op": "neg", "in": ["g"]}], "clip": ' + "9" * 5000 + "}")


@pytest.mark.parametrize("key", ["clip", "sigma"])
def test_loads_rejects_an_int_too_large_for_a_float(key):
    big = "9" * 400
    text = (
        '{"nodes": [{"op": "neg", "in": ["g"]}], '
        + ('"clip": ' + big if key == "clip" else '"noise": {"sigma": ' + big + "}")
        + "}"
    )
    with pytest.raises(GenomeError):
        loads(text)


def test_loads_rejects_a_node_reference_with_a_trailing_newline():
    with pytest.raises(GenomeError):
        loads('{"nodes": [{"op": "neg", "in": ["g"]}, {"op": "neg", "in": ["n0\\n"]}]}')


def test_loading_never_evaluates_strings(tmp_path):
    target = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(target)!r}).write_text('x')"
    payloads = [
        {"nodes": [{"op": code, "in": ["g"]}]},
        {"nodes": [{"op": "neg", "in": [code]}]},
        {"nodes": [{"op": "neg", "in": ["g"], "decay": [code]}]},
        {"nodes": [{"op": "neg", "in": ["g"], "decay": [{"op": code, "args": ["constant"]}]}]},
        {"nodes": [{"op": "neg", "in": ["g"]}], "update": code},
        {"nodes": [{"op": "neg", "in": ["g"]}], "lr": {"schedule": code}},
        {"nodes": [{"op": "neg", "in": ["g"]}], "noise": {"sigma": 0.1, "scale": code}},
        {"nodes": [{"op": "neg", "in": ["g"]}], code: 1},
        {"nodes": [{"op": "neg", "in": ["g"]}], "sign": code},
    ]
    for p in payloads:
        with pytest.raises(GenomeError):
            loads(json.dumps(p))
    with pytest.raises(GenomeError):
        loads(b"\x80\x04\x95" + code.encode())  # a pickle header is not JSON
    assert not target.exists()


# =============================================================================================
# mutation


def test_random_genomes_are_valid():
    rng = random.Random(2)
    for _ in range(300):
        g = random_genome(rng)
        check_valid(g)
        assert 1 <= len(g.nodes) <= 4
        assert g.reachable() == list(range(len(g.nodes)))  # grown as a tree: nothing dead


def _refs_only_earlier(g: Genome) -> bool:
    for i, n in enumerate(g.nodes):
        for r in n.inputs:
            k = node_index(r)
            if k is None:
                if r not in OPERANDS:
                    return False
            elif not k < i:
                return False
    return True


def _mutation_run(seed: int, n: int) -> tuple[list[str], dict[str, int], int]:
    rng = random.Random(seed)
    children, kinds, errors = [], {}, 0
    parent = random_genome(rng)
    while len(children) < n:
        if rng.random() < 0.3:
            parent = random_genome(rng)
        try:
            child, kind = mutate(parent, rng)
        except MutationError:
            errors += 1
            continue
        children.append(child.dumps())
        kinds[kind] = kinds.get(kind, 0) + 1
        parent = child
    return children, kinds, errors


def test_mutations_are_valid_and_varied():
    children, kinds, errors = _mutation_run(0, 2000)
    assert errors < 200  # retries are rare
    for text in children:
        g = loads(text)  # survives a JSON round trip
        assert g.dumps() == text
        check_valid(g)
        assert 1 <= len(g.nodes) <= MAX_NODES
        assert _refs_only_earlier(g)
        assert prune(g) == g  # mutate returns pruned children
    for k in ("change_op", "rewire", "update_type"):
        assert kinds.get(k, 0) > 0, k
    assert kinds.get("to_binary", 0) + kinds.get("to_unary", 0) > 0
    assert kinds.get("to_binary", 0) > 0 and kinds.get("to_unary", 0) > 0
    assert any(kinds.get(k, 0) for k in ("add_decay", "delete_decay", "mutate_decay"))
    assert any(kinds.get(k, 0) for k in ("lr_schedule", "lr_decay"))
    assert any(k.startswith("noise_") for k in kinds)
    # the mutated genomes really are different from each other, mostly
    assert len(set(children)) > 1500


def test_mutation_is_a_pure_function_of_the_seed():
    a = _mutation_run(11, 200)
    b = _mutation_run(11, 200)
    c = _mutation_run(12, 200)
    assert a == b
    assert a[0] != c[0]


def test_mutation_changes_the_genome():
    rng = random.Random(4)
    same = 0
    for _ in range(300):
        p = random_genome(rng)
        try:
            c, kind = mutate(p, rng)
        except MutationError:
            continue
        same += c == p
    assert same < 15  # a change_op etc. always changes something; only rare no-ops


def test_prune_drops_dead_nodes_and_renumbers():
    g = G([{"op": "exp", "in": ["g"]}, {"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["m", "n1"]}])
    assert g.reachable() == [1, 2]
    p = prune(g)
    assert p == builtin("adam")


# =============================================================================================
# symbolic form and canonical hash


def H(nodes, **rest) -> str:
    return canonical_hash(G(nodes, **rest))


SGD_HASH = canonical_hash(builtin("sgd"))

COLLIDE = {
    "commuted add": (
        [{"op": "add", "in": ["g", "m"]}],
        [{"op": "add", "in": ["m", "g"]}],
    ),
    "commuted mul with decay": (
        [{"op": "mul", "in": ["g", "v"], "decay": ["cosine_down", None]}],
        [{"op": "mul", "in": ["v", "g"], "decay": [None, "cosine_down"]}],
    ),
    "commuted max": (
        [{"op": "max", "in": ["g", "m"]}],
        [{"op": "max", "in": ["m", "g"]}],
    ),
    "mul(g, one) == mul(one, g)": (SGD["nodes"], [{"op": "mul", "in": ["one", "g"]}]),
    "mul(g, one) == neg(neg(g))": (SGD["nodes"], [{"op": "neg", "in": ["g"]}, {"op": "neg", "in": ["n0"]}]),
    "mul(g, one) == max(g, g)": (SGD["nodes"], [{"op": "max", "in": ["g", "g"]}]),
    "constant edge decay is no decay": (SGD["nodes"], [{"op": "mul", "in": ["g", "one"], "decay": ["constant", None]}]),
    "dead node": (
        BUILTIN_JSON["adam"]["nodes"],
        [{"op": "exp", "in": ["g"]}, {"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["m", "n1"]}],
    ),
    "dead node after pruning shift": (
        [{"op": "sign", "in": ["m"]}, {"op": "add", "in": ["n0", "g"]}],
        [{"op": "sign", "in": ["m"]}, {"op": "erf", "in": ["n0"]}, {"op": "add", "in": ["g", "n0"]}],
    ),
}


@pytest.mark.parametrize("case", list(COLLIDE))
def test_equivalent_genomes_collide(case):
    a, b = COLLIDE[case]
    assert G(a) != G(b)
    assert H(a) == H(b)


def test_equivalent_settings_collide():
    # sign -1 with a negated root is the plain gradient
    assert H([{"op": "neg", "in": ["g"]}], sign=-1) == SGD_HASH
    # a constant lr decay is no decay
    assert H(SGD["nodes"], lr={"schedule": "constant", "decay": "constant"}) == SGD_HASH
    # noise switched off: its other settings do not matter
    assert H(SGD["nodes"], noise={"sigma": 0.0, "decay": "cosine_down", "scale": "layer_std"}) == SGD_HASH
    # the sympy forms agree too
    assert symbolic(G([{"op": "neg", "in": ["g"]}], sign=-1)).update == symbolic(builtin("sgd")).update


def test_different_genomes_do_not_collide():
    variants = {
        **{name: canonical_hash(builtin(name)) for name in BUILTINS if name != "adam_clip"},
        "adam_clip": canonical_hash(builtin("adam_clip")),
        "sgd cosine lr": H(SGD["nodes"], lr={"schedule": "cosine"}),
        "sgd lr decay": H(SGD["nodes"], lr={"decay": "linear_down"}),
        "sgd noise": H(SGD["nodes"], noise={"sigma": 0.1}),
        "sgd noise other sigma": H(SGD["nodes"], noise={"sigma": 0.2}),
        "sgd noise layer_std": H(SGD["nodes"], noise={"sigma": 0.1, "scale": "layer_std"}),
        "sgd noise if_better": H(SGD["nodes"], noise={"sigma": 0.1, "accept": "if_better"}),
        "sgd noise decay": H(SGD["nodes"], noise={"sigma": 0.1, "decay": "exp_down"}),
        "sgd clip": H(SGD["nodes"], clip=1.0),
        "sgd clip 2": H(SGD["nodes"], clip=2.0),
        "neg g": H([{"op": "neg", "in": ["g"]}]),
        "sgd edge decay": H([{"op": "mul", "in": ["g", "one"], "decay": ["cosine_down", None]}]),
        "sub g m": H([{"op": "sub", "in": ["g", "m"]}]),
        "sub m g": H([{"op": "sub", "in": ["m", "g"]}]),
        "adam flipped": H(BUILTIN_JSON["adam"]["nodes"], sign=-1),
        "ema g": H([{"op": "ema", "in": ["g"]}]),
        "delta g": H([{"op": "delta", "in": ["g"]}]),
    }
    assert len(set(variants.values())) == len(variants), variants


def test_random_genomes_hash_almost_uniquely():
    genomes = [random_genome(random.Random(seed)) for seed in range(1000)]
    distinct_json = {g.dumps() for g in genomes}
    hashes = {canonical_hash(g) for g in genomes}
    assert len(hashes) >= 0.97 * len(genomes)
    assert len(hashes) <= len(distinct_json)


def test_independent_dropout_nodes_do_not_cancel():
    two_draws = [{"op": "dropout50", "in": ["g"]}, {"op": "dropout50", "in": ["g"]}, {"op": "sub", "in": ["n0", "n1"]}]
    zero = [{"op": "mul", "in": ["zero", "g"]}]
    assert H(two_draws) != H(zero)


def test_symbolic_text_and_latex():
    s = symbolic(builtin("adam"))
    assert s.update == sp.Symbol("m") / (EPS_SYMBOL + sp.sqrt(sp.Abs(sp.Symbol("v"))))
    assert "u = " in s.text and "update=plain" in s.text and "noise off" in s.text
    assert "\n" not in s.text
    assert r"\sqrt" in s.latex
    assert len(s.hash) == 20 and s.hash == canonical_hash(builtin("adam"))
    rso = symbolic(builtin("rso"))
    assert rso.update == 0 and "noise=1*linear_down (layer_std, if_better)" in rso.text
    assert "momentum" in symbolic(builtin("momentum")).canonical
