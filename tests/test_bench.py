"""`python -m nos.bench`: its JSON document (quick mode), the hand-written Adam it compares the
interpreter with, and the busy neighbour process it measures sharing the CPU against.

These check correctness only; the speeds themselves are measured by running the command."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from nos import bench
from nos.engine import fused
from nos.engine.trainer import train
from nos.tasks import sine_kernel
from nos.tasks.sine import SineConfig, SineTask, StackedSineTask
from search_space.builtins import builtin

from .conftest import run_entry

TINY = SineConfig(width=8, pretrain_steps=50)


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """The command sets torch's thread count of this process; put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> StackedSineTask:
    cache = tmp_path_factory.mktemp("cache")
    tasks = [SineTask(TINY, s, s, 1.0, "cpu", cache) for s in (0, 1)]
    return StackedSineTask(tasks, torch.tensor([0, 1, 0, 1, 1, 0]))


def test_reference_adam_matches_the_interpreters_adam(stack: StackedSineTask) -> None:
    C = 6
    for lr in (1e-3, 3e-2):
        interpreted = train(stack, [builtin("adam")] * C, [lr] * C, steps=8).losses
        reference = bench.reference_adam(stack, C, lr, 8)
        assert all(x is not None for x in interpreted)
        assert bench.max_rel_diff(interpreted, reference) < 1e-4, (interpreted, reference)
        assert reference != stack.loss(stack.init_params(C)).tolist()  # it really trained


def test_reference_adam_is_torch_adam(stack: StackedSineTask) -> None:
    C, lr = 6, 1e-2
    theta = stack.init_params(C).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr, betas=bench.ADAM_BETAS, eps=bench.ADAM_EPS)
    for _ in range(5):
        opt.zero_grad()
        stack.loss(theta).sum().backward()
        opt.step()
    expected = stack.loss(theta.detach()).tolist()
    assert bench.reference_adam(stack, C, lr, 5) == pytest.approx(expected, rel=1e-5)


def test_busy_neighbour_is_busy_and_always_stopped() -> None:
    with bench.busy_neighbour(max_s=60) as proc:
        assert proc.poll() is None
    assert proc.poll() is not None
    with pytest.raises(KeyboardInterrupt), bench.busy_neighbour(max_s=60) as proc:
        raise KeyboardInterrupt
    assert proc.poll() is not None


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_quick_json(keep_threads: None) -> None:
    code, out, err = run_entry(bench.main, ["--quick", "--format", "json", "--device", "cpu", "--threads", "1"])
    assert code == 0, err
    doc = json.loads(out)  # exactly one JSON document on stdout
    for key in ("naive_candidate_steps_per_s", "batched_candidate_steps_per_s", "speedup",
                "interpreter_adam_candidate_steps_per_s", "reference_adam_candidate_steps_per_s",
                "interpreter_vs_reference", "random_genome_candidate_steps_per_s", "random_vs_adam_cost",
                "task_only_candidate_steps_per_s", "shared_cpu_slowdown", "shared_cpu_slowdown_threads_1",
                "adapter_batched_candidate_steps_per_s", "adapter_one_at_a_time_candidate_steps_per_s",
                "adapter_batched_vs_one_speedup", "adapter_sine_vs_hand_stacked"):
        assert _positive(doc[key]), (key, doc[key])
    assert doc["threads"] == 1 and doc["scaling"] is None
    assert 0 <= doc["adam_loss_max_rel_diff"] < 1e-4
    assert 0 <= doc["random_update_share"] <= 1
    for key in ("random_update_eager_candidate_steps_per_s", "random_update_fused_candidate_steps_per_s"):
        assert _positive(doc[key]), (key, doc[key])
    assert doc["update_fused_vs_eager_speedup"] == pytest.approx(
        doc["random_update_fused_candidate_steps_per_s"] / doc["random_update_eager_candidate_steps_per_s"])
    assert doc["update_kernel"] == ("fused" if fused.HAVE_NUMBA else "eager")
    for ops in (doc["random_top_ops"], doc["adam_top_ops"], doc["random_update_top_ops"]):
        assert ops and all(isinstance(r["op"], str) and 0 <= r["self_cpu_share"] <= 1 and r["calls"] >= 1 for r in ops)
    for n, r in doc["shared_cpu"].items():
        assert all(_positive(r[k]) for k in ("alone", "shared", "slowdown"))
        assert doc[f"shared_cpu_slowdown_threads_{n}"] == r["slowdown"]
    assert doc["shared_cpu_slowdown"] == doc["shared_cpu"]["1"]["slowdown"]
    assert doc["end_to_end"] is None  # --quick leaves the two searches out
    assert [r["candidates"] for r in doc["rollout_scaling"]] == [8, 16]
    if sine_kernel.HAVE_NUMBA:  # the fused rollout against the eager floor, in the same run
        assert doc["rollout_kernel"] == "fused"
        for key in ("fused_adam_candidate_steps_per_s", "fused_task_only_candidate_steps_per_s",
                    "rollout_vs_floor_speedup", "task_fused_vs_eager_speedup", "random_vs_adam_cost_eager",
                    "random_vs_adam_cost_eager_update", "eager_update_adam_candidate_steps_per_s",
                    "eager_update_random_genome_candidate_steps_per_s"):
            assert _positive(doc[key]), (key, doc[key])
        assert doc["rollout_vs_floor_speedup"] == pytest.approx(
            doc["fused_adam_candidate_steps_per_s"] / doc["reference_adam_candidate_steps_per_s"])
        assert 0 <= doc["fused_adam_loss_max_rel_diff"] < 1e-3
        assert all(_positive(r["eager"]) and _positive(r["fused"]) for r in doc["rollout_scaling"])


def test_threads_flag(keep_threads: None) -> None:
    from nos.ui.cli import ArgumentParser, add_threads, apply_threads

    p = ArgumentParser()
    add_threads(p)
    assert apply_threads(p.parse_args(["--threads", "1"])) == 1 == torch.get_num_threads()
    n = apply_threads(p.parse_args([]))
    assert n >= 1 and torch.get_num_threads() == n



def test_fitness_moves_counts_what_moved() -> None:
    new = [1.0, 2.0 * (1 + 5e-7), 3.3, None, 5.0]
    old = [1.0, 2.0, 3.0, 4.0, None]
    m = bench._fitness_moves(new, old, "x_")
    assert m["x_fitness_both_finite"] == 3 and m["x_fitness_within_1e-6"] == 2 and m["x_fitness_within_1e-3"] == 2
    assert m["x_fitness_finite_eager_only"] == 1 and m["x_fitness_finite_fused_only"] == 1
    assert m["x_fitness_max_rel_diff"] == pytest.approx(0.1) and m["x_fitness_spearman"] == pytest.approx(1.0)
