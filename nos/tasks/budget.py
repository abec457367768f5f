"""Compute budgets, counted in forward-pass equivalents (FPE).

One rollout forward costs 1 FPE and its backward 2 (the usual rule of thumb that a backward
pass costs about twice the forward), so one gradient step costs 3 FPE. One RandOpt
perturbation is one forward (score the perturbed weights) = 1 FPE. The default budget, 600 FPE,
is the 200 post-training steps of our own independent implementation of the sine task (README,
"The sine-rollout task").

Hyperparameters that are tuned (Adam's lr, RandOpt's sigma) get the whole budget per value,
as in the post; the tuning itself is not charged.
"""

from __future__ import annotations

from search_space.genome import Genome

FORWARD_FPE = 1
BACKWARD_FPE = 2
GRADIENT_STEP_FPE = FORWARD_FPE + BACKWARD_FPE  # 3
RANDOPT_MEMBER_FPE = FORWARD_FPE  # 1

DEFAULT_BUDGET_FPE = 600  # = 200 gradient steps = 600 RandOpt perturbations


def _check(budget_fpe: int) -> None:
    if budget_fpe < 0:
        raise ValueError(f"budget must be non-negative, got {budget_fpe}")


def gradient_steps(budget_fpe: int = DEFAULT_BUDGET_FPE, extra_forwards_per_step: int = 0) -> int:
    """Gradient steps that fit in the budget; a step costs 3 FPE plus any extra forwards
    (e.g. an optimizer that evaluates the loss again at a perturbed point)."""
    _check(budget_fpe)
    if extra_forwards_per_step < 0:
        raise ValueError("extra_forwards_per_step must be non-negative")
    return int(budget_fpe // (GRADIENT_STEP_FPE + extra_forwards_per_step * FORWARD_FPE))


def randopt_population(budget_fpe: int = DEFAULT_BUDGET_FPE) -> int:
    """RandOpt perturbations N that fit in the budget (one forward each)."""
    _check(budget_fpe)
    return int(budget_fpe // RANDOPT_MEMBER_FPE)


def describe(budget_fpe: int = DEFAULT_BUDGET_FPE) -> str:
    """One line for table captions."""
    return (f"budget {budget_fpe} forward-pass equivalents = {gradient_steps(budget_fpe)} "
            f"gradient steps = {randopt_population(budget_fpe)} RandOpt perturbations")


def step_cost(genome: Genome) -> int:
    """FPE per training step of a genome: a forward (1), a backward (2) only if its update reads
    the gradient, and one more forward for an `if_better` noise rule (it scores the perturbed
    point). A gradient-free rule (RSO- or ES-like) thus gets 600 steps of a 600 FPE budget, the
    same compute as RandOpt's 600 perturbations."""
    backward = BACKWARD_FPE if genome.uses_gradient() else 0
    extra = FORWARD_FPE if genome.noise.active and genome.noise.accept == "if_better" else 0
    return FORWARD_FPE + backward + extra


def steps_for(genome: Genome, budget_fpe: int = DEFAULT_BUDGET_FPE) -> int:
    """Training steps a genome gets within the budget (at least 1). This is also the
    `total_steps` its schedules run over and the one its exported file defaults to."""
    _check(budget_fpe)
    return max(1, budget_fpe // step_cost(genome))
