"""The shipped non-sine families: digits, teacher_student, rosenbrock, quadratic."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from nos.engine.trainer import train
from nos.tasks import functions, supervised
from nos.tasks.api import TaskFamily
from nos.tasks.randopt import perturbed_params, randopt
from nos.tasks.registry import resolve
from search_space.builtins import builtin

FACTORIES: dict[str, Callable[[], TaskFamily]] = {
    "digits": supervised.digits,
    "teacher_student": supervised.teacher_student,
    "rosenbrock": functions.rosenbrock,
    "quadratic": functions.quadratic,
}
# the same family with one knob changed: its identity must change
CHANGED: dict[str, Callable[[], TaskFamily]] = {
    "digits": lambda: supervised.digits(width=16),
    "teacher_student": lambda: supervised.teacher_student(noise=0.1),
    "rosenbrock": lambda: functions.Rosenbrock(start_noise=0.2),
    "quadratic": lambda: functions.Quadratic(dim=10),
}
NAMES = list(FACTORIES)


def loss0(inst) -> float:
    with torch.no_grad():
        return float(inst.loss(inst.theta0.unsqueeze(0))[0])


@pytest.mark.parametrize("name", NAMES)
def test_family_metadata(name: str) -> None:
    fam = FACTORIES[name]()
    assert fam.name == name
    assert fam.variants and all(isinstance(v, float) for v in fam.variants)
    assert set(fam.default_search_variants()) <= set(fam.variants)
    assert fam.variant_label and fam.describe().strip()
    assert (type(fam).__doc__ or "").strip()
    mid = fam.lr_grid[len(fam.lr_grid) // 2]
    assert fam.lr_grid[0] < mid < fam.lr_grid[-1]
    assert all(s > 0 for s in fam.sigmas) and all(lr > 0 for lr in fam.search_lrs)
    assert fam.randopt_layers()[0] == "all"


@pytest.mark.parametrize("name", NAMES)
def test_identity_stable_and_knob_sensitive(name: str) -> None:
    a, b = FACTORIES[name](), FACTORIES[name]()
    assert a.identity() == b.identity() and a.identity().startswith(f"{name}@")
    assert resolve(name).identity() == a.identity()  # the registry builds the same family
    assert CHANGED[name]().identity() != a.identity()


@pytest.mark.parametrize("name", NAMES)
def test_instances_deterministic_and_seeded(name: str) -> None:
    fam = FACTORIES[name]()
    for v in fam.variants:
        a, b, c = fam.instance(v, 0), fam.instance(v, 0), fam.instance(v, 1)
        assert a.theta0.dtype == torch.float32 and a.theta0.device.type == "cpu"
        assert a.theta0.dim() == 1 and a.segments.n_params == a.n_params
        assert torch.equal(a.theta0, b.theta0)
        assert loss0(a) == loss0(b)
        assert math.isfinite(loss0(a)) and loss0(a) > 0
        assert not torch.equal(a.theta0, c.theta0)
        assert loss0(a) != loss0(c)
        for mask in a.layer_groups.values():
            assert mask.shape == (a.n_params,) and mask.dtype == torch.bool
        assert set(fam.randopt_layers()[1:]) == set(a.layer_groups)


@pytest.mark.parametrize("name", NAMES)
def test_adam_lowers_the_loss(name: str) -> None:
    fam = FACTORIES[name]()
    v = fam.default_search_variants()[0]
    inst = fam.instance(v, 0)
    lr = fam.lr_grid[len(fam.lr_grid) // 2]
    res = train(inst, [builtin("adam"), builtin("adam")], [lr, lr / 10], seeds=0, steps=100)
    start = loss0(inst)
    assert res.losses[0] is not None and res.losses[1] is not None
    assert res.losses[0] < 0.5 * start, (res.losses, start)
    assert res.losses[1] < start


@pytest.mark.parametrize("name", NAMES)
def test_randopt_on_the_family(name: str) -> None:
    fam = FACTORIES[name]()
    inst = fam.instance(fam.default_search_variants()[0], 0)
    layers = fam.randopt_layers()[-1]
    res = randopt(inst, n=24, sigmas=fam.sigmas[:3], top_k=4, layers=layers, seed=0, batch=10)
    assert res.base_loss == pytest.approx(loss0(inst), rel=1e-6)
    assert math.isfinite(res.best_loss) and res.best_sigma in fam.sigmas[:3]
    for r in res.per_sigma:
        assert list(r.top_losses) == sorted(r.top_losses) and len(r.top_indices) == 4
    assert res.ensemble_prediction.shape == inst.predict(inst.theta0[None]).shape[1:]
    if layers != "all":  # only the chosen layer moved
        mask = inst.layer_mask(layers)
        member = perturbed_params(inst, fam.sigmas[0], [0], layers)[0]
        assert torch.equal(member[~mask], inst.theta0[~mask]) and not torch.equal(member, inst.theta0)


def test_function_values() -> None:
    """Known values: Rosenbrock's minimum at (1, ..., 1) and the quadratic's spectrum."""
    ros = functions.rosenbrock().instance(10.0, 0)
    ones = torch.ones(1, 10)
    assert float(ros.loss(ones)[0]) == 0.0
    x = torch.tensor([[-1.2, 1.0]])
    assert float(functions.rosenbrock().instance(2.0, 0).loss(x)[0]) == pytest.approx(24.2, rel=1e-6)
    assert float((ros.theta0 - torch.tensor([-1.2, 1.0] * 5)).abs().max()) < 0.5  # near the classic start
    quad = functions.Quadratic()
    A = quad.matrix(1000.0, 0)
    eig = torch.linalg.eigvalsh(A)
    assert float(eig.max() / eig.min()) == pytest.approx(1000.0, rel=1e-6)
    inst = quad.instance(1000.0, 0)
    assert torch.equal(inst.predict(inst.theta0[None]), inst.theta0[None])
    assert float(inst.loss(torch.zeros(1, 20))[0]) == 0.0


def test_digits_data_is_a_standardised_subset() -> None:
    inst = supervised.digits().instance(128.0, 0)
    x, y = inst.inputs[0], inst.targets
    assert x.shape == (128, 64) and y.shape == (128,) and y.dtype == torch.int64
    assert float(x.mean(dim=0).abs().max()) < 1e-5
    assert len(set(y.tolist())) == 10
    assert inst.predict(inst.theta0[None]).shape == (1, 128, 10)
