"""Any nn.Module as a task (nos.tasks.module): the adapter against the plain module itself."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from nos.engine.trainer import train
from nos.tasks.module import ModuleInstance, ModuleTask, sine_module, sine_module_family
from nos.tasks.sine import SineConfig, SineTask
from search_space.builtins import builtin


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def small_data(scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(16, 3, generator=g)
    return x, scale * torch.sin(x[:, :2] * 2 + x[:, 2:])


def make_instance(seed: int = 0) -> tuple[ModuleInstance, nn.Module, torch.Tensor, torch.Tensor]:
    """The instance and an independent copy of the same module and data (the reference)."""
    model = small_model(seed)
    x, y = small_data(1.0, seed)
    return ModuleInstance(copy.deepcopy(model), x, y, mse_loss, seed=seed), model, x, y


def reference_loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and flat gradient of the plain module holding `row`, by plain autograd."""
    m = copy.deepcopy(model)
    vector_to_parameters(row.detach().clone(), m.parameters())
    loss = mse_loss(m(x), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def batched_loss_and_grad(inst: ModuleInstance, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta = theta.clone().requires_grad_(True)
    loss = inst.loss(theta)
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(loss), loss, 0.0).sum(), theta)
    return loss.detach(), grad


def rows(inst: ModuleInstance, C: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return inst.theta0 + 0.3 * torch.randn(C, inst.n_params, generator=g)


def test_layout_follows_named_parameters() -> None:
    inst, model, _, _ = make_instance()
    assert torch.equal(inst.theta0, parameters_to_vector(model.parameters()))
    assert inst.theta0.dtype == torch.float32
    sizes = [p.numel() for p in model.parameters()]
    assert [b - a for a, b in inst.segments.bounds] == sizes
    assert list(inst.layer_groups) == ["0", "2"]  # the Tanh owns no parameters
    first, last = inst.layer_groups["0"], inst.layer_groups["2"]
    assert int(first.sum()) == 3 * 8 + 8 and int(last.sum()) == 8 * 2 + 2
    assert not bool((first & last).any()) and bool((first | last).all())


def test_loss_of_theta0_is_the_modules() -> None:
    inst, model, x, y = make_instance()
    with torch.no_grad():
        expected = mse_loss(model(x), y)
    got = inst.loss(inst.theta0.unsqueeze(0))
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    assert inst.predict(inst.theta0.unsqueeze(0)).shape == (1, 16, 2)


def test_batched_gradient_equals_plain_autograd() -> None:
    inst, model, x, y = make_instance()
    theta = rows(inst, 4)
    loss, grad = batched_loss_and_grad(inst, theta)
    for c in range(4):
        ref_loss, ref_grad = reference_loss_and_grad(model, x, y, theta[c])
        assert float(loss[c]) == pytest.approx(float(ref_loss), rel=1e-6)
        torch.testing.assert_close(grad[c], ref_grad, rtol=1e-6, atol=1e-6)
    assert float((grad[0] - grad[1]).abs().max()) > 1e-3  # rows really differ


def test_nan_row_stays_in_its_row() -> None:
    inst, _, _, _ = make_instance()
    theta = rows(inst, 4)
    clean_loss, clean_grad = batched_loss_and_grad(inst, theta)
    poisoned = theta.clone()
    poisoned[2, 5] = float("nan")
    loss, grad = batched_loss_and_grad(inst, poisoned)
    assert torch.isnan(loss[2])
    others = [0, 1, 3]
    assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()
    torch.testing.assert_close(loss[others], clean_loss[others], rtol=0, atol=1e-6)
    torch.testing.assert_close(grad[others], clean_grad[others], rtol=0, atol=1e-6)


def test_alone_equals_in_a_batch() -> None:
    inst, _, _, _ = make_instance()
    theta = rows(inst, 5, seed=3)
    loss, grad = batched_loss_and_grad(inst, theta)
    for c in range(5):
        one_loss, one_grad = batched_loss_and_grad(inst, theta[c : c + 1])
        assert float(one_loss[0]) == pytest.approx(float(loss[c]), rel=1e-6, abs=1e-7)
        torch.testing.assert_close(one_grad[0], grad[c], rtol=1e-6, atol=1e-6)


def family(**overrides: Any) -> ModuleTask:
    kwargs: dict[str, Any] = dict(model=small_model, data=small_data, loss=mse_loss, variants=(1.0, 2.0),
                                  variant_label="scale", config={"n": 16, "width": 8})
    kwargs.update(overrides)
    return ModuleTask("small", **kwargs)


def test_identity_stable_and_config_sensitive() -> None:
    a, b = family(), family()
    assert a.identity() == b.identity() and a.identity().startswith("small@")
    assert family(config={"n": 16, "width": 9}).identity() != a.identity()
    assert family(variants=(1.0, 3.0)).identity() != a.identity()
    assert ModuleTask("other", small_model, small_data, mse_loss, variants=(1.0, 2.0),
                      variant_label="scale", config={"n": 16, "width": 8}).identity() != a.identity()
    with pytest.raises(ValueError, match="JSON"):
        family(config={"bad": object()})


def test_family_instances_are_deterministic() -> None:
    fam = family()
    a, b, c = fam.instance(2.0, 0), fam.instance(2.0, 0), fam.instance(2.0, 1)
    assert torch.equal(a.theta0, b.theta0) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.theta0, c.theta0)
    assert float(a.loss(a.theta0[None])[0]) == float(b.loss(b.theta0[None])[0])
    assert fam.randopt_layers() == ("all", "0", "2")
    with pytest.raises(ValueError, match="scale"):
        fam.instance(5.0, 0)


