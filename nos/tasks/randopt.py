"""RandOpt: random perturbations of the pretrained weights + top-K ensemble.

Gan & Isola, 2026, "Neural Thickets: Diverse Task Experts Are Dense Around Pretrained
Weights" (code: github.com/sunrainyg/RandOpt), as used on the sine-rollout task by the blog
post "When does RandOpt work?" (Ziming Liu, 2026):

1. draw N perturbations theta0 + sigma * eps_i, eps_i ~ N(0, I) (optionally only on one
   layer's weights: the post's "first / second / third" table);
2. score each on the post-training loss;
3. keep the K best and, at inference, run all K and average their predictions (the 1-D
   regression toy's "mean of predictions"; majority vote is the LLM variant).

sigma is tuned like Adam's learning rate: every sigma in the list gets the whole population
N, and the one with the best ensemble loss is reported. The same eps_i are used for every sigma
and every layer choice (common random numbers: comparisons between sigmas are not blurred by
different draws), and member i's noise depends only on (seed, i), not on the batch size.
Cost: N forward rollouts per sigma (N forward-pass equivalents; see nos.tasks.budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nos.tasks.api import TaskInstance

DEFAULT_SIGMAS = (0.002, 0.005, 0.01, 0.02, 0.05)  # Gan & Isola's toy used 0.002 from pretrained
DEFAULT_TOP_K = 10  # Gan & Isola's toy: K = 5..10; our independent sine-task runs: K = 10

_STREAM_RANDOPT = 4  # distinct from the streams of nos.tasks.sine


@dataclass(frozen=True)
class SigmaResult:
    """Outcome of one sigma: ensemble loss, and the K kept members (ascending loss)."""

    sigma: float
    ensemble_loss: float
    best_member_loss: float
    top_indices: tuple[int, ...]
    top_losses: tuple[float, ...]


@dataclass(frozen=True)
class RandOptResult:
    """RandOpt over a list of sigmas; ``best_*`` refer to the sigma with the lowest ensemble loss."""

    n: int
    top_k: int
    layers: str
    seed: int
    base_loss: float  # loss of the unperturbed pretrained weights (reference, not budgeted)
    per_sigma: tuple[SigmaResult, ...]
    best_sigma: float
    best_loss: float  # ensemble loss at best_sigma
    best_member_loss: float  # best single perturbation at best_sigma
    ensemble_prediction: torch.Tensor  # [n_points - k] mean of the K rollouts at best_sigma (CPU)

    @property
    def ensemble_losses(self) -> dict[float, float]:
        return {r.sigma: r.ensemble_loss for r in self.per_sigma}


def member_noise(n_params: int, seed: int, indices: Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """eps [len(indices), P] ~ N(0, 1); row i comes from a CPU generator seeded by (seed, i)."""
    rows = []
    for i in indices:
        words = np.random.SeedSequence([_STREAM_RANDOPT, seed, int(i)]).generate_state(2)
        g = torch.Generator(device="cpu").manual_seed((int(words[0]) << 31) ^ int(words[1]))
        rows.append(torch.randn(n_params, generator=g))
    return torch.stack(rows).to(device)


def perturbed_params(task: TaskInstance, sigma: float, indices: Sequence[int], layers: str = "all",
                     seed: int = 0) -> torch.Tensor:
    """Members ``indices`` of the population: theta0 + sigma * eps_i on the chosen layers [len, P]."""
    mask = task.layer_mask(layers).to(task.theta0.dtype)
    eps = member_noise(task.n_params, seed, indices, task.device)
    return task.theta0 + sigma * (eps * mask)


def _finite_or_inf(x: torch.Tensor) -> torch.Tensor:
    """NaN losses (diverged rollouts) rank last."""
    return torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)


@torch.no_grad()
def randopt(task: TaskInstance, n: int, sigmas: Sequence[float] = DEFAULT_SIGMAS,
            top_k: int = DEFAULT_TOP_K, layers: str = "all", seed: int = 0,
            batch: int = 256) -> RandOptResult:
    """Run RandOpt with population ``n`` per sigma, keep ``top_k``, ensemble by the mean.

    Members are evaluated ``batch`` at a time along the task's candidate axis; for each sigma
    a running top-K of (loss, member index, rollout) is kept, so no rollout is recomputed.
    Ties in loss go to the lower member index.
    """
    if n < 1 or not 1 <= top_k <= n:
        raise ValueError(f"need n >= 1 and 1 <= top_k <= n, got n={n}, top_k={top_k}")
    if len(sigmas) == 0 or batch < 1:
        raise ValueError("need at least one sigma and batch >= 1")
    mask = task.layer_mask(layers).to(task.theta0.dtype)  # validates `layers` early

    # Running top-K per sigma: losses [<=K], member indices [<=K], predictions [<=K, ...].
    shape = task.predict(task.theta0.unsqueeze(0)).shape[1:]
    top = [(task.theta0.new_empty(0), torch.empty(0, dtype=torch.long, device=task.device),
            task.theta0.new_empty(0, *shape)) for _ in sigmas]
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        eps = member_noise(task.n_params, seed, idx, task.device) * mask  # shared by all sigmas
        idx_t = torch.tensor(idx, dtype=torch.long, device=task.device)
        for s, sigma in enumerate(sigmas):
            preds = task.predict(task.theta0 + sigma * eps)
            losses = _finite_or_inf(task.loss_of_predictions(preds))
            old_l, old_i, old_p = top[s]
            cat_l = torch.cat([old_l, losses])
            order = torch.argsort(cat_l, stable=True)[:top_k]  # earlier = lower index wins ties
            top[s] = (cat_l[order], torch.cat([old_i, idx_t])[order], torch.cat([old_p, preds])[order])

    per_sigma, ensembles = [], []
    for sigma, (top_l, top_i, top_p) in zip(sigmas, top):
        ensemble = top_p.mean(dim=0)
        ens_loss = _finite_or_inf(task.loss_of_predictions(ensemble.unsqueeze(0)))[0]
        ensembles.append(ensemble)
        per_sigma.append(SigmaResult(
            sigma=float(sigma), ensemble_loss=float(ens_loss), best_member_loss=float(top_l[0]),
            top_indices=tuple(int(i) for i in top_i.tolist()),
            top_losses=tuple(float(v) for v in top_l.tolist())))

    best = min(range(len(per_sigma)), key=lambda s: per_sigma[s].ensemble_loss)
    base_loss = float(task.loss(task.theta0.unsqueeze(0))[0])
    return RandOptResult(
        n=n, top_k=top_k, layers=layers, seed=seed, base_loss=base_loss,
        per_sigma=tuple(per_sigma), best_sigma=per_sigma[best].sigma,
        best_loss=per_sigma[best].ensemble_loss, best_member_loss=per_sigma[best].best_member_loss,
        ensemble_prediction=ensembles[best].cpu())
