"""NOS's published final optimizers as builtins (nos_opt5, nos_opt6, nos_opt7, nos_adamclip).

The reference is `published_step` below: a plain-torch transcription written from the equations
of Morgan & Hougen's finalOptimizers.py (OUStudent/NeuralOptimizerSearch), independently of the genomes -- its
schedules count integer steps t as their TensorFlow code does, where the search space works with
tau = t / T. The interpreter and the exported file must both follow it step by step.
"""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType

import pytest
import sympy as sp
import torch

from nos.engine import integrity
from nos.engine.interpreter import BatchedOptimizer, Segments
from nos.export import main as export_main
from search_space import decay as decay_mod
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, check_valid, from_json
from search_space.mutation import mutate, random_genome
from search_space.operands import OPERAND_WEIGHTS, OPERANDS, PUBLISHED_OPERANDS
from search_space.schedules import lr_values

pytestmark = pytest.mark.usefixtures("single_thread")

NOS = ("nos_opt5", "nos_opt6", "nos_opt7", "nos_adamclip")
T = 60  # divisible by 15: warm-up 4 steps and hold 8, integers as in the authors' code
P = 17  # parameters: a 3 x 4 tensor and a 5-vector in the exported-file test
LRS = (0.05, 0.2)


# =============================================================================================
# the transcription


def published_lr(name: str, t: int, total: int) -> float:
    """The lr multiplier at 0-based step t: warm-up over total/15 steps, hold 2 total/15, cosine to
    0; Opt5 and Opt6 multiply it by their evolved decay erfc(erfc(a4)) / (1 - tanh(a8)^2)."""
    warmup, hold = total / 15, 2 * total / 15
    if t < warmup:
        base = t / warmup
    elif t <= warmup + hold:
        base = 1.0
    else:
        base = 0.5 * (1 + math.cos(math.pi * (t - warmup - hold) / (total - warmup - hold)))
    if name in ("nos_opt5", "nos_opt6"):
        a4 = 0.5 * (1 - math.cos(math.pi * t / total))
        a8 = 0.5 * (1 - math.cos(math.pi * ((2 * t) % total) / total))
        base *= math.erfc(math.erfc(a4)) / (1 - math.tanh(a8) ** 2)
    return base


def published_step(
    name: str, w: torch.Tensor, g: torch.Tensor, state: dict, t: int, total: int, lr: float, *, nos_eps: bool = False
):
    """w after NOS's optimizer `name` takes step t (from 0) of `total` with gradient g.

    `nos_eps` swaps the published epsilons for nos's documented ones (see search_space.builtins):
    divisions x / (y + 1e-8) instead of x / y, AdamClip's bound sqrt(v) instead of sqrt(v) + 1e-7.
    """
    div_eps, clip_eps = (1e-8, 0.0) if nos_eps else (0.0, 1e-7)
    state["m"] = 0.9 * state.get("m", torch.zeros_like(w)) + 0.1 * g
    m_hat = state["m"] / (1 - 0.9 ** (t + 1))
    qh = 0.3 * g + 0.7 * m_hat
    if name == "nos_opt5":
        c = torch.abs(torch.exp(m_hat))
        u = qh / (torch.minimum(torch.maximum(torch.full_like(w, 2.0), -c), c) + div_eps)
    elif name == "nos_opt6":
        d = 1 - math.tanh(0.5 * (1 - math.cos(math.pi * t / total))) ** 2
        u = qh / (torch.abs(d * torch.exp(1e-4 * w)) + div_eps)
    elif name == "nos_opt7":
        a6 = 0.5 * (1 - math.cos(2 * math.pi * t / total))
        a10 = ((2 * t) % total) / total
        u = torch.tanh(max(a6, a10) * torch.asinh(qh))
    elif name == "nos_adamclip":  # AdamClip variant 0
        state["s"] = 0.99 * state.get("s", torch.zeros_like(w)) + 0.01 * g * g
        bound = torch.sqrt(state["s"] / (1 - 0.99 ** (t + 1))) + clip_eps
        u = torch.minimum(torch.maximum(m_hat, -bound), bound)
        state["clipped"] = state.get("clipped", 0) + int((m_hat.abs() > bound).sum())
    else:
        raise KeyError(name)
    return w - lr * published_lr(name, t, total) * u


# =============================================================================================
# the problem: f(w) = sum h (1 - cos(w - b)), started near its maxima so that gradients first grow
# (AdamClip clips then) and then shrink