def test_trainer_adam_equals_torch_adam() -> None:
    inst, model, x, y = make_instance()
    steps, lr = 30, 1e-2
    res = train(inst, [builtin("adam")], [lr], seeds=0, steps=steps)
    assert res.losses[0] is not None

    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=lr)  # eps 1e-8 outside the sqrt: the `div` op's
    for _ in range(steps):
        opt.zero_grad()
        mse_loss(m(x), y).backward()
        opt.step()
    with torch.no_grad():
        ref = float(mse_loss(m(x), y))
    loss0 = float(inst.loss(inst.theta0[None])[0])
    assert ref < 0.8 * loss0  # Adam did something
    assert res.losses[0] == pytest.approx(ref, rel=1e-4)
    assert res.params is not None
    torch.testing.assert_close(res.params[0], parameters_to_vector(m.parameters()).detach(),
                               rtol=1e-4, atol=1e-5)


def test_batchnorm_runs_in_eval_mode_and_buffers_stay() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6)
    model = nn.Sequential(nn.Linear(3, 6), bn, nn.ReLU(), nn.Linear(6, 1))
    assert model.training and bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ref_model = copy.deepcopy(model).eval()
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(10, 1)
    before = bn.running_mean.clone()
    inst = ModuleInstance(model, x, y, mse_loss)
    assert not inst.model.training
    loss, _ = batched_loss_and_grad(inst, inst.init_params(3))
    with torch.no_grad():
        expected = float(mse_loss(ref_model(x), y))
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(bn.running_mean, before)  # never updated
    assert list(inst.layer_groups) == ["0", "1", "3"]


# ---------------------------------------------------------------- the sine task as an nn.Module

TINY_SINE = SineConfig(width=16, pretrain_steps=20)


def test_sine_module_matches_sine_task(tmp_path) -> None:
    task = SineTask(TINY_SINE, 0, 0, 2.0, "cpu", str(tmp_path))
    inst = sine_module_family(TINY_SINE).instance(2.0, 0, "cpu", str(tmp_path))
    assert torch.equal(inst.theta0, task.theta0)  # the same layout: the same flat vector
    assert inst.segments == task.segments
    assert list(inst.layer_groups) == ["first", "middle", "last"]
    for name in ("first", "middle", "last"):
        assert torch.equal(inst.layer_groups[name], task.layer_groups[name])
    g = torch.Generator().manual_seed(0)
    theta = task.theta0 + 0.05 * torch.randn(4, task.n_params, generator=g)
    torch.testing.assert_close(inst.loss(theta), task.loss(theta), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inst.predict(theta)[:, 0], task.rollout(theta), rtol=1e-5, atol=1e-6)
    # and the plain module, called directly on the trajectory
    model = sine_module(TINY_SINE, task.theta0)
    with torch.no_grad():
        direct = mse_loss(model(task.target[None]), task.target[None, TINY_SINE.k :])
    assert float(direct) == pytest.approx(float(task.loss(task.theta0[None])[0]), rel=1e-6)
