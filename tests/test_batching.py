"""The batched interpreter's cost: torch calls per step do not grow with the number of candidates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nos.engine.interpreter import BatchedOptimizer, Segments
from search_space.builtins import BUILTINS, builtin


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def calls_per_step(n_candidates: int) -> int:
    mix = [builtin(b) for b in BUILTINS]
    genomes = [mix[i % len(mix)] for i in range(n_candidates)]
    seg = Segments(((0, 30), (30, 50)))
    opt = BatchedOptimizer(genomes, [1e-3] * n_candidates, [10] * n_candidates, [0] * n_candidates, seg)
    theta = torch.randn(n_candidates, 50, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(n_candidates, 50, generator=torch.Generator().manual_seed(1))
    opt.direction(theta, grad)  # step 0 creates state lazily; count a later step
    opt.perturbation(theta)
    opt.advance()
    with CountOps() as counter:
        opt.direction(theta, grad)
        opt.perturbation(theta)
    return counter.calls


def test_torch_calls_per_step_do_not_grow_with_candidates() -> None:
    small, large = calls_per_step(len(BUILTINS)), calls_per_step(16 * len(BUILTINS))
    assert small > 20  # it really counted the step
    assert large == small
