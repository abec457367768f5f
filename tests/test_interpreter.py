"""The batched interpreter and trainer: against torch.optim and hand-written references, and
batched == one-at-a-time (the property the whole search relies on)."""

from __future__ import annotations

import math

import pytest
import torch

from nos.engine.interpreter import (
    BatchedOptimizer,
    Segments,
    segment_norm,
    segment_std,
)
from nos.engine.rng import rng_normal, rng_uniform
from nos.engine.trainer import train
from nos.tasks.budget import step_cost, steps_for
from nos.tasks.sphere import SHIFT, X0, SphereTask
from search_space.builtins import builtin
from search_space.genome import Genome, from_json

from .conftest import MLPTask

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True, params=["fused", "eager"])
def update_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here on both update paths (`nos.engine.fused` and the eager op groups)."""
    monkeypatch.setenv("NOS_UPDATE", request.param)
    return request.param

SPHERE_F0 = sum((x - b) ** 2 for x, b in zip(X0, SHIFT))  # 7.1525 (the docstring rounds to 7.15)


def G(nodes: list[dict], **rest) -> Genome:
    return from_json({"nodes": nodes, **rest})


# =============================================================================================
# references


def test_sphere_task():
    t = SphereTask()
    theta = t.init_params(3)
    assert theta.shape == (3, 5) and torch.equal(theta[1], torch.tensor(X0))
    assert t.loss(theta).tolist() == pytest.approx([SPHERE_F0] * 3)
    assert float(t.loss(torch.tensor([SHIFT]))) == 0.0


def test_mlp_task_fixture_is_the_module():
    """The batched MLP of the tests computes what the torch module computes, for every row."""
    task = MLPTask(seed=0)
    theta = task.init_params(4) + 0.1 * torch.randn(4, task.segments.n_params, generator=torch.Generator().manual_seed(0))
    theta.requires_grad_(True)
    fast, ref = task.loss(theta), task.loss_one_by_one(theta)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-7)
    (g_fast,) = torch.autograd.grad(fast.sum(), theta)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-7)
    assert task.segments.n_params == 4 * 8 + 8 + 8 + 1


def test_sgd_on_the_sphere_has_its_closed_form():
    # x_{t+1} - b = (1 - 2 lr)(x_t - b) = 0.8 (x_t - b): after 35 steps f = 0.8^70 f(x0)
    res = train(SphereTask(), [builtin("sgd")], [0.1], steps=35, record_curves=True)
    assert res.losses[0] == pytest.approx(0.8**70 * SPHERE_F0, rel=1e-4)
    assert res.curves is not None
    assert res.curves[0] == pytest.approx([0.8 ** (2 * t) * SPHERE_F0 for t in range(35)], rel=1e-4)
    assert res.steps == [35] and res.fpe == [35 * 3] and res.failed_at == {}


def _torch_sphere(opt_factory, steps: int) -> float:
    x = torch.tensor(X0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(SHIFT, dtype=torch.float64)
    opt = opt_factory([x])
    for _ in range(steps):
        opt.zero_grad()
        ((x - b) ** 2).sum().backward()
        opt.step()
    return float(((x - b) ** 2).sum().detach())


TORCH_EQUIVALENTS = {
    "sgd": (0.1, lambda p, lr: torch.optim.SGD(p, lr=lr)),
    "momentum": (0.05, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
    "nesterov": (0.05, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
    "adam": (0.1, lambda p, lr: torch.optim.Adam(p, lr=lr)),
}


@pytest.mark.parametrize("name", list(TORCH_EQUIVALENTS))
def test_interpreter_matches_torch_optim_on_the_sphere(name):
    lr, factory = TORCH_EQUIVALENTS[name]
    want = _torch_sphere(lambda p: factory(p, lr), 35)
    got = train(SphereTask(), [builtin(name)], [lr], steps=35).losses[0]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("name", list(TORCH_EQUIVALENTS))
def test_interpreter_matches_torch_optim_on_an_mlp(name):
    lr, factory = TORCH_EQUIVALENTS[name]
    lr = lr / 10 if name == "adam" else lr
    task = MLPTask(seed=1)
    res = train(task, [builtin(name)], [lr], steps=40)
    model = task.fresh_model()
    opt = factory(model.parameters(), lr)
    for _ in range(40):
        opt.zero_grad()
        task.module_loss(model(task.x)).backward()
        opt.step()
    want = MLPTask.flat(model)
    assert task.last_theta is not None
    got = task.last_theta[0]
    assert (want - task.theta0).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert res.losses[0] == pytest.approx(float(task.module_loss(model(task.x)).detach()), rel=1e-4)


def test_lion_matches_a_hand_written_lion():
    # Chen et al. 2023: c = b1 m + (1 - b1) g; w -= lr sign(c); m = b2 m + (1 - b2) g
    lr, steps = 0.03, 35
    x = torch.tensor(X0, dtype=torch.float64)
    b = torch.tensor(SHIFT, dtype=torch.float64)
    m = torch.zeros(5, dtype=torch.float64)
    for _ in range(steps):
        g = 2 * (x - b)
        x = x - lr * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    want = float(((x - b) ** 2).sum())
    got = train(SphereTask(), [builtin("lion")], [lr], steps=steps).losses[0]
    assert got == pytest.approx(want, rel=1e-4)


def test_global_clip_and_schedules_by_hand():
    # sgd with clip 0.5 and a linear lr schedule on the sphere, written out
    g = G([{"op": "mul", "in": ["g", "one"]}], clip=0.5, lr={"schedule": "linear"})
    lr, steps = 0.3, 20
    x = torch.tensor(X0, dtype=torch.float64)
    b = torch.tensor(SHIFT, dtype=torch.float64)
    for t in range(steps):
        grad = 2 * (x - b)
        grad = grad * min(1.0, 0.5 / (float(grad.norm()) + 1e-6))
        x = x - lr * (1 - t / steps) * grad
    want = float(((x - b) ** 2).sum())
    assert train(SphereTask(), [g], [lr], steps=steps).losses[0] == pytest.approx(want, rel=1e-4)


def test_segment_norm_and_std_match_torch():
    seg = Segments(((0, 3), (3, 4), (4, 10)))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    ids = seg.ids("cpu")
    norm, std = segment_norm(x, ids, 3), segment_std(x, ids, 3)
    for a, b in seg.bounds:
        torch.testing.assert_close(norm[:, a:b], x[:, a:b].norm(dim=1, keepdim=True).expand(-1, b - a))
        torch.testing.assert_close(
            std[:, a:b], x[:, a:b].std(dim=1, correction=0, keepdim=True).expand(-1, b - a)
        )
    assert seg.n_params == 10


# =============================================================================================
# batched == one at a time

# A mix covering every feature (stateful ops sharing a slot: see the test further below).
MIX = {
    "sgd": builtin("sgd"),
    "adam": builtin("adam"),
    "momentum": builtin("momentum"),
    "nesterov": builtin("nesterov"),
    "lion": builtin("lion"),
    "adam_clip": builtin("adam_clip"),
    "powersign": builtin("powersign"),
    "rso": builtin("rso"),
    "dropout": G([{"op": "dropout50", "in": ["g"]}, {"op": "add", "in": ["n0", "m"]}]),
    "dropout2": G([{"op": "dropout10", "in": ["m"]}, {"op": "dropout30", "in": ["g"]},
                   {"op": "interp", "in": ["n0", "n1"]}], update="nesterov"),
    "noise operand": G([{"op": "add", "in": ["g", "noise"]}],
                       lr={"schedule": "warmup_cosine", "decay": "exp_down"}),
    "pure noise": G([{"op": "mul", "in": ["noise", "two"]}]),
    "stateful": G(
        [
            {"op": "ema", "in": ["g"]},
            {"op": "delta", "in": ["m"]},
            {"op": "running_max", "in": ["g2"]},
            {"op": "sqrt_abs", "in": ["n2"]},
            {"op": "add", "in": ["n0", "n1"], "decay": ["cosine_down", {"op": "mul", "args": ["linear_down", "exp_up"]}]},
            {"op": "div", "in": ["n4", "n3"]},
        ]
    ),
    "edge decays": G(
        [{"op": "tanh", "in": ["g"], "decay": ["cyclic_cosine"]},
         {"op": "sub", "in": ["n0", "qh_gm"], "decay": ["demon", {"op": "one_minus", "args": ["demon_up"]}]}],
        update="momentum",
    ),
    "clip_by_norm": G([{"op": "clip_by_norm", "in": ["g"]}], update="nesterov", clip=0.7),
    "noise abs": G([{"op": "sign", "in": ["m"]}],
                   noise={"sigma": 0.01, "decay": "cosine_down", "scale": "absolute"}),
    "noise std": G([{"op": "mul", "in": ["g", "one"]}], update="momentum",
                   noise={"sigma": 0.05, "scale": "layer_std"}),
    "flipped": G([{"op": "neg", "in": ["aggmo"]}], sign=-1, lr={"schedule": "cosine"}),
    "ema alone": G([{"op": "ema", "in": ["g"]}]),
    "misc": G([{"op": "erf", "in": ["y"]}, {"op": "pow_abs", "in": ["n0", "two"]},
               {"op": "mul", "in": ["n1", "sign_g"]}], lr={"schedule": "warmup_constant"}),
}
MIX_LRS = {"adam": 0.05, "adam_clip": 0.05, "lion": 0.01, "rso": 1.0, "stateful": 0.01, "pure noise": 1.0}
SEEDS = {"dropout": 3, "noise operand": 7, "rso": 1, "noise std": 2}


def _check_batched_equals_alone(make_task, steps: int, compare_params: bool) -> None:
    names = list(MIX)
    genomes = [MIX[n] for n in names]
    lrs = [MIX_LRS.get(n, 0.1) for n in names]
    seeds = [SEEDS.get(n, 0) for n in names]
    task = make_task()
    batched = train(task, genomes, lrs, seeds=seeds, steps=steps)
    params = task.last_theta if compare_params else None
    assert all(x is not None for x in batched.losses), dict(zip(names, batched.losses))
    for i, n in enumerate(names):
        task = make_task()
        alone = train(task, [genomes[i]], [lrs[i]], seeds=seeds[i], steps=steps)
        assert alone.losses[0] == pytest.approx(batched.losses[i], rel=1e-5, abs=1e-7), n
        if params is not None:
            torch.testing.assert_close(task.last_theta[0], params[i], rtol=1e-5, atol=1e-7, msg=n)


def test_batched_equals_alone_on_the_sphere():
    _check_batched_equals_alone(SphereTask, 35, compare_params=False)


def test_batched_equals_alone_on_an_mlp():
    _check_batched_equals_alone(lambda: MLPTask(seed=0), 25, compare_params=True)


def test_mix_really_exercises_its_features():
    """The mix above is only meaningful if its random and stateful genomes do move the weights."""
    names = list(MIX)
    res = train(SphereTask(), [MIX[n] for n in names], [MIX_LRS.get(n, 0.1) for n in names], steps=35)
    for n, loss in zip(names, res.losses):
        assert loss is not None and loss != pytest.approx(SPHERE_F0, rel=1e-6), n
    # seeds matter for the random ones
    for n in ("dropout", "noise operand", "pure noise", "noise abs", "rso"):
        a = train(SphereTask(), [MIX[n]], [MIX_LRS.get(n, 0.1)], seeds=0, steps=35).losses[0]
        b = train(SphereTask(), [MIX[n]], [MIX_LRS.get(n, 0.1)], seeds=1, steps=35).losses[0]
        assert a != b, n


def test_stateful_ops_sharing_a_slot_batched_equals_alone():
    ema = G([{"op": "ema", "in": ["g"]}])
    running_max = G([{"op": "running_max", "in": ["g"]}])
    alone = train(SphereTask(), [running_max], [0.1], steps=10).losses[0]
    batched = train(SphereTask(), [ema, running_max], [0.1, 0.1], steps=10).losses[1]
    assert batched == pytest.approx(alone, rel=1e-5)


def test_dead_nodes_with_their_own_operands():
    dead = G([{"op": "sqrt_abs", "in": ["v"]}, {"op": "mul", "in": ["g", "one"]}])
    res = train(SphereTask(), [dead], [0.1], steps=35)
    assert res.losses[0] == pytest.approx(0.8**70 * SPHERE_F0, rel=1e-4)


# =============================================================================================
# failures stay contained


class NaNSphere(SphereTask):
    """The sphere plus 0 * log(x_0): NaN as soon as x_0 goes negative (the gradient stays finite)."""

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        return super().loss(theta) + 0.0 * torch.log(theta[:, 0])


BLOWUPS = [
    (builtin("sgd"), 1e30),  # loss overflows to inf
    (G([{"op": "exp", "in": ["g"]}, {"op": "exp", "in": ["n0"]}]), 1e6),  # exp(exp(g)): inf
    (G([{"op": "pow_abs", "in": ["g", "two"]}, {"op": "mul", "in": ["n0", "g"]}]), 1e12),
]
GOOD = [(builtin("sgd"), 0.1), (builtin("adam"), 0.1), (builtin("momentum"), 0.01), (MIX["dropout"], 0.1)]


def _alone(task_cls, g: Genome, lr: float) -> float | None:
    return train(task_cls(), [g], [lr], steps=35).losses[0]


@pytest.mark.parametrize(
    "n_good,n_bad,dropped",
    [(4, 3, True), (12, 1, False)],  # many failures: rows dropped (select); few: rows masked
)
def test_blowups_are_reported_and_do_not_touch_the_others(monkeypatch, n_good, n_bad, dropped):
    selects = []
    original = BatchedOptimizer.select

    def counting_select(self, keep):
        selects.append(len(keep))
        return original(self, keep)

    monkeypatch.setattr(BatchedOptimizer, "select", counting_select)
    good = (GOOD * 3)[:n_good]
    bad = BLOWUPS[:n_bad]
    batch = [good[0], *bad[:1], *good[1:3], *bad[1:2], *good[3:], *bad[2:]]
    bad_idx = {i for i, c in enumerate(batch) if c in bad}
    assert len(bad_idx) == n_bad
    res = train(SphereTask(), [g for g, _ in batch], [lr for _, lr in batch], steps=35)
    assert bool(selects) == dropped
    monkeypatch.undo()
    for i, (g, lr) in enumerate(batch):
        if i in bad_idx:
            assert res.losses[i] is None
            assert i in res.failed_at and 0 <= res.failed_at[i] < 35
            assert _alone(SphereTask, g, lr) is None
        else:
            assert res.losses[i] is not None and math.isfinite(res.losses[i])
            assert res.losses[i] == pytest.approx(_alone(SphereTask, g, lr), rel=1e-5, abs=1e-7)
    assert res.ok == [i not in bad_idx for i in range(len(batch))]


def test_nan_loss_is_reported_and_contained():
    sgd = builtin("sgd")
    # lr 1 jumps x_0 to 2 b_0 - x_0 = -0.1 < 0: log -> NaN; lr 0.1 and 0.2 stay positive
    res = train(NaNSphere(), [sgd, sgd, sgd], [0.1, 1.0, 0.2], steps=35)
    assert res.losses[1] is None and res.failed_at == {1: 1}
    assert res.losses[0] == pytest.approx(0.8**70 * SPHERE_F0, rel=1e-4)
    assert res.losses[2] == pytest.approx(_alone(NaNSphere, sgd, 0.2), rel=1e-5, abs=1e-9)


def test_all_candidates_failing():
    res = train(SphereTask(), [builtin("sgd")] * 2, [1e30, 1e31], steps=10)
    assert res.losses == [None, None] and res.ok == [False, False]


# =============================================================================================
# budgets, curves


def test_gradient_free_genome_gets_the_budget_in_forward_passes():
    """An update that never reads the gradient pays no backward: 600 FPE = 600 steps (RandOpt's
    600 perturbations), 300 with an if_better test (two forwards a step)."""
    noise_only = from_json({"nodes": [{"op": "mul", "in": ["zero", "one"]}], "noise": {"sigma": 0.01}})
    assert not noise_only.uses_gradient() and builtin("adam").uses_gradient()
    assert step_cost(noise_only) == 1 and steps_for(noise_only, 600) == 600
    assert steps_for(builtin("rso"), 600) == 300 and steps_for(builtin("adam"), 600) == 200
    res = train(SphereTask(), [noise_only, builtin("sgd")], [1.0, 0.1], budget_fpe=600)
    assert res.steps == [600, 200] and res.fpe == [600, 600]


def test_budget_gives_each_candidate_its_own_steps():
    sgd, rso = builtin("sgd"), builtin("rso")
    # RSO reads no gradient: a forward per step plus one for its if_better test
    assert step_cost(sgd) == 3 and step_cost(rso) == 2
    assert steps_for(sgd, 30) == 10 and steps_for(rso, 30) == 15 and steps_for(sgd, 1) == 1
    res = train(SphereTask(), [sgd, rso], [0.1, 1.0], budget_fpe=30, seeds=[0, 5])
    assert res.steps == [10, 15] and res.fpe == [30, 30]
    assert res.losses[0] == pytest.approx(train(SphereTask(), [sgd], [0.1], steps=10).losses[0], rel=1e-6)
    # the shorter candidate is frozen once its own run is over
    res = train(SphereTask(), [sgd, rso], [0.1, 1.0], budget_fpe=21, seeds=[0, 5])
    assert res.steps == [7, 10]
    rso_alone = train(SphereTask(), [rso], [1.0], steps=10, seeds=5).losses[0]
    assert res.losses[1] == pytest.approx(rso_alone, rel=1e-6)
    with pytest.raises(ValueError):
        train(SphereTask(), [sgd], [0.1])


def test_rso_only_accepts_improvements():
    res = train(SphereTask(), [builtin("rso")], [1.0], steps=35, seeds=0, record_curves=True)
    curve = res.curves[0] + [res.losses[0]]
    assert all(b <= a for a, b in zip(curve, curve[1:]))
    assert curve[-1] < SPHERE_F0


# =============================================================================================
# the counter-based RNG


def test_rng_is_a_pure_function_of_seed_step_stream_index():
    idx = torch.arange(50)
    seeds = torch.tensor([1, 5, 9, -3])
    stream = torch.full_like(seeds, 2)
    batch_u = rng_uniform(seeds, 4, stream, idx)
    batch_n = rng_normal(seeds, 4, stream, idx)
    for r in range(4):
        alone_u = rng_uniform(seeds[r : r + 1], 4, stream[r : r + 1], idx)
        assert torch.equal(alone_u[0], batch_u[r])
        assert torch.equal(rng_normal(seeds[r : r + 1], 4, stream[r : r + 1], idx)[0], batch_n[r])
    # a slice of the index gives the same numbers as the full vector
    assert torch.equal(rng_uniform(seeds, 4, stream, idx[10:20]), batch_u[:, 10:20])
    # every coordinate of the key changes the numbers
    assert not torch.equal(rng_uniform(seeds, 5, stream, idx), batch_u)
    assert not torch.equal(rng_uniform(seeds, 4, stream + 1, idx), batch_u)
    assert not torch.equal(rng_uniform(seeds + 1, 4, stream, idx), batch_u)
    assert len(set(batch_u[:, 0].tolist())) == 4


def test_rng_distributions():
    idx = torch.arange(100_000)
    seed, stream = torch.tensor([0]), torch.tensor([1])
    u = rng_uniform(seed, 0, stream, idx)[0]
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.002)
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.005)
    z = rng_normal(seed, 0, stream, idx)[0]
    assert torch.isfinite(z).all()
    assert float(z.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert float((z.abs() < 1.96).float().mean()) == pytest.approx(0.95, abs=0.005)
    # neighbouring elements, steps and streams are uncorrelated
    u2 = rng_uniform(seed, 1, stream, idx)[0]
    u3 = rng_uniform(seed, 0, stream + 1, idx)[0]
    for other in (u2, u3, u.roll(1)):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01


def test_random_candidates_get_the_same_numbers_alone_or_in_a_batch():
    noisy = [MIX["noise operand"], MIX["dropout"], MIX["noise abs"], MIX["pure noise"]]
    seeds = [11, 12, 13, 14]
    for make in (SphereTask, lambda: MLPTask(seed=2)):
        batch = train(make(), noisy + noisy, [0.1] * 8, seeds=seeds + [s + 100 for s in seeds], steps=15)
        for i, g in enumerate(noisy):
            assert train(make(), [g], [0.1], seeds=seeds[i], steps=15).losses[0] == pytest.approx(
                batch.losses[i], rel=1e-6
            )
            assert batch.losses[i] != batch.losses[i + 4]  # another seed, other numbers
