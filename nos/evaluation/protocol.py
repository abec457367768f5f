"""The evaluation protocol: disjoint seed splits, tuned baselines, choices on validation only.

A protocol belongs to one task family (`nos.tasks.api`; variants are called horizons here, after
the sine task's t_max). A run has three disjoint sets of instance seeds -- for the wave tasks seed s
means the network pretrained with seed s, fine-tuned on the target trajectory of seed s:

- *search* seeds give the fitness (`nos.evaluation.fitness.TaskEvaluator.fitness`);
- *validation* seeds make every choice: each method's lr / sigma / RandOpt layer variant per
  horizon, and the champion among the funnel's candidates;
- *test* seeds are only reported: each method runs once per horizon at its validated choice.

A search on several tasks has one protocol per task; its *test tasks* get the same treatment as
any task (every method's lr chosen on that task's validation seeds), but no choice of champion
ever reads them (`nos.search.funnel`).

The baselines (Adam, Adam + clip 1.0, and both with linear warmup + cosine decay, a schedule the
search space itself can express; RandOpt with its layer variant chosen too) are tuned exactly like
candidates: the same lr grid, the same budget in forward-pass equivalents, the same choice rule
(lowest geometric mean over the validation seeds of the loss, a diverged run counting as the
pretrained network's loss). Their results depend only on the `Protocol`, so they are computed
once per protocol key and reused (see `nos.search.baselines_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from search_space.builtins import builtin
from search_space.genome import Genome

from ..tasks.api import TaskFamily
from ..tasks.budget import randopt_population
from ..tasks.randopt import DEFAULT_TOP_K, randopt
from ..tasks.registry import WAVES
from ..tasks.sine import DEFAULT_CACHE_DIR, SineConfig
from ..ui.progress import Reporter, reporter
from .fitness import HORIZONS, LR_GRID, SIGMAS, SearchSetup, TaskEvaluator, _finite
from .stats import first_best, gmean, settle

SPLITS = ("search", "validation", "test")
PROTOCOL_VERSION = 1  # bump when the way baselines are computed changes: old stored rows are not reused
RANDOPT_LAYERS = ("all", "first", "middle", "last")
GRADIENT_BASELINES = ("adam", "adam_clip", "adam_wc", "adam_clip_wc")
BASELINES = (*GRADIENT_BASELINES, "randopt")
# NOS's published final optimizers (Morgan & Hougen's finalOptimizers.py, OUStudent/NeuralOptimizerSearch;
# re-derived as genomes in search_space.builtins), tuned and reported like the baselines
# when asked for (`--published`): extra rows of the comparison, not rivals a candidate must beat
PUBLISHED = ("nos_opt5", "nos_opt6", "nos_opt7", "nos_adamclip")
BEFORE = "before"  # the pretrained network, not fine-tuned (the floor every method must beat)
METHOD_LABELS = {
    BEFORE: "before fine-tuning",
    "adam": "Adam",
    "adam_clip": "Adam + clip 1.0",
    "adam_wc": "Adam + warmup-cosine",
    "adam_clip_wc": "Adam + clip + warmup-cosine",
    "randopt": "RandOpt",
    "nos_opt5": "NOS Opt5 (published)",
    "nos_opt6": "NOS Opt6 (published)",
    "nos_opt7": "NOS Opt7 (published)",
    "nos_adamclip": "NOS AdamClip (published)",
}


def baseline_genome(method: str) -> Genome:
    """The genome of a gradient baseline: Adam or Adam + clip, with a constant lr or linear
    warmup + cosine decay (the AlgoPerf-style schedule, `warmup_cosine` in the search space);
    or one of NOS's published optimizers (with their own warmup-cosine lr)."""
    if method in PUBLISHED:
        return builtin(method)
    base = builtin("adam_clip" if method.startswith("adam_clip") else "adam")
    if method.endswith("_wc"):
        return replace(base, lr=replace(base.lr, schedule="warmup_cosine"))
    if method not in ("adam", "adam_clip"):
        raise KeyError(f"unknown gradient baseline {method!r}; choose from {', '.join(GRADIENT_BASELINES)}")
    return base


def horizon_text(h: float) -> str:
    """A horizon as the user types it back: "20", "0.1", and the exact repr where :g would round."""
    short = f"{h:g}"
    return short if float(short) == h else repr(h)


