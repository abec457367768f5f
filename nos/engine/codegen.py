"""Render a genome as a standalone PyTorch optimizer file (torch/optim/sgd.py style).

The file imports only torch, math and warnings. Every op, operand, schedule and random-number function it
needs is copied from `search_space` / `nos.engine.rng` by source (`inspect.getsource`), so the
exported optimizer runs the very code the interpreter ran and gives the same numbers.

`render` assembles the file from small pieces, each a function of the genome: the copied helper
functions (`_helpers`), the per-parameter update lines (`_update_lines`), the gradient-clip block
(`_clip_block`), the noise block (`_noise_block`) and the docstring (`_docstring`), put into one
class template (`_CLASS_TEMPLATE`).

The code runs every gene of the genome, so the file steps exactly as the interpreter does. The
docstring describes only what has an effect (`Effects`): a gradient clip the update cannot see
(it reads the gradient only through signs, or not at all), a noise rule whose decay is 0 at
every step, an update graph that is 0 are listed apart as having no effect; an lr decay of 1
and operands that cancel out are left out.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import math
import operator
import re
import textwrap
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from string import Template
from typing import Any

import sympy as sp

from search_space import decay as decay_mod
from search_space.decay import decay_curve
from search_space.genome import MOMENTUM, Genome, node_index
from search_space.operands import OPERANDS, Response, update_moments
from search_space.ops import OPS, Op
from search_space.schedules import lr_schedule
from search_space.symbolic import SymbolicForm, symbolic

from .rng import (
    STREAM_DROPOUT,
    STREAM_NOISE_OPERAND,
    STREAM_PERTURBATION,
    rng_mix32,
    rng_normal,
    rng_uniform,
)


def class_name_for(name: str) -> str:
    """`adam` -> `Adam`, `run3-id42` -> `Run3Id42`; always a valid identifier."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    out = "".join(p[:1].upper() + p[1:] for p in parts) or "Discovered"
    if out[0].isdigit() or keyword.iskeyword(out):
        out = "Nos" + out
    return out


def _module_names() -> frozenset[str]:
    """Every name an exported file defines or uses at module level: a class may not shadow one."""
    fns = [decay_curve, lr_schedule, update_moments, rng_mix32, rng_uniform, rng_normal]
    fns += [o.fn for o in OPERANDS.values()] + [op.fn for op in OPS.values()]
    return frozenset({"torch", "math", *dir(builtins), *(f.__name__ for f in fns)})


RESERVED_NAMES = _module_names()


def check_class_name(name: str) -> None:
    """Raise ValueError unless `name` can name the class of an exported file that imports."""
    shown = visible(name, limit=60)
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"class name {shown!r} is not a Python identifier")
    if keyword.iskeyword(name):
        raise ValueError(f"class name {shown!r} is a Python keyword")
    if unicodedata.normalize("NFKC", name) != name:
        raise ValueError(f"class name {shown!r} is not in NFKC form (Python would rename it)")
    if name in RESERVED_NAMES:
        raise ValueError(f"class name {shown!r} would shadow a name the file uses")


def visible(text: Any, limit: int | None = None) -> str:
    r"""`text` with every non-printable character escaped as a repr escapes it (a NUL becomes
    `\x00`, a newline `\n`), cut to at most `limit` characters: safe on one line of a terminal
    and inside generated code."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 3)] + "..."
    return out


def _source(fn: Any) -> str:
    return textwrap.dedent(inspect.getsource(fn)).strip() + "\n"


def _indent(lines: list[str] | str, spaces: int) -> str:
    text = lines if isinstance(lines, str) else "\n".join(lines)
    return textwrap.indent(text, " " * spaces)


# ---------------------------------------------------------------------------------------------
# what the genome needs


@dataclass(frozen=True)
class _Needs:
    """What a genome's file must contain, worked out once from the genome."""

    nodes: list[int]  # graph nodes the root depends on, in order
    ops: list[str]  # their operations, sorted
    operands: list[str]  # operands they read, sorted
    moments: list[str]  # moment estimates those operands need (update_moments)
    random_ops: bool  # an op draws uniform numbers (dropout)
    needs_rng: bool  # anything random: random ops, the noise operand, the noise rule
    if_better: bool  # the noise rule keeps a perturbation only if the loss improves

    @classmethod
    def of(cls, genome: Genome) -> _Needs:
        nodes = genome.reachable()
        operands = sorted(genome.operands_used())
        random_ops = any(OPS[genome.nodes[i].op].needs == "uniform" for i in nodes)
        return cls(
            nodes=nodes,
            ops=sorted({genome.nodes[i].op for i in nodes}),
            operands=operands,
            moments=sorted(set().union(*(OPERANDS[o].needs for o in operands)) - {"noise"}),
            random_ops=random_ops,
            needs_rng=random_ops or "noise" in operands or genome.noise.active,
            if_better=genome.noise.active and genome.noise.accept == "if_better",
        )


