"""`nos.engine.simplify`: genomes reduced to what their update depends on, judged by the real
interpreter on seeded probe problems, and `nos export` writing the simplified genome by default."""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nos.engine.codegen import render
from nos.engine.simplify import (
    DEFAULT_SEED,
    effective_nodes,
    equal_to,
    equivalent,
    simplification,
    simplify,
)
from nos.engine.trainer import train
from nos.export import BUILTIN_LR
from nos.export import main as export_main
from nos.tasks.budget import steps_for
from search_space.builtins import BUILTINS, builtin, builtin_title
from search_space.genome import MAX_NODES, Genome, from_json
from search_space.mutation import mutate, random_genome

from .conftest import MLPTask, Proc

pytestmark = pytest.mark.usefixtures("single_thread")

FRESH_SEEDS = (101, 202)  # probe seeds simplify never uses (it uses DEFAULT_SEED)
assert DEFAULT_SEED not in FRESH_SEEDS

_SECH2 = {"op": "sech2", "args": ["cosine_up"]}

# hand-made genomes with a known inert part -> the genome simplify must reduce them to
REDUCED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "norm clip of a norm clip (the outer one never binds)": (
        {"nodes": [{"op": "clip_by_norm", "in": ["g"]}, {"op": "clip_by_norm", "in": ["n0"]}], "update": "momentum"},
        {"nodes": [{"op": "clip_by_norm", "in": ["g"]}], "update": "momentum"},
    ),
    "sign of a norm-clipped gradient, under a global clip (both clips scale g by a positive factor)": (
        {"nodes": [{"op": "clip_by_norm", "in": ["g"]}, {"op": "sign", "in": ["n0"]}], "clip": 0.5},
        {"nodes": [{"op": "sign", "in": ["g"]}]},
    ),
    "an unreachable node": (
        {"nodes": [{"op": "tanh", "in": ["g"]}, {"op": "sign", "in": ["m"]}], "lr": {"schedule": "cosine"}},
        {"nodes": [{"op": "sign", "in": ["m"]}], "lr": {"schedule": "cosine"}},
    ),
    "abs of something positive; its edge decay moves onto the edge that reads it (NOS's Opt6)": (
        {"nodes": [{"op": "exp", "in": ["w_1e4"]}, {"op": "abs", "in": ["n0"], "decay": [_SECH2]},
                   {"op": "div", "in": ["qh_gm", "n1"]}]},
        {"nodes": [{"op": "exp", "in": ["w_1e4"]}, {"op": "div", "in": ["qh_gm", "n0"], "decay": [None, _SECH2]}]},
    ),
    "interp of a node with itself (0.95 x + 0.05 x)": (
        {"nodes": [{"op": "tanh", "in": ["g"]}, {"op": "interp", "in": ["n0", "n0"]}, {"op": "neg", "in": ["n1"]}]},
        {"nodes": [{"op": "tanh", "in": ["g"]}, {"op": "neg", "in": ["n0"]}]},
    ),
    "a decay that is 1 at every step": (
        {"nodes": [{"op": "atan", "in": ["m"], "decay": [{"op": "mul", "args": ["constant", "constant"]}]}]},
        {"nodes": [{"op": "atan", "in": ["m"]}]},
    ),
    "a decay in front of sign that is never 0": (
        {"nodes": [{"op": "sign", "in": ["m"], "decay": ["exp_down"]}], "update": "nesterov"},
        {"nodes": [{"op": "sign", "in": ["m"]}], "update": "nesterov"},
    ),
    "a dead node after the only dropout node (its stream index does not move)": (
        {"nodes": [{"op": "dropout50", "in": ["m"]}, {"op": "tanh", "in": ["g"]}, {"op": "neg", "in": ["n0"]}]},
        {"nodes": [{"op": "dropout50", "in": ["m"]}, {"op": "neg", "in": ["n0"]}]},
    ),
}

