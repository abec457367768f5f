"""The batched interpreter: many genomes applied at once to parameters stacked on a candidate axis.

Parameters of C candidates live in one tensor theta[C, P]. A step evaluates every candidate's
update graph without a Python loop over candidates: genomes are right-aligned into MAX_NODES
slots (the root always in the last slot), and at each slot the candidates are *grouped by
operation* and by input source. Each group costs one indexed torch call, so the number of torch
calls per step is bounded by the size of the op and operand vocabularies, not by C.

Schedules (edge decays, lr, noise sigma) are tabulated once per batch as [C, T] tensors; a step
reads column t. Random operations use the counter-based generator in `rng.py`, keyed by each
candidate's seed, so a candidate gets the same numbers alone or in any batch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import torch

from search_space import decay as decay_mod
from search_space.genome import MAX_NODES, MOMENTUM, Genome, LRSchedule, node_index
from search_space.operands import OPERANDS, update_moments
from search_space.ops import OPS
from search_space.schedules import lr_values

from ..tasks.segments import Segments
from . import fused
from .rng import STREAM_DROPOUT, STREAM_NOISE_OPERAND, STREAM_PERTURBATION, rng_normal, rng_uniform


def segment_norm(x: torch.Tensor, seg_ids: torch.Tensor, n_seg: int) -> torch.Tensor:
    """L2 norm of each row's segments, broadcast back to x's shape."""
    sq = torch.zeros(x.shape[0], n_seg, dtype=x.dtype, device=x.device).index_add_(1, seg_ids, x * x)
    return torch.sqrt(sq)[:, seg_ids]


def segment_std(x: torch.Tensor, seg_ids: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Population std (correction 0) of each row's segments, broadcast back to x's shape.
    Summed in float64 and rounded once, as the fused kernel does: float32 sums of squares
    overflow for a diverging candidate (|theta| ~ 1e18) whose std is still a float32."""
    x64 = x.double()
    counts = torch.bincount(seg_ids, minlength=n_seg).double()
    zeros = torch.zeros(x.shape[0], n_seg, dtype=torch.float64, device=x.device)
    mean = zeros.index_add(1, seg_ids, x64) / counts
    dev = x64 - mean[:, seg_ids]
    var = zeros.index_add(1, seg_ids, dev * dev) / counts
    return torch.sqrt(var).to(x.dtype)[:, seg_ids]


@lru_cache(maxsize=4096)
def _decay_values(key: str, total_steps: int) -> tuple[float, ...]:
    return tuple(decay_mod.values(json.loads(key), total_steps))


def decay_values(d: decay_mod.Decay | None, total_steps: int) -> tuple[float, ...]:
    """Memoised `decay.values`: a batch holds many copies of the same few curves."""
    return _decay_values(json.dumps(d, sort_keys=True), total_steps)


@lru_cache(maxsize=4096)
def _lr_values(schedule: str, key: str, total_steps: int) -> tuple[float, ...]:
    return tuple(lr_values(LRSchedule(schedule, json.loads(key)), total_steps))


def _slot_of(genome: Genome, node: int) -> int:
    return MAX_NODES - len(genome.nodes) + node


def _ref_key(genome: Genome, ref: str) -> str | int:
    k = node_index(ref)
    return ref if k is None else _slot_of(genome, k)