# ---------------------------------------------------------------------------------------------
# the pieces of the file


def _helpers(needs: _Needs) -> str:
    """The building blocks, copied by source: schedules, moments, operands, ops, the RNG."""
    helpers = [_source(decay_curve), _source(lr_schedule)]
    if needs.moments:
        helpers.append(_source(update_moments))
    helpers += [_source(OPERANDS[o].fn) for o in needs.operands]
    helpers += sorted({_source(OPS[op].fn) for op in needs.ops})
    if needs.needs_rng:
        helpers += [_source(rng_mix32), _source(rng_uniform), _source(rng_normal)]
    return "\n\n".join(h.rstrip("\n") for h in helpers)


def _node_lines(genome: Genome, i: int) -> list[str]:
    """The lines computing graph node i as `n<i>` (its inputs as `a0`, `a1`)."""
    n = genome.nodes[i]
    op = OPS[n.op]
    lines, args = [], []
    for j, (ref, d) in enumerate(zip(n.inputs, n.decays)):
        k = node_index(ref)
        src = f"n{k}" if k is not None else f"{OPERANDS[ref].fn.__name__}(g, p, s)"
        if d is not None:
            src = f"{src} * ({decay_mod.to_code(d)})"
        lines.append(f"a{j} = {src}")
        args.append(f"a{j}")
    fn = op.fn.__name__
    if op.needs == "state":
        lines.append(f"n{i}, state['n{i}'] = {fn}(a0, state.get('n{i}'))")
    elif op.needs == "uniform":
        lines.append(f"u = rng_uniform(seed, step - 1, stream({STREAM_DROPOUT + i}), idx).view_as(p)")
        lines.append(f"n{i} = {fn}(a0, u, {op.param!r})")
    elif op.needs == "norm":
        lines.append(f"n{i} = {fn}(a0, torch.linalg.vector_norm(a0).expand_as(a0))")
    else:
        lines.append(f"n{i} = {fn}({', '.join(args)})")
    return lines


def _apply_lines(update: str) -> list[str]:
    """Apply u_t to the parameter: plain, momentum or Nesterov (torch.optim.SGD's rules)."""
    if update == "plain":
        return ["p.add_(u_t, alpha=-lr_t)"]
    return [
        "buf = state.get('momentum_buffer')",
        f"buf = u_t.clone() if buf is None else {MOMENTUM} * buf + u_t",
        "state['momentum_buffer'] = buf",
        "p.add_(buf, alpha=-lr_t)" if update == "momentum" else f"p.add_(u_t + {MOMENTUM} * buf, alpha=-lr_t)",
    ]


def _update_lines(genome: Genome, needs: _Needs) -> list[str]:
    """The per-parameter update (`_single_tensor_sgd`'s loop body), one line per graph node."""
    lines = [f"s = update_moments(state, g, step, {tuple(needs.moments)!r})" if needs.moments else "s = {}"]
    if "noise" in needs.operands:
        lines.append(
            f"s['noise'] = 0.01 * rng_normal(seed, step - 1, stream({STREAM_NOISE_OPERAND}), idx).view_as(p)"
        )
    for i in needs.nodes:
        lines += _node_lines(genome, i)
    lines.append(f"u_t = n{genome.root}")
    return lines + _apply_lines(genome.update)


def _clip_block(genome: Genome) -> str:
    """The global gradient-norm clip, at the top of step() (empty without a clip)."""
    if genome.clip is None:
        return ""
    return _indent(
        textwrap.dedent(
            f"""\
            # global gradient-norm clip over all parameters (as torch.nn.utils.clip_grad_norm_)
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            clip_coef = 1.0
            if grads:
                total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
                clip_coef = min(1.0, {genome.clip!r} / (float(total_norm) + 1e-6))
            """
        ),
        8,
    )


