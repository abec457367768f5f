"""The leaves of an update graph: gradient statistics, weights and constants.

The set is NOS joint evolution's (Morgan & Hougen, 2024): g, g^2, g^3; bias-corrected EMAs of
g (beta .9), g^2 and g^3; constants 1 and 2; weight-decay terms; sign(g), sign(m); quasi-hyperbolic
mixes (Ma & Yarats, 2019); an AggMo-style average (Lucas et al., 2019). Additions: a Gaussian
noise operand (Bello et al., 2017: eps ~ N(0, 0.01^2)), the constant 0 (so a noise-only optimizer
is expressible) and Lion's interpolation 0.1 g + 0.9 m_{t-1} (Chen et al., 2023).

Deviation from NOS: the EMA of g^2 uses beta 0.999 (Adam's default, Kingma & Ba 2015) rather
than 0.99, so `m / (sqrt(v) + eps)` *is* torch.optim.Adam. NOS's own beta-0.99 EMA is there too,
as `v99`, for its published AdamClip (the nos_adamclip builtin); random genomes never draw it.

Like the ops, the operand functions and `update_moments` are plain torch code that the exporter
copies verbatim, so the interpreter and the exported file compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import sympy as sp
import torch

NOISE_STD = 0.01


def update_moments(state, g, t, needed):
    """Advance the EMAs named in `needed` by one step (t counts from 1); return their values.

    `state` is a dict of tensors (per parameter, or per stacked candidate batch). Returns a dict
    with the bias-corrected moments and `m99_prev`, the slow EMA before this step (for Lion).
    """
    s = {}
    # (state key, beta, power of g, bias-corrected?)
    moments = (
        ("m", 0.9, 1, True),
        ("v", 0.999, 2, True),
        ("y", 0.999, 3, True),
        ("m99", 0.99, 1, False),
        ("v99", 0.99, 2, True),  # NOS's own EMA of g^2 (its final optimizers' AdamClip)
    )
    for key, beta, power, corrected in moments:
        if key not in needed:
            continue
        prev = state.get(key)
        if key == "m99":
            s["m99_prev"] = torch.zeros_like(g) if prev is None else prev
        gp = g if power == 1 else g**power
        cur = (1.0 - beta) * gp if prev is None else beta * prev + (1.0 - beta) * gp
        state[key] = cur
        s[key] = cur / (1.0 - beta**t) if corrected else cur
    return s


class Response(IntEnum):
    """How a value of the update graph responds when every step's gradient g_t is multiplied by a
    positive factor c_t of its own (what the global-norm gradient clip does), from the most to the
    least invariant. `nos.engine.codegen` propagates it through the graph (with the ops' `keeps_sign`,
    `of_signs` and `scales_first`) to tell whether a gene can change what the optimizer does."""

    SAME = 0  # it does not change at all
    SIGNS = 1  # each element keeps its sign (its magnitude may change)
    ANY = 2  # it may change in any way


@dataclass(frozen=True)
class Operand:
    name: str
    fn: Callable  # fn(g, w, s) where s holds the moments and, if needed, "noise"
    description: str
    needs: frozenset[str] = frozenset()  # moments ("m", "v", "y", "m99") and/or "noise"
    uses_grad: bool = True
    # How the operand responds to a positive per-step rescaling of g (see Response), where the
    # default is not right: None means SAME for an operand that does not read the gradient and ANY
    # for one that does (an EMA of c_t g_t mixes steps with different factors, so it can change
    # direction). g^2 >= 0 and g^3 keep their signs like g; sign(g) does not change at all.
    scaling: Response | None = None

    @property
    def response(self) -> Response:
        """How the operand responds to multiplying each step's gradient by its own positive factor."""
        if self.scaling is not None:
            return self.scaling
        return Response.ANY if self.uses_grad else Response.SAME

    @property
    def symbol(self) -> sp.Expr:
        """Constants are sympy numbers, so `g * one` folds to `g` and `g * zero` to 0."""
        return _CONSTANTS[self.name] if self.name in _CONSTANTS else sp.Symbol(self.name)


def opd_g(g, w, s):
    return g


def opd_g2(g, w, s):
    return g * g


def opd_g3(g, w, s):
    return g * g * g


def opd_m(g, w, s):
    return s["m"]


def opd_v(g, w, s):
    return s["v"]


