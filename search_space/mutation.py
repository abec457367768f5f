"""Random genomes and mutation, in NOS joint evolution's mix (Morgan & Hougen, 2024).

One *active* (reachable) node is mutated:
  40% change its op (same arity), 30% rewire an input (for a binary node 20% of these swap the
  two inputs), 10% unary <-> binary, 10% change the update type, 10% add / delete / mutate an
  edge decay.
On top of NOS, a share `SCHEDULE_RATE` of mutations changes the lr schedule, the noise schedule or
the gradient clip instead, so those genes evolve jointly. Numbers are perturbed multiplicatively
by 2^N(0,1), as Lion's search does (Chen et al., 2023).

Every function takes a `random.Random`, so a run's lineage is a pure function of its seed.
A mutation returns a valid genome (acyclic, within limits, decays in [0, 1]) or raises
MutationError saying why not; the caller retries.
"""

from __future__ import annotations

import random
from dataclasses import replace

from . import decay as decay_mod
from .decay import CURVES, DECAY_OPS, Decay
from .genome import (
    LR_SCHEDULES,
    MAX_NODES,
    NOISE_ACCEPT,
    NOISE_SCALES,
    SIGMA_MAX,
    UPDATE_TYPES,
    Genome,
    GenomeError,
    LRSchedule,
    Node,
    Noise,
    check_valid,
    node_index,
    prune,
)
from .operands import OPERAND_WEIGHTS
from .ops import BINARY, UNARY

SCHEDULE_RATE = 0.15
EDGE_DECAY_RATE = 0.1  # chance that a random edge carries a decay
NOISE_RATE = 0.3  # chance that a random genome has its noise rule switched on


class MutationError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# random pieces


def random_operand(rng: random.Random) -> str:
    names = list(OPERAND_WEIGHTS)
    return rng.choices(names, weights=[OPERAND_WEIGHTS[n] for n in names])[0]


def random_decay(rng: random.Random, tries: int = 50) -> Decay:
    """A base curve (70%) or a one/two-op tree over curves, valid in [0, 1]."""
    for _ in range(tries):
        if rng.random() < 0.7:
            return rng.choice(CURVES)
        op = rng.choice(list(DECAY_OPS))
        arity = DECAY_OPS[op][0]
        d: Decay = {"op": op, "args": [rng.choice(CURVES) for _ in range(arity)]}
        if decay_mod.is_valid(d):
            return d
    return rng.choice(CURVES)


def random_lr(rng: random.Random) -> LRSchedule:
    return LRSchedule(rng.choice(LR_SCHEDULES), random_decay(rng) if rng.random() < 0.2 else None)


def random_noise(rng: random.Random) -> Noise:
    if rng.random() >= NOISE_RATE:
        return Noise()
    return Noise(
        sigma=10 ** rng.uniform(-3.0, -0.5),
        decay=random_decay(rng) if rng.random() < 0.5 else None,
        scale=rng.choice(NOISE_SCALES),
        accept=rng.choice(NOISE_ACCEPT),
    )


def random_genome(rng: random.Random, max_nodes: int = 4) -> Genome:
    """Grow a random expression tree of 1..max_nodes nodes, listed in topological order."""
    budget = rng.randint(1, max_nodes)
    nodes: list[Node] = []

    def grow(depth: int) -> str:
        nonlocal budget
        budget -= 1
        binary = rng.random() < 0.45
        op = rng.choice(list(BINARY if binary else UNARY))
        refs = []
        for _ in range(2 if binary else 1):
            if budget > 0 and rng.random() < 0.6 / (1 + depth):
                refs.append(grow(depth + 1))
            else:
                refs.append(random_operand(rng))
        decays = tuple(random_decay(rng) if rng.random() < EDGE_DECAY_RATE else None for _ in refs)
        nodes.append(Node(op, tuple(refs), decays))
        return f"n{len(nodes) - 1}"

    grow(0)
    update = rng.choices(UPDATE_TYPES, weights=[0.6, 0.2, 0.2])[0]
    clip = 1.0 if rng.random() < 0.2 else None
    return Genome(tuple(nodes), update, 1, clip, random_lr(rng), random_noise(rng))


# ---------------------------------------------------------------------------------------------
# mutation


def _set_node(g: Genome, i: int, node: Node) -> Genome:
    nodes = list(g.nodes)
    nodes[i] = node
    return g.with_(nodes=tuple(nodes))


def _random_input(g: Genome, i: int, rng: random.Random) -> tuple[Genome, int, str]:
    """An input for node i: an operand, an earlier node, or a fresh node inserted before i.

    Returns the (possibly grown) genome, the index node i now has, and the reference.
    """
    r = rng.random()
    if r < 0.25 and i > 0:
        return g, i, f"n{rng.randrange(i)}"
    if r < 0.45 and len(g.nodes) < MAX_NODES:
        op = rng.choice(list(UNARY))
        fresh = Node(op, (random_operand(rng),), (None,))
        return _insert_node(g, i, fresh), i + 1, f"n{i}"
    return g, i, random_operand(rng)


def _insert_node(g: Genome, at: int, node: Node) -> Genome:
    """Insert `node` at index `at`, shifting references to nodes >= at by one."""

    def shift(ref: str) -> str:
        k = node_index(ref)
        return f"n{k + 1}" if k is not None and k >= at else ref

    shifted = [Node(n.op, tuple(shift(r) for r in n.inputs), n.decays) for n in g.nodes]
    return g.with_(nodes=tuple(shifted[:at] + [node] + shifted[at:]))


