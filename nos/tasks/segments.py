"""How a task's flat parameter vector splits into tensors (for per-tensor norms and stds).

Tasks describe their parameters with it; the interpreter reads it. It lives with the tasks so
that tasks never import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """How the flat parameter vector splits into tensors (for per-tensor norms and stds)."""

    bounds: tuple[tuple[int, int], ...]

    @property
    def n_params(self) -> int:
        return self.bounds[-1][1]

    def ids(self, device: torch.device | str) -> torch.Tensor:
        out = torch.empty(self.n_params, dtype=torch.long)
        for i, (a, b) in enumerate(self.bounds):
            out[a:b] = i
        return out.to(device)
