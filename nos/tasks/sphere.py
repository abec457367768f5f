"""The shifted sphere of NOS's integrity check (Morgan & Hougen, 2024; after Liu et al., 2021).

f(x) = sum((x - b)^2) in 5-D, from x0 = [1.1, .9, 1.1, .9, 1.0] with b = [.5, 1.5, -.3, -1.2, .75]
(f(x0) = 7.15).
"""

from __future__ import annotations

import torch

from nos.tasks.segments import Segments

X0 = (1.1, 0.9, 1.1, 0.9, 1.0)
SHIFT = (0.5, 1.5, -0.3, -1.2, 0.75)


class SphereTask:
    segments = Segments(((0, 5),))

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.x0 = torch.tensor(X0, device=self.device)
        self.shift = torch.tensor(SHIFT, device=self.device)

    def init_params(self, n: int) -> torch.Tensor:
        return self.x0.repeat(n, 1)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        return ((theta - self.shift) ** 2).sum(dim=1)
