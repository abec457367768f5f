"""Learning-rate schedules: a base shape times an evolvable decay (NOS's joint lr search).

`lr_schedule` is plain `math` code; the exporter copies it into the optimizer file.
"""

from __future__ import annotations

import math

import sympy as sp

from . import decay as decay_mod
from .decay import TAU
from .genome import LRSchedule

WARMUP_FRACTION = 0.05


def lr_schedule(name, t, total):
    """Multiplier of the base lr at step t (0-based) of `total` steps."""
    tau = t / total
    warm = min(1.0, (t + 1) / max(1.0, math.ceil(0.05 * total)))
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * tau))
    if name == "linear":
        return 1.0 - tau
    if name == "warmup_cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * tau))
    if name == "warmup_constant":
        return warm
    raise KeyError(f"unknown lr schedule {name!r}")


def lr_values(lr: LRSchedule, total_steps: int) -> list[float]:
    """The full multiplier lr_schedule(t) * decay(t/T) for t = 0..T-1."""
    d = decay_mod.values(lr.decay, total_steps)
    return [lr_schedule(lr.schedule, t, total_steps) * d[t] for t in range(total_steps)]


_SYMPY_BASE = {
    "constant": sp.Integer(1),
    "cosine": (1 + sp.cos(sp.pi * TAU)) / 2,
    "linear": 1 - TAU,
    "warmup_cosine": sp.Function("warmup")(TAU) * (1 + sp.cos(sp.pi * TAU)) / 2,
    "warmup_constant": sp.Function("warmup")(TAU),
}


def lr_sympy(lr: LRSchedule) -> sp.Expr:
    return _SYMPY_BASE[lr.schedule] * decay_mod.to_sympy(lr.decay)