def _noise_block(genome: Genome, if_better: bool) -> str:
    """The noise rule, after the update: perturb, and with `if_better` keep it only if the
    loss improves (empty without noise)."""
    nz = genome.noise
    if not nz.active:
        return ""
    scale = "p.std(correction=0)" if nz.scale == "layer_std" else "1.0"
    lines = [
        "# the noise rule: a Gaussian perturbation after the update",
        "deltas = []  # (parameter, its value before the perturbation)" if if_better else "",
        "for group in self.param_groups:",
        "    seed_t = torch.tensor([group['seed']], dtype=torch.long)",
        "    offset = 0",
        "    for p in group['params']:",
        "        idx = torch.arange(offset, offset + p.numel(), dtype=torch.long)",
        "        offset += p.numel()",
        "        if p.grad is None:",
        "            continue",
        "        T = group['total_steps']",
        "        step = self.state[p]['step']",
        "        t = min(step - 1, T - 1)",
        f"        sigma_t = {nz.sigma!r} * ({decay_mod.to_code(nz.decay, 't / T')})",
        f"        eps = rng_normal(seed_t.to(p.device), step - 1, torch.tensor([{STREAM_PERTURBATION}], "
        "device=p.device), idx.to(p.device)).view_as(p)",
        f"        delta = sigma_t * {scale} * eps",
        "        deltas.append((p, p.clone()))" if if_better else "",
        "        p.add_(delta)",
    ]
    if if_better:
        lines += [
            "with torch.enable_grad():",
            "    trial_loss = closure()",
            "if not float(trial_loss) < float(loss):",
            "    for p, before in deltas:",
            "        p.copy_(before)  # exactly the weights before the perturbation",
            "else:",
            "    loss = trial_loss",
        ]
    return _indent([line for line in lines if line], 8) + "\n"


def _closure_check(if_better: bool) -> str:
    if not if_better:
        return ""
    return _indent(
        textwrap.dedent(
            """\
            if closure is None:
                raise RuntimeError(
                    "this optimizer keeps its weight perturbation only if the loss improves: "
                    "call step(closure) with a closure that returns the loss"
                )
            """
        ),
        8,
    )


def _rng_blocks(needs: _Needs) -> tuple[str, str]:
    """Per group and per parameter: the seed and element indices the update's random numbers
    are drawn with (both empty when the update draws none)."""
    if not (needs.random_ops or "noise" in needs.operands):
        return "", ""
    group = _indent(
        'seed = torch.tensor([group["seed"]], dtype=torch.long)\n'
        "offset = 0  # element index of each parameter in the flattened group (for the RNG)\n",
        12,
    )
    param = _indent(
        "idx = torch.arange(offset, offset + p.numel(), dtype=torch.long, device=p.device)\n"
        "offset += p.numel()\n"
        "seed = seed.to(p.device)\n\n"
        "def stream(k, _device=p.device):\n"
        "    return torch.tensor([k], dtype=torch.long, device=_device)\n\n",
        16,
    )
    return group, param


def _lr_line(genome: Genome) -> str:
    return (
        f"lr_t = float(group[\"lr\"]) * {genome.sign} * lr_schedule({genome.lr.schedule!r}, t, T) * "
        f"({decay_mod.to_code(genome.lr.decay)})"
    )


# ---------------------------------------------------------------------------------------------
# what has an effect: the docstring describes only that


# How a value of the update graph responds when every step's gradient g_t is multiplied by a
# positive factor c_t of its own (what the global-norm clip does): it stays the same, it keeps
# the sign of each element (its magnitude may change), or it may change in any way. The
# operands say how they respond (`Operand.response`) and the ops how they pass it on
# (`Op.keeps_sign`, `Op.of_signs`, `Op.scales_first`): a new op or operand brings its own.
SAME, SIGNS, ANY = Response.SAME, Response.SIGNS, Response.ANY


def _node_response(op: Op, inputs: list[Response]) -> Response:
    """How node `op` over inputs that respond as `inputs` responds (see Response)."""
    if all(x == SAME for x in inputs):
        return SAME  # the same inputs at every step: the same state, random numbers and output
    if ANY not in inputs and op.of_signs:
        return SAME  # a function of signs that do not change (sign)
    if ANY not in inputs and op.keeps_sign:
        return SIGNS  # e.g. sign(clamp(x * y)) = sign(x) sign(y); clamp(x, -|y|, |y|): sign(x) or 0
    if op.scales_first and len(inputs) == 2 and inputs[0] != ANY and inputs[1] == SAME:
        return SIGNS  # x times a factor that does not change (x over a denominator that does not)
    return ANY