@dataclass(frozen=True)
class Seeds:
    """Three disjoint seed sets. A horizon (a task's variant) named in `test_at` is tested on the
    first n of the test seeds only, any other on all of them: a power computation may ask for
    more seeds at one horizon than at the rest (`nos calibrate --power`)."""

    search: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]
    test_at: tuple[tuple[float, int], ...] = ()  # (horizon, test seeds there), sorted by horizon

    def __post_init__(self) -> None:
        sets = [set(self.search), set(self.validation), set(self.test)]
        if any(len(s) != len(t) for s, t in zip(sets, (self.search, self.validation, self.test))):
            raise ValueError("a seed appears twice in one split")
        if not all(sets):
            raise ValueError("every split needs at least one seed")
        if sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]:
            raise ValueError("search, validation and test seeds must be disjoint")
        hs = [h for h, _ in self.test_at]
        if hs != sorted(set(hs)) or not all(type(n) is int and 1 <= n <= len(self.test) for _, n in self.test_at):
            raise ValueError(f"test seeds per horizon: each horizon once, with 1 to {len(self.test)} seeds")

    def test_for(self, horizon: float) -> tuple[int, ...]:
        """The test seeds of one horizon: the first n where `test_at` names it, else all."""
        n = dict(self.test_at).get(horizon)
        return self.test if n is None else self.test[:n]

    def test_text(self) -> str:
        """The test seeds in words: "1000..1049 (n = 50)", "... (n = 150; 50 at horizon 1, 2)"."""
        fewer: dict[int, list[str]] = {}
        for h, n in self.test_at:
            fewer.setdefault(n, []).append(horizon_text(h))
        at = "".join(f"; {n} at horizon {', '.join(hs)}" for n, hs in fewer.items())
        return f"{self.test[0]}..{self.test[-1]} (n = {len(self.test)}{at})"

    def only(self, horizons: Sequence[float]) -> Seeds:
        """These seeds with per-horizon counts for `horizons` alone (one task's protocol: its
        key and tables do not depend on another task's variants), none that names every seed."""
        keep = tuple((h, n) for h, n in self.test_at if h in horizons and n < len(self.test))
        return self if keep == self.test_at else dataclasses.replace(self, test_at=keep)

    def of_unit(self, split: str, horizon: float) -> tuple[int, ...]:
        """The seeds of one (split, horizon) unit: the split's, per horizon for test."""
        return self.test_for(horizon) if split == "test" else self.of(split)

    @classmethod
    def counted(cls, n_search: int, n_validation: int, n_test: int) -> Seeds:
        """Seeds 0.. for search, 100.. for validation, 1000.. for test (disjoint while n <= 100)."""
        if not (1 <= n_search <= 100 and 1 <= n_validation <= 900 and 1 <= n_test <= 10_000):
            raise ValueError("seed counts: search 1..100, validation 1..900, test 1..10000")
        return cls(tuple(range(n_search)), tuple(range(100, 100 + n_validation)),
                   tuple(range(1000, 1000 + n_test)))

    def of(self, split: str) -> tuple[int, ...]:
        return {"search": self.search, "validation": self.validation, "test": self.test}[split]


