"""Classic optimizers written as genomes -- no special-case code paths anywhere downstream.

- sgd / momentum / nesterov: torch.optim.SGD (momentum 0.9, dampening 0).
- adam: Kingma & Ba (2015), m / (sqrt(v) + 1e-8) with bias correction; equals torch.optim.Adam.
- adam_clip: Adam on the globally norm-clipped gradient (max norm 1), the strongest simple
  long-horizon baseline on the sine task (an earlier independent measurement of the sine task:
  Adam + gradient-norm clip 1.0 beat Adam at t_max >= 5).
- rmsprop: g / (sqrt(v) + eps) with v the bias-corrected EMA of g^2 (Tieleman & Hinton, 2012).
- lion: sign(0.1 g + 0.9 m_{t-1}), m an EMA of g with beta .99 (Chen et al., 2023).
- powersign / addsign: Bello et al. (2017), with the linear decay f(t) = 1 - t/T on sign(g)sign(m).
- rso: no gradient step at all; a Gaussian perturbation scaled by each tensor's std, kept only
  when the loss improves (Tripathi & Singh, 2020, "RSO"; a (1+1)-ES).

NOS's published final optimizers (Morgan & Hougen, 2024; their TensorFlow finalOptimizers.py in
OUStudent/NeuralOptimizerSearch), re-derived from the equations, with `use_decay` on. Notation:
m = bias-corrected EMA of g (beta .9), qh = 0.3 g + 0.7 m, tau = t / T, t counted from 0, and
W(tau) = `warmup_hold_cosine`, their lr_warmup_cosine_decay: linear warm-up from 0 over T/15
steps, hold 2T/15, cosine to 0 (the fractions of their usage example, 6400 / 12800 of 96000).
Every one of them is a plain update w <- w - lr W(tau) [E(tau)] u, where E = `nos_evolved_lr0` =
erfc(erfc(cosine_up)) / (1 - tanh^2(a8)), a8 = 0.5 (1 - cos(pi ((2t mod T) / T))).
- nos_opt5: u = qh / clip(2, -c, c), c = |exp(m)|; lr W E.
- nos_opt6: u = qh / |d(tau) exp(1e-4 w)|, d = 1 - tanh^2(cosine_up); lr W E.
- nos_opt7: u = tanh(a(tau) asinh(qh)), a = max(a6, a10), a6 = 0.5 (1 - cos(2 pi tau)),
  a10 = (2t mod T) / T; lr W (no evolved decay).
- nos_adamclip: their AdamClip variant 0, u = clip(m, -s, s), s = sqrt(v99) + 1e-7 with v99 the
  bias-corrected EMA of g^2, beta .99; lr W.
Where nos's ops differ from their TensorFlow ones, by design or by a missing constant:
- division is nos's `div`, x / (y + 1e-8): their plain division has no epsilon. The denominators
  here are min(2, exp(m)) and d exp(1e-4 w) >= 0.42 exp(1e-4 w), so the relative difference is
  about 1e-8.
- nos_adamclip clips to +-sqrt(v99), without their + 1e-7: the search space has no constant
  1e-7 operand. The two agree to a relative 1e-7 / sqrt(v99), i.e. wherever |g| >> 1e-7.
- their step 0 has lr 0 (W(0) = 0), as here: the first step only fills the moments.
Champions of nos's own runs (README "Results"), so that anyone can export and run them:
- discovered_erf_sign: the champion of the default run (README: #32) and of both runs of the
  task-mix experiment: u = erf(d(tau) dropout30(sign(g))), d = mean(linear_up, linear_restart),
  Nesterov, cosine lr, clip 1 (no effect on a sign update). It is the initial genome of slot
  `init:3` of every search with run seed 0, `random_genome(random.Random("0:init:3"))` (tested):
  exactly the stored genome, regenerated.
- discovered_sign_interp: `scale-ga`'s champion (README: #2825), u = sign(0.95 g + 0.05 dropout30(g)),
  Nesterov, warmup-cosine lr.
- discovered_lion_interp: `scale-random`'s champion (README: #4200), u = 0.95 lion_mix + 0.05 sign(m),
  plain update, warmup-cosine lr.
  These two are rebuilt from the formulas the README printed (sympy's simplified update, update
  type and lr schedule): the same update rule, but the stored genomes (their database is not in the
  repository) may differ in parts the printed formula does not show (an inert clip, node order).
Their other final optimizers, not builtins here: Opt8 is Opt7 with an outer asinh instead of tanh,
and Opt1 / Opt2 (qh plus a softsign term in 1e-5 w shaped by 0.95 v99 -+ 0.05 g^2) can be built
from v99, `interp`, `neg`, `clip` / `div_sqrt` and `softsign` in 6 / 5 nodes; Opt3 needs a
0.99 / 0.01 mix of v and g^3 (`interp` is 0.95 / 0.05), Opt4 atan of a Demon-like decay with beta
0.95 over (t + 1) / T, Opt9-10 a momentum schedule 0.95 -> 0.85 -> 0.95 (nos's is a fixed 0.9).
"""