def gradient_response(genome: Genome) -> Response:
    """How the update u_t responds to multiplying each step's gradient by its own positive
    factor: SAME means that a gradient clip cannot change anything the optimizer does."""
    response: dict[int, Response] = {}
    for i in genome.reachable():
        n = genome.nodes[i]
        # an edge decay multiplies by d(tau) >= 0, the same with or without the clip
        ins = [response[k] if (k := node_index(r)) is not None else OPERANDS[r].response for r in n.inputs]
        response[i] = _node_response(OPS[n.op], ins)
    return response[genome.root]


def _constant(d: Any) -> sp.Expr | None:
    """The value of decay `d` when it is provably the same at every step (no decay: 1)."""
    value = decay_mod.to_sympy(d)
    return value if value.is_number else None


@dataclass(frozen=True)
class Effects:
    """What the genome's genes do, for the docstring (the code runs them all regardless)."""

    steps: bool  # the gradient step changes the weights: u_t is not 0 and lr_t is not 0
    clip: bool  # the gradient clip can change the update
    lr_decay: bool  # the lr decay is not 1 at every step
    noise: bool  # the noise rule perturbs the weights: sigma > 0 and its decay is not 0
    operands: list[str] = field(default_factory=list)  # operands u_t really reads
    inert: list[str] = field(default_factory=list)  # genes without effect, each with the reason

    @classmethod
    def of(cls, genome: Genome, sym: SymbolicForm) -> Effects:
        u = sym.update
        names = {s.name for s in u.free_symbols if isinstance(s, sp.Symbol)}
        operands = sorted(o for o in genome.operands_used() if o in names)
        lr_decay = _constant(genome.lr.decay)
        steps = u != 0 and lr_decay != 0
        inert = []
        if u == 0:
            inert.append("the update graph: u_t = 0 at every step, so lr and the update type do nothing")
        elif lr_decay == 0:
            inert.append(f"the update: the lr decay {decay_mod.describe(genome.lr.decay)} is 0 at every step")
        clip = genome.clip is not None
        if clip:
            what = f"the gradient clip to global L2 norm {genome.clip:g}"
            if not steps:
                clip = False
                inert.append(f"{what}: there is no gradient step")
            elif not any(OPERANDS[o].uses_grad for o in operands):
                clip = False
                inert.append(f"{what}: the update does not read the gradient")
            elif gradient_response(genome) == SAME:
                clip = False
                inert.append(
                    f"{what}: the update reads the gradient only through signs, which clipping (a positive "
                    "rescaling of g) leaves unchanged (while the norm is finite and no element underflows to 0)"
                )
        noise = genome.noise.active and _constant(genome.noise.decay) != 0
        if genome.noise.active and not noise:
            inert.append(f"the noise rule: its decay {decay_mod.describe(genome.noise.decay)} is 0 at every step")
        return cls(steps, clip, steps and lr_decay != 1, noise, operands, inert)


# ---------------------------------------------------------------------------------------------
# the docstring


@dataclass(frozen=True)
class LrChoice:
    """Where the default lr of an individual's file comes from: the search (its search seeds),
    or -- with `horizon` -- the funnel's choice on the validation seeds for that horizon."""

    search: float  # the lr the search chose on its search seeds
    validated: Mapping[float, float]  # horizon t_max -> the lr chosen on the validation seeds
    search_horizons: tuple[float, ...] = ()  # the horizons of the search's fitness (if known)
    horizon: float | None = None  # the default is validated[horizon]; None: the search lr
    task: str = "sine"  # the task the funnel validated on (the run's first search task)
    label: str = "t_max"  # what its variants are called

    def where(self) -> str:
        """How a variant of the task is named in prose ("rollout horizon t_max")."""
        return "rollout horizon t_max" if self.label == "t_max" and self.task == "sine" else \
            f"{self.label} of task {self.task}"

    @property
    def default(self) -> float:
        return self.search if self.horizon is None else self.validated[self.horizon]