# genomes where nothing can go: each looks inert in some way but is not
KEPT: dict[str, dict[str, Any]] = {
    # |sign(g)| has norm sqrt(n) per tensor: the norm clip binds on every tensor of more than one element
    "norm clip of sign(g)": {"nodes": [{"op": "sign", "in": ["g"]}, {"op": "clip_by_norm", "in": ["n0"]}]},
    "a decay that is 0 at tau = 0, in front of sign": {"nodes": [{"op": "sign", "in": ["g"], "decay": ["linear_up"]}]},
    # 0 at tau = 1/8, 3/8, ...: only a horizon divisible by 8 shows it (the probes run T = 24, 40)
    "cyclic_cosine in front of sign": {"nodes": [{"op": "sign", "in": ["g"], "decay": ["cyclic_cosine"]}]},
    "a clip at 1e6 on a gradient rule (large gradients exist)": {"nodes": [{"op": "neg", "in": ["g"]}], "clip": 1e6},
    # removing the dead n0 would move dropout50 from RNG stream 101 to 100
    "a dead node in front of a dropout node": {"nodes": [{"op": "tanh", "in": ["g"]}, {"op": "dropout50", "in": ["m"]}]},
    "noise and a zero update": {"nodes": [{"op": "mul", "in": ["zero", "one"]}],
                                "noise": {"sigma": 0.1, "decay": "linear_down", "accept": "if_better"}},
}


def _same_rest(a: Genome, b: Genome) -> None:
    """What simplify never touches."""
    assert (a.sign, a.update, a.lr, a.noise) == (b.sign, b.update, b.lr, b.noise)


@pytest.mark.parametrize("case", list(REDUCED))
def test_known_inert_parts_are_dropped(case):
    spec, want = REDUCED[case]
    g = from_json(spec)
    got = simplify(g)
    assert got == from_json(want), got.to_json()
    _same_rest(g, got)
    for seed in FRESH_SEEDS:
        assert equivalent(g, got, seed)


@pytest.mark.parametrize("case", list(KEPT))
def test_parts_that_act_are_kept(case):
    g = from_json(KEPT[case])
    assert simplify(g) == g
    assert not simplification(g).steps


def test_a_node_that_holds_a_dropout_index_is_not_counted():
    g = from_json(KEPT["a dead node in front of a dropout node"])
    assert len(simplify(g).nodes) == 2 and effective_nodes(g) == 1
    # and the probes do tell the shifted stream apart
    assert not equivalent(g, from_json({"nodes": [{"op": "dropout50", "in": ["m"]}]}))


def test_equality_tells_apart_what_differs():
    adam, adam_clip = builtin("adam"), builtin("adam_clip")
    assert equal_to(adam, [adam, adam_clip, builtin("rmsprop"), adam.with_(update="momentum"),
                           adam.with_(sign=-1)]) == [True, False, False, False, False]
    # NOS's AdamClip clips m to +-sqrt(v99) only where the moments lag a change of regime
    nos_adamclip = builtin("nos_adamclip")
    assert not equivalent(nos_adamclip, from_json({"nodes": [{"op": "neg", "in": ["m"]}, {"op": "neg", "in": ["n0"]}],
                                                   "lr": nos_adamclip.to_json()["lr"]}))


# =============================================================================================
# random genomes


def _random_genomes() -> list[Genome]:
    """100 random genomes as a search draws them, plus 20 grown by mutation to 5-6 nodes."""
    genomes = [random_genome(random.Random(f"simplify:{i}")) for i in range(100)]
    rng = random.Random("simplify:big")
    while len(genomes) < 120:
        g = random_genome(rng, max_nodes=MAX_NODES)
        for _ in range(30):
            try:
                child, _ = mutate(g, rng)
            except ValueError:
                continue
            if len(child.nodes) >= len(g.nodes):
                g = child
        if len(g.nodes) >= 5:
            genomes.append(g)
    return genomes


@pytest.fixture(scope="module")
def random_cases() -> list[tuple[Genome, Genome]]:
    return [(g, simplify(g)) for g in _random_genomes()]


def test_random_genomes_never_grow_and_keep_their_genes(random_cases):
    changed = 0
    for g, s in random_cases:
        assert len(s.nodes) <= len(g.nodes) and len(s.reachable()) <= len(g.reachable())
        assert effective_nodes(g) <= len(g.reachable()) + (g.clip is not None) + g.noise.active
        _same_rest(g, s)
        changed += s != g
    assert changed >= 10  # the sample exercises simplification at all


