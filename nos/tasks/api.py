"""The task API: what every optimizer, baseline and meta-objective of nos meets.

Shaped like learned_optimization's `Task` / `TaskFamily` (Metz et al., google/learned_optimization):

- A `TaskFamily` names its *variants* (numbers with a label: the sine rollout's horizons t_max,
  a quadratic's condition number, ...), yields one `TaskInstance` per (variant, seed), and has an
  *identity* -- its name plus a hash of its configuration -- that keys pretraining caches, database
  rows and evaluation protocols. It also says how its baselines are tuned: the lr grid of the
  protocol, the search's lr grid and RandOpt's sigmas and layer groups.
- A `TaskInstance` holds initial parameters `theta0` [P] (flat) and a batched loss: `loss(theta)`
  maps [C, P] (C independent candidates on the leading axis) to [C]. A candidate's row never
  touches another's: a NaN in one row never reaches another row's loss or gradient, and a row's
  loss is the same alone or in a batch.

Which seeds an instance is drawn with is the caller's business: the protocol keeps the search,
validation and test seeds disjoint (`nos.evaluation.protocol.Seeds`), and a family draws instance
`seed` the same way whatever split asks for it.

Shipped families are listed by `nos.tasks.registry`; a researcher's own family comes from a file
or module named on the command line (`--task FILE.py:FACTORY`), see `nos.tasks.registry.load`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from .segments import Segments

# The protocol's lr grid and the search's, unless a family says otherwise (the sine task's, chosen
# there by measurement: Adam kept picking the low end of the 1e-4..1e-2 grid)
DEFAULT_LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_SEARCH_LRS = (3e-5, 3e-4, 3e-3)
DEFAULT_SIGMAS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


class TaskInstance(ABC):
    """One problem an optimizer is run on: initial parameters and a batched loss.

    Subclasses set `theta0` ([P] float32 on `device`) and `segments` (how the flat vector splits
    into tensors, for per-tensor norms), and implement `predict` and `loss_of_predictions`;
    `loss = loss_of_predictions(predict(theta))`. RandOpt ensembles the *predictions* of its
    best members (Gan & Isola's mean of predictions), so the two halves are separate.
    """

    theta0: torch.Tensor
    segments: Segments
    device: torch.device
    seed: int = 0  # the instance's seed: also the seed of candidates' random ops on it
    # RandOpt's layer groups: name -> [P] boolean mask ("all" is always there)
    layer_groups: dict[str, torch.Tensor]

    @property
    def n_params(self) -> int:
        return int(self.theta0.numel())

    def init_params(self, C: int) -> torch.Tensor:
        """[C, P] independent copies of the initial parameters."""
        return self.theta0.unsqueeze(0).repeat(C, 1)

    @abstractmethod
    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        """Predictions [C, ...] of candidates theta [C, P] (differentiable in theta)."""

    @abstractmethod
    def loss_of_predictions(self, pred: torch.Tensor) -> torch.Tensor:
        """Loss [C] of predictions [C, ...]."""

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """The loss [C] of candidates theta [C, P]."""
        return self.loss_of_predictions(self.predict(theta))

    def layer_mask(self, layers: str) -> torch.Tensor:
        """[P] boolean mask of a layer group ("all" or a key of `layer_groups`)."""
        if layers == "all":
            return torch.ones(self.n_params, dtype=torch.bool, device=self.device)
        if layers not in self.layer_groups:
            raise ValueError(f"layers must be 'all' or one of {list(self.layer_groups)}, got {layers!r}")
        return self.layer_groups[layers].to(self.device)


class StackedTask:
    """Several instances of one family and variant trained in one batch (the trainer's `Task`).

    Row i of theta starts from instance `row_task[i]`'s parameters and is scored by its loss. This
    generic stack calls each instance's loss on its own rows; families whose instances share one
    computation (the sine rollout) stack faster by themselves (`TaskFamily.stack`).
    """

    def __init__(self, instances: Sequence[TaskInstance], row_task: torch.Tensor) -> None:
        first = instances[0]
        if any(t.n_params != first.n_params for t in instances):
            raise ValueError("stacked instances must have the same number of parameters")
        self.instances = list(instances)
        self.device = first.device
        self.segments = first.segments
        self.row_task = row_task.to(self.device)
        self.theta0 = torch.stack([t.theta0 for t in instances])
        self._groups = [torch.nonzero(self.row_task == j).squeeze(1) for j in range(len(instances))]

    def init_params(self, C: int) -> torch.Tensor:
        if C != len(self.row_task):
            raise ValueError(f"this stack has {len(self.row_task)} rows, not {C}")
        return self.theta0[self.row_task].clone()

    def select(self, keep: torch.Tensor) -> StackedTask:
        """The same stack restricted to rows `keep` (the trainer drops failed rows)."""
        return type(self)(self.instances, self.row_task[keep])

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        if len(self.instances) == 1:
            return self.instances[0].loss(theta)
        out = theta.new_empty(theta.shape[0])
        for inst, rows in zip(self.instances, self._groups):
            if rows.numel():
                out = out.index_put((rows,), inst.loss(theta[rows]))
        return out


class TaskFamily(ABC):
    """A named family of task instances with variants; see the module docstring."""

    name: str = "task"
    variant_label: str = "variant"  # what a variant number means, for tables ("t_max")
    variants: tuple[float, ...] = (1.0,)  # every variant the protocol reports
    search_variants: tuple[float, ...] | None = None  # the search's default variants (None: all)
    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID  # every tuned method's lr choices (validation)
    search_lrs: tuple[float, ...] = DEFAULT_SEARCH_LRS  # a candidate's lr choices in the search
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS  # RandOpt's sigma choices

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that determines the family's instances, as plain JSON data."""

    @abstractmethod
    def instance(self, variant: float, seed: int, device: torch.device | str = "cpu",
                 cache_dir: str = "runs/cache") -> TaskInstance:
        """The instance of `variant` drawn with `seed` (deterministic; may use the cache dir)."""

    def identity(self) -> str:
        """`name@hash`: equal identities, equal instances (keys caches, rows and protocols)."""
        blob = json.dumps({"name": self.name, "config": self.config()}, sort_keys=True).encode()
        return f"{self.name}@{hashlib.sha256(blob).hexdigest()[:12]}"

    def stack(self, instances: Sequence[TaskInstance], row_task: torch.Tensor) -> Any:
        """Instances of one variant on one candidate axis (see `StackedTask`)."""
        return StackedTask(instances, row_task)

    def randopt_layers(self) -> tuple[str, ...]:
        """RandOpt's layer variants: "all" and the instances' layer groups."""
        return ("all",)

    def describe(self) -> str:
        """One line for listings."""
        return (self.__doc__ or self.name).strip().splitlines()[0]

    def default_search_variants(self) -> tuple[float, ...]:
        return self.search_variants if self.search_variants is not None else self.variants

    def check_variants(self, variants: Sequence[float], what: str = "variants") -> tuple[float, ...]:
        """`variants` as a tuple, each one of the family's (ValueError, one line, otherwise)."""
        bad = [v for v in variants if v not in self.variants]
        if bad or not variants:
            known = ", ".join(f"{v:g}" for v in self.variants)
            raise ValueError(f"task {self.name!r} has {self.variant_label} {known}; "
                             f"not {', '.join(f'{v:g}' for v in bad) or 'none'} ({what})")
        return tuple(float(v) for v in variants)

    def __repr__(self) -> str:
        return f"<task {self.identity()}>"


def is_family(obj: object) -> bool:
    return isinstance(obj, TaskFamily)
