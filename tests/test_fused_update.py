"""The fused update (nos.engine.fused) against the eager interpreter and against float64.

The kernel computes the ops' formulas in float32 like torch, but its exp, log, tanh, ... come from
nos.engine._vecmath (float64, rounded once; erf and a few more from libm) rather than torch's SLEEF,
so single values may differ in their last bit or two: each op is held to a few ulp of the eager path. Through a chain of ops (a `delta` of nearly equal values
cancels, for one) those bits can grow, so whole random genomes are held to the eager path's own
distance from float64, as the fused rollout is (tests/test_sine_kernel.py). Where there is no
rounding to differ (dropout masks, the batch a row sits in, the threads, `select`), the numbers
must be bit for bit the same."""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.special
import torch

from nos.engine import fused
from nos.engine.interpreter import BatchedOptimizer
from nos.engine.trainer import train
from nos.tasks.segments import Segments
from nos.tasks.sphere import SphereTask
from search_space.builtins import BUILTINS, builtin
from search_space.genome import Genome, from_json
from search_space.mutation import random_genome
from search_space.operands import OPERANDS
from search_space.ops import OPS

from .conftest import MLPTask

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba is not installed")]

SEG = Segments(((0, 40), (40, 45), (45, 300)))
ULP = 2.0**-23  # float32's relative spacing at 1


def G(nodes: list[dict], **rest: object) -> Genome:
    return from_json({"nodes": nodes, **rest})


def _pair(genomes: list[Genome], steps: int = 4, seeds: list[int] | None = None,
          lrs: list[float] | None = None) -> tuple[BatchedOptimizer, BatchedOptimizer]:
    C = len(genomes)
    args = (genomes, lrs or [0.1] * C, [steps] * C, seeds or list(range(C)), SEG)
    eager, fast = BatchedOptimizer(*args, update="eager"), BatchedOptimizer(*args, update="fused")
    assert eager.fused is None and fast.fused is not None
    return eager, fast


