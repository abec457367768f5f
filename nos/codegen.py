"""Render a genome as a standalone PyTorch optimizer file (torch/optim/sgd.py style).

The file imports only torch and math. Every op, operand, schedule and random-number function it
needs is copied from `search_space` / `nos.engine.rng` by source (`inspect.getsource`), so the
exported optimizer runs the very code the interpreter ran and gives the same numbers.
"""

from __future__ import annotations

import inspect
import keyword
import re
import textwrap
from typing import Any

from search_space import decay as decay_mod
from search_space.decay import decay_curve
from search_space.genome import MOMENTUM, Genome, node_index
from search_space.operands import OPERANDS, update_moments
from search_space.ops import OPS
from search_space.schedules import lr_schedule
from search_space.symbolic import symbolic

from .engine.rng import (
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


def _source(fn: Any) -> str:
    return textwrap.dedent(inspect.getsource(fn)).strip() + "\n"


def _docstring(genome: Genome, lr: float, total_steps: int, provenance: dict[str, Any]) -> str:
    sym = symbolic(genome)
    lines = [
        f"{provenance.get('title', 'An optimizer exported by nos')}.",
        "",
        "Update rule (t = step index from 0, T = total_steps, tau = t / T):",
        f"    u_t = {sym.update}",
    ]
    if genome.clip is not None:
        lines.append(f"    (g is first clipped to global L2 norm {genome.clip:g})")
    if genome.update == "plain":
        lines.append("    w <- w - lr_t * u_t")
    elif genome.update == "momentum":
        lines.append(f"    b_t = {MOMENTUM} b_(t-1) + u_t;  w <- w - lr_t * b_t")
    else:
        lines.append(f"    b_t = {MOMENTUM} b_(t-1) + u_t;  w <- w - lr_t * (u_t + {MOMENTUM} b_t)   (Nesterov)")
    lines += [
        "Operands: " + "; ".join(f"{o} = {OPERANDS[o].description}" for o in sorted(genome.operands_used())),
        f"Learning-rate schedule: lr_t = lr * {genome.lr.schedule}(t, T) * {decay_mod.describe(genome.lr.decay)}(tau)",
    ]
    nz = genome.noise
    if nz.active:
        scale = "the std of each parameter tensor" if nz.scale == "layer_std" else "1"
        lines.append(
            f"Noise: after the update, w <- w + {nz.sigma:g} * {decay_mod.describe(nz.decay)}(tau) * s * eps, "
            f"eps ~ N(0, 1), s = {scale}"
        )
        if nz.accept == "if_better":
            lines.append("    kept only if the loss improves on the loss before the step: step() needs a closure.")
    else:
        lines.append("Noise: none.")
    lines += ["", "Schedules are functions of t / total_steps; past total_steps they hold their last value."]
    lines += ["", "Provenance:"]
    for k, v in provenance.items():
        if k != "title":
            lines.append(f"    {k}: {v}")
    lines.append(f"    canonical hash: {sym.hash}")
    lines.append(f"    defaults: lr={lr!r}, total_steps={total_steps}")
    return "\n".join(lines).replace('"""', "'''").replace("\\", "\\\\")


def render(
    genome: Genome,
    *,
    class_name: str,
    lr: float,
    total_steps: int,
    provenance: dict[str, Any],
) -> str:
    """The text of a standalone optimizer module for `genome`."""
    nodes = genome.reachable()
    used_ops = sorted({genome.nodes[i].op for i in nodes})
    operands = sorted(genome.operands_used())
    moments = sorted(set().union(*(OPERANDS[o].needs for o in operands)) - {"noise"})
    random_ops = any(OPS[genome.nodes[i].op].needs == "uniform" for i in nodes)
    needs_rng = random_ops or "noise" in operands or genome.noise.active
    if_better = genome.noise.active and genome.noise.accept == "if_better"

    helpers = [_source(decay_curve), _source(lr_schedule)]
    if moments:
        helpers.append(_source(update_moments))
    helpers += [_source(OPERANDS[o].fn) for o in operands]
    helpers += sorted({_source(OPS[op].fn) for op in used_ops})
    if needs_rng:
        helpers += [_source(rng_mix32), _source(rng_uniform), _source(rng_normal)]

    # ---- the per-parameter update, one line per graph node
    body: list[str] = []
    if moments:
        body.append(f"s = update_moments(state, g, step, {tuple(moments)!r})")
    else:
        body.append("s = {}")
    if "noise" in operands:
        body.append(f"s['noise'] = 0.01 * rng_normal(seed, step - 1, stream({STREAM_NOISE_OPERAND}), idx).view_as(p)")
    for i in nodes:
        n = genome.nodes[i]
        op = OPS[n.op]
        args = []
        for j, (ref, d) in enumerate(zip(n.inputs, n.decays)):
            k = node_index(ref)
            src = f"n{k}" if k is not None else f"{OPERANDS[ref].fn.__name__}(g, p, s)"
            if d is not None:
                src = f"{src} * ({decay_mod.to_code(d)})"
            body.append(f"a{j} = {src}")
            args.append(f"a{j}")
        fn = op.fn.__name__
        if op.needs == "state":
            body.append(f"n{i}, state['n{i}'] = {fn}(a0, state.get('n{i}'))")
        elif op.needs == "uniform":
            body.append(f"u = rng_uniform(seed, step - 1, stream({STREAM_DROPOUT + i}), idx).view_as(p)")
            body.append(f"n{i} = {fn}(a0, u, {op.param!r})")
        elif op.needs == "norm":
            body.append(f"n{i} = {fn}(a0, torch.linalg.vector_norm(a0).expand_as(a0))")
        else:
            body.append(f"n{i} = {fn}({', '.join(args)})")
    body.append(f"u_t = n{genome.root}")
    if genome.update == "plain":
        body.append("p.add_(u_t, alpha=-lr_t)")
    else:
        body += [
            "buf = state.get('momentum_buffer')",
            f"buf = u_t.clone() if buf is None else {MOMENTUM} * buf + u_t",
            "state['momentum_buffer'] = buf",
            "p.add_(buf, alpha=-lr_t)" if genome.update == "momentum" else f"p.add_(u_t + {MOMENTUM} * buf, alpha=-lr_t)",
        ]
    update_block = textwrap.indent("\n".join(body), " " * 16)

    clip_block = ""
    if genome.clip is not None:
        clip_block = textwrap.indent(
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
            " " * 8,
        )
    noise_block = ""
    if genome.noise.active:
        nz = genome.noise
        scale = "p.std(correction=0)" if nz.scale == "layer_std" else "1.0"
        noise_lines = [
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
            f"        eps = rng_normal(seed_t.to(p.device), step - 1, torch.tensor([{STREAM_PERTURBATION}], device=p.device), idx.to(p.device)).view_as(p)",
            f"        delta = sigma_t * {scale} * eps",
            "        deltas.append((p, p.clone()))" if if_better else "",
            "        p.add_(delta)",
        ]
        if if_better:
            noise_lines += [
                "with torch.enable_grad():",
                "    trial_loss = closure()",
                "if not float(trial_loss) < float(loss):",
                "    for p, before in deltas:",
                "        p.copy_(before)  # exactly the weights before the perturbation",
                "else:",
                "    loss = trial_loss",
            ]
        noise_lines = [line for line in noise_lines if line]
        noise_block = textwrap.indent("\n".join(noise_lines), " " * 8) + "\n"

    closure_check = ""
    if if_better:
        closure_check = textwrap.indent(
            textwrap.dedent(
                """\
                if closure is None:
                    raise RuntimeError(
                        "this optimizer keeps its weight perturbation only if the loss improves: "
                        "call step(closure) with a closure that returns the loss"
                    )
                """
            ),
            " " * 8,
        )

    rng_group = rng_param = ""
    if random_ops or "noise" in operands:
        rng_group = textwrap.indent(
            'seed = torch.tensor([group["seed"]], dtype=torch.long)\n'
            "offset = 0  # element index of each parameter in the flattened group (for the RNG)\n",
            " " * 12,
        )
        rng_param = textwrap.indent(
            "idx = torch.arange(offset, offset + p.numel(), dtype=torch.long, device=p.device)\n"
            "offset += p.numel()\n"
            "seed = seed.to(p.device)\n\n"
            "def stream(k, _device=p.device):\n"
            "    return torch.tensor([k], dtype=torch.long, device=_device)\n\n",
            " " * 16,
        )

    doc = _docstring(genome, lr, total_steps, provenance)
    helpers_text = "\n\n".join(h.rstrip("\n") for h in helpers)
    return f'''"""{doc}
"""

import math

import torch

# ----------------------------------------------------------------------------------------------
# building blocks (copied from nos so that this file gives the interpreter's numbers)


{helpers_text}


# ----------------------------------------------------------------------------------------------


class {class_name}(torch.optim.Optimizer):
    """See the module docstring for the update rule, schedules and provenance."""

    def __init__(self, params, lr={lr!r}, total_steps={total_steps!r}, seed=0):
        if not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"Invalid learning rate: {{lr}}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"Invalid total_steps: {{total_steps}}")
        if not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {{seed}}")
        defaults = dict(lr=lr, total_steps=total_steps, seed=seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): reevaluates the model and returns the loss.
        """
{closure_check}        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
{clip_block}
        for group in self.param_groups:
            T = group["total_steps"]
{rng_group}            for p in group["params"]:
{rng_param}                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.get("step", 0) + 1  # steps taken, this one included
                state["step"] = step
                t = min(step - 1, T - 1)  # schedules hold their last value past total_steps
                tau = t / T
                lr_t = group["lr"] * {genome.sign} * lr_schedule({genome.lr.schedule!r}, t, T) * ({decay_mod.to_code(genome.lr.decay)})
                g = p.grad{" * clip_coef" if genome.clip is not None else ""}
{update_block}

{noise_block}        return loss
'''
