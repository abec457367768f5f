"""Decay functions: multipliers d(tau) of the training progress tau = t / T.

The 14 base curves are NOS joint evolution's (Morgan & Hougen, 2024), themselves extending the
decays of Bello et al. (2017): linear, cosine, cyclic cosine, restarts, exponential and Demon
(Chen et al., 2022, "Demon: improved neural network training with momentum decay"), each with its
complement. A decay is a small tree over these curves (NOS: one hidden node and a root), written in
JSON as a curve name or `{"op": NAME, "args": [decay, ...]}`.

A decay is valid only if it stays in [0, 1] on t = 0..99 with T = 100 (NOS's rule); two decays are
duplicates when their curves are within L2 distance 1e-4 over those 100 points.

The curve functions are plain `math` code: the exporter copies their source into the optimizer
file, so the schedule in an exported file is the very same function.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from typing import Any

import sympy as sp

CYCLES = 4  # cycles of the cyclic / restart curves over a run
DEMON_BETA = 0.9
VALIDITY_T = 100
DUPLICATE_L2 = 1e-4
MAX_DECAY_OPS = 2


def decay_curve(name, tau):
    """The base curve `name` at progress tau in [0, 1)."""
    if name == "constant":
        return 1.0
    if name == "linear_down":
        return 1.0 - tau
    if name == "linear_up":
        return tau
    if name == "cosine_down":
        return 0.5 * (1.0 + math.cos(math.pi * tau))
    if name == "cosine_up":
        return 0.5 * (1.0 - math.cos(math.pi * tau))
    if name == "cyclic_cosine":
        return 0.5 * (1.0 + math.cos(2.0 * math.pi * 4 * tau))
    if name == "cosine_restart":
        return 0.5 * (1.0 + math.cos(math.pi * ((4 * tau) % 1.0)))
    if name == "cosine_restart_up":
        return 0.5 * (1.0 - math.cos(math.pi * ((4 * tau) % 1.0)))
    if name == "linear_restart":
        return 1.0 - ((4 * tau) % 1.0)
    if name == "linear_restart_up":
        return (4 * tau) % 1.0
    if name == "exp_down":
        return 0.01**tau
    if name == "exp_up":
        return 1.0 - 0.01**tau
    if name == "demon":
        return (1.0 - tau) / ((1.0 - 0.9) + 0.9 * (1.0 - tau))
    if name == "demon_up":
        return 1.0 - (1.0 - tau) / ((1.0 - 0.9) + 0.9 * (1.0 - tau))
    # NOS's published final optimizers (never drawn at random: see PUBLISHED_CURVE_SYMPY)
    if name == "cyclic_cosine_up1":
        return 0.5 * (1.0 - math.cos(2.0 * math.pi * tau))
    if name == "linear_restart_up2":
        return (2 * tau) % 1.0
    if name == "warmup_hold_cosine":
        if tau < 1.0 / 15.0:
            return 15.0 * tau
        if tau <= 3.0 / 15.0:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (tau - 0.2) / 0.8))
    if name == "nos_evolved_lr0":
        a4 = 0.5 * (1.0 - math.cos(math.pi * tau))
        a8 = 0.5 * (1.0 - math.cos(math.pi * ((2 * tau) % 1.0)))
        return math.erfc(math.erfc(a4)) / (1.0 - math.tanh(a8) ** 2)
    raise KeyError(f"unknown decay curve {name!r}")


TAU = sp.Symbol("tau", nonnegative=True)
_PI = sp.pi
_R = sp.Rational
_DEMON = (1 - TAU) / (_R(1, 10) + _R(9, 10) * (1 - TAU))

CURVE_SYMPY: dict[str, sp.Expr] = {
    "constant": sp.Integer(1),
    "linear_down": 1 - TAU,
    "linear_up": TAU,
    "cosine_down": (1 + sp.cos(_PI * TAU)) / 2,
    "cosine_up": (1 - sp.cos(_PI * TAU)) / 2,
    "cyclic_cosine": (1 + sp.cos(2 * _PI * CYCLES * TAU)) / 2,
    "cosine_restart": (1 + sp.cos(_PI * sp.Mod(CYCLES * TAU, 1))) / 2,
    "cosine_restart_up": (1 - sp.cos(_PI * sp.Mod(CYCLES * TAU, 1))) / 2,
    "linear_restart": 1 - sp.Mod(CYCLES * TAU, 1),
    "linear_restart_up": sp.Mod(CYCLES * TAU, 1),
    "exp_down": _R(1, 100) ** TAU,
    "exp_up": 1 - _R(1, 100) ** TAU,
    "demon": _DEMON,
    "demon_up": 1 - _DEMON,
}
CURVES: tuple[str, ...] = tuple(CURVE_SYMPY)  # the curves random decays and mutations draw from

# Curves of NOS's published final optimizers (Morgan & Hougen's finalOptimizers.py; the nos_*
# builtins) that the sampled set lacks. Genomes may name them, but they are never drawn at
# random, so CURVES -- and every random genome and mutation -- stays as it was.
#   cyclic_cosine_up1   NOS's a6, 0.5 (1 - cos(2 pi tau)): one cycle (`cyclic_cosine` has 4)
#   linear_restart_up2  NOS's a10, (2t mod T) / T: two restarts (`linear_restart_up` has 4)
#   warmup_hold_cosine  NOS's lr_warmup_cosine_decay: linear warm-up from 0 over T/15 steps, hold
#                       at 1 for 2T/15, then cosine to 0 (the fractions of its usage example,
#                       warmup 6400 and hold 12800 of 96000 steps)
#   nos_evolved_lr0     NOS's evolved lr decay (EvolvedLRSchedules type 0, on Opt4-6):
#                       erfc(erfc(a4)) / (1 - tanh^2(a8)), a4 = cosine_up, a8 = 0.5 (1 -
#                       cos(pi ((2t mod T) / T))). It lies in [0.157, 1.96], so on its own it is
#                       not a valid decay; times warmup_hold_cosine it stays in [0, 0.82]. As a
#                       tree it would need 4 operations (erfc, erfc, sech2, a division) over a
#                       two-restart cosine curve, past MAX_DECAY_OPS, hence one named curve.
_A8 = (1 - sp.cos(_PI * sp.Mod(2 * TAU, 1))) / 2
PUBLISHED_CURVE_SYMPY: dict[str, sp.Expr] = {
    "cyclic_cosine_up1": (1 - sp.cos(2 * _PI * TAU)) / 2,
    "linear_restart_up2": sp.Mod(2 * TAU, 1),
    "warmup_hold_cosine": sp.Piecewise(
        (15 * TAU, TAU < _R(1, 15)),
        (sp.Integer(1), TAU <= _R(3, 15)),
        ((1 + sp.cos(_PI * (TAU - _R(1, 5)) * _R(5, 4))) / 2, True),
    ),
    "nos_evolved_lr0": sp.erfc(sp.erfc(CURVE_SYMPY["cosine_up"])) / (1 - sp.tanh(_A8) ** 2),
}
PUBLISHED_CURVES: tuple[str, ...] = tuple(PUBLISHED_CURVE_SYMPY)
ALL_CURVE_SYMPY: dict[str, sp.Expr] = {**CURVE_SYMPY, **PUBLISHED_CURVE_SYMPY}

# Operations combining curves inside a decay tree: (arity, float function, sympy function).
DECAY_OPS: dict[str, tuple[int, Callable[..., float], Callable[..., sp.Expr]]] = {
    "one_minus": (1, lambda a: 1.0 - a, lambda a: 1 - a),
    "sqrt": (1, lambda a: math.sqrt(max(a, 0.0)), lambda a: sp.sqrt(a)),
    "square": (1, lambda a: a**2, lambda a: a**2),
    "mul": (2, lambda a, b: a * b, lambda a, b: a * b),
    "min": (2, min, sp.Min),
    "max": (2, max, sp.Max),
    "mean": (2, lambda a, b: 0.5 * (a + b), lambda a, b: (a + b) / 2),
    "add": (2, lambda a, b: a + b, lambda a, b: a + b),
    "sub": (2, lambda a, b: a - b, lambda a, b: a - b),
}

# Operations of NOS's published final optimizers, likewise valid but never drawn at random:
#   sech2  1 - tanh^2(a), NOS's deriv_tanh (Opt6's denominator decay)
PUBLISHED_DECAY_OPS: dict[str, tuple[int, Callable[..., float], Callable[..., sp.Expr]]] = {
    "sech2": (1, lambda a: 1.0 - math.tanh(a) ** 2, lambda a: 1 - sp.tanh(a) ** 2),
}
ALL_DECAY_OPS = {**DECAY_OPS, **PUBLISHED_DECAY_OPS}


#: Python source of each decay operation, for exported files ({a}, {b}: the arguments' code).
DECAY_OP_CODE: dict[str, str] = {
    "one_minus": "(1.0 - {a})",
    "sqrt": "math.sqrt(max({a}, 0.0))",
    "square": "({a}) ** 2",
    "mul": "({a} * {b})",
    "min": "min({a}, {b})",
    "max": "max({a}, {b})",
    "mean": "(0.5 * ({a} + {b}))",
    "add": "({a} + {b})",
    "sub": "({a} - {b})",
    "sech2": "(1.0 - math.tanh({a}) ** 2)",
}


def to_code(d: Decay | None, tau: str = "tau") -> str:
    """Python source computing the decay at progress `tau` (uses `decay_curve` and math)."""
    if d is None:
        return "1.0"
    if isinstance(d, str):
        return f"decay_curve({d!r}, {tau})"
    args = [to_code(a, tau) for a in d["args"]]
    return DECAY_OP_CODE[d["op"]].format(a=args[0], b=args[1] if len(args) > 1 else "")


class DecayError(ValueError):
    """A decay tree that is malformed or leaves [0, 1]."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlong = 2, 4, 4, 40


