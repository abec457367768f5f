"""Symbolic form of a genome through sympy: readable text, LaTeX and a canonical hash.

The canonical hash follows Lion's functional dedup (Chen et al., 2023) in spirit: two genomes that
compute the same update collide. sympy's automatic canonicalisation does the work -- sums and
products are ordered (x + y == y + x), double negations cancel, dead subgraphs never enter the
expression because it is built from the root -- without calling the (slow) `simplify`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sympy as sp

from . import decay as decay_mod
from .genome import Genome, node_index
from .operands import OPERANDS
from .ops import OPS
from .schedules import lr_sympy


def update_expr(g: Genome) -> sp.Expr:
    """u_t, the root of the update graph, with the genome's sign folded in."""
    memo: dict[int, sp.Expr] = {}

    def node(i: int) -> sp.Expr:
        if i not in memo:
            n = g.nodes[i]
            args = []
            for ref, d in zip(n.inputs, n.decays):
                k = node_index(ref)
                x = node(k) if k is not None else OPERANDS[ref].symbol
                args.append(x * decay_mod.to_sympy(d))
            op = OPS[n.op]
            if op.needs == "uniform":
                # each random node draws its own stream (keyed by node index): two dropout nodes
                # on the same input are different random variables, not one
                memo[i] = sp.Function(f"{n.op}_n{i}")(*args)
            else:
                memo[i] = op.sym(*args)
        return memo[i]

    return g.sign * node(g.root)


@dataclass(frozen=True)
class SymbolicForm:
    update: sp.Expr
    text: str  # one line, human readable
    latex: str
    canonical: str  # the string that is hashed
    hash: str


def _noise_key(g: Genome) -> str:
    nz = g.noise
    if not nz.active:
        return "off"
    return f"{nz.sigma:.6g}|{sp.srepr(decay_mod.to_sympy(nz.decay))}|{nz.scale}|{nz.accept}"


def symbolic(g: Genome) -> SymbolicForm:
    u = update_expr(g)
    lr = lr_sympy(g.lr)
    canonical = "\n".join(
        [
            f"u={sp.srepr(u)}",
            f"type={g.update}",
            f"clip={g.clip!r}",
            f"lr={sp.srepr(lr)}",
            f"noise={_noise_key(g)}",
        ]
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    return SymbolicForm(u, describe(g, u), latex(g, u), canonical, digest)


def canonical_hash(g: Genome) -> str:
    return symbolic(g).hash


def describe(g: Genome, u: sp.Expr | None = None) -> str:
    """`u = m/(epsilon + sqrt(|v|)); update=plain; lr=constant*1; noise off` style one-liner."""
    u = update_expr(g) if u is None else u
    parts = [f"u = {sp.sstr(u)}", f"update={g.update}"]
    if g.clip is not None:
        parts.append(f"clip={g.clip:g}")
    parts.append(f"lr={g.lr.schedule}*{decay_mod.describe(g.lr.decay)}")
    if g.noise.active:
        nz = g.noise
        parts.append(f"noise={nz.sigma:g}*{decay_mod.describe(nz.decay)} ({nz.scale}, {nz.accept})")
    else:
        parts.append("noise off")
    return "; ".join(parts)


def latex(g: Genome, u: sp.Expr | None = None) -> str:
    u = update_expr(g) if u is None else u
    body = sp.latex(u)
    if g.update == "momentum":
        return rf"b_t = 0.9\,b_{{t-1}} + {body},\quad \Delta w = -\eta_t\, b_t"
    if g.update == "nesterov":
        return rf"b_t = 0.9\,b_{{t-1}} + u_t,\ u_t = {body},\quad \Delta w = -\eta_t (u_t + 0.9\,b_t)"
    return rf"\Delta w = -\eta_t \left({body}\right)"
