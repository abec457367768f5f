"""Tests of the RandOpt baseline (nos/tasks/randopt.py) and the FPE budget (nos/tasks/budget.py)."""

from __future__ import annotations

import pytest
import torch

from nos.tasks import budget
from nos.tasks.randopt import member_noise, perturbed_params, randopt
from nos.tasks.sine import SineConfig, SineTask

SMALL = SineConfig(width=16, pretrain_steps=200)
SIGMAS = (0.01, 0.05)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> SineTask:
    cache = tmp_path_factory.mktemp("cache")
    return SineTask(SMALL, pretrain_seed=0, target_seed=0, horizon=2, cache_dir=cache)


@pytest.fixture(scope="module")
def result(task):
    return randopt(task, n=40, sigmas=SIGMAS, top_k=5, seed=3, batch=16)  # 16 does not divide 40


def test_top_k_and_ensemble_recomputed_independently(task, result):
    target_future = task.target[task.config.k :]
    for r in result.per_sigma:
        members = perturbed_params(task, r.sigma, range(40), seed=3)
        with torch.no_grad():
            losses = task.loss(members)
        expected = torch.argsort(losses, stable=True)[:5]
        assert list(r.top_indices) == expected.tolist()
        assert torch.allclose(torch.tensor(r.top_losses), losses[expected], rtol=1e-5)
        others = torch.ones(40, dtype=torch.bool)
        others[expected] = False
        assert max(r.top_losses) <= losses[others].min()
        with torch.no_grad():
            mean_pred = task.rollout(members[expected]).mean(dim=0)
        want = ((mean_pred - target_future) ** 2).mean()
        assert r.ensemble_loss == pytest.approx(float(want), rel=1e-5)
        assert r.best_member_loss == pytest.approx(float(losses.min()), rel=1e-5)


def test_best_sigma_is_argmin(task, result):
    best = min(result.per_sigma, key=lambda r: r.ensemble_loss)
    assert result.best_sigma == best.sigma and result.best_loss == best.ensemble_loss
    assert result.best_member_loss == best.best_member_loss
    assert result.ensemble_losses == {r.sigma: r.ensemble_loss for r in result.per_sigma}
    assert (result.n, result.top_k, result.layers) == (40, 5, "all")
    assert result.ensemble_prediction.shape == (task.n_points - task.config.k,)
    assert result.base_loss == pytest.approx(float(task.loss(task.init_params(1))[0]), rel=1e-6)


def test_deterministic_and_batch_independent(task, result):
    again = randopt(task, n=40, sigmas=SIGMAS, top_k=5, seed=3, batch=40)
    assert again.per_sigma == result.per_sigma
    other = randopt(task, n=40, sigmas=SIGMAS, top_k=5, seed=4, batch=16)
    assert other.per_sigma != result.per_sigma


@pytest.mark.parametrize("layers", ["first", "middle", "last"])
def test_layer_mask_touches_only_that_layer(task, layers):
    delta = perturbed_params(task, 0.1, range(3), layers=layers) - task.theta0
    delta_all = perturbed_params(task, 0.1, range(3), layers="all") - task.theta0
    chosen = set(task.layout.layers[layers])
    for seg in task.layout.segments:
        part = delta[:, seg.start : seg.end]
        if seg.name in chosen:
            assert (part != 0).all(), seg.name
            assert torch.equal(part, delta_all[:, seg.start : seg.end])  # same noise draws
        else:
            assert (part == 0).all(), seg.name
    r = randopt(task, n=8, sigmas=(0.02,), top_k=2, layers=layers, batch=8)
    assert r.layers == layers and r.best_loss < float("inf")


def test_member_noise_depends_only_on_seed_and_index():
    a = member_noise(50, seed=0, indices=[0, 1, 2])
    b = member_noise(50, seed=0, indices=[2])
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], member_noise(50, seed=1, indices=[0])[0])


def test_invalid_arguments(task):
    with pytest.raises(ValueError):
        randopt(task, n=4, top_k=5)
    with pytest.raises(ValueError):
        randopt(task, n=4, top_k=2, layers="second")


def test_budget_accounting():
    assert budget.DEFAULT_BUDGET_FPE == 600
    assert budget.gradient_steps(600) == 200
    assert budget.gradient_steps(600, extra_forwards_per_step=1) == 150
    assert budget.gradient_steps(601) == 200
    assert budget.randopt_population(600) == 600
    assert budget.describe(600) == (
        "budget 600 forward-pass equivalents = 200 gradient steps = 600 RandOpt perturbations")
    with pytest.raises(ValueError):
        budget.gradient_steps(-1)
