"""The genome: an optimizer as plain JSON.

```json
{
  "nodes": [
    {"op": "sqrt_abs", "in": ["v"]},
    {"op": "div", "in": ["m", "n0"], "decay": [null, "cosine_down"]}
  ],
  "update": "plain",            // plain | momentum | nesterov  (momentum 0.9, torch.optim.SGD's rule)
  "sign": 1,                    // +1 or -1: the integrity check may flip the update's sign
  "clip": null,                 // global gradient-norm clip applied to g before anything else
  "lr": {"schedule": "constant", "decay": null},
  "noise": {"sigma": 0.0, "decay": null, "scale": "absolute", "accept": "always"}
}
```

The update graph is a DAG in topological order: node inputs are operand names or `"n<i>"` for an
earlier node i; the last node is the root, u_t. Each input edge may carry a decay that multiplies
the value flowing along it. The step applied to the weights is

    w <- w - lr * lr_schedule(t/T) * lr_decay(t/T) * sign * D(u_t)

where D is the update type (plain: u; momentum: b = 0.9 b + u; Nesterov: u + 0.9 b), followed by
the noise rule (new in nos): w <- w + sigma * noise_decay(t/T) * s * eps, eps ~ N(0, 1), with
s = 1 (`absolute`) or the std of each parameter tensor (`layer_std`); with `accept: if_better`
the perturbation is kept only if the loss improves on the loss before the step (RSO, Tripathi &
Singh 2020; a (1+1)-ES); `sigma: 0` switches the noise off.

Loading validates every name against a whitelist and every number's type and range; nothing in
the JSON is ever evaluated.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from . import decay as decay_mod
from .decay import Decay, short_repr
from .operands import OPERANDS
from .ops import OPS

MAX_NODES = 6  # at most 5 hidden nodes plus the root (NOS)
UPDATE_TYPES = ("plain", "momentum", "nesterov")
MOMENTUM = 0.9
LR_SCHEDULES = ("constant", "cosine", "linear", "warmup_cosine", "warmup_constant")
NOISE_SCALES = ("absolute", "layer_std")
NOISE_ACCEPT = ("always", "if_better")
SIGMA_MAX = 1.0
MAX_JSON_BYTES = 100_000
_NODE_REF = re.compile(r"n([0-9])")  # ASCII only: \d would also match "n٠"


class GenomeError(ValueError):
    """Malformed genome: the message is one line that says where and what."""


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    decays: tuple[Decay | None, ...]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "in": list(self.inputs)}
        if any(d is not None for d in self.decays):
            out["decay"] = list(self.decays)
        return out


@dataclass(frozen=True)
class LRSchedule:
    schedule: str = "constant"
    decay: Decay | None = None


@dataclass(frozen=True)
class Noise:
    sigma: float = 0.0
    decay: Decay | None = None
    scale: str = "absolute"
    accept: str = "always"

    @property
    def active(self) -> bool:
        return self.sigma > 0.0


@dataclass(frozen=True)
class Genome:
    nodes: tuple[Node, ...]
    update: str = "plain"
    sign: int = 1
    clip: float | None = None
    lr: LRSchedule = field(default_factory=LRSchedule)
    noise: Noise = field(default_factory=Noise)

    # -- structure
    @property
    def root(self) -> int:
        return len(self.nodes) - 1

    def reachable(self) -> list[int]:
        """Indices of nodes the root depends on, in topological order."""
        seen: set[int] = set()
        stack = [self.root]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(k for r in self.nodes[i].inputs if (k := node_index(r)) is not None)
        return sorted(seen)

    def operands_used(self) -> set[str]:
        return {r for i in self.reachable() for r in self.nodes[i].inputs if r in OPERANDS}

    def uses_gradient(self) -> bool:
        return any(OPERANDS[o].uses_grad for o in self.operands_used())

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "update": self.update,
            "sign": self.sign,
            "clip": self.clip,
            "lr": {"schedule": self.lr.schedule, "decay": self.lr.decay},
            "noise": {
                "sigma": self.noise.sigma,
                "decay": self.noise.decay,
                "scale": self.noise.scale,
                "accept": self.noise.accept,
            },
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def with_(self, **changes: Any) -> Genome:
        return replace(self, **changes)


def node_index(ref: str) -> int | None:
    m = _NODE_REF.fullmatch(ref)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# loading and validation


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise GenomeError(msg)


def _number(x: Any, where: str, lo: float, hi: float) -> float:
    _expect(isinstance(x, (int, float)) and not isinstance(x, bool), f"{where}: expected a number")
    try:
        v = float(x)
    except OverflowError:
        raise GenomeError(f"{where}: number too large") from None
    _expect(math.isfinite(v) and lo <= v <= hi, f"{where}: {v!r} is outside [{lo}, {hi}]")
    return v


def _choice(x: Any, options: tuple[str, ...], where: str) -> str:
    _expect(isinstance(x, str) and x in options, f"{where}: {short_repr(x)} is not one of {', '.join(options)}")
    return x


def _decay(x: Any, where: str) -> Decay | None:
    if x is None:
        return None
    try:
        decay_mod.validate_decay(x, where=where)
    except decay_mod.DecayError as e:
        raise GenomeError(str(e)) from None
    _expect(decay_mod.is_valid(x), f"{where}: {decay_mod.describe(x)} leaves [0, 1]")
    return x


def _keys(obj: Any, allowed: set[str], required: set[str], where: str) -> dict[str, Any]:
    _expect(isinstance(obj, dict), f"{where}: expected an object")
    unknown = set(obj) - allowed
    shown = sorted(short_repr(k) for k in unknown)
    more = f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""
    _expect(not unknown, f"{where}: unknown key(s) {', '.join(shown[:5])}{more}")
    missing = required - set(obj)
    _expect(not missing, f"{where}: missing key(s) {', '.join(sorted(missing))}")
    return obj


def from_json(obj: Any) -> Genome:
    """Build a genome from parsed JSON, validating names, structure and numbers."""
    obj = _keys(obj, {"nodes", "update", "sign", "clip", "lr", "noise"}, {"nodes"}, "genome")
    raw_nodes = obj["nodes"]
    _expect(isinstance(raw_nodes, list) and bool(raw_nodes), "genome.nodes: expected a non-empty list")
    _expect(len(raw_nodes) <= MAX_NODES, f"genome.nodes: at most {MAX_NODES} nodes")
    nodes = []
    for i, rn in enumerate(raw_nodes):
        where = f"genome.nodes[{i}]"
        rn = _keys(rn, {"op", "in", "decay"}, {"op", "in"}, where)
        op = rn["op"]
        _expect(isinstance(op, str) and op in OPS, f"{where}.op: unknown operation {short_repr(op)}")
        arity = OPS[op].arity
        ins = rn["in"]
        _expect(isinstance(ins, list) and len(ins) == arity, f"{where}.in: {op} takes {arity} input(s)")
        for j, ref in enumerate(ins):
            _expect(isinstance(ref, str), f"{where}.in[{j}]: expected a name")
            k = node_index(ref)
            if k is None:
                _expect(ref in OPERANDS, f"{where}.in[{j}]: unknown operand {short_repr(ref)}")
            else:
                _expect(k < i, f"{where}.in[{j}]: {short_repr(ref)} is not an earlier node (graph must be acyclic)")
        decays = rn.get("decay", [None] * arity)
        _expect(isinstance(decays, list) and len(decays) == arity, f"{where}.decay: expected {arity} entries")
        nodes.append(
            Node(op, tuple(ins), tuple(_decay(d, f"{where}.decay[{j}]") for j, d in enumerate(decays)))
        )
    update = _choice(obj.get("update", "plain"), UPDATE_TYPES, "genome.update")
    sign = obj.get("sign", 1)
    _expect(sign in (1, -1) and not isinstance(sign, bool), "genome.sign: expected 1 or -1")
    clip = obj.get("clip")
    if clip is not None:
        clip = _number(clip, "genome.clip", 1e-6, 1e6)
    lr_obj = _keys(obj.get("lr", {}), {"schedule", "decay"}, set(), "genome.lr")
    lr = LRSchedule(
        _choice(lr_obj.get("schedule", "constant"), LR_SCHEDULES, "genome.lr.schedule"),
        _decay(lr_obj.get("decay"), "genome.lr.decay"),
    )
    nz = _keys(obj.get("noise", {}), {"sigma", "decay", "scale", "accept"}, set(), "genome.noise")
    noise = Noise(
        _number(nz.get("sigma", 0.0), "genome.noise.sigma", 0.0, SIGMA_MAX),
        _decay(nz.get("decay"), "genome.noise.decay"),
        _choice(nz.get("scale", "absolute"), NOISE_SCALES, "genome.noise.scale"),
        _choice(nz.get("accept", "always"), NOISE_ACCEPT, "genome.noise.accept"),
    )
    return Genome(tuple(nodes), update, int(sign), clip, lr, noise)


def read_file(path: str | os.PathLike[str]) -> Genome:
    """The genome in the JSON file `path`; a GenomeError (one line naming the file) when it cannot
    be read, is larger than MAX_JSON_BYTES or is not a valid genome. Only a regular file is read
    (never a directory, a device or a FIFO), and never more than MAX_JSON_BYTES + 1 bytes of it."""
    name = os.fspath(path)
    try:
        if os.path.exists(name) and not os.path.isfile(name):
            raise GenomeError(f"cannot read {name}: not a regular file")
        with open(name, "rb") as fh:
            text = fh.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise GenomeError(f"cannot read {name}: {e.strerror or e}") from None
    if len(text) > MAX_JSON_BYTES:
        raise GenomeError(f"{name}: a genome file is at most {MAX_JSON_BYTES:,} bytes")
    try:
        return loads(text)
    except GenomeError as e:
        raise GenomeError(f"{name}: {e}") from None


def loads(text: str | bytes) -> Genome:
    """Parse genome JSON text; any problem is a GenomeError with one clear line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise GenomeError("genome: not UTF-8 text") from None
    _expect(len(text) <= MAX_JSON_BYTES, f"genome: larger than {MAX_JSON_BYTES} bytes")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise GenomeError(f"genome: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise GenomeError(f"genome: invalid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise GenomeError("genome: JSON nested too deeply") from None
    return from_json(obj)


def _reject_constant(name: str) -> Any:
    raise GenomeError(f"genome: {name} is not a valid number")


def prune(g: Genome) -> Genome:
    """Drop nodes the root does not depend on and renumber the rest (same function)."""
    keep = g.reachable()
    if len(keep) == len(g.nodes):
        return g
    new_index = {old: new for new, old in enumerate(keep)}

    def remap(ref: str) -> str:
        k = node_index(ref)
        return ref if k is None else f"n{new_index[k]}"

    nodes = tuple(
        Node(g.nodes[i].op, tuple(remap(r) for r in g.nodes[i].inputs), g.nodes[i].decays) for i in keep
    )
    return g.with_(nodes=nodes)


def check_valid(g: Genome) -> None:
    """Raise GenomeError unless the genome is within limits and every decay stays in [0, 1]."""
    _expect(1 <= len(g.nodes) <= MAX_NODES, f"genome: {len(g.nodes)} nodes (1..{MAX_NODES} allowed)")
    for i, n in enumerate(g.nodes):
        for j, ref in enumerate(n.inputs):
            k = node_index(ref)
            _expect(ref in OPERANDS or (k is not None and k < i), f"genome.nodes[{i}].in[{j}]: bad reference {short_repr(ref)}")
        for j, d in enumerate(n.decays):
            _expect(d is None or decay_mod.is_valid(d), f"genome.nodes[{i}].decay[{j}]: leaves [0, 1]")
    for where, d in (("lr.decay", g.lr.decay), ("noise.decay", g.noise.decay)):
        _expect(d is None or decay_mod.is_valid(d), f"genome.{where}: leaves [0, 1]")
