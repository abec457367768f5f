"""What a run's search optimises (its objective) and where the fitness is computed (its evaluator).

`Objective`: the fidelity stages of the search fitness (successive halving, as in Hyperband / ASHA
and the Lion search's funnel): every candidate gets the first stage, the best `promote` fraction of
each chunk the next, and the last stage is the full fitness. A stage trains on one task family or
several (`MultiEvaluator`); its scores are normalised by tuned Adam on the same instances -- or,
with the config's `reference` "best", by the strongest tuned gradient baseline per horizon (the
run tunes and stores that reference: `Run.reference`).

`Evaluator`: computes a stage's fitness -- in this process (`LocalEvaluator`) or on a Dask cluster
(`nos.search.distributed.DaskEvaluator`). The command picks one and hands it to the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from search_space.genome import Genome

from ..evaluation.fitness import (
    AdamReference,
    Fitness,
    MultiEvaluator,
    MultiReference,
    TaskEvaluator,
)
from .config import SearchConfig

# fitness_fn(genomes, reference) -> one Fitness (or the Exception that stopped it) per genome
FitnessFn = Callable[[Sequence[Genome], "AdamReference | MultiReference"], "list[Fitness | Exception]"]


@dataclass(frozen=True)
class ObjectiveStage:
    """One fidelity of the search fitness: what it trains on, and the fraction promoted past it."""

    evaluator: TaskEvaluator | MultiEvaluator
    promote: float = 1.0

    @property
    def members(self) -> list[TaskEvaluator]:
        """Its evaluator per task (one for a single-task search)."""
        ev = self.evaluator
        return list(ev.evaluators) if isinstance(ev, MultiEvaluator) else [ev]


class Objective:
    """A run's search fitness, built from its configuration (`SearchConfig.stage_setups`)."""

    def __init__(self, config: SearchConfig, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.reference = config.reference  # what every stage's fitness is divided by: "adam" or "best"
        self.stages: list[ObjectiveStage] = []
        for setups, promote in config.stage_setups():
            members = [TaskEvaluator(setup, self.device) for setup in setups]
            self.stages.append(ObjectiveStage(members[0] if len(members) == 1 else MultiEvaluator(members), promote))

    def members(self) -> list[TaskEvaluator]:
        """Every stage's evaluator per task, stage by stage (the order references are tuned in)."""
        return [e for stage in self.stages for e in stage.members]


class Evaluator(Protocol):
    """Where fitness is computed: gives the fitness function of one stage's evaluator."""

    def fitness_fn(self, evaluator: TaskEvaluator | MultiEvaluator) -> FitnessFn: ...


class LocalEvaluator:
    """Fitness computed in this process, by the stage's own evaluator."""

    def fitness_fn(self, evaluator: TaskEvaluator | MultiEvaluator) -> FitnessFn:
        return evaluator.fitness  # type: ignore[return-value]