def short_repr(x: Any) -> str:
    """``x`` for an error message: repr-escaped (no raw newline or control character),
    nested values and long texts cut, so a message stays one short line."""
    return _SHORT.repr(x)


def _exceeds_ops(d: Decay, limit: int) -> bool:
    """More than ``limit`` operations in the tree? (iterative: a deep tree is refused
    before anything recurses into it)."""
    count, stack = 0, [d]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            count += 1
            if count > limit:
                return True
            args = x.get("args")
            if isinstance(args, list):
                stack.extend(args)
    return False


Decay = Any  # str | dict: the JSON form


def validate_decay(d: Decay, *, where: str = "decay") -> None:
    """Check structure and names (not the [0, 1] range: see `is_valid`)."""
    if isinstance(d, str):
        if d not in ALL_CURVE_SYMPY:
            raise DecayError(f"{where}: unknown decay curve {short_repr(d)}")
        return
    if not isinstance(d, dict) or set(d) != {"op", "args"}:
        raise DecayError(f"{where}: a decay is a curve name or {{'op': ..., 'args': [...]}}")
    if _exceeds_ops(d, MAX_DECAY_OPS):
        raise DecayError(f"{where}: a decay tree has at most {MAX_DECAY_OPS} operations")
    op = d["op"]
    if not isinstance(op, str) or op not in ALL_DECAY_OPS:
        raise DecayError(f"{where}: unknown decay operation {short_repr(op)}")
    args = d["args"]
    if not isinstance(args, list) or len(args) != ALL_DECAY_OPS[op][0]:
        raise DecayError(f"{where}: decay operation {short_repr(op)} takes {ALL_DECAY_OPS[op][0]} argument(s)")
    for i, a in enumerate(args):
        validate_decay(a, where=f"{where}.args[{i}]")
    if count_ops(d) > MAX_DECAY_OPS:
        raise DecayError(f"{where}: a decay tree has at most {MAX_DECAY_OPS} operations")


