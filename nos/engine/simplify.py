"""Program simplification: drop what an update rule does not depend on (Lion's "simplicity" step).

Chen et al. (2023, "Symbolic Discovery of Optimization Algorithms") simplify every discovered
program by removing statements that do not change what it computes. `simplify(genome)` does the
same for a nos genome, with these edits:

- bypass: node i is replaced by one of its inputs (a wrapper whose effect is nil: `clip_by_norm`
  of something whose norm never exceeds 1, `abs` of something positive, `sign(interp(g, ...))`
  when only g's sign survives, ...). An edge decay on the bypassed input moves onto the edges
  that read node i (a product of two decays, if the tree stays within MAX_DECAY_OPS);
- drop an edge decay (set it to None), e.g. a decay in front of `sign` that is never 0;
- drop the global gradient clip (one that cannot bind, e.g. before a sign-only update);
- remove unreachable nodes (`search_space.genome.prune`, or one at a time).

The sign, the update type, the lr schedule and decay and the noise rule are never touched.

Equality is decided *semantically*: the simplified genome must give the same trajectory as the
genome it came from when both run through the real interpreter (`BatchedOptimizer`) on seeded
probe problems: 12 variants of parameters split into tensors of shapes (1,), (2,), (5,), (3, 4)
and (4, 5); horizons T of 15, 24 and 40 steps (tau then hits 1/15, 1/8, 1/4, 1/3, 1/2, where the
restart and cyclic curves reach 0 or 1); gradient scales 1e-5 .. 1e6 and weight scales 1e-3 ..
1e2; gradients with regimes (pure noise, a persistent drift of either sign, a burst 4x larger),
jumps of the envelope by 100x, steps and elements where the gradient is exactly 0. Every step's
update and parameters must agree elementwise to rtol 1e-6 plus atol 1e-9 of that element's
largest update (parameter) magnitude over the run, in float64. Dropout and the noise operand use the counter RNG keyed
by the node's index, so an edit that would shift another node's random stream (removing a node in
front of a dropout node) changes the trajectory and is rejected: such a node stays, unreachable,
to hold the index (the exported file does not compute it).

This is a test, not a proof: an edit is kept when no probe tells the two genomes apart. The probes
are built so that the usual ways an op can be inert only on some inputs (a clip that binds only on
large gradients or on a change of regime, a norm clip that binds only on large tensors, a decay
that is 0 only at particular tau) are exercised.

The search is greedy and deterministic: each round every candidate edit of the current genome is
tried at once (one batched interpreter run for all of them); the accepted ones are chained, the
longest chain that is still equal is kept, and rounds repeat until no edit is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from search_space import decay as decay_mod
from search_space.decay import Decay
from search_space.genome import Genome, GenomeError, Node, check_valid, node_index, prune
from search_space.ops import OPS

from ..tasks.segments import Segments
from .interpreter import BatchedOptimizer

SHAPES: tuple[tuple[int, ...], ...] = ((1,), (2,), (5,), (3, 4), (4, 5))
HORIZONS = (15, 24, 40)  # T of the probe runs: tau = t / T covers 1/15, 1/8, 1/4, 1/3, 1/2
GRAD_SCALES = (1e-5, 1e-1, 1e1, 1e6)  # global clips go from 1e-6 to 1e6: some probe binds each
WEIGHT_SCALES = (1e-3, 1.0, 1e2)
VARIANTS = 12  # probe problems per seed: every (horizon, gradient scale) pair once
RTOL, ATOL = 1e-6, 1e-9
DEFAULT_SEED = 0
DTYPE = torch.float64  # so that the tolerance measures the rule, not float32 rounding


# ---------------------------------------------------------------------------------------------
# probe problems


@dataclass(frozen=True)
class Probes:
    """V seeded probe problems over one parameter layout, and the steps to run them for."""

    segments: Segments
    totals: tuple[int, ...]  # T per variant
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # the counter RNG's seed per variant
    theta0: torch.Tensor  # [V, P]
    grads: torch.Tensor  # [steps, V, P], open loop: the same for every genome
    center: torch.Tensor  # [V, P]: the loss sum(h (theta - center)^2) of `if_better` noise
    curvature: torch.Tensor  # [V, P]

    @property
    def V(self) -> int:
        return len(self.totals)

    @property
    def steps(self) -> int:
        return self.grads.shape[0]

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        k = theta.shape[0] // self.V
        return (self.curvature.repeat(k, 1) * (theta - self.center.repeat(k, 1)) ** 2).sum(dim=1)


def _bounds(shapes: Sequence[tuple[int, ...]]) -> Segments:
    bounds, start = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        bounds.append((start, start + n))
        start += n
    return Segments(tuple(bounds))


def _regimes(gen: torch.Generator, steps: int, values: Sequence[float], lo: int, hi: int) -> torch.Tensor:
    """A piecewise-constant sequence: runs of lo..hi steps, each at a value drawn from `values`."""
    out = torch.empty(steps, dtype=DTYPE)
    t = 0
    while t < steps:
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out[t : t + length] = values[int(torch.randint(len(values), (1,), generator=gen))]
        t += length
    return out


@lru_cache(maxsize=16)
def probes(seed: int = DEFAULT_SEED) -> Probes:
    """The probe problems of `seed` (a pure function of it)."""
    segments = _bounds(SHAPES)
    P, steps = segments.n_params, max(HORIZONS)
    totals, lrs, seeds, thetas, grads, centers, curvatures = [], [], [], [], [], [], []
    for v in range(VARIANTS):
        gen = torch.Generator().manual_seed(1_000_003 * seed + 7_919 * v + 17)
        T, gs, ws = HORIZONS[v % 3], GRAD_SCALES[v % 4], WEIGHT_SCALES[(v // 4) % 3]
        mu = torch.randn(P, generator=gen, dtype=DTYPE)  # a persistent direction
        sigma = 0.1 + 1.4 * torch.rand(P, generator=gen, dtype=DTYPE)
        eps = torch.randn(steps, P, generator=gen, dtype=DTYPE)
        # drift regimes: noise only, a steady drift either way, a burst: moments lag behind a
        # change of regime, which is where clips against a moment (AdamClip) bind
        drift = _regimes(gen, steps, (0.0, 1.0, -1.0, 4.0, -0.25), 3, 12)
        # the envelope: a random walk in log10, with jumps by 100x now and then
        jump = torch.rand(steps, generator=gen, dtype=DTYPE)
        step = torch.where(jump < 0.1, 2.0, torch.where(jump < 0.4, 0.3, 0.0))
        step = step * torch.where(torch.rand(steps, generator=gen, dtype=DTYPE) < 0.5, -1.0, 1.0)
        env = 10.0 ** torch.clamp(torch.cumsum(step, 0), -3.0, 3.0)
        mask = torch.ones(P, dtype=DTYPE)
        if v % 2:  # exact zeros: some elements never get a gradient, some steps none does
            mask = (torch.rand(P, generator=gen, dtype=DTYPE) >= 0.15).to(DTYPE)
            k = int(torch.randint(steps - 3, (1,), generator=gen))
            env[k : k + 3] = 0.0
        grads.append(gs * env[:, None] * mask * (mu * drift[:, None] + sigma * eps))
        thetas.append(ws * torch.randn(P, generator=gen, dtype=DTYPE))
        centers.append(ws * torch.randn(P, generator=gen, dtype=DTYPE))
        curvatures.append(0.5 + torch.rand(P, generator=gen, dtype=DTYPE))
        totals.append(T)
        lrs.append(0.1 * ws)  # steps of sign-like rules are then 10% of the weights' scale
        seeds.append(int(torch.randint(2**31 - 1, (1,), generator=gen)))
    return Probes(segments, tuple(totals), tuple(lrs), tuple(seeds), torch.stack(thetas),
                  torch.stack(grads, dim=1), torch.stack(centers), torch.stack(curvatures))


# ---------------------------------------------------------------------------------------------
# running genomes on the probes


@dataclass(frozen=True)
class Trajectory:
    """Every step's update (lr_t * sign * D(u_t)) and parameters, [steps, V, P] each."""

    directions: torch.Tensor
    thetas: torch.Tensor

    @staticmethod
    def _scale(x: torch.Tensor) -> torch.Tensor:
        # each element's largest finite magnitude over the run, [V, P] (an inf must not make
        # every difference tolerable)
        return torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=0)

    @property
    def direction_scale(self) -> torch.Tensor:
        return self._scale(self.directions)

    @property
    def theta_scale(self) -> torch.Tensor:
        return self._scale(self.thetas)