def opd_y(g, w, s):
    return s["y"]


def opd_one(g, w, s):
    return torch.ones_like(w)


def opd_two(g, w, s):
    return torch.full_like(w, 2.0)


def opd_zero(g, w, s):
    return torch.zeros_like(w)


def opd_w_1e6(g, w, s):
    return 1e-6 * w


def opd_w_1e5(g, w, s):
    return 1e-5 * w


def opd_w_1e4(g, w, s):
    return 1e-4 * w


def opd_w_1e3(g, w, s):
    return 1e-3 * w


def opd_sign_g(g, w, s):
    return torch.sign(g)


def opd_sign_m(g, w, s):
    return torch.sign(s["m"])


def opd_qh_gm(g, w, s):
    return 0.3 * g + 0.7 * s["m"]


def opd_qh_g2v(g, w, s):
    return 0.05 * g * g + 0.95 * s["v"]


def opd_aggmo(g, w, s):
    return (g + s["m"] + s["m99"]) / 3.0


def opd_lion_mix(g, w, s):
    return 0.1 * g + 0.9 * s["m99_prev"]


def opd_noise(g, w, s):
    return s["noise"]


def opd_v99(g, w, s):
    return s["v99"]


_CONSTANTS = {"one": sp.Integer(1), "two": sp.Integer(2), "zero": sp.Integer(0)}
_M, _V, _Y, _S = frozenset({"m"}), frozenset({"v"}), frozenset({"y"}), frozenset({"m99"})

OPERANDS: dict[str, Operand] = {
    o.name: o
    for o in [
        Operand("g", opd_g, "gradient", scaling=Response.SIGNS),
        Operand("g2", opd_g2, "g^2", scaling=Response.SIGNS),
        Operand("g3", opd_g3, "g^3", scaling=Response.SIGNS),
        Operand("m", opd_m, "bias-corrected EMA of g, beta 0.9", _M),
        Operand("v", opd_v, "bias-corrected EMA of g^2, beta 0.999", _V),
        Operand("y", opd_y, "bias-corrected EMA of g^3, beta 0.999", _Y),
        Operand("one", opd_one, "constant 1", uses_grad=False),
        Operand("two", opd_two, "constant 2", uses_grad=False),
        Operand("zero", opd_zero, "constant 0 (noise-only optimizers)", uses_grad=False),
        Operand("w_1e6", opd_w_1e6, "weight decay 1e-6 * w", uses_grad=False),
        Operand("w_1e5", opd_w_1e5, "weight decay 1e-5 * w", uses_grad=False),
        Operand("w_1e4", opd_w_1e4, "weight decay 1e-4 * w", uses_grad=False),
        Operand("w_1e3", opd_w_1e3, "weight decay 1e-3 * w", uses_grad=False),
        Operand("sign_g", opd_sign_g, "sign(g)", scaling=Response.SAME),
        Operand("sign_m", opd_sign_m, "sign(m)", _M),
        Operand("qh_gm", opd_qh_gm, "quasi-hyperbolic 0.3 g + 0.7 m", _M),
        Operand("qh_g2v", opd_qh_g2v, "quasi-hyperbolic 0.05 g^2 + 0.95 v", _V),
        Operand("aggmo", opd_aggmo, "AggMo-style mean of EMAs of g with beta 0, 0.9, 0.99", _M | _S),
        Operand("lion_mix", opd_lion_mix, "Lion's 0.1 g + 0.9 m99_{t-1} (m99: EMA of g, beta .99)", _S),
        Operand("noise", opd_noise, "Gaussian noise N(0, 0.01^2)", frozenset({"noise"}), uses_grad=False),
        Operand("v99", opd_v99, "bias-corrected EMA of g^2, beta 0.99 (NOS's)", frozenset({"v99"})),
    ]
}

#: operands of NOS's published final optimizers (the nos_* builtins) that random genomes and
#: mutations never draw, so that adding them changed no run: v99 is AdamClip's second moment
PUBLISHED_OPERANDS = frozenset({"v99"})

#: how often a random genome picks each operand (the gradient statistics dominate)
OPERAND_WEIGHTS: dict[str, float] = {name: 1.0 for name in OPERANDS if name not in PUBLISHED_OPERANDS}
OPERAND_WEIGHTS.update({"g": 3.0, "m": 2.0, "v": 1.5, "zero": 0.1, "noise": 0.5})
