"""A run as the report reads it: its stored rows, comparison and champion, and the GA's particle
positions (replayed through the strategy, not re-derived)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from db.store import Store

from ..evaluation.compare import Comparison
from ..search import SearchConfig
from ..search.funnel import candidate_id, comparison
from ..ui.cli import UsageError


@dataclass
class RunData:
    """Everything the report reads from the database about one run."""

    run: dict
    config: SearchConfig
    individuals: list[dict]
    counts: dict[str, int]
    stats: list[dict]
    comparison: Comparison | None = None  # the funnel's test-seed comparison (None: no funnel)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # nos.search.diagnostics
    champion: dict | None = None  # the best individual (funnel champion, else best fitness)

    @property
    def by_id(self) -> dict[int, dict]:
        return {r["id"]: r for r in self.individuals}


# ---------------------------------------------------------------------- reading


def load(store: Store, name_or_id: str) -> RunData:
    """Read a run, its individuals, stats and held-out results; UsageError for an unknown run."""
    run = store.get_run(name_or_id)
    if run is None:
        raise UsageError(f"no run named {name_or_id!r} (nor with that id) in {store.url}")
    try:  # re-validated like user input
        cfg = SearchConfig.checked(run["config"])
    except ValueError as e:
        raise UsageError(f"run {run['name']!r}: {e}") from None
    data = RunData(run, cfg, store.individuals(run["id"]), store.status_counts(run["id"]),
                   store.timestep_stats(run["id"]))
    data.comparison = comparison(store, run["id"], cfg)
    # the funnel's own choice (on validation seeds), else the best fitness
    name = data.comparison.champion if data.comparison else None
    best = data.by_id.get(candidate_id(name)) if name is not None else None  # type: ignore[arg-type]
    if best is None:
        top = store.top(run["id"], 1)
        best = top[0] if top else None
    data.champion = best
    return data


def particle_paths(data: RunData) -> dict[int, list[dict]]:
    """Each particle's position at timesteps 0, 1, ... (its row), as the GA chose it: the stored
    candidates replayed through the run's strategy (`ParticleGA.positions`), up to the last
    timestep fully stored. A strategy without particles (random search) has none."""
    from ..ga.particle import STRATEGIES, ParticleGA
    from ..search.records import Candidate

    strategy = STRATEGIES[data.config.algorithm].of(data.config)
    if not isinstance(strategy, ParticleGA):
        return {}
    by_id = data.by_id
    positions = strategy.positions({r["slot"]: Candidate.from_row(r) for r in data.individuals})
    return {p: [by_id[c.id] for c in pts] for p, pts in positions.items()}