def _close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[K] flags: every element of got [K, V, P] matches want [V, P] (NaN matches NaN) within
    rtol of itself plus atol of its element's scale [V, P] over the run.

    The scale is per element, not per step: one element's update may be 1e15 (an op clamped to
    +-BIG) while its neighbours are 1e-4, and a step-wide scale would then tolerate any change
    of the small ones."""
    both = torch.isfinite(want) & torch.isfinite(got)
    within = both & ((got - want).abs() <= RTOL * want.abs() + ATOL * scale)
    ok = within | (got == want) | (torch.isnan(got) & torch.isnan(want))
    return ok.flatten(1).all(dim=1)


def _run(genomes: Sequence[Genome], pr: Probes, ref: Trajectory | None = None) -> Trajectory | list[bool]:
    """Run `genomes` on every probe in one batch (row k * V + v: genome k on probe v).

    Without `ref`: the trajectory of the single genome given. With it: one flag per genome,
    whether its trajectory equals `ref` at every step (the run stops once every one differs)."""
    with _small_tensors():
        return _run_batch(genomes, pr, ref)


@contextmanager
def _small_tensors() -> Iterator[None]:
    """One intra-op thread and subnormals flushed to zero while the probes run.

    The probe tensors are tiny (rows x 44 elements): a second thread only adds contention
    (about 30x slower per op on a loaded 2-core machine), and an op on subnormal float64 values
    (an exp that underflows, a product of small gradient powers) costs about 10x a normal one.
    The reference and every candidate are flushed alike, so equality is judged on the same
    numbers. torch has no getter for the flush mode; its default (off) is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _run_batch(genomes: Sequence[Genome], pr: Probes, ref: Trajectory | None) -> Trajectory | list[bool]:
    K, V = len(genomes), pr.V
    opt = BatchedOptimizer([g for g in genomes for _ in range(V)], pr.lrs * K, pr.totals * K, pr.seeds * K,
                           pr.segments, "cpu", DTYPE)
    theta = pr.theta0.repeat(K, 1)
    equal = [True] * K
    live = list(range(K))  # the candidates still in the batch, in row order
    directions, thetas = [], []
    if ref is not None:
        d_scale, theta_scale = ref.direction_scale, ref.theta_scale
    with torch.no_grad():
        for t in range(pr.steps):
            k = len(live)
            loss = pr.loss(theta) if opt.any_if_better else None
            d = opt.direction(theta, pr.grads[t].repeat(k, 1))
            theta = theta - d
            delta = opt.perturbation(theta)
            if delta is not None:  # the trainer's noise rule (nos.engine.trainer._with_noise)
                trial = theta + delta
                if loss is not None:
                    better = pr.loss(trial) < loss
                    trial = torch.where((better | ~opt.if_better)[:, None], trial, theta)
                theta = trial
            opt.advance()
            if ref is None:
                directions.append(d)
                thetas.append(theta)
                continue
            ok = (_close(d.view(k, V, -1), ref.directions[t], d_scale)
                  & _close(theta.view(k, V, -1), ref.thetas[t], theta_scale)).tolist()
            if all(ok):
                continue
            for c, good in zip(live, ok):
                equal[c] = equal[c] and good
            # most candidates differ within a few steps: drop their rows, so that the rest runs
            # on a smaller batch with fewer op groups (select carries every row's state along)
            keep = [j for j, good in enumerate(ok) if good]
            if not keep:
                break
            rows = torch.tensor([j * V + v for j in keep for v in range(V)], dtype=torch.long)
            opt, theta, live = opt.select(rows), theta[rows], [live[j] for j in keep]
    if ref is None:
        return Trajectory(torch.stack(directions), torch.stack(thetas))
    return equal


