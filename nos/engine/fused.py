"""The interpreter's update step compiled into one pass per candidate (numba): the fused update.

Why: the eager interpreter (`BatchedOptimizer.direction`) spends one or more torch calls per op
group per slot -- gather the inputs, scale by the edge decay, apply the op, scatter the rows back
into a zeroed buffer -- each streaming [C, P] tensors through memory. A random genome's update
then cost more than the task's whole forward + backward. Here one compiled call walks each
candidate's *live* nodes (those the root depends on; the eager path computes dead ones too, which
changes nothing) in slot order, each a tight loop over its P parameters on a scratch that stays
in cache, after the global gradient clip and the moments the candidate reads, and before the
momentum buffer and the lr, all in the same call. The compiled code is one generic kernel, not
code generated per genome: there is nothing to compile per batch, and numba caches the kernel on
disk after its first build (about 10 s, once per machine). The noise rule
(`BatchedOptimizer.perturbation`) and the noise operand's numbers have kernels of their own.

The eager path is the reference and the fallback: CUDA, float64, no numba, an op the kernel does
not know, or `NOS_UPDATE=eager`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from search_space.genome import MAX_NODES, Genome, node_index
from search_space.operands import OPERANDS
from search_space.ops import OPS

from .threads import run_rows

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
UPDATES = ("fused", "eager")

# the kernel's codes (`_update_numba` holds the same tuples; importing it would import numba)
_UNARY = ("neg", "log_abs", "sqrt_abs", "exp", "abs", "sigmoid", "inv_1p_abs", "softplus", "erf", "erfc",
          "asinh", "tanh", "atan", "reciprocal", "bessel_i1e", "relu", "min0", "softsign", "sign")
_SPECIAL = ("dropout50", "dropout30", "dropout10", "clip_by_norm", "ema", "delta", "running_max")
_BINARY = ("add", "sub", "mul", "max", "min", "div", "div_sqrt", "clip", "interp", "pow_abs")
OP_CODES = {name: i for i, name in enumerate(_UNARY + _SPECIAL + _BINARY)}
OPERAND_CODES = {name: i for i, name in enumerate((
    "g", "g2", "g3", "m", "v", "y", "one", "two", "zero", "w_1e6", "w_1e5", "w_1e4", "w_1e3",
    "sign_g", "sign_m", "qh_gm", "qh_g2v", "aggmo", "lion_mix", "noise", "v99"))}
UPDATE_KINDS = {"plain": 0, "momentum": 1, "nesterov": 2}
_STATEFUL = frozenset(name for name, op in OPS.items() if op.stateful)
_MOMENT_BITS = {"m": 1, "v": 2, "y": 4, "m99": 8, "v99": 16}  # the kernel's MOMENT_NAMES order
_EMPTY = np.zeros((1, 1), np.float32)  # stands for an input the batch does not use


def default_update() -> str:
    """The update path the interpreter takes unless told: `NOS_UPDATE` (fused | eager), else fused
    when numba is importable."""
    choice = os.environ.get("NOS_UPDATE", "fused")
    if choice not in UPDATES:
        raise ValueError(f"NOS_UPDATE must be one of {', '.join(UPDATES)}, got {choice!r}")
    return choice if HAVE_NUMBA else "eager"


def supports(genomes: Sequence[Genome], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused update can take this batch (CPU float32, every op and operand known)."""
    if not HAVE_NUMBA or device.type != "cpu" or dtype != torch.float32:
        return False
    return all(n.op in OP_CODES and all(r in OPERAND_CODES or node_index(r) is not None for r in n.inputs)
               and g.update in UPDATE_KINDS for g in genomes for n in g.nodes)


@dataclass(frozen=True)
class _Tables:
    """One genome's rows of the kernel's tables (see FusedUpdate)."""

    ops: np.ndarray  # [S]
    refs: np.ndarray  # [S, 2]
    node_idx: np.ndarray  # [S]
    need: int  # the moment bits
    decayed: list[tuple[int, int]]  # (slot, input) with an edge decay
    stateful: list[int]  # slots of stateful nodes, in order
    operands: set[str]