def _mutate_graph(g: Genome, rng: random.Random) -> tuple[Genome, str]:
    i = rng.choice(g.reachable())
    n = g.nodes[i]
    r = rng.random()
    if r < 0.40:  # change op, same arity
        pool = [o for o in (UNARY if len(n.inputs) == 1 else BINARY) if o != n.op]
        return _set_node(g, i, Node(rng.choice(pool), n.inputs, n.decays)), "change_op"
    if r < 0.70:  # rewire an input (binary: 20% swap)
        if len(n.inputs) == 2 and rng.random() < 0.2:
            if n.inputs[0] == n.inputs[1]:
                raise MutationError("swap of identical inputs changes nothing")
            return _set_node(g, i, Node(n.op, n.inputs[::-1], n.decays[::-1])), "swap_inputs"
        j = rng.randrange(len(n.inputs))
        g2, i2, ref = _random_input(g, i, rng)
        n2 = g2.nodes[i2]
        inputs = list(n2.inputs)
        inputs[j] = ref
        return _set_node(g2, i2, Node(n2.op, tuple(inputs), n2.decays)), "rewire"
    if r < 0.80:  # unary <-> binary
        if len(n.inputs) == 1:
            g2, i2, ref = _random_input(g, i, rng)
            n2 = g2.nodes[i2]
            new = Node(rng.choice(list(BINARY)), (n2.inputs[0], ref), (n2.decays[0], None))
            return _set_node(g2, i2, new), "to_binary"
        keep = rng.randrange(2)
        new = Node(rng.choice(list(UNARY)), (n.inputs[keep],), (n.decays[keep],))
        return _set_node(g, i, new), "to_unary"
    if r < 0.90:
        return g.with_(update=rng.choice([u for u in UPDATE_TYPES if u != g.update])), "update_type"
    # add / delete / mutate an edge decay
    j = rng.randrange(len(n.inputs))
    decays = list(n.decays)
    old = decays[j]
    if old is None:
        decays[j], kind = random_decay(rng), "add_decay"
    elif rng.random() < 0.4:
        decays[j], kind = None, "delete_decay"
    else:
        decays[j], kind = _different_decay(old, rng), "mutate_decay"
    return _set_node(g, i, Node(n.op, n.inputs, tuple(decays))), kind


def _different_decay(old: Decay | None, rng: random.Random, tries: int = 20) -> Decay:
    """A random decay whose curve is not a duplicate (L2 <= 1e-4) of `old`."""
    for _ in range(tries):
        d = random_decay(rng)
        if not decay_mod.is_duplicate(d, [old]):
            return d
    raise MutationError("no decay found that differs from the current one")


def _perturb(x: float, rng: random.Random, lo: float, hi: float) -> float:
    return min(hi, max(lo, x * 2.0 ** rng.gauss(0.0, 1.0)))


def _mutate_schedules(g: Genome, rng: random.Random) -> tuple[Genome, str]:
    r = rng.random()
    if r < 0.25:
        pool = [s for s in LR_SCHEDULES if s != g.lr.schedule]
        return g.with_(lr=replace(g.lr, schedule=rng.choice(pool))), "lr_schedule"
    if r < 0.45:
        new = None if g.lr.decay is not None and rng.random() < 0.4 else _different_decay(g.lr.decay, rng)
        return g.with_(lr=replace(g.lr, decay=new)), "lr_decay"
    if r < 0.9:
        nz = g.noise
        if not nz.active:
            return g.with_(noise=random_noise_on(rng)), "noise_on"
        s = rng.random()
        if s < 0.2:
            return g.with_(noise=Noise()), "noise_off"
        if s < 0.5:
            return g.with_(noise=replace(nz, sigma=_perturb(nz.sigma, rng, 1e-5, SIGMA_MAX))), "noise_sigma"
        if s < 0.7:
            new = None if nz.decay is not None and rng.random() < 0.4 else _different_decay(nz.decay, rng)
            return g.with_(noise=replace(nz, decay=new)), "noise_decay"
        if s < 0.85:
            other = [x for x in NOISE_SCALES if x != nz.scale][0]
            return g.with_(noise=replace(nz, scale=other)), "noise_scale"
        other = [x for x in NOISE_ACCEPT if x != nz.accept][0]
        return g.with_(noise=replace(nz, accept=other)), "noise_accept"
    if g.clip is None:
        return g.with_(clip=1.0), "clip_on"
    if rng.random() < 0.5:
        return g.with_(clip=None), "clip_off"
    return g.with_(clip=_perturb(g.clip, rng, 1e-3, 1e3)), "clip_value"


def random_noise_on(rng: random.Random) -> Noise:
    nz = Noise()
    while not nz.active:
        nz = random_noise(rng)
    return nz


def mutate(g: Genome, rng: random.Random) -> tuple[Genome, str]:
    """One mutation of `g`; returns (child, kind). Raises MutationError if the child is invalid."""
    if rng.random() < SCHEDULE_RATE:
        child, kind = _mutate_schedules(g, rng)
    else:
        child, kind = _mutate_graph(g, rng)
    child = prune(child)
    try:
        check_valid(child)
    except GenomeError as e:
        raise MutationError(f"{kind}: {e}") from None
    return child, kind