def trajectory(genome: Genome, seed: int = DEFAULT_SEED) -> Trajectory:
    """The genome's updates and parameters on the probe problems of `seed`."""
    out = _run([genome], probes(seed))
    assert isinstance(out, Trajectory)
    return out


def equivalent(a: Genome, b: Genome, seed: int = DEFAULT_SEED) -> bool:
    """Whether b follows a's trajectory at every step of every probe problem of `seed`."""
    return equal_to(a, [b], seed)[0]


def equal_to(reference: Genome, candidates: Sequence[Genome], seed: int = DEFAULT_SEED) -> list[bool]:
    """For each candidate, whether it follows `reference`'s trajectory (one batched run)."""
    if not candidates:
        return []
    out = _run(candidates, probes(seed), trajectory(reference, seed))
    assert isinstance(out, list)
    return out


# ---------------------------------------------------------------------------------------------
# edits


@dataclass(frozen=True)
class Edit:
    """One candidate simplification: `kind` is bypass (node `node` by its input `arg`),
    drop_decay (of input `arg` of node `node`), drop_clip, prune (every unreachable node) or
    remove (the unreachable node `node`)."""

    kind: str
    node: int = -1
    arg: int = -1

    def describe(self, g: Genome) -> str:
        """What the edit does to `g` (the genome before it), for the exported file."""
        if self.kind == "drop_clip":
            return f"gradient clip {g.clip:g} removed"
        if self.kind == "prune":
            return "unreachable node(s) " + ", ".join(f"n{i} ({g.nodes[i].op})" for i in _dead(g)) + " removed"
        n = g.nodes[self.node]
        if self.kind == "bypass":
            return f"n{self.node} ({n.op}) replaced by its input {n.inputs[self.arg]}"
        if self.kind == "drop_decay":
            return f"decay {decay_mod.describe(n.decays[self.arg])} on input {self.arg} of n{self.node} ({n.op}) removed"
        return f"unreachable node n{self.node} ({n.op}) removed"