@dataclass(frozen=True)
class Protocol:
    """Everything a baseline result depends on (and nothing else).

    `spec` names the task family (the sine task by default; `sine` holds the wave families'
    knobs); `family` may carry it resolved (`Protocol.of` fills the grids from the family)."""

    sine: SineConfig
    seeds: Seeds
    horizons: tuple[float, ...] = HORIZONS
    budget_fpe: int = 600
    lrs: tuple[float, ...] = LR_GRID
    sigmas: tuple[float, ...] = SIGMAS
    randopt_layers: tuple[str, ...] = RANDOPT_LAYERS
    top_k: int = DEFAULT_TOP_K
    cache_dir: str = field(default=DEFAULT_CACHE_DIR, compare=False)  # where, not what
    spec: str = "sine"
    identity: str = ""  # the family's identity (a non-wave task's key); "" = resolve the family
    name: str = ""  # the family's name (the `task` of its rows); "" = resolve the family
    family: TaskFamily | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, family: TaskFamily, spec: str, seeds: Seeds, budget_fpe: int, cache_dir: str = DEFAULT_CACHE_DIR,
           horizons: tuple[float, ...] | None = None, sine: SineConfig | None = None) -> Protocol:
        """The protocol of a family: its variants (or `horizons`), lr grid, sigmas and layers."""
        return cls(sine=sine or SineConfig(), seeds=seeds, horizons=horizons or family.variants,
                   budget_fpe=budget_fpe, lrs=family.lr_grid, sigmas=family.sigmas,
                   randopt_layers=family.randopt_layers(), cache_dir=cache_dir, spec=spec,
                   identity=family.identity(), name=family.name, family=family)

    @property
    def task(self) -> str:
        """The `task` of this protocol's stored rows: the family's name ("sine")."""
        return self.spec if self.spec in WAVES else self.name or self.setup().resolved().name

    @property
    def task_key(self) -> str:
        """The family's identity (the `task_key` of this protocol's stored rows)."""
        return self.identity or self.setup().resolved().identity()

    def key(self, split: str) -> str:
        """Identifies the baseline results of one split ("validation" or "test"): equal keys,
        equal numbers. Search seeds never enter: baselines do not depend on them."""
        # test rows are run at the choices made on validation: their key covers both seed sets
        seeds = [*self.seeds.validation, "|", *self.seeds.test] if split == "test" else list(self.seeds.of(split))
        # per-horizon test seeds change the test rows, so the key; without them it is the old key
        per_horizon = {"test_at": [list(x) for x in self.seeds.test_at]} if split == "test" and self.seeds.test_at else {}
        # a wave task is named by its pretraining config's key (the sine task's keys predate the
        # task API and stay valid); any other family by its identity
        task = ({"sine": dataclasses.replace(self.sine, wave=self.spec).key()} if self.spec in WAVES
                else {"task": self.identity or self.setup().resolved().identity()})
        doc = {"version": PROTOCOL_VERSION, **task, "seeds": seeds, **per_horizon,
               "horizons": list(self.horizons), "budget_fpe": self.budget_fpe, "lrs": list(self.lrs),
               "sigmas": list(self.sigmas), "layers": list(self.randopt_layers), "top_k": self.top_k}
        return f"{split}:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def setup(self) -> SearchSetup:
        return SearchSetup(horizons=self.horizons, lrs=self.lrs, budget_fpe=self.budget_fpe, sine=self.sine,
                           cache_dir=self.cache_dir, task=self.task, spec=self.spec, family=self.family)

    def evaluator(self, device: torch.device | str = "cpu") -> TaskEvaluator:
        return TaskEvaluator(self.setup(), device)


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    """One loss: `method` at `horizon` on `seed`, with hyperparameter `hparam` (lr or sigma);
    `seconds`: its share of the wall time of the training that produced it (0 when read back)."""

    method: str
    horizon: float
    seed: int
    hparam: float | None
    loss: float | None
    split: str
    seconds: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Choice:
    """A method's validated choice at one horizon."""

    method: str  # e.g. "adam", "randopt_first", "#17"
    horizon: float
    hparam: float | None
    score: float  # geometric mean over validation seeds at the chosen hparam (diverged -> before)


def choose(rows: Sequence[Row], before: Mapping[tuple[float, int], float]) -> dict[tuple[str, float], Choice]:
    """(method, horizon) -> the hparam with the lowest validation geometric mean (ties, within a
    relative `stats.TIE_RTOL`: the first in grid order, the smallest lr / sigma). `before[(horizon, seed)]` replaces a diverged loss. Test rows are ignored."""
    grid: dict[tuple[str, float], dict[float | None, list[Row]]] = {}
    for r in rows:
        if r.split == "validation":
            grid.setdefault((r.method, r.horizon), {}).setdefault(r.hparam, []).append(r)
    out = {}
    for (method, h), options in grid.items():
        scored = []
        for hp, rs in options.items():
            rs = sorted(rs, key=lambda r: r.seed)
            losses, _ = settle([r.loss for r in rs], [before[(h, r.seed)] for r in rs])
            scored.append((gmean(losses), hp))
        score, hp = first_best(scored)  # ties within float rounding: the first in grid order
        out[(method, h)] = Choice(method, h, hp, score)
    return out


def best_randopt(choices: Mapping[tuple[str, float], Choice], horizon: float) -> Choice | None:
    """RandOpt's layer variant at a horizon: the variant whose own best sigma scores lowest."""
    variants = [c for (m, h), c in choices.items() if h == horizon and m.startswith("randopt_")]
    return first_best([(c.score, c) for c in variants])[1] if variants else None


# ------------------------------------------------------------------------------- computing


# a Reporter (stages with counts: `nos.ui.progress`), or a plain callable that hears the messages
Progress = Reporter | Callable[[str], None]


def baseline_units(protocol: Protocol, split: str, horizon: float, gradient: Sequence[str] = GRADIENT_BASELINES,
                   with_randopt: bool = True) -> int:
    """Trainings per horizon of `validation_baselines` / `test_baselines` (what their progress
    counts): one batch of the gradient baselines, then one RandOpt run per seed and layer variant
    (validation) or per seed at the chosen variant (test)."""
    seeds = len(protocol.seeds.of_unit(split, horizon))
    randopt = (seeds * len(protocol.randopt_layers) if split == "validation" else seeds) if with_randopt else 0
    return (1 if gradient else 0) + randopt


def before_losses(evaluator: TaskEvaluator, horizons: Sequence[float], seeds: Sequence[int]) -> dict[tuple[float, int], float]:
    """The initial parameters' loss (for the waves: the pretrained network's) per (horizon, seed)."""
    out = {}
    for h in horizons:
        for s in seeds:
            t = evaluator.task(h, pretrain_seed=s, target_seed=s)  # may pretrain: not under no_grad
            with torch.no_grad():
                out[(h, s)] = float(t.loss(t.theta0[None])[0])
    return out


