"""NOS's integrity check, batched: every genome x 6 learning rates x both signs in one pass.

A candidate passes if, after 35 steps on the shifted sphere, the loss is below 3.5 (about half of
the initial 7.15) at some learning rate in {1, 1e-1, ..., 1e-5}; if no rate passes, the update's
sign is flipped and the sweep repeated (Morgan & Hougen, 2024). Both signs run in the same batch:
the flipped result is only used when the original sign fails everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from search_space.genome import Genome

from ..tasks.sphere import SphereTask
from .trainer import train

STEPS = 35
THRESHOLD = 3.5
LRS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@dataclass(frozen=True)
class IntegrityResult:
    passed: bool
    final_loss: float | None  # best final loss under the chosen sign (None: all non-finite)
    lr: float | None  # the learning rate that reached it
    sign_flipped: bool

    def to_json(self) -> dict:
        return {"passed": self.passed, "final_loss": self.final_loss, "lr": self.lr, "sign_flipped": self.sign_flipped}

    def apply(self, genome: Genome) -> Genome:
        """The genome as it should be kept: with its sign flipped if that is what passed."""
        return genome.with_(sign=-genome.sign) if self.sign_flipped else genome


def _best(losses: Sequence[float | None]) -> tuple[float | None, float | None]:
    finite = [(x, lr) for x, lr in zip(losses, LRS) if x is not None and math.isfinite(x)]
    if not finite:
        return None, None
    return min(finite)


def check(genomes: Sequence[Genome], *, device: torch.device | str = "cpu", seed: int = 0) -> list[IntegrityResult]:
    """Run the shifted-sphere check for all genomes in one batched training run."""
    if not genomes:
        return []
    batch, lrs = [], []
    for g in genomes:
        for flipped in (False, True):
            gg = g.with_(sign=-g.sign) if flipped else g
            batch += [gg] * len(LRS)
            lrs += list(LRS)
    res = train(SphereTask(device), batch, lrs, steps=STEPS, seeds=seed)
    out = []
    n = len(LRS)
    for i in range(len(genomes)):
        plain_losses = res.losses[2 * n * i : 2 * n * i + n]
        flipped_losses = res.losses[2 * n * i + n : 2 * n * (i + 1)]
        loss, lr = _best(plain_losses)
        if loss is not None and loss < THRESHOLD:
            out.append(IntegrityResult(True, loss, lr, False))
            continue
        floss, flr = _best(flipped_losses)
        if floss is not None and floss < THRESHOLD:
            out.append(IntegrityResult(True, floss, flr, True))
        else:
            out.append(IntegrityResult(False, loss, lr, False))
    return out
