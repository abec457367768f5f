"""A run's configuration: what is searched, how candidates are judged, and the held-out funnel.

Stored as JSON in `runs.config`, so a resumed run (or a report) sees exactly what the run used.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..evaluation.fitness import HORIZONS, REFERENCES, SEARCH_LRS, SearchSetup
from ..evaluation.protocol import Protocol, Seeds
from ..tasks.api import TaskFamily
from ..tasks.budget import DEFAULT_BUDGET_FPE, gradient_steps
from ..tasks.registry import WAVES, TaskError, check_spec, is_code, is_shipped, named, resolve
from ..tasks.sine import DEFAULT_CACHE_DIR, SineConfig

# Defaults by measurement (README, "Evaluation protocol"): 2 search seeds, 3 validation, 10 test
DEFAULT_SEEDS = Seeds.counted(2, 3, 10)

ALGORITHMS = ("ga", "random")
# Multi-fidelity by measurement (`nos calibrate`, README "Defaults by measurement"): a cheap stage on
# one search seed and the shortest search horizon, the best third of each chunk promoted -- it kept
# every candidate of the full fitness's top 10% of 40 random genomes at 56% of the compute
DEFAULT_FIDELITY: dict[str, Any] = {"seeds": 1, "horizons": [2.0], "budget_fpe": DEFAULT_BUDGET_FPE, "promote": 1 / 3}

MAX_INT = 2**63 - 1
_POSITIVE = ("budget_fpe", "total_steps")  # stored integers that must be at least 1


def _same_kind(want: Any, value: Any) -> bool:
    """Does a stored `value` have the kind of the default `want`?"""
    if isinstance(want, tuple) and not want:  # an empty default: a list of names (test_tasks)
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if isinstance(want, tuple):
        return isinstance(value, (list, tuple)) and bool(value) and all(_same_kind(want[0], v) for v in value)
    if isinstance(want, (bool, str, dict)):
        return type(value) is type(want)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(want, float):
        return isinstance(value, int) or math.isfinite(value)
    return isinstance(value, int) and 0 <= value <= MAX_INT


PRESETS: dict[str, dict[str, int]] = {
    "default": {},
    "paper": {"initial": 500, "particles": 50, "timesteps": 5, "mutations": 7},
}


@dataclass
class SearchConfig:
    algorithm: str = "ga"  # "ga": the particle GA; "random": random search with the GA's schedule
    # What the search fitness is divided by, per search horizon and task: "adam", tuned Adam; "best",
    # the strongest of the tuned gradient baselines there (`TaskEvaluator.best_reference`). A stored
    # config without it is "adam": what every run before the option meant.
    reference: str = "adam"
    initial: int = 12
    particles: int = 2
    timesteps: int = 2
    mutations: int = 3
    max_tries: int = 4
    seed: int = 0
    seed_builtins: bool = False
    elitism: bool = False
    chunk: int = 64  # initial candidates judged (and written) together
    timestep_chunk: int = 0  # children of one timestep attempt judged together (0: all of them)
    horizons: tuple[float, ...] = (2.0, 10.0)  # one where Adam shines, one where it struggles
    lrs: tuple[float, ...] = SEARCH_LRS
    budget_fpe: int = DEFAULT_BUDGET_FPE
    # candidates the funnel validates: 5, so that its diagnostics (a Spearman over them) are defined
    funnel: int = 5
    # three disjoint seed sets (see nos.evaluation.protocol): fitness / every choice / reported only
    search_seeds: tuple[int, ...] = DEFAULT_SEEDS.search
    validation_seeds: tuple[int, ...] = DEFAULT_SEEDS.validation
    test_seeds: tuple[int, ...] = DEFAULT_SEEDS.test
    # horizon (repr of a float: a task's variant) -> test seeds there, the first n of test_seeds;
    # a horizon not named is tested on all of them (`nos evolve --test-seeds 50,20=150`)
    test_seeds_at: dict[str, int] = field(default_factory=dict)
    heldout_horizons: tuple[float, ...] = HORIZONS
    sine: dict[str, Any] = field(default_factory=dict)  # SineConfig overrides (tests use a small one)
    cache_dir: str = DEFAULT_CACHE_DIR
    # Multi-fidelity: a cheap first stage (its search seeds, horizons and budget), after which the
    # best `promote` fraction of each chunk gets the full fitness. None: one stage (full only).
    # (`nos evolve` turns DEFAULT_FIDELITY on unless --promote 1; a config built in code has one stage)
    fidelity: dict[str, Any] | None = None
    published: bool = False  # also tune and report NOS's published optimizers in the funnel
    # The racing funnel (`nos.search.race`): "NxS,NxS,..." -- stage k judges N candidates on its own
    # S validation seeds (disjoint blocks, in order), the best distinct ones advance; "" = one stage
    # (every funnel candidate on every validation seed, the funnel as it was before racing)
    race: str = ""
    # The tasks (`nos.tasks.registry` specs): the search mix, and held-out test tasks that no choice
    # ever reads. `horizons`, `lrs` and `heldout_horizons` above are the wave tasks' (t_max); every
    # other family brings its own variants and grids. `task_info` snapshots the contract (identity,
    # variants, grids) of a user's task when the run is created, so that query, report and export
    # know it without importing its code, and a resume can check the code is the same.
    tasks: tuple[str, ...] = ("sine",)
    test_tasks: tuple[str, ...] = ()
    task_info: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """Gradient steps of a plain genome within the budget (kept in the stored config)."""
        return gradient_steps(self.budget_fpe)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchConfig:
        """The config of a dict this program built (`to_json` of a config in hand), unchecked
        beyond what the constructor checks; a config read back from the database goes through
        `checked`, the one validator of stored configs."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("horizons", "lrs", "search_seeds", "validation_seeds", "test_seeds", "heldout_horizons",
                  "tasks", "test_tasks"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    @classmethod
    def checked(cls, raw: Any) -> SearchConfig:
        """A config read back from the database, re-validated like user input (another program
        may have written it): each known field (and the `total_steps` that `to_json` adds) must
        have its default's type -- finite numbers, non-negative 64-bit integers, lists of such
        numbers -- with a positive budget and total steps, and the config must build, with valid
        seed sets and tasks whose contracts give a search setup and a protocol. ValueError (one
        line) otherwise. Every command that reads a stored config (query, report, export, resume)
        reads it through here."""
        if not isinstance(raw, dict):
            raise ValueError("its stored config is not an object")
        defaults = cls()
        for key, value in raw.items():
            if key in cls.__dataclass_fields__:
                want = getattr(defaults, key)
            elif key == "total_steps":
                want = defaults.total_steps
            else:
                continue
            if value is None or want is None:
                continue
            if not _same_kind(want, value) or (key in _POSITIVE and value < 1):
                raise ValueError(f"its stored config has a bad {key!r}: {json.dumps(value)[:60]!r}")
        try:
            cfg = cls.from_json(raw)
            for spec in cfg.tasks:
                cfg.setup(spec)  # the search variants and lrs of every search task can be read
            for spec in cfg.all_tasks:
                cfg.protocol(spec)  # the task, its stored contract and the seed sets are valid too
            return cfg
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ValueError(f"its stored config is not usable ({str(e)[:120]})") from None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: one of {', '.join(ALGORITHMS)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference: one of {', '.join(REFERENCES)}")
        if not self.tasks:
            raise ValueError("tasks: at least one search task")
        for spec in self.all_tasks:
            check_spec(spec)
        if len(set(self.all_tasks)) != len(self.all_tasks):
            raise ValueError("a task appears twice among the search and test tasks")
        names = [self.task_name(spec) for spec in self.all_tasks if spec in self.task_info or is_shipped(spec)]
        if len(set(names)) != len(names):
            raise ValueError(f"two tasks share a name ({', '.join(names)}): rows could not tell them apart")
        self.seeds()  # disjoint and non-empty, or ValueError
        if self.race:
            self.race_plan()  # well formed and fits the funnel and the validation seeds, or ValueError
        if self.fidelity:
            f = self.fidelity
            if set(f) != {"seeds", "horizons", "budget_fpe", "promote"}:
                raise ValueError("fidelity: need exactly seeds, horizons, budget_fpe and promote")
            if not (1 <= int(f["seeds"]) <= len(self.search_seeds) and f["horizons"] and 3 <= int(f["budget_fpe"])
                    and 0 < float(f["promote"]) <= 1):
                raise ValueError("fidelity: 1 <= seeds <= search seeds, some horizons, budget >= 3, 0 < promote <= 1")

    def seeds(self) -> Seeds:
        return Seeds(tuple(self.search_seeds), tuple(self.validation_seeds), tuple(self.test_seeds),
                     tuple(sorted((float(h), n) for h, n in self.test_seeds_at.items())))

    def race_plan(self) -> list[tuple[int, tuple[int, ...]]]:
        """The racing funnel's stages: (candidates, its own block of validation seeds) each; the
        blocks are consecutive slices of the validation seeds, disjoint, covering all of them."""
        counts = parse_race(self.race)
        if counts[0][0] != self.funnel:
            raise ValueError(f"race: its first stage judges {counts[0][0]} candidates but the funnel has {self.funnel}")
        if sum(s for _, s in counts) != len(self.validation_seeds):
            raise ValueError(f"race: its stages use {sum(s for _, s in counts)} validation seeds, the run has "
                             f"{len(self.validation_seeds)}")
        plan, start = [], 0
        for n, s in counts:
            plan.append((n, tuple(self.validation_seeds[start:start + s])))
            start += s
        return plan

    # ------------------------------------------------------------------ tasks
    @property
    def all_tasks(self) -> tuple[str, ...]:
        """Search tasks, then test tasks."""
        return (*self.tasks, *self.test_tasks)

    def family(self, spec: str) -> TaskFamily:
        """The family of one of the run's tasks (a user's code only if named in this process, by
        this spec or by any path to code of the same identity)."""
        if is_code(spec) and isinstance(self.task_info.get(spec), dict):
            same = named(str(self.task_info[spec].get("identity")))
            if same:
                return same[0]
        return resolve(spec, self.sine)

    def _info(self, family: TaskFamily, spec: str) -> dict[str, Any]:
        """The contract of a task as this run uses it (stored in `task_info`)."""
        return _contract(family, spec, tuple(self.horizons), tuple(self.heldout_horizons), tuple(self.lrs))

    def add_task_info(self, families: dict[str, TaskFamily]) -> None:
        """Snapshot the contract of tasks given as resolved families (a user's own, from the CLI)."""
        for spec, fam in families.items():
            if spec in self.all_tasks:
                self.task_info[spec] = self._info(fam, spec)

    def check_task_code(self) -> None:
        """On resume: every task resolves (a user's file named again) and is what the run used."""
        for spec in self.all_tasks:
            if is_code(spec) and not named(str(self.info(spec)["identity"])) and named():
                given = ", ".join(f.identity() for f in named())
                raise TaskError(f"task {spec!r}: the run used {self.info(spec)['identity']}, the code named on the "
                                f"command line is {given}: its code or configuration changed")
            live = self._info(self.family(spec), spec)
            if live["identity"] != self.info(spec)["identity"]:
                raise TaskError(f"task {spec!r} is now {live['identity']}, but the run used "
                                f"{self.info(spec)['identity']}: its code or configuration changed")

    def info(self, spec: str) -> dict[str, Any]:
        """A task's contract: the stored snapshot (a user's task), else the shipped family's now."""
        if spec not in self.task_info and is_shipped(spec):
            return dict(_shipped_info(spec, json.dumps(self.sine, sort_keys=True), tuple(self.horizons),
                                      tuple(self.heldout_horizons), tuple(self.lrs)))
        if spec not in self.task_info:
            raise TaskError(f"task {spec!r} is user code; name it on the command line (--task {spec})")
        info = self.task_info[spec]
        if not isinstance(info, dict) or not {"identity", "name", "search_variants", "variants", "search_lrs",
                                              "lr_grid", "sigmas", "randopt_layers"} <= set(info):
            raise ValueError(f"task_info of {spec!r} is incomplete")
        return info

    def task_name(self, spec: str) -> str:
        """The `task` of this task's evaluation rows (its family's name)."""
        return str(self.info(spec)["name"])

    def setup(self, spec: str | None = None) -> SearchSetup:
        """The search objective on one task: its search variants and seeds, lr grid, the budget."""
        spec = spec or self.tasks[0]
        info = self.info(spec)
        return SearchSetup(
            horizons=tuple(float(v) for v in info["search_variants"]),
            lrs=tuple(float(v) for v in info["search_lrs"]),
            budget_fpe=self.budget_fpe,
            seeds=tuple(self.search_seeds),
            sine=SineConfig(**self.sine),
            cache_dir=self.cache_dir,
            task=self.task_name(spec),
            spec=spec,
            family=self._code_family(spec),
        )

    def stage_setups(self) -> list[tuple[list[SearchSetup], float]]:
        """(one setup per search task, promoted fraction) per fidelity stage, the full fitness last.
        A cheap stage uses the fidelity's horizons on wave tasks, the shortest search variant on others."""
        full = [self.setup(spec) for spec in self.tasks]
        if not self.fidelity:
            return [(full, 1.0)]
        f = self.fidelity
        cheap = [replace(s, seeds=tuple(self.search_seeds[: int(f["seeds"])]),
                         horizons=tuple(float(h) for h in f["horizons"]) if s.spec in WAVES else (min(s.horizons),),
                         budget_fpe=int(f["budget_fpe"]), task=f"{s.task}_cheap") for s in full]
        return [(cheap, float(f["promote"])), (full, 1.0)]

    def protocol(self, spec: str | None = None) -> Protocol:
        """The held-out protocol of one task: validation and test seeds, all its variants, the tuned
        baselines (on the first search task unless `spec` names another)."""
        spec = spec or self.tasks[0]
        info = self.info(spec)
        horizons = tuple(float(v) for v in info["variants"])
        return Protocol(sine=SineConfig(**self.sine), seeds=self.seeds().only(horizons), horizons=horizons,
                        budget_fpe=self.budget_fpe,
                        lrs=tuple(float(v) for v in info["lr_grid"]), sigmas=tuple(float(v) for v in info["sigmas"]),
                        randopt_layers=tuple(str(v) for v in info["randopt_layers"]), cache_dir=self.cache_dir,
                        spec=spec, identity=str(info["identity"]), name=self.task_name(spec),
                        family=self._code_family(spec))

    def _code_family(self, spec: str) -> TaskFamily | None:
        """A user's task as named in this process (whatever path the user typed this time), or None
        (shipped tasks resolve by name; an unnamed user task is only read, never trained)."""
        if not is_code(spec):
            return None
        try:
            return self.family(spec)
        except TaskError:
            return None


def parse_race(text: str) -> list[tuple[int, int]]:
    """"32x2,8x4,3x10" -> [(32, 2), (8, 4), (3, 10)]: (candidates, validation seeds) per stage,
    at least one candidate and one seed each, candidates never growing. ValueError otherwise."""
    out = []
    for part in text.split(","):
        n, sep, s = part.strip().partition("x")
        if not sep or not n.isdigit() or not s.isdigit() or int(n) < 1 or int(s) < 1:
            raise ValueError(f"race: {part.strip()!r} is not CANDIDATESxSEEDS (e.g. 32x2,8x4,3x10)")
        out.append((int(n), int(s)))
    if any(b[0] > a[0] for a, b in zip(out, out[1:])):
        raise ValueError("race: a later stage cannot judge more candidates than the one before")
    return out


@functools.lru_cache(maxsize=64)
def _shipped_info(spec: str, sine: str, horizons: tuple[float, ...], heldout: tuple[float, ...],
                  lrs: tuple[float, ...]) -> dict[str, Any]:
    """A shipped task's contract for a config's wave settings (cached: building a family may build
    a model to find its layers, and a comparison asks for the contract many times)."""
    return _contract(resolve(spec, json.loads(sine)), spec, horizons, heldout, lrs)


def _contract(family: TaskFamily, spec: str, horizons: tuple[float, ...], heldout: tuple[float, ...],
              lrs: tuple[float, ...]) -> dict[str, Any]:
    """A task's contract; the wave tasks take the config's horizons and search lrs (t_max)."""
    wave = spec in WAVES
    return {"identity": family.identity(), "name": family.name, "variant_label": family.variant_label,
            "search_variants": list(horizons if wave else family.default_search_variants()),
            "variants": list(heldout if wave else family.variants),
            "search_lrs": list(lrs if wave else family.search_lrs), "lr_grid": list(family.lr_grid),
            "sigmas": list(family.sigmas), "randopt_layers": list(family.randopt_layers())}