def gradient_rows(evaluator: TaskEvaluator, methods: Mapping[str, Genome], horizon: float,
                  seeds: Sequence[int], lrs: Mapping[str, Sequence[float]], split: str) -> list[Row]:
    """Train every method at each of its lrs on every seed (one stacked batch per horizon)."""
    names = list(methods)
    tasks = [evaluator.task(horizon, pretrain_seed=s, target_seed=s) for s in seeds]
    # one grid per distinct lr list (validation: the same grid for all; test: one lr each)
    rows: list[Row] = []
    groups: dict[tuple[float, ...], list[str]] = {}
    for n in names:
        groups.setdefault(tuple(lrs[n]), []).append(n)
    for grid, group in groups.items():
        results = evaluator.grid_seeds([methods[n] for n in group], grid, tasks)
        for s, res in zip(seeds, results):
            each = res.seconds / max(1, len(group) * len(grid))  # one seed's share, evenly over its rows
            for n, per_lr in zip(group, res.losses):
                rows += [Row(n, horizon, s, lr, loss, split, each) for lr, loss in zip(grid, per_lr)]
    return rows


def randopt_rows(evaluator: TaskEvaluator, protocol: Protocol, horizon: float, seeds: Sequence[int],
                 variants: Mapping[str, Sequence[float]], split: str, progress: Progress | None = None) -> list[Row]:
    """RandOpt with each layer variant at each of its sigmas (all sigmas share the draws); one
    unit of `progress` per (seed, variant)."""
    say = reporter(progress)
    n = randopt_population(protocol.budget_fpe)
    rows = []
    for s in seeds:
        task = evaluator.task(horizon, pretrain_seed=s, target_seed=s)
        for layers, sigmas in variants.items():
            start = time.perf_counter()
            res = randopt(task, n, list(sigmas), protocol.top_k, layers=layers, seed=s)
            each = (time.perf_counter() - start) / max(1, len(sigmas))
            rows += [Row(f"randopt_{layers}", horizon, s, sig, _finite(res.ensemble_losses[sig]), split, each)
                     for sig in sigmas]
            say.advance(1)
    return rows


def validation_baselines(protocol: Protocol, evaluator: TaskEvaluator, progress: Progress | None = None,
                         gradient: Sequence[str] = GRADIENT_BASELINES, with_randopt: bool = True) -> list[Row]:
    """Every baseline at every grid value on the validation seeds, at every horizon
    (`baseline_units` units of `progress` per horizon)."""
    say = reporter(progress)
    seeds = protocol.seeds.validation
    methods = {m: baseline_genome(m) for m in gradient}
    rows = []
    for h in protocol.horizons:
        say.message(f"{', '.join(methods)} at every lr, t_max = {h:g}")
        rows += gradient_rows(evaluator, methods, h, seeds, {m: protocol.lrs for m in methods}, "validation")
        if methods:
            say.advance(1)
        if with_randopt:
            say.message(f"RandOpt at every sigma and layer variant, t_max = {h:g}")
            rows += randopt_rows(evaluator, protocol, h, seeds,
                                 {v: protocol.sigmas for v in protocol.randopt_layers}, "validation", say)
    return rows


def test_baselines(protocol: Protocol, evaluator: TaskEvaluator, choices: Mapping[tuple[str, float], Choice],
                   progress: Progress | None = None, gradient: Sequence[str] = GRADIENT_BASELINES,
                   with_randopt: bool = True) -> list[Row]:
    """Each baseline once per horizon on the test seeds, at its validated choice
    (`baseline_units` units of `progress` per horizon)."""
    say = reporter(progress)
    rows = []
    for h in protocol.horizons:
        seeds = protocol.seeds.test_for(h)
        say.message(f"{', '.join(gradient)} at the validated lr, t_max = {h:g}")
        methods = {m: baseline_genome(m) for m in gradient}
        lrs = {m: [choices[(m, h)].hparam] for m in methods}
        rows += gradient_rows(evaluator, methods, h, seeds, lrs, "test")  # type: ignore[arg-type]
        if methods:
            say.advance(1)
        ro = best_randopt(choices, h) if with_randopt else None
        if ro is not None:
            say.message(f"RandOpt at the validated sigma and layers, t_max = {h:g}")
            rows += randopt_rows(evaluator, protocol, h, seeds, {ro.method[len("randopt_"):]: [ro.hparam]}, "test",  # type: ignore[list-item]
                                 say)
        elif with_randopt:
            say.advance(len(seeds))  # nothing to run: the count still reaches its total
    return rows