def _dead(g: Genome) -> list[int]:
    live = set(g.reachable())
    return [i for i in range(len(g.nodes)) if i not in live]


def _compose(d: Decay | None, e: Decay | None) -> tuple[bool, Decay | None]:
    """(ok, d * e) as one decay tree; not ok when the product needs too many operations."""
    if d is None or e is None:
        return True, e if d is None else d
    prod = {"op": "mul", "args": [d, e]}
    if decay_mod.count_ops(prod) > decay_mod.MAX_DECAY_OPS or not decay_mod.is_valid(prod):
        return False, None
    return True, prod


def _bypass(g: Genome, i: int, j: int) -> Genome | None:
    node = g.nodes[i]
    ref, d = node.inputs[j], node.decays[j]
    if i == g.root:
        k = node_index(ref)
        if k is None or d is not None:  # the root must stay a node; its decay cannot move on
            return None
        # node k becomes the root; nodes past it are unreachable and keep no other's index
        return g.with_(nodes=g.nodes[: k + 1])
    target, nodes = f"n{i}", list(g.nodes)
    for k in g.reachable():
        n = nodes[k]
        if target not in n.inputs:
            continue
        ins, decs = list(n.inputs), list(n.decays)
        for jj, r in enumerate(ins):
            if r == target:
                ok, decs[jj] = _compose(d, decs[jj])
                if not ok:
                    return None
                ins[jj] = ref
        nodes[k] = Node(n.op, tuple(ins), tuple(decs))
    # node i is unreachable now but stays where it is, so no other node's index moves
    return g.with_(nodes=tuple(nodes))


def _remove(g: Genome, i: int) -> Genome | None:
    target = f"n{i}"
    if i == g.root or i in g.reachable() or any(target in n.inputs for n in g.nodes):
        return None

    def shift(ref: str) -> str:
        k = node_index(ref)
        return f"n{k - 1}" if k is not None and k > i else ref

    nodes = [Node(n.op, tuple(shift(r) for r in n.inputs), n.decays) for k, n in enumerate(g.nodes) if k != i]
    return g.with_(nodes=tuple(nodes))


def apply(edit: Edit, g: Genome) -> Genome | None:
    """`g` with the edit made, or None where it does not apply (or changes nothing)."""
    live = set(g.reachable())
    if edit.kind in ("bypass", "drop_decay") and edit.node not in live:
        return None
    if edit.kind == "bypass":
        if edit.arg >= len(g.nodes[edit.node].inputs):
            return None
        out = _bypass(g, edit.node, edit.arg)
    elif edit.kind == "drop_decay":
        n = g.nodes[edit.node]
        if edit.arg >= len(n.decays) or n.decays[edit.arg] is None:
            return None
        decays = tuple(None if j == edit.arg else x for j, x in enumerate(n.decays))
        nodes = list(g.nodes)
        nodes[edit.node] = Node(n.op, n.inputs, decays)
        out = g.with_(nodes=tuple(nodes))
    elif edit.kind == "drop_clip":
        out = g.with_(clip=None) if g.clip is not None else None
    elif edit.kind == "prune":
        out = prune(g) if len(live) < len(g.nodes) else None
    elif edit.kind == "remove":
        out = _remove(g, edit.node) if edit.node < len(g.nodes) else None
    else:
        raise ValueError(f"unknown edit {edit.kind!r}")
    if out is None or out == g:
        return None
    try:
        check_valid(out)
    except GenomeError:
        return None
    return out


def _graph_edits(g: Genome) -> list[Edit]:
    """Edits of the update graph and the clip, most reducing first: bypasses from the root down,
    then decays, then the clip."""
    live = g.reachable()[::-1]
    edits = [Edit("bypass", i, j) for i in live for j in range(OPS[g.nodes[i].op].arity)]
    edits += [Edit("drop_decay", i, j) for i in live for j, d in enumerate(g.nodes[i].decays) if d is not None]
    return edits + ([Edit("drop_clip")] if g.clip is not None else [])