def problem(dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(0)
    h = (0.5 + 1.5 * torch.rand(P, generator=gen)).to(dtype)
    b = (2.0 * torch.randn(P, generator=gen)).to(dtype)
    w0 = (b + math.pi + 2.0 * torch.rand(P, generator=gen) - 1.0).to(dtype)
    return h, b, w0


def grad_of(w: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return h * torch.sin(w - b)


def reference_path(
    name: str, lr: float, dtype: torch.dtype = torch.float64, nos_eps: bool = False
) -> tuple[list[torch.Tensor], dict]:
    h, b, w = problem(dtype)
    state: dict = {}
    path = [w]
    for t in range(T):
        w = published_step(name, w, grad_of(w, h, b), state, t, T, lr, nos_eps=nos_eps)
        path.append(w)
    return path, state


# =============================================================================================
# the genomes


@pytest.mark.parametrize("name", NOS)
def test_is_a_valid_builtin(name):
    assert name in BUILTINS
    check_valid(builtin(name))  # every decay, the lr's included, stays in [0, 1]


@pytest.mark.parametrize("name", NOS)
@pytest.mark.parametrize("total", [T, 35, 200, 1000])
def test_lr_schedule_is_the_published_one(name, total):
    got = lr_values(builtin(name).lr, total)
    want = [published_lr(name, t, total) for t in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[0] == 0.0 and max(got) <= 1.0


# The weights are O(1) (|w| < 8), so atol 1e-5 is a relative 1e-5 of their scale; the published
# epsilons are what separates the paths at all (up to 3e-6: AdamClip at lr 0.2), as
# test_interpreter_is_exact_up_to_the_documented_epsilons shows.
RTOL, ATOL = 1e-5, 1e-5


def _interpreter_path(name: str, dtype: torch.dtype = torch.float64, genome: Genome | None = None) -> list[torch.Tensor]:
    """theta [len(LRS), P] after each step, one row per lr in LRS."""
    h, b, w0 = problem(dtype)
    genome = builtin(name) if genome is None else genome
    opt = BatchedOptimizer([genome] * len(LRS), LRS, [T] * len(LRS), [0] * len(LRS),
                           Segments(((0, 12), (12, P))), dtype=dtype)
    theta = w0.repeat(len(LRS), 1)
    path = [theta]
    for _ in range(T):
        theta = theta - opt.direction(theta, grad_of(theta, h, b))
        assert opt.perturbation(theta) is None
        opt.advance()
        path.append(theta)
    assert float((theta - w0).abs().max()) > 0.5  # it trained
    return path


@pytest.mark.parametrize("name", NOS)
def test_interpreter_follows_the_transcription_step_by_step(name):
    got = _interpreter_path(name)
    for row, lr in enumerate(LRS):
        want = reference_path(name, lr)[0]
        for t in range(T + 1):
            torch.testing.assert_close(got[t][row], want[t], rtol=RTOL, atol=ATOL, msg=f"{name} lr {lr} step {t}")


@pytest.mark.parametrize("name", NOS)
def test_interpreter_is_exact_up_to_the_documented_epsilons(name):
    got = _interpreter_path(name)
    for row, lr in enumerate(LRS):
        want = reference_path(name, lr, nos_eps=True)[0]
        for t in range(T + 1):
            torch.testing.assert_close(got[t][row], want[t], rtol=1e-12, atol=1e-12, msg=f"{name} lr {lr} step {t}")


def test_step_zero_has_lr_zero_and_adamclip_clips():
    for name in NOS:
        path, _ = reference_path(name, LRS[0])
        assert torch.equal(path[1], path[0]), name  # lr 0 at t = 0, as published
    _, state = reference_path("nos_adamclip", LRS[0])
    assert state["clipped"] > 10  # the clip is exercised, not only m_hat passed through


def test_float32_interpreter_is_close_too():
    h, b, w0 = problem(torch.float32)
    genomes = [builtin(n) for n in NOS]  # all four in one batch, as a search would run them
    opt = BatchedOptimizer(genomes, [0.05] * 4, [T] * 4, [0] * 4, Segments(((0, P),)))
    theta = w0.repeat(4, 1)
    for _ in range(T):
        theta = theta - opt.direction(theta, grad_of(theta, h, b))
        opt.advance()
    for row, name in enumerate(NOS):
        want = reference_path(name, 0.05)[0][-1].float()
        torch.testing.assert_close(theta[row], want, rtol=1e-4, atol=1e-5, msg=name)


NEAR_MISSES = {  # genomes one detail away from a published optimizer: the comparison must tell
    "nos_adamclip": {"nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "clip", "in": ["m", "n0"]}],
                     "lr": {"schedule": "constant", "decay": "warmup_hold_cosine"}},  # beta2 .999
    "nos_opt7": {"nodes": [{"op": "asinh", "in": ["qh_gm"]},
                           {"op": "tanh", "in": ["n0"], "decay": [{"op": "max", "args": ["cyclic_cosine_up1", "linear_restart_up"]}]}],
                 "lr": {"schedule": "constant", "decay": "warmup_hold_cosine"}},  # 4 restarts, not 2
    "nos_opt5": {"nodes": [{"op": "exp", "in": ["m"]}, {"op": "clip", "in": ["two", "n0"]}, {"op": "div", "in": ["qh_gm", "n1"]}],
                 "lr": {"schedule": "constant", "decay": "warmup_hold_cosine"}},  # no evolved lr decay
    "nos_opt6": {"nodes": [{"op": "exp", "in": ["w_1e4"]}, {"op": "div", "in": ["qh_gm", "n0"]}],
                 "lr": {"schedule": "constant", "decay": {"op": "mul", "args": ["warmup_hold_cosine", "nos_evolved_lr0"]}}},
}


@pytest.mark.parametrize("name", NOS)
def test_a_near_miss_is_told_apart(name):
    got = _interpreter_path(name, genome=from_json(NEAR_MISSES[name]))[-1]
    want = torch.stack([reference_path(name, lr)[0][-1] for lr in LRS])
    assert float((got - want).abs().max()) > 1e-3


# =============================================================================================
# the exported file


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"nos_builtin_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLASS = {"nos_opt5": "NosOpt5", "nos_opt6": "NosOpt6", "nos_opt7": "NosOpt7", "nos_adamclip": "NosAdamclip"}


@pytest.mark.parametrize("name", NOS)
def test_exported_file_follows_the_transcription(tmp_path, name, capsys):
    path = tmp_path / f"{name}.py"
    assert export_main(["--builtin", name, "-o", str(path)]) == 0
    text = path.read_text()
    assert "import nos" not in text and "search_space" not in text.split('"""')[-1]
    mod = _load(path)
    h, b, w0 = problem()
    lr = LRS[1]
    params = [w0[:12].clone().view(3, 4).requires_grad_(True), w0[12:].clone().requires_grad_(True)]
    opt = getattr(mod, CLASS[name])(params, lr=lr, total_steps=T)
    ref = reference_path(name, lr)[0]
    exact = reference_path(name, lr, nos_eps=True)[0]
    for t in range(T):
        opt.zero_grad()
        w = torch.cat([p.reshape(-1) for p in params])
        (h * (1 - torch.cos(w - b))).sum().backward()
        opt.step()
        got = torch.cat([p.detach().reshape(-1) for p in params])
        torch.testing.assert_close(got, ref[t + 1], rtol=RTOL, atol=ATOL, msg=f"{name} step {t}")
        torch.testing.assert_close(got, exact[t + 1], rtol=1e-12, atol=1e-12, msg=f"{name} step {t}")


# =============================================================================================
# integrity check, search-space bookkeeping


def test_integrity_check():
    results = integrity.check([builtin(n) for n in NOS])
    for name, r in zip(NOS, results):
        assert r.passed and not r.sign_flipped, (name, r)


def test_published_pieces_are_never_drawn_at_random():
    published = set(decay_mod.PUBLISHED_CURVES) | set(decay_mod.PUBLISHED_DECAY_OPS) | set(PUBLISHED_OPERANDS)
    assert not set(decay_mod.CURVES) & published and not set(decay_mod.DECAY_OPS) & published
    assert PUBLISHED_OPERANDS <= set(OPERANDS) and not PUBLISHED_OPERANDS & set(OPERAND_WEIGHTS)
    seen = []
    for seed in range(300):
        rng = random.Random(seed)
        g = random_genome(rng)
        seen.append(g.dumps())
        for _ in range(3):
            try:
                g, _ = mutate(g, rng)
            except ValueError:
                continue
            seen.append(g.dumps())
    for text in seen:
        assert not any(f'"{p}"' in text for p in published), text


def _eval_code(code: str, tau: float) -> float:
    # the exporter's decay expression, evaluated with only the names it may use
    namespace = {"__builtins__": {"min": min, "max": max}, "decay_curve": decay_mod.decay_curve, "math": math}
    return eval(compile(code, "<decay>", "eval"), namespace, {"tau": tau})


@pytest.mark.parametrize(
    "d",
    [*decay_mod.PUBLISHED_CURVES, {"op": "sech2", "args": ["cosine_up"]},
     {"op": "mul", "args": ["warmup_hold_cosine", "nos_evolved_lr0"]}],
)
def test_published_decays_code_and_sympy_match(d):
    decay_mod.validate_decay(d)
    expr = decay_mod.to_sympy(d)
    for tau in (0.0, 0.03, 1 / 15, 0.1, 0.2, 0.33, 0.5, 0.61, 0.77, 0.999):
        want = decay_mod.evaluate(d, tau)
        assert _eval_code(decay_mod.to_code(d), tau) == pytest.approx(want, abs=1e-12)
        assert float(expr.subs(decay_mod.TAU, sp.Rational(str(tau)))) == pytest.approx(want, abs=1e-9)