def _tables(g: Genome) -> _Tables:
    S = MAX_NODES
    first = S - len(g.nodes)
    ops, refs, node_idx = np.full(S, -1, np.int32), np.zeros((S, 2), np.int32), np.zeros(S, np.int32)
    decayed, stateful, operands = [], [], set()
    for i in g.reachable():
        node, s = g.nodes[i], first + i
        ops[s], node_idx[s] = OP_CODES[node.op], i
        if node.op in _STATEFUL:
            stateful.append(s)
        for j, ref in enumerate(node.inputs):
            k = node_index(ref)
            if k is None:
                operands.add(ref)
                refs[s, j] = S + OPERAND_CODES[ref]
            else:
                refs[s, j] = first + k
            if node.decays[j] is not None:
                decayed.append((s, j))
    need = 0
    for name in operands:
        for moment in OPERANDS[name].needs - {"noise"}:
            need |= _MOMENT_BITS[moment]
    return _Tables(ops, refs, node_idx, need, decayed, stateful, operands)


class FusedUpdate:
    """The live update graphs of C genomes as small integer tables, plus the stateful nodes' state.

    Slot s of candidate c holds node s - first[c] (genomes are right-aligned, the root in the last
    slot, as in the interpreter), so an input that is node k sits in slot first[c] + k."""

    def __init__(self, genomes: Sequence[Genome], edge_keys: Sequence[tuple[int, int]], n_params: int) -> None:
        C, S = len(genomes), MAX_NODES
        self.ops = np.full((C, S), -1, np.int32)
        self.refs = np.zeros((C, S, 2), np.int32)
        self.edges = np.full((C, S, 2), -1, np.int32)
        self.state_rows = np.full((C, S), -1, np.int32)
        self.node_idx = np.zeros((C, S), np.int32)
        self.kinds = np.array([UPDATE_KINDS[g.update] for g in genomes], np.int32)
        self.need = np.zeros(C, np.int32)
        row_of_edge = {key: k for k, key in enumerate(edge_keys)}
        tables: dict[int, _Tables] = {}  # by id: a batch repeats genome objects (one per lr, sign, seed)
        operands: set[str] = set()
        n_state = 0
        for c, g in enumerate(genomes):
            t = tables.get(id(g))
            if t is None:
                t = tables[id(g)] = _tables(g)
                operands |= t.operands
            self.ops[c], self.refs[c], self.node_idx[c], self.need[c] = t.ops, t.refs, t.node_idx, t.need
            for s, j in t.decayed:
                self.edges[c, s, j] = row_of_edge[(s, j)]
            for s in t.stateful:
                self.state_rows[c, s] = n_state
                n_state += 1
        #: operands the live nodes read, and the moments those need (the eager path's sets cover
        #: dead nodes too)
        self.operands = operands
        self.moments = set().union(*(OPERANDS[o].needs for o in operands)) - {"noise"}
        self.n_params = n_params
        self.node_state = np.zeros((max(n_state, 1), n_params if n_state else 1), np.float32)

    def select(self, keep: torch.Tensor, genomes: Sequence[Genome], edge_keys: Sequence[tuple[int, int]]) -> FusedUpdate:
        """The rows `keep` (a long tensor), with their stateful nodes' state carried along."""
        idx = keep.cpu().numpy()
        new = FusedUpdate(genomes, edge_keys, self.n_params)
        old_rows = self.state_rows[idx]
        old_rows = old_rows[old_rows >= 0]  # in (candidate, slot) order, as the new table's rows
        if old_rows.size:
            new.node_state = self.node_state[old_rows].copy()
        return new

    def direction(self, grad: torch.Tensor, theta: torch.Tensor, state: dict[str, torch.Tensor],
                  noise: torch.Tensor | None, decays: torch.Tensor | None, lr: torch.Tensor, clip: torch.Tensor,
                  seeds: torch.Tensor, step: int, seg_ids: torch.Tensor, n_seg: int,
                  needs_buffer: bool) -> torch.Tensor:
        """lr_t * sign * D(u_t) for every candidate, as `BatchedOptimizer.direction` returns it, from
        the raw gradient (the global clip and the moments are done here too).

        state: the moments' EMAs and the momentum buffer ("buf"), [C, P] each, created on step 0
        and updated in place; noise: the noise operand's [C, P] (or None); decays: [K, C] edge
        decays at this step, rows in `edge_keys` order; lr, clip: [C] (clip inf: none)."""
        from ._update_numba import MOMENT_NAMES, rows  # compiled on first use, then cached on disk

        def arr(x: torch.Tensor | None) -> np.ndarray:
            return _EMPTY if x is None else x.detach().contiguous().numpy()

        if step == 0:
            for key in self.moments | ({"buf"} if needs_buffer else set()):
                state[key] = torch.zeros_like(theta)
        out = torch.empty_like(theta)
        before = (self.ops, self.refs, self.edges, self.state_rows, self.node_idx, self.need, arr(decays),
                  arr(grad), arr(theta), clip.numpy(), *(arr(state.get(k)) for k in MOMENT_NAMES),
                  arr(noise), self.node_state, seeds.numpy(), step, seg_ids.numpy(), n_seg,
                  lr.contiguous().numpy(), self.kinds, needs_buffer, arr(state.get("buf")))
        run_rows(rows, out.shape[0], before, (out.numpy(),))
        return out


