"""A run's configuration: what is searched, how candidates are judged, and the held-out funnel.

Stored as JSON in `runs.config`, so a resumed run (or a report) sees exactly what the run used.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..evaluation.protocol import Protocol, Seeds
from ..evaluation.sine import HORIZONS, SEARCH_LRS, SearchSetup
from ..tasks.budget import DEFAULT_BUDGET_FPE, gradient_steps
from ..tasks.sine import DEFAULT_CACHE_DIR, SineConfig

# Defaults by measurement (README, "Evaluation protocol"): 2 search seeds, 3 validation, 10 test
DEFAULT_SEEDS = Seeds.counted(2, 3, 10)

ALGORITHMS = ("ga", "random")
# Multi-fidelity by measurement (`nos calibrate`, README "Defaults by measurement"): a cheap stage on
# one search seed and the shortest search horizon, the best third of each chunk promoted -- it kept
# every candidate of the full fitness's top 10% of 40 random genomes at 56% of the compute
DEFAULT_FIDELITY: dict[str, Any] = {"seeds": 1, "horizons": [2.0], "budget_fpe": DEFAULT_BUDGET_FPE, "promote": 1 / 3}

MAX_INT = 2**63 - 1


def _same_kind(want: Any, value: Any) -> bool:
    """Does a stored `value` have the kind of the default `want`?"""
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
    funnel: int = 1
    # three disjoint seed sets (see nos.evaluation.protocol): fitness / every choice / reported only
    search_seeds: tuple[int, ...] = DEFAULT_SEEDS.search
    validation_seeds: tuple[int, ...] = DEFAULT_SEEDS.validation
    test_seeds: tuple[int, ...] = DEFAULT_SEEDS.test
    heldout_horizons: tuple[float, ...] = HORIZONS
    sine: dict[str, Any] = field(default_factory=dict)  # SineConfig overrides (tests use a small one)
    cache_dir: str = DEFAULT_CACHE_DIR
    # Multi-fidelity: a cheap first stage (its search seeds, horizons and budget), after which the
    # best `promote` fraction of each chunk gets the full fitness. None: one stage (full only).
    # (`nos evolve` turns DEFAULT_FIDELITY on unless --promote 1; a config built in code has one stage)
    fidelity: dict[str, Any] | None = None
    published: bool = False  # also tune and report NOS's published optimizers in the funnel

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
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("horizons", "lrs", "search_seeds", "validation_seeds", "test_seeds", "heldout_horizons"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    @classmethod
    def checked(cls, raw: Any) -> SearchConfig:
        """A config read back from the database, re-validated like user input (another program
        may have written it): each known field must have its default's type -- finite numbers,
        non-negative 64-bit integers, lists of such numbers -- and the config must build, with
        valid seed sets and sine task. ValueError (one line) otherwise."""
        if not isinstance(raw, dict):
            raise ValueError("its stored config is not an object")
        defaults = cls()
        for key, value in raw.items():
            want = getattr(defaults, key, None)
            if key not in cls.__dataclass_fields__ or value is None or want is None:
                continue
            if not _same_kind(want, value):
                raise ValueError(f"its stored config has a bad {key!r}: {json.dumps(value)[:60]!r}")
        try:
            cfg = cls.from_json(raw)
            cfg.protocol()  # the sine task and the seed sets it names are valid too
            cfg.stage_setups()
            return cfg
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ValueError(f"its stored config is not usable ({str(e)[:120]})") from None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: one of {', '.join(ALGORITHMS)}")
        self.seeds()  # disjoint and non-empty, or ValueError
        if self.fidelity:
            f = self.fidelity
            if set(f) != {"seeds", "horizons", "budget_fpe", "promote"}:
                raise ValueError("fidelity: need exactly seeds, horizons, budget_fpe and promote")
            if not (1 <= int(f["seeds"]) <= len(self.search_seeds) and f["horizons"] and 3 <= int(f["budget_fpe"])
                    and 0 < float(f["promote"]) <= 1):
                raise ValueError("fidelity: 1 <= seeds <= search seeds, some horizons, budget >= 3, 0 < promote <= 1")

    def seeds(self) -> Seeds:
        return Seeds(tuple(self.search_seeds), tuple(self.validation_seeds), tuple(self.test_seeds))

    def setup(self) -> SearchSetup:
        """The search objective: search horizons and seeds, the search lr grid, the budget."""
        return SearchSetup(
            horizons=self.horizons,
            lrs=self.lrs,
            budget_fpe=self.budget_fpe,
            seeds=tuple(self.search_seeds),
            sine=SineConfig(**self.sine),
            cache_dir=self.cache_dir,
        )

    def stage_setups(self) -> list[tuple[SearchSetup, float]]:
        """(setup, promoted fraction) per fidelity stage, the full search fitness last."""
        full = self.setup()
        if not self.fidelity:
            return [(full, 1.0)]
        f = self.fidelity
        cheap = replace(full, seeds=tuple(self.search_seeds[: int(f["seeds"])]),
                        horizons=tuple(float(h) for h in f["horizons"]), budget_fpe=int(f["budget_fpe"]),
                        task="sine_cheap")
        return [(cheap, float(f["promote"])), (full, 1.0)]

    def protocol(self) -> Protocol:
        """The held-out protocol: validation and test seeds, all horizons, tuned baselines."""
        return Protocol(sine=SineConfig(**self.sine), seeds=self.seeds(), horizons=tuple(self.heldout_horizons),
                        budget_fpe=self.budget_fpe, cache_dir=self.cache_dir)