class BatchedOptimizer:
    """Compiled update rules of C genomes; `direction` and `perturbation` make one step."""

    def __init__(
        self,
        genomes: Sequence[Genome],
        lrs: Sequence[float],
        total_steps: Sequence[int],
        seeds: Sequence[int],
        segments: Segments,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        update: str | None = None,
    ) -> None:
        """`update`: "fused" (the compiled update of `nos.engine.fused`, where it can take the
        batch) or "eager" (torch op groups); by default `fused.default_update()`."""
        self.genomes = list(genomes)
        self.device = torch.device(device)
        self.dtype = dtype
        self.segments = segments
        self.seg_ids = segments.ids(self.device)
        self.index = torch.arange(segments.n_params, device=self.device)
        self.seeds = torch.tensor(list(seeds), dtype=torch.long, device=self.device)
        self.t = 0
        self.state: dict[str, torch.Tensor] = {}  # moments and the momentum buffer, [C, P] each
        self.node_state: dict[int, torch.Tensor] = {}  # slot -> [C, P] state of stateful ops
        self._compile_structure()
        self._compile_tables(list(lrs), list(total_steps))
        self.update = update if update is not None else fused.default_update()
        self._compile_fused()

    @property
    def C(self) -> int:
        return len(self.genomes)

    # ------------------------------------------------------------------ compilation
    def _rows(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _mask(self, flags: list[bool]) -> torch.Tensor:
        return torch.tensor(flags, dtype=torch.bool, device=self.device)

    def _compile_structure(self) -> None:
        """Group candidates by op and by input source at every slot (cheap, pure Python)."""
        C, gs = self.C, self.genomes
        first = [_slot_of(g, 0) for g in gs]
        # every node is evaluated (dead ones too: slots are computed for all rows), so every
        # node's operands are needed
        self.operands = sorted({r for g in gs for n in g.nodes for r in n.inputs if r in OPERANDS})
        self.moments = set().union(*(OPERANDS[o].needs for o in self.operands)) - {"noise"}
        self.slots: list[tuple | None] = []
        for s in range(MAX_NODES):
            members = [c for c in range(C) if first[c] <= s]
            if not members:
                self.slots.append(None)
                continue
            ops: dict[str, list[int]] = defaultdict(list)
            sources: list[dict[str | int, list[int]]] = [defaultdict(list), defaultdict(list)]
            for c in members:
                node = gs[c].nodes[s - first[c]]
                ops[node.op].append(c)
                for j, ref in enumerate(node.inputs):
                    sources[j][_ref_key(gs[c], ref)].append(c)
            args = [[(k, self._rows(v), len(v) == C) for k, v in src.items()] for src in sources if src]
            groups = [(OPS[op], self._rows(rows), len(rows) == C) for op, rows in ops.items()]
            self.slots.append((groups, args, self._rows([s - f for f in first])))
        self.update_types = {k: self._mask([g.update == k for g in gs])[:, None] for k in ("plain", "momentum")}
        self.needs_buffer = any(g.update != "plain" for g in gs)
        self.any_clip = any(g.clip is not None for g in gs)
        self.any_noise = any(g.noise.active for g in gs)
        self.perturbed_rows = self._rows([c for c, g in enumerate(gs) if g.noise.active])
        self.noise_rows = self._rows([c for c, g in enumerate(gs) if "noise" in g.operands_used()])
        self.layer_std = self._mask([g.noise.scale == "layer_std" for g in gs])[:, None]
        self.if_better = self._mask([g.noise.active and g.noise.accept == "if_better" for g in gs])
        self.if_better_rows = torch.nonzero(self.if_better).squeeze(1)
        self.any_if_better = bool(self.if_better.any())

    def _table(self, rows: Sequence[Sequence[float]], total_steps: list[int]) -> torch.Tensor:
        """[C, T_max] tensor; steps past a candidate's own T are 0 (it is frozen then)."""
        width = max(total_steps)
        padded = [list(r) + [0.0] * (width - len(r)) for r in rows]
        return torch.tensor(padded, dtype=self.dtype, device=self.device)

    def _compile_tables(self, lrs: list[float], total_steps: list[int]) -> None:
        """Tabulate every schedule over the run: lr, noise sigma, and each edge decay."""
        gs = self.genomes
        first = [_slot_of(g, 0) for g in gs]
        self.edge_tables: dict[tuple[int, int], torch.Tensor] = {}
        for s in range(MAX_NODES):
            for j in range(2):
                rows = [
                    decay_values(g.nodes[s - f].decays[j], T)
                    if f <= s and len(g.nodes[s - f].inputs) > j and g.nodes[s - f].decays[j] is not None
                    else None
                    for g, f, T in zip(gs, first, total_steps)
                ]
                if any(r is not None for r in rows):
                    filled = [r if r is not None else (1.0,) * T for r, T in zip(rows, total_steps)]
                    self.edge_tables[(s, j)] = self._table(filled, total_steps)
        lr_rows = [_lr_values(g.lr.schedule, json.dumps(g.lr.decay, sort_keys=True), T) for g, T in zip(gs, total_steps)]
        scale = torch.tensor([lr * g.sign for g, lr in zip(gs, lrs)], dtype=self.dtype, device=self.device)
        self.lr_table = self._table(lr_rows, total_steps) * scale[:, None]
        sig = [decay_values(g.noise.decay, T) if g.noise.active else (0.0,) * T for g, T in zip(gs, total_steps)]
        sigma0 = torch.tensor([g.noise.sigma for g in gs], dtype=self.dtype, device=self.device)
        self.sigma_table = self._table(sig, total_steps) * sigma0[:, None]
        clip = [g.clip if g.clip is not None else float("inf") for g in gs]
        self.clip = torch.tensor(clip, dtype=self.dtype, device=self.device)

    def _compile_fused(self, previous: fused.FusedUpdate | None = None, keep: torch.Tensor | None = None) -> None:
        """The fused update's tables (None when the batch takes the eager path)."""
        self.fused: fused.FusedUpdate | None = None
        if self.update != "fused" or not fused.supports(self.genomes, self.device, self.dtype):
            return
        self.edge_keys = sorted(self.edge_tables)
        self.edge_stack = torch.stack([self.edge_tables[k] for k in self.edge_keys]) if self.edge_keys else None
        self.seg_bounds = torch.tensor(self.segments.bounds, dtype=torch.long).reshape(-1, 2)
        if previous is not None and keep is not None:
            self.fused = previous.select(keep, self.genomes, self.edge_keys)
        else:
            self.fused = fused.FusedUpdate(self.genomes, self.edge_keys, self.segments.n_params)

    # ------------------------------------------------------------------ stepping
    def _operand_values(self, g: torch.Tensor, w: torch.Tensor) -> dict[str | int, torch.Tensor]:
        s = update_moments(self.state, g, self.t + 1, self.moments)
        if "noise" in self.operands:
            s["noise"] = self._normal_rows(self.noise_rows, STREAM_NOISE_OPERAND, 0.01)
        return {name: OPERANDS[name].fn(g, w, s) for name in self.operands}

    def _gather(self, sources, C: int, P: int, values) -> torch.Tensor:
        if len(sources) == 1 and sources[0][2]:
            return values[sources[0][0]]
        out = torch.zeros(C, P, dtype=self.dtype, device=self.device)
        for key, rows, _ in sources:
            out.index_copy_(0, rows, values[key].index_select(0, rows))
        return out

    def _apply(self, op, rows, full: bool, xs: list[torch.Tensor], s: int, node_idx) -> torch.Tensor:
        sub = xs if full else [x.index_select(0, rows) for x in xs]
        if op.needs == "state":
            prev = None if self.t == 0 else self.node_state.get(s)
            if prev is not None and not full:
                prev = prev.index_select(0, rows)
            y, new = op.fn(sub[0], prev)
            if s not in self.node_state:
                self.node_state[s] = torch.zeros(self.C, xs[0].shape[1], dtype=self.dtype, device=self.device)
            if full:
                self.node_state[s] = new
            else:
                self.node_state[s].index_copy_(0, rows, new)
            return y
        if op.needs == "uniform":
            stream = STREAM_DROPOUT + (node_idx if full else node_idx.index_select(0, rows))
            seeds = self.seeds if full else self.seeds.index_select(0, rows)
            u = rng_uniform(seeds, self.t, stream, self.index).to(self.dtype)
            return op.call(sub[0], u)
        if op.needs == "norm":
            return op.fn(sub[0], segment_norm(sub[0], self.seg_ids, len(self.segments.bounds)))
        return op.call(*sub)

    def direction(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """lr_t * sign * D(u_t): the amount subtracted from theta at this step."""
        if self.fused is not None:
            decays = self.edge_stack[:, :, self.t] if self.edge_stack is not None else None
            noise = self._normal_rows(self.noise_rows, STREAM_NOISE_OPERAND, 0.01) if "noise" in self.fused.operands else None
            return self.fused.direction(grad, theta, self.state, noise, decays, self.lr_table[:, self.t], self.clip,
                                        self.seeds, self.t, self.seg_ids, len(self.segments.bounds), self.needs_buffer)
        C, P = theta.shape
        if self.any_clip:
            norm = grad.norm(dim=1)
            scale = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
            # rows without a clip (clip inf) keep their gradient even when its norm overflows
            # (inf / inf would be NaN): a row's numbers must not depend on its batch
            grad = grad * torch.where(torch.isinf(self.clip), 1.0, scale)[:, None]
        values: dict[str | int, torch.Tensor] = self._operand_values(grad, theta)
        for s, slot in enumerate(self.slots):
            if slot is None:
                continue
            groups, args, node_idx = slot
            xs = []
            for j, sources in enumerate(args):
                x = self._gather(sources, C, P, values)
                table = self.edge_tables.get((s, j))
                if table is not None:
                    x = x * table[:, self.t : self.t + 1]
                xs.append(x)
            if len(groups) == 1 and groups[0][2]:
                op, rows, full = groups[0]
                values[s] = self._apply(op, rows, True, xs[: op.arity], s, node_idx)
                continue
            out = torch.zeros(C, P, dtype=self.dtype, device=self.device)
            for op, rows, _ in groups:
                out.index_copy_(0, rows, self._apply(op, rows, False, xs[: op.arity], s, node_idx))
            values[s] = out
        u = values[MAX_NODES - 1]
        if self.needs_buffer:
            buf = self.state.get("buf")
            buf = u.clone() if buf is None else MOMENTUM * buf + u
            self.state["buf"] = buf
            u = torch.where(
                self.update_types["plain"],
                u,
                torch.where(self.update_types["momentum"], buf, u + MOMENTUM * buf),  # else Nesterov
            )
        return self.lr_table[:, self.t : self.t + 1] * u

    def perturbation(self, theta: torch.Tensor) -> torch.Tensor | None:
        """The noise rule's delta for this step (None when no candidate has noise)."""
        if not self.any_noise:
            return None
        if self.fused is not None:
            return fused.perturbation(theta, self.perturbed_rows, self.seeds, self.t, STREAM_PERTURBATION,
                                      self.sigma_table[:, self.t], self.layer_std[:, 0], self.seg_bounds)
        eps = self._normal_rows(self.perturbed_rows, STREAM_PERTURBATION, 1.0)
        scale = torch.where(self.layer_std, segment_std(theta, self.seg_ids, len(self.segments.bounds)), 1.0)
        return self.sigma_table[:, self.t : self.t + 1] * scale * eps

    def perturb_(self, theta: torch.Tensor) -> torch.Tensor | None:
        """Adds this step's noise to `theta` in place in the rows that always keep it, and returns
        the noisy trial of the `if_better` rows ([len(if_better_rows), P]; None when there are
        none), which the trainer keeps only where it lowers the loss. The numbers of
        `theta + perturbation(theta)`, without a [C, P] delta and a pass over the rows without noise."""
        if not self.any_noise:
            return None
        if self.fused is not None and theta.is_contiguous():
            trial = fused.perturbation(theta, self.perturbed_rows, self.seeds, self.t, STREAM_PERTURBATION,
                                       self.sigma_table[:, self.t], self.layer_std[:, 0], self.seg_bounds,
                                       self.if_better_rows)
            return trial if self.any_if_better else None
        delta = self.perturbation(theta)
        assert delta is not None
        noisy = theta + delta
        theta.copy_(torch.where(self.if_better[:, None], theta, noisy))
        return noisy[self.if_better_rows] if self.any_if_better else None

    def _normal_rows(self, rows: torch.Tensor, stream: int, std: float) -> torch.Tensor:
        """std * N(0, 1) for the given rows (zeros elsewhere): hashing costs, so only where used."""
        if self.fused is not None:
            return fused.normals(rows, self.seeds, self.t, stream, std, self.C, self.segments.n_params)
        out = torch.zeros(self.C, self.segments.n_params, dtype=self.dtype, device=self.device)
        seeds = self.seeds[rows]
        z = rng_normal(seeds, self.t, torch.full_like(seeds, stream), self.index).to(self.dtype)
        return out.index_copy_(0, rows, std * z)

    def advance(self) -> None:
        self.t += 1

    # ------------------------------------------------------------------ batch surgery
    def select(self, keep: torch.Tensor) -> BatchedOptimizer:
        """A new optimizer over the rows `keep` (a long tensor), carrying all state along."""
        new = object.__new__(BatchedOptimizer)
        new.__dict__.update(self.__dict__)
        new.genomes = [self.genomes[i] for i in keep.tolist()]
        new.seeds = self.seeds[keep]
        # slots are right-aligned per genome, so a kept candidate's node stays in its slot
        new.state = {k: v[keep] for k, v in self.state.items()}
        new.node_state = {s: v[keep] for s, v in self.node_state.items()}
        new.edge_tables = {k: v[keep] for k, v in self.edge_tables.items()}
        new.lr_table, new.sigma_table, new.clip = self.lr_table[keep], self.sigma_table[keep], self.clip[keep]
        new._compile_structure()
        new._compile_fused(self.fused, keep)
        return new