from __future__ import annotations

from typing import Any

from .genome import Genome, from_json

# NOS's lr for Opt5 / Opt6: the warm-up-hold-cosine base times their evolved decay
_NOS_EVOLVED_LR = {"op": "mul", "args": ["warmup_hold_cosine", "nos_evolved_lr0"]}

BUILTIN_JSON: dict[str, dict[str, Any]] = {
    "sgd": {"nodes": [{"op": "mul", "in": ["g", "one"]}]},
    "momentum": {"nodes": [{"op": "mul", "in": ["g", "one"]}], "update": "momentum"},
    "nesterov": {"nodes": [{"op": "mul", "in": ["g", "one"]}], "update": "nesterov"},
    "adam": {"nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["m", "n0"]}]},
    "adam_clip": {
        "nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["m", "n0"]}],
        "clip": 1.0,
    },
    "rmsprop": {"nodes": [{"op": "sqrt_abs", "in": ["v"]}, {"op": "div", "in": ["g", "n0"]}]},
    "lion": {"nodes": [{"op": "sign", "in": ["lion_mix"]}]},
    "powersign": {
        "nodes": [
            {"op": "mul", "in": ["sign_g", "sign_m"]},
            {"op": "exp", "in": ["n0"], "decay": ["linear_down"]},
            {"op": "mul", "in": ["n1", "g"]},
        ]
    },
    "addsign": {
        "nodes": [
            {"op": "mul", "in": ["sign_g", "sign_m"]},
            {"op": "add", "in": ["one", "n0"], "decay": [None, "linear_down"]},
            {"op": "mul", "in": ["n1", "g"]},
        ]
    },
    "rso": {
        "nodes": [{"op": "mul", "in": ["zero", "one"]}],
        "noise": {"sigma": 1.0, "decay": "linear_down", "scale": "layer_std", "accept": "if_better"},
    },
    # NOS's published final optimizers (see the module docstring)
    "nos_opt5": {
        "nodes": [
            {"op": "exp", "in": ["m"]},
            {"op": "clip", "in": ["two", "n0"]},  # clip(2, -|exp(m)|, |exp(m)|)
            {"op": "div", "in": ["qh_gm", "n1"]},
        ],
        "lr": {"schedule": "constant", "decay": _NOS_EVOLVED_LR},
    },
    "nos_opt6": {
        "nodes": [
            {"op": "exp", "in": ["w_1e4"]},
            {"op": "abs", "in": ["n0"], "decay": [{"op": "sech2", "args": ["cosine_up"]}]},
            {"op": "div", "in": ["qh_gm", "n1"]},
        ],
        "lr": {"schedule": "constant", "decay": _NOS_EVOLVED_LR},
    },
    "nos_opt7": {
        "nodes": [
            {"op": "asinh", "in": ["qh_gm"]},
            {"op": "tanh", "in": ["n0"], "decay": [{"op": "max", "args": ["cyclic_cosine_up1", "linear_restart_up2"]}]},
        ],
        "lr": {"schedule": "constant", "decay": "warmup_hold_cosine"},
    },
    "nos_adamclip": {
        "nodes": [{"op": "sqrt_abs", "in": ["v99"]}, {"op": "clip", "in": ["m", "n0"]}],
        "lr": {"schedule": "constant", "decay": "warmup_hold_cosine"},
    },
    # champions of nos's runs (see the module docstring)
    "discovered_erf_sign": {
        "nodes": [
            {"op": "dropout30", "in": ["sign_g"]},
            {"op": "erf", "in": ["n0"], "decay": [{"op": "mean", "args": ["linear_restart", "linear_up"]}]},
        ],
        "update": "nesterov",
        "clip": 1.0,
        "lr": {"schedule": "cosine"},
    },
    "discovered_sign_interp": {
        "nodes": [{"op": "dropout30", "in": ["g"]}, {"op": "interp", "in": ["g", "n0"]}, {"op": "sign", "in": ["n1"]}],
        "update": "nesterov",
        "lr": {"schedule": "warmup_cosine"},
    },
    "discovered_lion_interp": {
        "nodes": [{"op": "interp", "in": ["lion_mix", "sign_m"]}],
        "lr": {"schedule": "warmup_cosine"},
    },
}
# Note: a single-operand update still needs a node; `mul(g, one)` is g (sympy folds the 1).

BUILTINS: tuple[str, ...] = tuple(BUILTIN_JSON)


def builtin_title(name: str) -> str:
    """One line saying what the builtin `name` is (the title of its exported file)."""
    if name.startswith("discovered_"):
        return f"{name}, an optimizer discovered by nos (see search_space/builtins.py)"
    if name.startswith("nos_"):
        return f"{name}, NOS's published optimizer (Morgan & Hougen, 2024) written as a nos genome"
    return f"{name}, a classic optimizer written as a nos genome"


def builtin(name: str) -> Genome:
    try:
        return from_json(BUILTIN_JSON[name])
    except KeyError:
        raise KeyError(f"unknown builtin {name!r} (choose from {', '.join(BUILTINS)})") from None