def perturbation(theta: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor, step: int, stream: int,
                 sigma: torch.Tensor, layer_std: torch.Tensor, bounds: torch.Tensor,
                 trial_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`BatchedOptimizer.perturbation` in one compiled pass over the perturbed `rows`: sigma [C] at
    this step, layer_std [C] bool (scale by each tensor's std), bounds [n_seg, 2] int64 (each
    tensor's [start, end) in the flat parameters). Returns the [C, P] delta (zeros in the rows not
    perturbed); with `trial_rows`, `BatchedOptimizer.perturb_`: the noise is added to theta in
    place, except in `trial_rows`, whose noisy copies are returned ([len(trial_rows), P])."""
    from ._update_numba import perturb

    C = theta.shape[0]
    th = theta.detach().contiguous()
    if trial_rows is None:
        dest, add = torch.arange(C), False
        out = torch.zeros_like(th)
    else:
        assert th.data_ptr() == theta.data_ptr(), "perturb_ needs a contiguous theta"
        dest, add = torch.full((C,), -1, dtype=torch.long), True
        dest[trial_rows] = torch.arange(trial_rows.numel())
        out = torch.empty(trial_rows.numel(), th.shape[1], dtype=th.dtype)
    before = (th.numpy(), rows.numpy(), seeds.numpy(), step, stream, sigma.contiguous().numpy(),
              layer_std.contiguous().numpy(), bounds.numpy(), dest.numpy(), add)
    run_rows(perturb, rows.numel(), before, (out.numpy(),))
    return out


def normals(rows: torch.Tensor, seeds: torch.Tensor, step: int, stream: int, std: float, C: int,
            P: int) -> torch.Tensor:
    """`BatchedOptimizer._normal_rows` compiled: std * `rng_normal` in the given rows of a [C, P]
    float32 tensor, zeros elsewhere."""
    from ._update_numba import normals as kernel

    out = torch.zeros(C, P, dtype=torch.float32)
    run_rows(kernel, rows.numel(), (rows.numpy(), seeds.numpy(), step, stream, np.float32(std)), (out.numpy(),))
    return out


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(x).all(dim=1) of a [C, P] tensor; compiled where the fused update runs (the
    trainer asks it of every step's gradient, and torch's isfinite makes four passes over it)."""
    if not (HAVE_NUMBA and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2):
        return torch.isfinite(x).all(dim=1)
    from ._update_numba import finite_rows as kernel

    out = torch.empty(x.shape[0], dtype=torch.bool)
    run_rows(kernel, x.shape[0], (x.detach().contiguous().numpy(),), (out.numpy(),))
    return out