def _random_indices(g: Genome) -> list[int]:
    """Indices of the reachable nodes that draw random numbers (their RNG stream is the index)."""
    return [i for i in g.reachable() if OPS[g.nodes[i].op].needs == "uniform"]


def _removal_edits(g: Genome) -> list[Edit]:
    dead = _dead(g)
    return [Edit("prune")] + [Edit("remove", i) for i in dead[::-1]] if dead else []


# ---------------------------------------------------------------------------------------------
# the search


@dataclass(frozen=True)
class Simplification:
    """The simplified genome and what was done to get it, in order."""

    original: Genome
    genome: Genome
    steps: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.genome != self.original


def _candidates(edits: list[Edit], g: Genome) -> list[tuple[Edit, Genome]]:
    out, seen = [], set()
    for e in edits:
        c = apply(e, g)
        if c is not None and (key := c.dumps()) not in seen:
            seen.add(key)
            out.append((e, c))
    return out


def _greedy(g: Genome, make_edits: Callable[[Genome], list[Edit]], seed: int, ref: Trajectory,
            log: list[str]) -> Genome:
    pr = probes(seed)

    def equal(cands: Sequence[Genome]) -> list[bool]:
        if not cands:
            return []
        out = _run(cands, pr, ref)
        assert isinstance(out, list)
        return out

    while True:
        cands = _candidates(make_edits(g), g)
        accepted = [(e, c) for (e, c), ok in zip(cands, equal([c for _, c in cands])) if ok]
        if not accepted:
            return g
        # chain the accepted edits (each equal on its own; together they may not be) and keep the
        # longest chain that is still equal: most genomes then need only one more round
        chain: list[tuple[list[str], Genome]] = []
        cur: Genome = g
        steps: list[str] = []
        for e, _ in accepted:
            nxt = apply(e, cur)
            if nxt is None:
                continue
            steps = [*steps, e.describe(cur)]
            cur = nxt
            chain.append((steps, cur))
        best = 0
        for k, ok in enumerate(equal([c for _, c in chain[1:]]), start=1):
            if ok:
                best = k
        log.extend(chain[best][0])
        g = chain[best][1]


def _simplify(original: Genome, seed: int) -> Simplification:
    ref = trajectory(original, seed)
    log: list[str] = []
    g = _greedy(original, _graph_edits, seed, ref, log)
    # removing unreachable nodes changes nothing the update computes (the interpreter's rows do
    # not interact through them), unless it shifts the counter-RNG stream -- keyed by node index
    # -- of a random node behind them: then the probes decide, else no run is needed
    pruned = prune(g)
    if pruned != g and _random_indices(pruned) == _random_indices(g):
        log.append(Edit("prune").describe(g))
        g = pruned
    g = _greedy(g, _removal_edits, seed, ref, log)
    return Simplification(original, g, tuple(log))


_CACHE: dict[tuple[str, int], Simplification] = {}
_CACHE_SIZE = 1024


def simplification(genome: Genome, seed: int = DEFAULT_SEED) -> Simplification:
    """The simplified genome and the list of edits (memoised by the genome's JSON: export and
    effective_nodes ask for the same genome; a genome's decays are dicts, so it is not hashable)."""
    key = (genome.dumps(), seed)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = _simplify(genome, seed)
    return _CACHE[key]


def simplify(genome: Genome, seed: int = DEFAULT_SEED) -> Genome:
    """A genome computing the same update as `genome` (on the probe problems of `seed`) without
    the nodes, edge decays and clip it does not depend on; `genome` itself if nothing can go."""
    s = simplification(genome, seed)
    return s.genome if s.changed else genome


def effective_nodes(genome: Genome, seed: int = DEFAULT_SEED) -> int:
    """The size of the simplified rule: its reachable update-graph nodes (an unreachable node kept
    only to hold a dropout node's RNG index computes nothing), plus 1 for a gradient clip that
    survives simplification and 1 for an active noise rule (each is one more mechanism the rule
    needs, like a node)."""
    g = simplify(genome, seed)
    return len(g.reachable()) + (g.clip is not None) + g.noise.active


def describe(s: Simplification) -> str:
    """One line for an exported file's provenance."""
    kept, total = len(s.genome.reachable()), len(s.original.nodes)
    return f"{kept} of {total} nodes kept; " + "; ".join(s.steps)


__all__ = [
    "Edit", "Probes", "Simplification", "Trajectory", "apply", "describe", "effective_nodes", "equal_to",
    "equivalent", "probes", "simplification", "simplify", "trajectory",
]