def _wrap(text: str, indent: int) -> list[str]:
    """Text of ours (never stored text) as docstring lines of at most 100 characters."""
    first, rest = " " * indent, " " * (indent + 4)
    return textwrap.wrap(text, 100, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def _horizons(hs: Any) -> str:
    return ", ".join(f"{h:g}" for h in hs)


def _lr_doc_lines(choice: LrChoice) -> list[str]:
    search = "chosen in the search, on its search seeds"
    if choice.search_horizons:
        search += f" (fitness over {choice.label} = {_horizons(choice.search_horizons)})"
    if choice.horizon is None:
        lines = _wrap(f"Learning rate: the default lr={choice.default!r} is the lr {search}.", 0)
    else:
        lines = _wrap(
            f"Learning rate: the default lr={choice.default!r} is the lr chosen on the validation seeds for "
            f"{choice.where()} = {choice.horizon:g} (exported with --horizon {choice.horizon:g}).", 0)
        lines.append(f"    lr {search}: {choice.search!r}")
    if not choice.validated:
        return lines + ["    Not in its run's funnel: no lr was chosen on the validation seeds."]
    lines.append(f"    lr chosen on the validation seeds, per {choice.where()} (the funnel's choice):")
    for h, v in sorted(choice.validated.items()):
        lines.append(f"        {choice.label} = {h:g}: lr = {v!r}" + ("  (the default)" if h == choice.horizon else ""))
    if choice.horizon is None:
        lines.append("    `python -m nos.export ID --horizon H` makes the lr chosen for horizon H the default.")
    return lines


def _rule_lines(genome: Genome, update: sp.Expr, effects: Effects) -> list[str]:
    lines = ["Update rule (t = step index from 0, T = total_steps, tau = t / T):"]
    if not effects.steps:
        lines.append("    none: no gradient step changes the weights (lr_t * u_t = 0 at every step)")
        return lines + ["Learning-rate schedule: no effect (there is no gradient step)."]
    lines.append(f"    u_t = {update}")
    if effects.clip:
        lines.append(f"    (g is first clipped to global L2 norm {genome.clip:g})")
    if genome.update == "plain":
        lines.append("    w <- w - lr_t * u_t")
    elif genome.update == "momentum":
        lines.append(f"    b_t = {MOMENTUM} b_(t-1) + u_t;  w <- w - lr_t * b_t")
    else:
        lines.append(f"    b_t = {MOMENTUM} b_(t-1) + u_t;  w <- w - lr_t * (u_t + {MOMENTUM} b_t)   (Nesterov)")
    if effects.operands:
        lines.append("Operands: " + "; ".join(f"{o} = {OPERANDS[o].description}" for o in effects.operands))
    factors = [f"{genome.lr.schedule}(t, T)"] if genome.lr.schedule != "constant" else []
    factors += [f"{decay_mod.describe(genome.lr.decay)}(tau)"] if effects.lr_decay else []
    schedule = " * ".join(["lr", *factors]) if factors else "lr (constant)"
    return lines + [f"Learning-rate schedule: lr_t = {schedule}"]


def _noise_doc_lines(genome: Genome, effects: Effects) -> list[str]:
    nz = genome.noise
    lines = []
    if not effects.noise:
        lines.append("Noise: none.")
    else:
        scale = "the std of each parameter tensor" if nz.scale == "layer_std" else "1"
        decay = "" if _constant(nz.decay) == 1 else f" * {decay_mod.describe(nz.decay)}(tau)"
        lines.append(f"Noise: after the update, w <- w + {nz.sigma:g}{decay} * s * eps, eps ~ N(0, 1), s = {scale}")
    if effects.noise and nz.accept == "if_better":
        lines.append("    kept only if the loss improves on the loss before the step: step() needs a closure.")
    elif nz.active and nz.accept == "if_better":
        lines.append("    step() still needs a closure: the code runs the noise rule's loss test.")
    return lines


def _docstring(genome: Genome, lr: float, total_steps: int, provenance: dict[str, Any],
               lr_choice: LrChoice | None = None) -> str:
    sym = symbolic(genome)
    effects = Effects.of(genome, sym)
    lines = [f"{visible(provenance.get('title', 'An optimizer exported by nos'))}.", ""]
    lines += _rule_lines(genome, sym.update, effects) + _noise_doc_lines(genome, effects)
    if effects.inert:
        lines.append("No effect here (the code still runs them, exactly as nos's interpreter does):")
        lines += [w for x in effects.inert for w in _wrap(x, 4)]
    if _uses_time(genome):
        about_t = ("is the length of the training the schedules span: they are functions of "
                   "tau = t / total_steps. Set it to the number of steps you will train. Past it every "
                   "schedule holds its last value (a cosine lr stays at about 0), and the first step "
                   "past it warns once.")
    else:
        about_t = "does not matter here: nothing in this rule depends on t / total_steps."
    head = f"total_steps (default {total_steps}: the steps nos trained it for, its budget of gradient steps)"
    lines += ["", *textwrap.wrap(f"{head} {about_t}", 100)]
    if lr_choice is not None:
        lines += ["", *_lr_doc_lines(lr_choice)]
    lines += ["", "Provenance:"]
    lines += [f"    {visible(k)}: {visible(v)}" for k, v in provenance.items() if k != "title"]
    lines.append(f"    canonical hash: {sym.hash}")
    lines.append(f"    defaults: lr={lr!r}, total_steps={total_steps}")
    return _docstring_source("\n".join(lines))


def _docstring_source(text: str) -> str:
    """The body of a triple-quoted literal that reads back as `text` with its non-printable
    characters shown escaped (`visible`) and any triple double quote as `'''`: whatever a
    database or a user put into the provenance cannot end the string, become an escape
    sequence, or add a NUL byte (a file with one does not import)."""
    lines = (visible(line) for line in text.split("\n"))
    return "\n".join(lines).replace('"""', "'''").replace("\\", "\\\\")


# ---------------------------------------------------------------------------------------------
# the file


# One optimizer class in torch/optim/sgd.py style; $names are filled in by `render`.
_CLASS_TEMPLATE = Template(
    '''"""$doc
"""

import math
import warnings

import torch

# ----------------------------------------------------------------------------------------------
# building blocks (copied from nos so that this file gives the interpreter's numbers)


$helpers


# ----------------------------------------------------------------------------------------------


class $class_name(torch.optim.Optimizer):
    """See the module docstring for the update rule, schedules and provenance."""

    def __init__(self, params, lr=$lr, total_steps=$total_steps, seed=0):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)) or not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"Invalid total_steps: {total_steps}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"Invalid seed: {seed}")
        defaults = dict(lr=lr, total_steps=total_steps, seed=seed)
        super().__init__(params, defaults)
        self._warned_past_total = False  # one warning per optimizer, at the first step past total_steps

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): reevaluates the model and returns the loss.
        """
${closure_check}        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
$clip_block
        for group in self.param_groups:
            T = group["total_steps"]
${rng_group}            for p in group["params"]:
${rng_param}                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.get("step", 0) + 1  # steps taken, this one included
                state["step"] = step
${past_total}                t = min(step - 1, T - 1)  # schedules hold their last value past total_steps
                tau = t / T
                $lr_line
                g = p.grad$grad_scale
$update_block

${noise_block}        return loss
'''
)


def render(
    genome: Genome,
    *,
    class_name: str,
    lr: float,
    total_steps: int,
    provenance: dict[str, Any],
    lr_choice: LrChoice | None = None,
) -> str:
    """The text of a standalone optimizer module for `genome`; ValueError for a class name the
    file could not define, or defaults its constructor would refuse. `lr_choice` says in the
    docstring where `lr` came from (it must be its `default`)."""
    check_class_name(class_name)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {visible(lr, 40)}")
    if lr_choice is not None and lr_choice.default != lr:
        raise ValueError(f"lr {lr!r} is not the default {lr_choice.default!r} that lr_choice describes")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or not 1 <= total_steps < 2**63:
        raise ValueError(f"total_steps must be an integer >= 1, got {visible(total_steps, 40)}")
    lr, total_steps = float(lr), operator.index(total_steps)  # numpy scalars print as np.float64(...)
    needs = _Needs.of(genome)
    rng_group, rng_param = _rng_blocks(needs)
    return _CLASS_TEMPLATE.substitute(
        doc=_docstring(genome, lr, total_steps, provenance, lr_choice),
        helpers=_helpers(needs),
        class_name=class_name,
        lr=repr(lr),
        total_steps=repr(total_steps),
        closure_check=_closure_check(needs.if_better),
        clip_block=_clip_block(genome),
        rng_group=rng_group,
        rng_param=rng_param,
        lr_line=_lr_line(genome),
        grad_scale=" * clip_coef" if genome.clip is not None else "",
        update_block=_indent(_update_lines(genome, needs), 16),
        noise_block=_noise_block(genome, needs.if_better),
        past_total=_PAST_TOTAL if _uses_time(genome) else "",
    )


# Training past total_steps freezes every schedule at its last value (a cosine lr at ~0): the
# one place a user who trains longer than the search did learns it, without reading the docstring.
_PAST_TOTAL = """\
                if step > T and not self._warned_past_total:
                    self._warned_past_total = True
                    warnings.warn(f"{type(self).__name__}: step {step} is past total_steps={T}; the "
                                  "schedules hold their last value from here (pass total_steps=N for "
                                  "N steps of training)", stacklevel=2)
"""


def _uses_time(genome: Genome) -> bool:
    """Whether anything in the rule (update, lr, noise) depends on tau = t / total_steps."""
    return "tau" in symbolic(genome).canonical
