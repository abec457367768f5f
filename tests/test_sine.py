"""Tests of the sine-rollout task (nos/tasks/sine.py), on reduced configs so they run in seconds."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from nos.tasks.sine import (
    ParamLayout,
    SineConfig,
    SineTask,
    cache_path,
    init_theta,
    n_points,
    one_step_loss,
    pretrain,
    pretrain_cached,
    pretrain_uncached,
    sample_sine_params,
    sine_values,
    target_trajectory,
)

SMALL = SineConfig(width=16, pretrain_steps=200)
TINY = SineConfig(k=3, width=5, pretrain_steps=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache_dir) -> SineTask:
    return SineTask(SMALL, pretrain_seed=0, target_seed=0, horizon=2, cache_dir=cache_dir)


def perturbed(task: SineTask, C: int, scale: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return task.init_params(C) + scale * torch.randn(C, task.n_params, generator=g)


# --- config, layout, data -------------------------------------------------------------------


def test_config_key_stable_and_sensitive():
    assert SineConfig().key() == SineConfig().key()
    assert len(SineConfig().key()) == 12
    assert SineConfig(pretrain_lr=2e-3).key() != SineConfig().key()
    assert SineConfig(amp_range=(0.8, 1.3)).key() != SineConfig().key()


def test_layout_contiguous_and_layers_partition():
    layout = ParamLayout.for_config(SineConfig())
    k, h = 8, 64
    assert layout.n_params == k * h + h + h * h + h + h + 1
    assert [s.name for s in layout.segments] == ["w1", "b1", "w2", "b2", "w3", "b3"]
    for a, b in zip(layout.segments, layout.segments[1:]):
        assert a.end == b.start
    for seg in layout.segments:
        assert seg.end - seg.start == math.prod(seg.shape)
    masks = [layout.mask(name) for name in ("first", "middle", "last")]
    assert torch.equal(sum(m.int() for m in masks), torch.ones(layout.n_params, dtype=torch.int))
    assert layout.mask("all").all()
    with pytest.raises(ValueError):
        layout.mask("second")


def test_target_trajectory_lengths_and_family():
    c = SineConfig()
    assert [n_points(c, h) for h in (1, 2, 5, 10, 20)] == [20, 40, 100, 200, 400]
    long = target_trajectory(c, seed=3, horizon=20)
    short = target_trajectory(c, seed=3, horizon=1)
    assert long.shape == (400,) and long.dtype == torch.float32
    assert torch.equal(long[:20], short)  # a longer horizon extends the same curve
    assert not torch.allclose(short, target_trajectory(c, seed=4, horizon=1))
    # amp*sin(.)+offset: max - min over >= one period is 2*amp, the midpoint is the offset
    amp = (long.max() - long.min()) / 2
    offset = (long.max() + long.min()) / 2
    assert 0.79 <= amp <= 1.21 and -0.51 <= offset <= 0.51


def test_sine_values_formula():
    c = SineConfig()
    params = torch.tensor([[1.1, 0.3, -0.2]], dtype=torch.float64)
    got = sine_values(c, params, 5)[0]
    want = [1.1 * math.sin(4 * 0.05 * i + 0.3) - 0.2 for i in range(5)]
    assert np.allclose(got.numpy(), want)


# --- rollout and loss ------------------------------------------------------------------------


def test_rollout_matches_hand_loop(cache_dir):
    """An independent one-candidate loop: unflatten by hand, tanh MLP, feed predictions back."""
    task = SineTask(TINY, pretrain_seed=0, target_seed=1, horizon=0.5, cache_dir=cache_dir)
    k, h = 3, 5
    assert task.n_points == 10
    theta = perturbed(task, 1, scale=0.3).double()
    flat = theta[0]
    w1, flat = flat[: k * h].view(k, h), flat[k * h :]
    b1, flat = flat[:h], flat[h:]
    w2, flat = flat[: h * h].view(h, h), flat[h * h :]
    b2, flat = flat[:h], flat[h:]
    w3, b3 = flat[:h].view(h, 1), flat[h:]
    assert b3.shape == (1,)
    target = task.target.double()
    window = list(target[:k])
    preds = []
    for _ in range(10 - k):
        x = torch.stack(window[-k:])
        y = (torch.tanh(torch.tanh(x @ w1 + b1) @ w2 + b2) @ w3 + b3)[0]
        preds.append(y)
        window.append(y)
    preds = torch.stack(preds)
    want = ((preds - target[k:]) ** 2).mean()
    assert torch.allclose(task.rollout(theta)[0], preds)
    assert torch.allclose(task.loss(theta)[0], want)
    assert torch.allclose(task.loss_of_predictions(preds[None])[0], want)


def test_batched_loss_equals_per_candidate(task):
    theta = perturbed(task, 4)
    batched = task.loss(theta)
    single = torch.cat([task.loss(theta[i : i + 1]) for i in range(4)])
    assert batched.shape == (4,)
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-8)
    assert task.rollout(theta).shape == (4, task.n_points - task.config.k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_candidate_does_not_leak(task, bad):
    theta = perturbed(task, 4)
    good_rows = [0, 2, 3]
    ref = theta[good_rows].clone().requires_grad_(True)
    ref_loss = task.loss(ref)
    ref_loss.sum().backward()

    theta[1, -1] = bad  # b3: the output itself (an inf inside w1 would be saturated by tanh)
    theta.requires_grad_(True)
    loss = task.loss(theta)
    assert not torch.isfinite(loss[1])
    assert torch.allclose(loss[good_rows], ref_loss, rtol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(theta.grad[good_rows]).all()
    assert torch.allclose(theta.grad[good_rows], ref.grad, rtol=1e-4, atol=1e-7)


def test_loss_is_differentiable_in_every_segment(task):
    theta = task.init_params(2).requires_grad_(True)
    task.loss(theta).sum().backward()
    for seg in task.layout.segments:
        assert theta.grad[:, seg.start : seg.end].abs().sum() > 0, seg.name


def test_init_params_are_copies(task):
    theta = task.init_params(3)
    assert theta.shape == (3, task.n_params)
    theta[0, 0] += 1.0
    assert torch.equal(theta[1], task.theta0) and not torch.equal(theta[0], task.theta0)
    with pytest.raises(ValueError):
        task.rollout(task.theta0)  # [P] is not [C, P]


# --- pretraining and cache ------------------------------------------------------------------


def test_pretraining_deterministic_and_seed_dependent():
    a = pretrain_uncached(SMALL, seed=0)
    b = pretrain_uncached(SMALL, seed=0)
    c = pretrain_uncached(SMALL, seed=1)
    assert a.dtype == torch.float32 and a.shape == (ParamLayout.for_config(SMALL).n_params,)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_pretraining_learns():
    g = torch.Generator().manual_seed(123)
    seqs = sine_values(SMALL, sample_sine_params(SMALL, g, 256), 20).float()
    theta_init = init_theta(SMALL, torch.Generator().manual_seed(0))
    before = one_step_loss(SMALL, theta_init[None], seqs)[0]
    after = one_step_loss(SMALL, pretrain_uncached(SMALL, seed=0)[None], seqs)[0]
    assert after < 0.05 * before, (before, after)


def test_cache_loads_and_config_change_retrains(tmp_path):
    t0 = time.perf_counter()
    a, loaded = pretrain_cached(SMALL, seed=0, cache_dir=tmp_path)
    t_train = time.perf_counter() - t0
    assert not loaded
    path = cache_path(SMALL, 0, tmp_path)
    assert path.name == f"sine-{SMALL.key()}-seed0.npz" and path.exists()
    with np.load(path, allow_pickle=False) as f:  # plain arrays, no pickle
        assert np.array_equal(f["theta"], a.numpy())

    t0 = time.perf_counter()
    b, loaded = pretrain_cached(SMALL, seed=0, cache_dir=tmp_path)
    t_load = time.perf_counter() - t0
    assert loaded and torch.equal(a, b)
    assert t_load < t_train
    assert torch.equal(pretrain(SMALL, seed=0, cache_dir=tmp_path), a)

    changed = SineConfig(width=16, pretrain_steps=200, pretrain_lr=2e-3)
    c, loaded = pretrain_cached(changed, seed=0, cache_dir=tmp_path)
    assert not loaded and not torch.equal(a, c)
    d, loaded = pretrain_cached(SMALL, seed=1, cache_dir=tmp_path)
    assert not loaded and not torch.allclose(a, d)
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(task, cache_dir):
    gpu = SineTask(SMALL, pretrain_seed=0, target_seed=0, horizon=2, device="cuda",
                   cache_dir=cache_dir)
    theta = perturbed(task, 4)
    assert gpu.loss(theta.cuda()).device.type == "cuda"
    assert torch.allclose(gpu.loss(theta.cuda()).cpu(), task.loss(theta), rtol=1e-4, atol=1e-7)