def test_simplify_is_idempotent(random_cases):
    for _, s in random_cases:
        assert simplify(s) == s, s.to_json()


def test_simplified_genomes_follow_the_original_on_fresh_probes(random_cases):
    """The same trajectories on probe problems simplify never saw (other seeds: other
    gradients, weights and RNG streams)."""
    for g, s in random_cases:
        if s != g:
            for seed in FRESH_SEEDS:
                assert equivalent(g, s, seed), (g.to_json(), s.to_json())


def test_simplified_genomes_train_a_real_network_alike(random_cases):
    """A different kind of problem: the MLP task's training (float32, closed loop), all the
    simplified genomes beside their originals in one batch, as a search would run them."""
    pairs = [(g, s) for g, s in random_cases if s != g]
    genomes = [x for pair in pairs for x in pair]
    task = MLPTask(seed=1, target_scale=3.0)
    res = train(task, genomes, [1e-2] * len(genomes), seeds=7, steps=25)
    assert res.params is not None
    for k, (g, _) in enumerate(pairs):
        a, b = res.params[2 * k], res.params[2 * k + 1]
        if torch.isfinite(a).all():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, g=g: f"{g.dumps()}: {m}")


def test_simplify_is_fast():
    """Well under a second for the largest genomes (6 nodes) on a CPU; the bound is loose for a
    loaded test machine, the README quotes the measured times."""
    genomes = [g for g in _random_genomes() if len(g.nodes) >= 5][:5]
    start = time.perf_counter()
    for g in genomes:
        simplification(g, seed=3)  # a seed of its own: nothing memoised
    assert (time.perf_counter() - start) / len(genomes) < 3.0


# =============================================================================================
# builtins

EFFECTIVE = {
    "sgd": 1, "momentum": 1, "nesterov": 1, "adam": 2, "adam_clip": 3, "rmsprop": 2, "lion": 1,
    "powersign": 3, "addsign": 3, "rso": 2, "nos_opt5": 3, "nos_opt6": 2, "nos_opt7": 2, "nos_adamclip": 2,
    "discovered_erf_sign": 2, "discovered_sign_interp": 1, "discovered_lion_interp": 1,
}
SIMPLIFIED_BUILTINS = {
    # the clip cannot change a sign-only update
    "discovered_erf_sign": {**builtin("discovered_erf_sign").to_json(), "clip": None},
    # sign(0.95 g + 0.05 dropout30(g)) = sign(g): dropout keeps g's sign or gives 0
    "discovered_sign_interp": {"nodes": [{"op": "sign", "in": ["g"]}], "update": "nesterov",
                               "lr": {"schedule": "warmup_cosine"}},
    "nos_opt6": {**builtin("nos_opt6").to_json(), "nodes": REDUCED[
        "abs of something positive; its edge decay moves onto the edge that reads it (NOS's Opt6)"][1]["nodes"]},
}


def test_effective_nodes_of_the_builtins(capsys):
    assert set(EFFECTIVE) == set(BUILTINS)
    got = {name: effective_nodes(builtin(name)) for name in BUILTINS}
    with capsys.disabled():
        print("\neffective nodes:", ", ".join(f"{k} {v}" for k, v in got.items()))
    assert got == EFFECTIVE
    # Adam-like rules keep their moments' ratio (and adam_clip its clip, which binds)
    assert got["adam"] == got["rmsprop"] == 2 and got["adam_clip"] == 3


def test_which_builtins_simplify():
    for name in BUILTINS:
        g = builtin(name)
        want = from_json(SIMPLIFIED_BUILTINS[name]) if name in SIMPLIFIED_BUILTINS else g
        assert simplify(g) == want, name


