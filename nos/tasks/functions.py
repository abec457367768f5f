"""Classic optimization test functions as task families (no network: theta is the point).

- `rosenbrock`: f(x) = sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2 (Rosenbrock, 1960), from a
  seeded start near (-1.2, 1, -1.2, 1, ...); variants: the dimension.
- `quadratic`: f(x) = 0.5 x^T A x with A = Q diag(eigs) Q^T, eigenvalues log-spaced from 1 down
  to 1 / kappa, Q a seeded random rotation, x0 seeded; variants: the condition number kappa.

`predict(theta)` is the point itself (so RandOpt's ensemble is the mean point) and
`loss_of_predictions` the function value; one segment, no layer groups.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .api import TaskFamily, TaskInstance
from .segments import Segments
from .supervised import seeded_generator

_STREAM_START = 21
_STREAM_ROTATION = 22


class PointInstance(TaskInstance):
    """A test function f of a point theta [P]: predictions are the points, the loss f(point)."""

    def __init__(self, theta0: torch.Tensor, device: torch.device | str, seed: int) -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.theta0 = theta0.to(device=self.device, dtype=torch.float32)
        self.segments = Segments(((0, self.theta0.numel()),))
        self.layer_groups = {}

    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must be [C, {self.n_params}], got {tuple(theta.shape)}")
        return theta


class RosenbrockInstance(PointInstance):
    """The Rosenbrock function in `theta0.numel()` dimensions."""

    def loss_of_predictions(self, pred: torch.Tensor) -> torch.Tensor:
        x, nxt = pred[:, :-1], pred[:, 1:]
        return (100.0 * (nxt - x**2) ** 2 + (1.0 - x) ** 2).sum(dim=1)


class QuadraticInstance(PointInstance):
    """0.5 x^T A x for a fixed symmetric positive definite A [P, P]."""

    def __init__(self, theta0: torch.Tensor, A: torch.Tensor, device: torch.device | str, seed: int) -> None:
        super().__init__(theta0, device, seed)
        self.A = A.to(device=self.device, dtype=torch.float32)

    def loss_of_predictions(self, pred: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((pred @ self.A) * pred).sum(dim=1)


# Measured (`nos.tasks.supervised.measure_adam`: 200 steps of torch.optim.Adam from theta0, seeds
# 0 / 1; final f; f(theta0) = 62 / 114 in 2-D, 1,950 / 2,200 in 10-D):
#   lr          1e-2   3e-2   1e-1   3e-1   1      3      10
#   dim 2 s0:   4.1    3.6    2.0    0.13   0.041  4.5    4.9
#   dim 2 s1:   4.2    3.9    2.5    0.23   0.10   3.3    4.5
#   dim 10 s0:  35     9.4    7.1    5.6    0.43   5.8    9.1
#   dim 10 s1:  56     9.5    7.2    4.9    0.33   9.6    29
# tuned lr 1 everywhere: inside the grid, not at its edge (1e-3: 10 / 25 / 1,100 / 1,300).
ROSENBROCK_LR_GRID = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
ROSENBROCK_SEARCH_LRS = (3e-2, 3e-1, 3.0)
ROSENBROCK_SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class Rosenbrock(TaskFamily):
    """Minimise the Rosenbrock function from a seeded start near (-1.2, 1, ...) (variants: dimension).

    Instance (d, seed): x0 = (-1.2, 1, -1.2, 1, ...)[:d] + `start_noise` * N(0, I), drawn with seed.
    """

    name = "rosenbrock"
    variant_label = "dim"
    lr_grid = ROSENBROCK_LR_GRID
    search_lrs = ROSENBROCK_SEARCH_LRS
    sigmas = ROSENBROCK_SIGMAS

    def __init__(self, dims: tuple[float, ...] = (2.0, 10.0), start_noise: float = 0.1) -> None:
        if any(d < 2 or d != int(d) for d in dims):
            raise ValueError("Rosenbrock dimensions must be integers >= 2")
        self.variants = tuple(float(d) for d in dims)
        self.search_variants = self.variants[:1]
        self.start_noise = start_noise

    def config(self) -> dict[str, Any]:
        return {"dims": list(self.variants), "start_noise": self.start_noise,
                "start": "(-1.2, 1, ...)", "version": 1}

    def instance(self, variant: float, seed: int, device: torch.device | str = "cpu",
                 cache_dir: str | os.PathLike = "runs/cache") -> RosenbrockInstance:
        (variant,) = self.check_variants([variant])
        d = int(variant)
        base = torch.tensor([-1.2 if i % 2 == 0 else 1.0 for i in range(d)])
        x0 = base + self.start_noise * torch.randn(d, generator=seeded_generator(_STREAM_START, seed))
        return RosenbrockInstance(x0, device, seed)


# Measured (200 steps of torch.optim.Adam from theta0, seeds 0 / 1; final f; f(theta0) = 6.9 / 3.5
# at kappa 10, 2.9 / 1.4 at kappa 1000; ~1e-9 is where Adam's own steps stall, not float32's floor:
# other rules reach 1e-18):
#   lr           1e-2   3e-2    1e-1    3e-1    1       3       10
#   k 10 s0:     0.65   0.021   8e-9    2.4e-9  1.5e-9  2.5e-8  2.5e-7
#   k 10 s1:     0.081  1.2e-6  1e-9    7.5e-10 1.6e-9  1.3e-8  7.9e-8
#   k 1000 s0:   0.11   0.029   4.3e-3  4.2e-4  2.0e-6  1.8e-6  7.8e-6
#   k 1000 s1:   0.032  2.6e-3  2.8e-4  1.3e-5  7.9e-7  2.8e-6  8.1e-6
# tuned lr 3e-1..3: inside the grid, not at its edge.
QUADRATIC_LR_GRID = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
QUADRATIC_SEARCH_LRS = (3e-2, 3e-1, 3.0)
QUADRATIC_SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class Quadratic(TaskFamily):
    """Minimise an ill-conditioned quadratic 0.5 x^T A x in 20-D (variants: condition number).

    Instance (kappa, seed): A = Q diag(eigs) Q^T with eigs log-spaced from 1 down to 1 / kappa,
    Q a random rotation (QR of a Gaussian matrix, signs fixed) and x0 ~ N(0, I), both drawn with
    seed. The minimum is f(0) = 0.
    """

    name = "quadratic"
    variant_label = "kappa"
    lr_grid = QUADRATIC_LR_GRID
    search_lrs = QUADRATIC_SEARCH_LRS
    sigmas = QUADRATIC_SIGMAS

    def __init__(self, conds: tuple[float, ...] = (10.0, 1000.0), dim: int = 20) -> None:
        if any(c < 1 for c in conds) or dim < 1:
            raise ValueError("condition numbers must be >= 1 and the dimension positive")
        self.variants = tuple(float(c) for c in conds)
        self.search_variants = self.variants[-1:]
        self.dim = dim

    def config(self) -> dict[str, Any]:
        return {"conds": list(self.variants), "dim": self.dim, "eigs": "logspace(1, 1/kappa)",
                "x0": "N(0, I)", "version": 1}

    def matrix(self, kappa: float, seed: int) -> torch.Tensor:
        """A [dim, dim] (float64, CPU) of instance (kappa, seed)."""
        g = seeded_generator(_STREAM_ROTATION, seed)
        q, r = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # a unique rotation per draw
        eigs = torch.logspace(0.0, -math.log10(kappa), self.dim, dtype=torch.float64)
        return (q * eigs) @ q.T

    def instance(self, variant: float, seed: int, device: torch.device | str = "cpu",
                 cache_dir: str | os.PathLike = "runs/cache") -> QuadraticInstance:
        (variant,) = self.check_variants([variant])
        x0 = torch.randn(self.dim, generator=seeded_generator(_STREAM_START, seed))
        return QuadraticInstance(x0, self.matrix(variant, seed), device, seed)


def rosenbrock() -> Rosenbrock:
    """The shipped Rosenbrock family (dimensions 2 and 10)."""
    return Rosenbrock()


def quadratic() -> Quadratic:
    """The shipped ill-conditioned quadratic family (condition numbers 10 and 1000, 20-D)."""
    return Quadratic()
