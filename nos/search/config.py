"""A run's configuration: what is searched, how candidates are judged, and the held-out funnel.

Stored as JSON in `runs.config`, so a resumed run (or a report) sees exactly what the run used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..evaluation.sine import HELDOUT_SEEDS, HORIZONS, SEARCH_LRS, SearchSetup
from ..tasks.budget import DEFAULT_BUDGET_FPE, gradient_steps
from ..tasks.sine import DEFAULT_CACHE_DIR, SineConfig

PRESETS: dict[str, dict[str, int]] = {
    "default": {},
    "paper": {"initial": 500, "particles": 50, "timesteps": 5, "mutations": 7},
}


@dataclass
class SearchConfig:
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
    heldout_seeds: tuple[int, ...] = HELDOUT_SEEDS
    heldout_horizons: tuple[float, ...] = HORIZONS
    sine: dict[str, Any] = field(default_factory=dict)  # SineConfig overrides (tests use a small one)
    cache_dir: str = DEFAULT_CACHE_DIR

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
        for k in ("horizons", "lrs", "heldout_seeds", "heldout_horizons"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def setup(self) -> SearchSetup:
        return SearchSetup(
            horizons=self.horizons,
            lrs=self.lrs,
            budget_fpe=self.budget_fpe,
            sine=SineConfig(**self.sine),
            cache_dir=self.cache_dir,
        )