# =============================================================================================
# nos export


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"nos_simplify_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch_path(cls: type, steps: int = 20) -> list[torch.Tensor]:
    """Parameters of the MLP after each of `steps` steps of the exported optimizer `cls`."""
    task = MLPTask(seed=2, target_scale=4.0)
    model = task.fresh_model()
    opt = cls(model.parameters(), lr=1e-2, total_steps=steps, seed=5)
    path = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = task.module_loss(model(task.x))
            loss.backward()
            return loss

        opt.step(closure)
        path.append(MLPTask.flat(model))
    assert float((path[-1] - task.theta0).abs().max()) > 1e-3  # it trained
    return path


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """Real `python -m nos export` runs of a builtin that simplifies, with and without
    --no-simplify, started with the module so that they run while the other tests do."""
    out = tmp_path_factory.mktemp("cli")
    name = "discovered_sign_interp"
    procs = {
        "simplified": Proc(["-m", "nos", "export", "--builtin", name, "-o", str(out / "simplified.py")]),
        "raw": Proc(["-m", "nos", "export", "--builtin", name, "--no-simplify", "-o", str(out / "raw.py")]),
    }
    yield out, procs
    for p in procs.values():
        p.stop()


def test_cli_exports_the_simplified_genome(cli):
    out, procs = cli
    for k, p in procs.items():
        rc, _, stderr = p.result()
        assert rc == 0, (k, stderr)
        assert "class DiscoveredSignInterp" in stderr
    name = "discovered_sign_interp"
    simple, raw = (out / "simplified.py").read_text(), (out / "raw.py").read_text()
    stored = builtin(name)
    # the stored genome, exactly as `render` writes it: what export wrote before simplification
    assert raw == render(stored, class_name="DiscoveredSignInterp", lr=BUILTIN_LR[name],
                         total_steps=steps_for(stored), provenance={"title": builtin_title(name), "builtin": name})
    assert "simplified:" not in raw and "op_dropout" in raw
    # the simplified file: sign(g) alone, and it says which stored genome it came from
    assert f"builtin: {name}" in simple and f"stored genome: {stored.dumps()}" in simple
    assert "simplified: 1 of 3 nodes kept" in simple and "--no-simplify" in simple
    assert "op_dropout" not in simple and "op_interp" not in simple and "u_t = sign(g)" in simple
    assert f"total_steps={steps_for(stored)}" in simple  # the steps the stored genome trains for
    # numerically the same optimizer on a real torch model
    a = _torch_path(_load(out / "simplified.py", "cli_simple").DiscoveredSignInterp)
    b = _torch_path(_load(out / "raw.py", "cli_raw").DiscoveredSignInterp)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name", sorted(set(BUILTINS) - set(SIMPLIFIED_BUILTINS)))
def test_export_of_a_builtin_that_does_not_simplify_is_unchanged(tmp_path, name):
    """Byte for byte the file --no-simplify writes: no provenance line added."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    assert export_main(["--builtin", name, "-o", str(a)]) == 0
    assert export_main(["--builtin", name, "-o", str(b), "--no-simplify"]) == 0
    assert a.read_bytes() == b.read_bytes() and b"simplified:" not in a.read_bytes()


@pytest.mark.parametrize("name", sorted(SIMPLIFIED_BUILTINS))
def test_simplified_export_trains_like_the_stored_one(tmp_path, name):
    """The exported simplified optimizer's trajectory is the unsimplified exported one's, step by
    step, on a real torch model (float32)."""
    simple, raw = tmp_path / "s.py", tmp_path / "r.py"
    assert export_main(["--builtin", name, "-o", str(simple), "--class-name", "Opt"]) == 0
    assert export_main(["--builtin", name, "-o", str(raw), "--class-name", "Opt", "--no-simplify"]) == 0
    assert simple.read_text() != raw.read_text()
    a = _torch_path(_load(simple, f"{name}_s").Opt)
    b = _torch_path(_load(raw, f"{name}_r").Opt)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_genome_file_export_says_what_was_left_out(tmp_path):
    g = from_json(REDUCED["an unreachable node"][0])
    path = tmp_path / "g.json"
    path.write_text(g.dumps())
    out = tmp_path / "g.py"
    assert export_main(["--genome", str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert "genome file:" in text and "unreachable node(s) n0 (tanh) removed" in text
    assert "op_tanh" not in text
