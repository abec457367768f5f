"""The sine task's rollout loss and its gradient in one compiled pass per candidate (numba).

Why: the eager rollout (`nos.tasks.sine.rollout`) runs one batched GEMV per layer and time step
over all C candidates, so each of the ~100 time steps streams every candidate's ~19 KB of weights
through the cache, forward and again backward: at 256 candidates that is ~5 MB per time step, far
past this kind of CPU's 1 MB L2, and throughput *falls* as the batch grows. Here one candidate is
rolled out forward and back-propagated through time while its weights, activations and gradient
stay in L1/L2; candidates are independent, so chunks of them run on threads (numba releases the
GIL). The math is the eager path's, step for step (same layer order, tanh or relu, MSE mean), in
float32; only the order of summation inside a layer differs. The rollout amplifies float32
rounding (eager float32 is itself ~2e-5 from float64), and the tests hold the kernel to the eager
path's own distance from float64 autograd.

`SineLoss.apply(theta, context, target, k, width, activation, want_grad)` is a `torch.autograd.Function`: loss [C],
and d loss / d theta computed in the same pass when autograd wants it (each candidate's loss
depends on its own row only, so the backward is one row-wise scale). CPU float32 only; anything
else (CUDA, float64, no numba) takes the eager path, which is also the reference.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import torch

from ..engine.threads import run_rows

# numba is a dependency; without it (or with NOS_ROLLOUT=eager) the eager rollout runs
HAVE_NUMBA = importlib.util.find_spec("numba") is not None

KERNELS = ("fused", "eager")


def default_kernel() -> str:
    """The rollout kernel tasks use unless told: `NOS_ROLLOUT` (fused | eager), else fused when
    numba is importable."""
    choice = os.environ.get("NOS_ROLLOUT", "fused")
    if choice not in KERNELS:
        raise ValueError(f"NOS_ROLLOUT must be one of {', '.join(KERNELS)}, got {choice!r}")
    return choice if HAVE_NUMBA else "eager"


def usable(theta: torch.Tensor) -> bool:
    """Whether the fused kernel can take `theta` (CPU float32 [C, P])."""
    return HAVE_NUMBA and theta.device.type == "cpu" and theta.dtype == torch.float32 and theta.dim() == 2


def loss_and_grad(theta: torch.Tensor, context: torch.Tensor, target: torch.Tensor, k: int, width: int,
                  activation: str, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss [C] (and d loss_c / d theta_c as [C, P]) of the sine MLP rolled out from `context`
    [C, k] against `target` [C, S], on torch's thread count (candidates split in chunks)."""
    th = theta.detach().contiguous().numpy()
    ctx = context.detach().to(torch.float32).contiguous().numpy()
    tgt = target.detach().to(torch.float32).contiguous().numpy()
    C = th.shape[0]
    loss = np.empty(C, np.float32)
    grad = np.empty(th.shape if want_grad else (1, 1), np.float32)  # the kernel writes every entry
    tanh = activation == "tanh"
    from ._sine_numba import rows as _rows  # compiled on first use, then cached on disk by numba
    run_rows(_rows, C, (th, ctx, tgt, k, width, tanh, want_grad), (loss, grad))
    return torch.from_numpy(loss), (torch.from_numpy(grad) if want_grad else None)


class SineLoss(torch.autograd.Function):
    """Loss [C] of C sine MLPs theta [C, P]; the gradient comes from the same compiled pass."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, context: torch.Tensor, target: torch.Tensor,
                k: int, width: int, activation: str, want_grad: bool) -> torch.Tensor:
        loss, grad = loss_and_grad(theta, context, target, k, width, activation, want_grad)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None], None, None, None, None, None, None