def _inputs(C: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(theta, grad) per step: magnitudes from 1e-6 to 1e2 across the parameters, both signs."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-6, 2, SEG.n_params)
    return [(torch.randn(C, SEG.n_params, generator=gen), torch.randn(C, SEG.n_params, generator=gen) * scale)
            for _ in range(steps)]


def _directions(opt: BatchedOptimizer, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for theta, grad in inputs:
        out.append(opt.direction(theta.to(opt.dtype), grad.to(opt.dtype)).double())
        opt.advance()
    return out


def _row_err(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: the largest error relative to the row's largest reference entry."""
    return (a - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp(min=1e-300)


def test_the_kernel_knows_every_op_and_operand() -> None:
    from nos.engine import _update_numba as kernel

    assert set(fused.OP_CODES) == set(OPS) and tuple(fused.OP_CODES) == kernel.OP_NAMES
    assert set(fused.OPERAND_CODES) == set(OPERANDS) and tuple(fused.OPERAND_CODES) == kernel.OPERAND_NAMES
    # the kernel's grouping of ops follows their needs
    for name in kernel.UNARY_NAMES:
        assert OPS[name].arity == 1 and OPS[name].needs == ""
    for name in kernel.BINARY_NAMES:
        assert OPS[name].arity == 2


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_within_a_few_ulp_of_eager(op: str) -> None:
    inputs = ["g", "m"] if OPS[op].arity == 2 else ["g"]
    genome = G([{"op": op, "in": inputs}])
    eager, fast = _pair([genome, genome], seeds=[3, 4])
    data = _inputs(2, 4, seed=1)
    for e, f in zip(_directions(eager, data), _directions(fast, data)):
        if op == "bessel_i1e":  # torch's float32 i1e is the less accurate one (next test)
            tol = 2e-6 * e.abs()
        else:
            tol = 4 * ULP * e.abs()
        assert torch.all((e - f).abs() <= tol), op


def test_i1e_against_scipy_in_float64() -> None:
    from nos.engine._update_numba import i1e

    x = np.concatenate([np.linspace(-60, 60, 4001), np.logspace(-30, 15, 400), -np.logspace(-30, 15, 400),
                        [0.0, 24.999998, 25.0, 25.000002]]).astype(np.float32)
    ours = np.array([i1e(v) for v in x], np.float64)
    ref = scipy.special.i1e(x.astype(np.float64))
    assert np.all(np.abs(ours - ref) <= 1.2e-7 * np.abs(ref) + 1e-45)  # float32 rounding of the true value
    assert np.isnan(i1e(np.float32("nan"))) and i1e(np.float32("inf")) == 0.0


@pytest.mark.parametrize("operand", sorted(OPERANDS))
def test_each_operand_matches_eager(operand: str) -> None:
    # The noise operand's normals are computed in float64 and rounded once, eager's in float32
    # steps: up to 2 ulp apart, which Nesterov's u + 0.9 buf of noise cancels into many; its
    # chains are held by the float64 test below, its values here without the buffer.
    genome = G([{"op": "neg", "in": [operand]}], update="plain" if operand == "noise" else "nesterov")
    eager, fast = _pair([genome, genome])
    data = _inputs(2, 4, seed=2)
    for e, f in zip(_directions(eager, data), _directions(fast, data)):
        assert torch.allclose(e, f, rtol=4 * ULP, atol=0.0), operand


def test_edge_decays_schedules_clip_and_update_kinds_match_eager() -> None:
    decays = [None, "linear_down", "cosine_down", "exp_up", "linear_restart_up"]
    genomes = [
        G([{"op": "sqrt_abs", "in": ["v"], "decay": [d]},
           {"op": "div", "in": ["m", "n0"], "decay": [decays[(i + 1) % 5], None]}],
          update=["plain", "momentum", "nesterov"][i % 3], clip=[None, 1.0, 0.01][i % 3],
          lr={"schedule": ["constant", "cosine", "warmup_cosine", "linear", "warmup_constant"][i], "decay": None})
        for i, d in enumerate(decays)
    ]
    eager, fast = _pair(genomes, steps=6, lrs=[1e-3, 1e-2, 0.1, 1.0, 3.0])
    data = _inputs(len(genomes), 6, seed=3)
    for e, f in zip(_directions(eager, data), _directions(fast, data)):
        # a momentum buffer of this step's and older gradients can cancel: per row, not per entry
        assert float(_row_err(f, e).max()) < 1e-6


def test_builtins_match_eager() -> None:
    genomes = [builtin(name) for name in BUILTINS]
    eager, fast = _pair(genomes, steps=5)
    data = _inputs(len(genomes), 5, seed=4)
    for e, f in zip(_directions(eager, data), _directions(fast, data)):
        assert float(_row_err(f, e).max()) < 1e-6


def test_random_genomes_are_as_close_to_float64_as_eager_is() -> None:
    rng = random.Random(5)
    genomes = [random_genome(rng) for _ in range(150)]
    C, T = len(genomes), 5
    args = (genomes, [0.1] * C, [T] * C, list(range(C)), SEG)
    paths = {"eager": BatchedOptimizer(*args, update="eager"), "fused": BatchedOptimizer(*args, update="fused"),
             "float64": BatchedOptimizer(*args, dtype=torch.float64)}
    assert paths["float64"].fused is None  # float64 is the eager path's
    data = _inputs(C, T, seed=5)
    out = {k: _directions(opt, data) for k, opt in paths.items()}
    for e, f, ref in zip(out["eager"], out["fused"], out["float64"]):
        finite = torch.isfinite(ref).all(dim=1) & (ref.abs().amax(dim=1) > 0)
        err_e, err_f = _row_err(e[finite], ref[finite]), _row_err(f[finite], ref[finite])
        assert torch.all(err_f <= 10 * err_e + 1e-6), (err_f - 10 * err_e).max()
        assert float(err_f.median()) < 1e-6


def test_dropout_masks_are_the_eager_paths_bit_for_bit() -> None:
    genomes = [G([{"op": op, "in": ["g"]}, {"op": "dropout10", "in": ["n0"]}])
               for op in ("dropout50", "dropout30", "dropout10")]
    eager, fast = _pair(genomes, seeds=[7, 8, 9])
    data = _inputs(3, 4, seed=6)
    for e, f in zip(_directions(eager, data), _directions(fast, data)):
        assert torch.equal(e == 0, f == 0)
        assert 0.2 < float((f == 0).double().mean()) < 0.8


def _mixed(n: int, seed: int) -> list[Genome]:
    """Random genomes with the stateful, random and per-tensor ops and a noise rule mixed in."""
    rng = random.Random(seed)
    extra = [G([{"op": "ema", "in": ["g"]}, {"op": "running_max", "in": ["n0"]},
                {"op": "delta", "in": ["n1"]}, {"op": "clip_by_norm", "in": ["n2"]}], update="momentum"),
             G([{"op": "dropout30", "in": ["noise"]}, {"op": "add", "in": ["n0", "lion_mix"]}],
               noise={"sigma": 0.01, "decay": "linear_down", "scale": "layer_std", "accept": "always"}),
             G([{"op": "sign", "in": ["m"]}], noise={"sigma": 0.1, "decay": None, "scale": "absolute",
                                                         "accept": "if_better"})]
    return extra + [random_genome(rng) for _ in range(n - len(extra))]


def test_a_row_gets_the_same_bits_alone_in_any_batch_and_on_any_threads() -> None:
    genomes = _mixed(24, seed=8)
    data = _inputs(24, 4, seed=8)
    opt = BatchedOptimizer(genomes, [0.1] * 24, [4] * 24, list(range(24)), SEG, update="fused")
    batch = _directions(opt, data)
    for c in (0, 1, 5, 23):
        alone = BatchedOptimizer([genomes[c]], [0.1], [4], [c], SEG, update="fused")
        for b, a in zip(batch, _directions(alone, [(th[c:c + 1], g[c:c + 1]) for th, g in data])):
            assert torch.equal(b[c:c + 1], a)
    torch.set_num_threads(2)
    try:
        threaded = _directions(BatchedOptimizer(genomes, [0.1] * 24, [4] * 24, list(range(24)), SEG, update="fused"), data)
    finally:
        torch.set_num_threads(1)  # the module's single_thread
    assert all(torch.equal(a, b) for a, b in zip(batch, threaded))


def test_select_carries_the_state_along() -> None:
    genomes = _mixed(12, seed=9)
    data = _inputs(12, 6, seed=9)
    whole = _directions(BatchedOptimizer(genomes, [0.1] * 12, [6] * 12, list(range(12)), SEG, update="fused"), data)
    opt = BatchedOptimizer(genomes, [0.1] * 12, [6] * 12, list(range(12)), SEG, update="fused")
    keep = torch.tensor([0, 2, 3, 7, 11])
    part = _directions(opt, data[:3])
    opt = opt.select(keep)
    assert opt.fused is not None
    part += _directions(opt, [(th[keep], g[keep]) for th, g in data[3:]])
    for t, (w, p) in enumerate(zip(whole, part)):
        assert torch.equal(w[keep] if t >= 3 else w, p)


def test_perturbation_matches_eager() -> None:
    genomes = [G([{"op": "neg", "in": ["g"]}],
                 noise={"sigma": s, "decay": d, "scale": sc, "accept": a})
               for s, d, sc, a in [(0.1, None, "absolute", "always"), (0.01, "linear_down", "layer_std", "always"),
                                   (0.0, None, "layer_std", "always"), (0.3, "cosine_down", "layer_std", "if_better")]]
    eager, fast = _pair(genomes, seeds=[1, 2, 3, 4])
    for theta, _ in _inputs(4, 4, seed=10):
        e, f = eager.perturbation(theta), fast.perturbation(theta)
        assert e is not None and f is not None
        assert torch.all(f[2] == 0) and torch.all(e[2] == 0)  # sigma 0: not perturbed
        rows = [0, 1, 3]
        assert float(_row_err(f[rows].double(), e[rows].double()).max()) < 1e-6
        eager.advance()
        fast.advance()


def test_perturb_in_place_is_theta_plus_the_perturbation() -> None:
    """`perturb_` (what the trainer runs) gives the numbers of theta + perturbation(theta), bit for
    bit on both paths: always-rows get their noise in place, if_better rows stay as they were and
    their noisy copies come back in if_better_rows' order, rows without noise are untouched."""
    genomes = [G([{"op": "neg", "in": ["g"]}], noise={"sigma": s, "decay": None, "scale": sc, "accept": a})
               for s, sc, a in [(0.1, "layer_std", "if_better"), (0.0, "absolute", "always"),
                                (0.01, "layer_std", "always"), (0.3, "absolute", "if_better"),
                                (0.2, "absolute", "always")]]
    for path in fused.UPDATES:
        args = (genomes, [0.1] * 5, [4] * 5, [7, 8, 9, 10, 11], SEG)
        a, b = BatchedOptimizer(*args, update=path), BatchedOptimizer(*args, update=path)
        for theta, _ in _inputs(5, 3, seed=4):
            delta = a.perturbation(theta)
            assert delta is not None
            whole = theta + delta
            new = theta.clone()
            trial = b.perturb_(new)
            assert trial is not None and torch.equal(trial, whole[[0, 3]]), path
            assert torch.equal(new[[2, 4]], whole[[2, 4]]), path  # noise kept in place
            assert torch.equal(new[[0, 1, 3]], theta[[0, 1, 3]]), path  # if_better and quiet rows untouched
            assert not torch.equal(new[2], theta[2])
            a.advance()
            b.advance()


def test_layer_std_of_a_diverging_candidate_is_the_same_on_both_paths() -> None:
    """Parameters near 1e18 (a candidate on its way to blowing up): each tensor's std is a float32
    but its float32 sum of squares is not. Both paths sum in float64, so both give the same finite
    noise and judge the candidate alike (an overflow on one path only would keep it on the other)."""
    genome = G([{"op": "neg", "in": ["g"]}], noise={"sigma": 0.01, "decay": None, "scale": "layer_std",
                                                   "accept": "always"})
    theta = torch.randn(2, SEG.n_params, generator=torch.Generator().manual_seed(5)) * 2e18
    deltas = [BatchedOptimizer([genome] * 2, [0.1] * 2, [4] * 2, [3, 4], SEG, update=path).perturbation(theta)
              for path in fused.UPDATES]
    assert all(d is not None and torch.isfinite(d).all() for d in deltas)
    torch.testing.assert_close(deltas[0], deltas[1], rtol=4 * ULP, atol=0)


def test_training_matches_eager() -> None:
    """Whole trainings (the trainer's `if_better` trials now score only those rows): on the sphere
    and on an MLP, final losses of the two update paths agree."""
    genomes = _mixed(16, seed=11)
    for make in (SphereTask, lambda: MLPTask(seed=3)):
        results = {}
        for path in fused.UPDATES:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("NOS_UPDATE", path)
                results[path] = train(make(), genomes, [0.01] * 16, seeds=list(range(16)), steps=12)
        e, f = results["eager"].losses, results["fused"].losses
        assert [x is None for x in e] == [x is None for x in f]
        for a, b in zip(e, f):
            if a is not None and b is not None:
                assert b == pytest.approx(a, rel=1e-4, abs=1e-7)


def test_choosing_the_path() -> None:
    genome = builtin("adam")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOS_UPDATE", "eager")
        assert BatchedOptimizer([genome], [0.1], [3], [0], SEG).fused is None
        mp.setenv("NOS_UPDATE", "fused")
        assert BatchedOptimizer([genome], [0.1], [3], [0], SEG).fused is not None
        assert BatchedOptimizer([genome], [0.1], [3], [0], SEG, dtype=torch.float64).fused is None
        mp.setenv("NOS_UPDATE", "compiled")
        with pytest.raises(ValueError, match="NOS_UPDATE must be one of fused, eager"):
            BatchedOptimizer([genome], [0.1], [3], [0], SEG)


def test_finite_rows_is_isfinite_all() -> None:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(40, 300, generator=gen)
    for row, col, bad in [(1, 0, float("nan")), (5, 299, float("inf")), (9, 150, -float("inf")), (20, 7, float("nan"))]:
        x[row, col] = bad
    x[30] = 3e38  # huge but finite: a sum would overflow, this must not
    for t in (x, x.double(), x[:, ::2]):
        assert torch.equal(fused.finite_rows(t), torch.isfinite(t).all(dim=1))


def test_an_overflowing_gradient_norm_is_the_same_in_both_paths_and_in_any_batch() -> None:
    """A diverging candidate's gradient norm overflows float32 (torch's norm is then inf): a clipped
    row steps by zero, as torch's clip does, and an unclipped row beside it keeps its gradient
    (the eager path used to turn it into NaN whenever another row of the batch had a clip)."""
    genomes = [G([{"op": "neg", "in": ["g"]}], clip=1.0), G([{"op": "neg", "in": ["g"]}])]
    grad = torch.full((2, SEG.n_params), 3e19)  # finite, but the sum of squares is past float32's range
    grad[:, ::2] = -1e19
    assert torch.all(torch.isinf(grad.norm(dim=1)))
    theta = torch.zeros(2, SEG.n_params)
    for path in fused.UPDATES:
        both = BatchedOptimizer(genomes, [1.0, 1.0], [3, 3], [0, 1], SEG, update=path).direction(theta, grad)
        alone = BatchedOptimizer(genomes[1:], [1.0], [3], [1], SEG, update=path).direction(theta[1:], grad[1:])
        assert torch.all(both[0] == 0), path
        assert torch.equal(both[1], alone[0]) and torch.equal(both[1], -grad[1]), path