def count_ops(d: Decay) -> int:
    if isinstance(d, str):
        return 0
    return 1 + sum(count_ops(a) for a in d["args"])


def evaluate(d: Decay, tau: float) -> float:
    if isinstance(d, str):
        return decay_curve(d, tau)
    _, fn, _ = ALL_DECAY_OPS[d["op"]]
    return fn(*(evaluate(a, tau) for a in d["args"]))


def values(d: Decay | None, total_steps: int) -> list[float]:
    """d(t / T) for t = 0..T-1 (1.0 everywhere for no decay)."""
    if d is None:
        return [1.0] * total_steps
    return [evaluate(d, t / total_steps) for t in range(total_steps)]


def is_valid(d: Decay) -> bool:
    """NOS's rule: the curve stays within [0, 1] on t = 0..99, T = 100."""
    return all(-1e-9 <= v <= 1.0 + 1e-9 for v in values(d, VALIDITY_T))


def distance(a: Decay | None, b: Decay | None) -> float:
    """L2 distance between two decays' curves over 100 points."""
    va, vb = values(a, VALIDITY_T), values(b, VALIDITY_T)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(va, vb)))


def is_duplicate(d: Decay | None, others: list[Decay | None]) -> bool:
    return any(distance(d, o) <= DUPLICATE_L2 for o in others)


def to_sympy(d: Decay | None) -> sp.Expr:
    if d is None:
        return sp.Integer(1)
    if isinstance(d, str):
        return ALL_CURVE_SYMPY[d]
    _, _, sym = ALL_DECAY_OPS[d["op"]]
    return sym(*(to_sympy(a) for a in d["args"]))


def describe(d: Decay | None) -> str:
    """Compact human-readable form, e.g. `mul(cosine_down, linear_up)`."""
    if d is None:
        return "1"
    if isinstance(d, str):
        return d
    return f"{d['op']}({', '.join(describe(a) for a in d['args'])})"
