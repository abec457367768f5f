"""Train many candidate optimizers at once on one task.

Every candidate (genome x lr) gets its own copy of the task's initial parameters on the candidate
axis; one batched forward/backward serves them all. A candidate whose loss turns NaN/inf is marked
failed and dropped from the batch (it stops costing compute and cannot poison the others).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from search_space.genome import Genome

from ..tasks.budget import step_cost, steps_for
from . import fused
from .interpreter import BatchedOptimizer, Segments


class Task(Protocol):
    """What the trainer needs from a task: batched parameters and a batched loss."""

    segments: Segments
    device: torch.device

    def init_params(self, n: int) -> torch.Tensor: ...

    def loss(self, theta: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TrainResult:
    losses: list[float | None]  # final loss per candidate; None when it went non-finite
    steps: list[int]
    fpe: list[int]  # compute spent, in forward-pass equivalents
    seconds: float
    curves: list[list[float]] | None = None  # loss before each step, per candidate (if asked)
    failed_at: dict[int, int] = field(default_factory=dict)  # candidate -> step it went non-finite
    params: torch.Tensor | None = None  # [C, P] final parameters (NaN rows for failed candidates)

    @property
    def ok(self) -> list[bool]:
        return [x is not None for x in self.losses]


def train(
    task: Task,
    genomes: Sequence[Genome],
    lrs: Sequence[float],
    *,
    seeds: Sequence[int] | int = 0,
    steps: int | None = None,
    budget_fpe: int | None = None,
    record_curves: bool = False,
) -> TrainResult:
    """Train candidate i with genomes[i] at lrs[i]; `steps` fixed, or as many as `budget_fpe` buys.

    A task may ask for its rows in chunks (`chunk_rows`: the fused sine rollout, whose cost does not
    shrink with the batch, while the update's elementwise passes stay in cache on a chunk of rows
    and spill out of it on the whole batch). Candidates are independent, so the chunks train one
    after the other to the same numbers."""
    if steps is None and budget_fpe is None:
        raise ValueError("give steps or budget_fpe")
    C = len(genomes)
    chunk = getattr(task, "chunk_rows", None)
    if not chunk or C <= chunk:
        return _train(task, genomes, lrs, seeds=seeds, steps=steps, budget_fpe=budget_fpe, record_curves=record_curves)
    seed_list = [seeds] * C if isinstance(seeds, int) else list(seeds)
    parts = []
    for lo in range(0, C, chunk):
        rows = list(range(lo, min(C, lo + chunk)))
        part = task.select(torch.tensor(rows, device=task.device)) if hasattr(task, "select") else task
        parts.append(_train(part, [genomes[i] for i in rows], [lrs[i] for i in rows], seeds=[seed_list[i] for i in rows],
                            steps=steps, budget_fpe=budget_fpe, record_curves=record_curves))
    return TrainResult(
        losses=[x for p in parts for x in p.losses],
        steps=[x for p in parts for x in p.steps],
        fpe=[x for p in parts for x in p.fpe],
        seconds=sum(p.seconds for p in parts),
        curves=[c for p in parts for c in p.curves] if record_curves else None,  # type: ignore[union-attr]
        failed_at={n * chunk + r: t for n, p in enumerate(parts) for r, t in p.failed_at.items()},
        params=torch.cat([p.params for p in parts]),  # type: ignore[misc]
    )


def _train(
    task: Task,
    genomes: Sequence[Genome],
    lrs: Sequence[float],
    *,
    seeds: Sequence[int] | int,
    steps: int | None,
    budget_fpe: int | None,
    record_curves: bool,
) -> TrainResult:
    start = time.perf_counter()
    C = len(genomes)
    total = [steps if steps is not None else steps_for(g, budget_fpe) for g in genomes]  # type: ignore[arg-type]
    seed_list = [seeds] * C if isinstance(seeds, int) else list(seeds)
    opt = BatchedOptimizer(genomes, lrs, total, seed_list, task.segments, task.device)
    theta = task.init_params(C)
    rows = torch.arange(C, device=theta.device)  # original index of each live row
    failed_at: dict[int, int] = {}
    curves: list[list[float]] | None = [[] for _ in range(C)] if record_curves else None

    trial_task = _trial_task(task, opt)
    dead = torch.zeros(C, dtype=torch.bool, device=theta.device)  # failed rows not yet dropped
    any_dead = False  # kept in Python so the common case costs no extra tensor op per step
    for t in range(max(total)):
        theta.requires_grad_(True)
        loss = task.loss(theta)
        (grad,) = torch.autograd.grad(torch.where(torch.isfinite(loss), loss, 0.0).sum(), theta)
        with torch.no_grad():
            failed = ~(torch.isfinite(loss) & fused.finite_rows(grad)) & ~dead
            if curves is not None:
                for r, v in zip(rows.tolist(), loss.tolist()):
                    curves[r].append(v)
            if bool(failed.any()):
                for r in rows[failed].tolist():
                    failed_at[r] = t
                dead |= failed
                any_dead = True
                # Dropping rows recompiles the batch's grouping; do it once enough have failed.
                if int(dead.sum()) * 10 >= len(rows):
                    keep = torch.nonzero(~dead).squeeze(1)
                    rows, theta, grad, loss, dead = rows[keep], theta[keep], grad[keep], loss[keep], dead[keep]
                    opt = opt.select(keep)
                    any_dead = False
                    if hasattr(task, "select"):  # tasks with per-row data follow the rows
                        task = task.select(keep)
                    trial_task = _trial_task(task, opt)
                    if rows.numel() == 0:
                        break
            if any_dead:
                grad = torch.where(dead[:, None], 0.0, grad)
            theta = _with_noise(trial_task, opt, theta.detach() - opt.direction(theta.detach(), grad), loss)
            opt.advance()

    losses, params = _final(task, theta, rows, dead, C)
    return TrainResult(
        losses=losses,
        steps=total,
        fpe=[T * step_cost(g) for T, g in zip(total, genomes)],
        seconds=time.perf_counter() - start,
        curves=curves,
        failed_at=failed_at,
        params=params,
    )


def _trial_task(task: Task, opt: BatchedOptimizer) -> Task | None:
    """The task over the `if_better` rows alone: only they need the loss of their noisy trial."""
    if not opt.any_if_better:
        return None
    return task.select(opt.if_better_rows) if hasattr(task, "select") else task  # per-row data follows


def _with_noise(trial_task: Task | None, opt: BatchedOptimizer, new: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The step's noise (if any rule is active), added to `new` in place; `if_better` rows keep it
    only when the loss improves (`trial_task`: `_trial_task`'s, None when no row is `if_better`)."""
    trial = opt.perturb_(new)
    if trial is not None and trial_task is not None:
        rows = opt.if_better_rows
        better = trial_task.loss(trial) < loss[rows]  # NaN trials are rejected
        new[rows[better]] = trial[better]
    return new


def _final(task: Task, theta: torch.Tensor, rows: torch.Tensor, dead: torch.Tensor,
           C: int) -> tuple[list[float | None], torch.Tensor]:
    """Final loss per original candidate (None for failed ones) and the [C, P] parameters (NaN rows
    for candidates dropped from the batch)."""
    losses: list[float | None] = [None] * C
    params = torch.full((C, task.segments.n_params), float("nan"), device=theta.device)
    with torch.no_grad():
        if rows.numel():
            params[rows] = theta.detach()
            final = task.loss(theta.detach())
            for r, v, d in zip(rows.tolist(), final.tolist(), dead.tolist()):
                losses[r] = v if not d and math.isfinite(v) else None
    return losses, params
