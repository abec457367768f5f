"""Classic optimizers written as genomes -- no special-case code paths anywhere downstream.

- sgd / momentum / nesterov: torch.optim.SGD (momentum 0.9, dampening 0).
- adam: Kingma & Ba (2015), m / (sqrt(v) + 1e-8) with bias correction; equals torch.optim.Adam.
- adam_clip: Adam on the globally norm-clipped gradient (max norm 1), the strongest simple
  long-horizon baseline on the sine task (ANCHORS section 8).
- rmsprop: g / (sqrt(v) + eps) with v the bias-corrected EMA of g^2 (Tieleman & Hinton, 2012).
- lion: sign(0.1 g + 0.9 m_{t-1}), m an EMA of g with beta .99 (Chen et al., 2023).
- powersign / addsign: Bello et al. (2017), with the linear decay f(t) = 1 - t/T on sign(g)sign(m).
- rso: no gradient step at all; a Gaussian perturbation scaled by each tensor's std, kept only
  when the loss improves (Tripathi & Singh, 2020, "RSO"; a (1+1)-ES).
"""

from __future__ import annotations

from typing import Any

from .genome import Genome, from_json

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
}
# Note: a single-operand update still needs a node; `mul(g, one)` is g (sympy folds the 1).

BUILTINS: tuple[str, ...] = tuple(BUILTIN_JSON)


def builtin(name: str) -> Genome:
    try:
        return from_json(BUILTIN_JSON[name])
    except KeyError:
        raise KeyError(f"unknown builtin {name!r} (choose from {', '.join(BUILTINS)})") from None
