"""Shared fixtures: a tiny MLP regression task in both of its forms.

`MLPTask` implements the trainer's Task protocol (a flat parameter vector per candidate, the
concatenation of a torch module's parameters in `model.parameters()` order), and can also build
the same network as an ordinary `nn.Module` with the same initial weights, so an exported
optimizer and the batched interpreter can be run on literally the same problem.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nos.engine.interpreter import Segments


class MLPTask:
    """Linear(4, 8) - Tanh - Linear(8, 1) regressing scale * sin(sum(x)) on 32 seeded points."""

    def __init__(self, seed: int = 0, device: str = "cpu", target_scale: float = 1.0) -> None:
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.x = torch.randn(32, 4, generator=gen)
        self.y = target_scale * torch.sin(self.x.sum(dim=1, keepdim=True))
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        bounds, start = [], 0
        for p in self.model.parameters():
            bounds.append((start, start + p.numel()))
            start += p.numel()
        self.segments = Segments(tuple(bounds))
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        self.last_theta: torch.Tensor | None = None  # the parameters of the latest loss() call

    def module_loss(self, out: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, self.y)

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: row[a:b].view(shape)
            for name, (a, b), shape in zip(self.names, self.segments.bounds, self.shapes)
        }

    # -- the trainer's Task protocol
    def init_params(self, n: int) -> torch.Tensor:
        return self.theta0.repeat(n, 1)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """All candidates at once: the network written out with batched matmuls."""
        self.last_theta = theta.detach().clone()
        C = theta.shape[0]
        w1, b1, w2, b2 = (theta[:, a:b].reshape(C, *shape) for (a, b), shape in zip(self.segments.bounds, self.shapes))
        h = torch.tanh(torch.baddbmm(b1[:, None, :], self.x.expand(C, -1, -1), w1.transpose(1, 2)))
        out = torch.baddbmm(b2[:, None, :], h, w2.transpose(1, 2))
        return ((out - self.y) ** 2).mean(dim=(1, 2))

    def loss_one_by_one(self, theta: torch.Tensor) -> torch.Tensor:
        """The reference: each candidate through the torch module itself."""
        return torch.stack(
            [
                self.module_loss(functional_call(self.model, self.unflatten(theta[c]), (self.x,)))
                for c in range(theta.shape[0])
            ]
        )

    # -- the same network as a plain module (for exported optimizers / torch.optim)
    def fresh_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return copy.deepcopy(self.model).to(dtype)

    def data(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.to(dtype), self.y.to(dtype)

    @staticmethod
    def flat(model: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture
def mlp_task() -> MLPTask:
    return MLPTask(seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's tiny tensors: the tests start subprocesses that run in
    parallel on a 2-core machine, and torch's spinning worker threads would fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A command started at once and collected when a test needs its result."""

    def __init__(self, args: list[str], *, cwd: Path = REPO, env: dict | None = None) -> None:
        env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._result: tuple[int, str, str] | None = None

    def result(self, timeout: float = 120) -> tuple[int, str, str]:
        if self._result is None:
            out, err = self.popen.communicate(timeout=timeout)
            self._result = (self.popen.returncode, out, err)
        return self._result

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()
