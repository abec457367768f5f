"""The operations an update graph is built from.

The unary and binary sets follow NOS joint evolution (Morgan & Hougen, 2024, arXiv 2404.06679),
which extends Bello et al. (2017, "Neural Optimizer Search with Reinforcement Learning"); `sign`
is added so that Lion (Chen et al., 2023) is expressible.

Every operation is a small top-level function of torch tensors that imports nothing but torch and
math. The interpreter calls these functions, and `nos.export` copies their source text into the
exported optimizer file, so both run literally the same code.

Numerical safety: on finite inputs no operation returns NaN or inf. Logs and reciprocals clamp
their argument away from zero, `exp` clamps its argument, and anything that can blow up is
clamped to +-BIG.

Some operations need more than their inputs; `Op.needs` says what the caller must pass:
- "state": a stateful op keeps one tensor per parameter; called `fn(x, prev) -> (y, new_prev)`
  with `prev=None` on the first step.
- "uniform": a random op gets a tensor of U[0,1) numbers shaped like x: `fn(x, u)`.
- "norm": `fn(x, norm)` gets the L2 norm of x over each parameter tensor, broadcast to x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
import torch

BIG = 1e15  # outputs that could overflow are clamped to [-BIG, BIG]
TINY = 1e-30  # smallest magnitude fed to a log
DIV_EPS = 1e-8  # x / (y + eps), Adam's epsilon

# ---------------------------------------------------------------------------------------------
# torch implementations (copied verbatim into exported files; keep them torch/math only)


def op_neg(x):
    return -x


def op_log_abs(x):
    return torch.log(torch.clamp(torch.abs(x), min=1e-30))


def op_sqrt_abs(x):
    return torch.sqrt(torch.abs(x))


def op_exp(x):
    return torch.exp(torch.clamp(x, max=40.0))


def op_abs(x):
    return torch.abs(x)


def op_sigmoid(x):
    return torch.sigmoid(x)


def op_inv_1p_abs(x):
    return 1.0 / (1.0 + torch.abs(x))


def op_softplus(x):
    return torch.nn.functional.softplus(x)


def op_erf(x):
    return torch.erf(x)


def op_erfc(x):
    return torch.erfc(x)


def op_asinh(x):
    return torch.asinh(x)


def op_tanh(x):
    return torch.tanh(x)


def op_atan(x):
    return torch.atan(x)


def op_reciprocal(x):
    # 1/x with 1/0 := 0 (sign(0) = 0) and |1/x| <= 1e15
    return torch.sign(x) / torch.clamp(torch.abs(x), min=1e-15)


def op_bessel_i1e(x):
    return torch.special.i1e(x)


def op_relu(x):
    return torch.relu(x)


def op_min0(x):
    return torch.clamp(x, max=0.0)


def op_softsign(x):
    return x / (1.0 + torch.abs(x))


def op_sign(x):
    return torch.sign(x)


def op_dropout(x, u, p):
    # inverted dropout: keep with probability 1-p and rescale, as tf.nn.dropout does in NOS
    return torch.where(u >= p, torch.clamp(x / (1.0 - p), min=-1e15, max=1e15), torch.zeros_like(x))


def op_clip_by_norm(x, norm):
    # clip each parameter tensor's update to L2 norm <= 1 (tf.clip_by_norm(x, 1.0) in NOS)
    return x / torch.clamp(norm, min=1.0)


def op_ema(x, prev):
    # stateful exponential moving average, beta 0.9, zero-initialised
    s = 0.1 * x if prev is None else 0.9 * prev + 0.1 * x
    return s, s


def op_delta(x, prev):
    # change since the previous step (x itself on the first step)
    y = x if prev is None else torch.clamp(x - prev, min=-1e15, max=1e15)
    return y, x


def op_running_max(x, prev):
    s = x if prev is None else torch.maximum(prev, x)
    return s, s


def op_add(x, y):
    return torch.clamp(x + y, min=-1e15, max=1e15)


def op_sub(x, y):
    return torch.clamp(x - y, min=-1e15, max=1e15)


def op_mul(x, y):
    return torch.clamp(x * y, min=-1e15, max=1e15)


def op_max(x, y):
    return torch.maximum(x, y)


def op_min(x, y):
    return torch.minimum(x, y)


def op_div(x, y):
    # x / (y + eps) with the denominator kept away from zero; equals Adam's m / (sqrt(v) + eps)
    d = y + 1e-8
    d = torch.where(torch.abs(d) < 1e-15, torch.full_like(d, 1e-15), d)
    return torch.clamp(x / d, min=-1e15, max=1e15)


def op_div_sqrt(x, y):
    return x / torch.sqrt(1.0 + y * y)


def op_clip(x, y):
    a = torch.abs(y)
    return torch.maximum(torch.minimum(x, a), -a)


def op_interp(x, y):
    return 0.95 * x + 0.05 * y


def op_pow_abs(x, y):
    return torch.clamp(torch.pow(torch.abs(x), y), max=1e15)


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Op:
    name: str
    arity: int
    fn: Callable
    sym: Callable[..., sp.Expr]
    needs: str = ""  # "", "state", "uniform" or "norm" (see module docstring)
    param: float | None = None  # the dropout rate, passed as the last positional argument
    # How the output responds when the inputs' magnitudes change but not their signs (as when each
    # step's gradient is rescaled by a positive factor: `search_space.operands.Response`). False is
    # always safe: the analysis then assumes the output may change in any way.
    # keeps_sign: the output's sign pattern is a function of the inputs' sign patterns alone (odd
    # and increasing, a rectifier, a division by something positive, a product, a clip to +-|y|,
    # or a dropout whose mask is drawn from the step and the element index, not from the value)
    keeps_sign: bool = False
    # of_signs: the output itself (not only its sign) is a function of the inputs' signs alone
    of_signs: bool = False
    # scales_first: binary; the output is the first input times a factor that depends on the
    # second alone (then clamped to +-BIG), so over a second input that never changes it keeps the
    # first's signs
    scales_first: bool = False

    @property
    def stateful(self) -> bool:
        return self.needs == "state"

    def call(self, *args):
        """Apply with `param` bound (dropout rate); other extras are passed by the caller."""
        if self.param is not None:
            return self.fn(*args, self.param)
        return self.fn(*args)


EPS_SYMBOL = sp.Symbol("epsilon", positive=True)


def _f(name: str) -> Callable[..., sp.Expr]:
    """An opaque sympy function: used for ops with no closed form (state, randomness)."""
    return sp.Function(name)


def _sym_commutative(name: str) -> Callable[[sp.Expr, sp.Expr], sp.Expr]:
    """max/min as opaque commutative functions: sympy's Max/Min query assumptions and are ~100x
    slower; sorting the arguments keeps max(x, y) == max(y, x), and max(x, x) folds to x."""
    f = sp.Function(name)

    def build(x: sp.Expr, y: sp.Expr) -> sp.Expr:
        if x == y:
            return x
        return f(*sorted((x, y), key=sp.default_sort_key))

    return build


def _sym_dropout(p: float) -> Callable[[sp.Expr], sp.Expr]:
    return _f(f"dropout{int(round(p * 100))}")


UNARY: dict[str, Op] = {
    op.name: op
    for op in [
        Op("neg", 1, op_neg, lambda x: -x, keeps_sign=True),
        Op("log_abs", 1, op_log_abs, lambda x: sp.log(sp.Abs(x))),
        Op("sqrt_abs", 1, op_sqrt_abs, lambda x: sp.sqrt(sp.Abs(x)), keeps_sign=True),
        Op("exp", 1, op_exp, sp.exp),
        Op("abs", 1, op_abs, sp.Abs, keeps_sign=True),
        Op("sigmoid", 1, op_sigmoid, lambda x: 1 / (1 + sp.exp(-x))),
        Op("inv_1p_abs", 1, op_inv_1p_abs, lambda x: 1 / (1 + sp.Abs(x))),
        Op("softplus", 1, op_softplus, lambda x: sp.log(1 + sp.exp(x))),
        Op("erf", 1, op_erf, sp.erf, keeps_sign=True),
        Op("erfc", 1, op_erfc, sp.erfc),
        Op("asinh", 1, op_asinh, sp.asinh, keeps_sign=True),
        Op("tanh", 1, op_tanh, sp.tanh, keeps_sign=True),
        Op("atan", 1, op_atan, sp.atan, keeps_sign=True),
        Op("reciprocal", 1, op_reciprocal, lambda x: 1 / x, keeps_sign=True),
        Op("bessel_i1e", 1, op_bessel_i1e, _f("i1e"), keeps_sign=True),
        Op("relu", 1, op_relu, _f("relu"), keeps_sign=True),
        Op("min0", 1, op_min0, _f("min0"), keeps_sign=True),
        Op("dropout50", 1, op_dropout, _sym_dropout(0.5), needs="uniform", param=0.5, keeps_sign=True),
        Op("dropout30", 1, op_dropout, _sym_dropout(0.3), needs="uniform", param=0.3, keeps_sign=True),
        Op("dropout10", 1, op_dropout, _sym_dropout(0.1), needs="uniform", param=0.1, keeps_sign=True),
        Op("clip_by_norm", 1, op_clip_by_norm, _f("clip_by_norm"), needs="norm", keeps_sign=True),
        Op("softsign", 1, op_softsign, lambda x: x / (1 + sp.Abs(x)), keeps_sign=True),
        Op("ema", 1, op_ema, _f("ema"), needs="state"),
        Op("delta", 1, op_delta, _f("delta"), needs="state"),
        Op("running_max", 1, op_running_max, _f("running_max"), needs="state"),
        Op("sign", 1, op_sign, sp.sign, keeps_sign=True, of_signs=True),
    ]
}

BINARY: dict[str, Op] = {
    op.name: op
    for op in [
        Op("add", 2, op_add, lambda x, y: x + y),
        Op("sub", 2, op_sub, lambda x, y: x - y),
        Op("mul", 2, op_mul, lambda x, y: x * y, keeps_sign=True, scales_first=True),
        Op("max", 2, op_max, _sym_commutative("max")),
        Op("min", 2, op_min, _sym_commutative("min")),
        Op("div", 2, op_div, lambda x, y: x / (y + EPS_SYMBOL), scales_first=True),
        Op("div_sqrt", 2, op_div_sqrt, lambda x, y: x / sp.sqrt(1 + y**2), scales_first=True),
        Op("clip", 2, op_clip, lambda x, y: sp.Function("clip")(x, sp.Abs(y)), keeps_sign=True),
        Op("interp", 2, op_interp, lambda x, y: sp.Rational(19, 20) * x + sp.Rational(1, 20) * y),
        Op("pow_abs", 2, op_pow_abs, lambda x, y: sp.Abs(x) ** y),
    ]
}

OPS: dict[str, Op] = {**UNARY, **BINARY}

#: ops whose argument order does not matter (used by the swap-arguments mutation)
COMMUTATIVE = frozenset({"add", "mul", "max", "min"})


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown operation {name!r}") from None
