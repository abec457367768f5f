"""Any `torch.nn.Module` as a nos task, through `torch.func` (no hand-written stacking).

A candidate optimizer trains one row of `theta` [C, P]: row c is the module's parameters,
flattened in `named_parameters()` order. `ModuleInstance.predict` unflattens every row into a
{name: tensor} dict and evaluates the module on it with `torch.func.functional_call`, vectorised
over the candidate axis with `torch.func.vmap`; the loss is `vmap(loss_fn)` of the predictions
against the targets. Rows never meet: vmap evaluates each candidate's forward as if it were
alone (batched matmuls keep rows apart), so a NaN in one row never reaches another row's loss or
gradient, and a row's loss is the same alone or in a batch.

`ModuleTask` is the family a researcher writes to bring their own model (see its docstring).
`sine_module_family` is the shipped sine task rebuilt on this adapter (the bench compares it with
the hand-stacked `StackedSineTask`).

Limitations (by design):

- The module is put in **eval mode**: dropout is off and BatchNorm uses (and never updates) its
  running statistics. Buffers are passed to every candidate unchanged; a module whose forward
  mutates its buffers in eval mode is not supported (functional_call would mutate the shared
  buffers once per call, not per candidate).
- The forward must be deterministic (no random ops: vmap refuses them) and must not branch on
  parameter values in Python.
- Floating-point parameters and buffers are cast to float32; parameters with no elements are
  left out of theta (the module's own value is used).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .api import DEFAULT_LR_GRID, DEFAULT_SEARCH_LRS, DEFAULT_SIGMAS, TaskFamily, TaskInstance
from .segments import Segments

if TYPE_CHECKING:
    from .sine import SineConfig

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _float32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, cast to float32 when it is floating point (labels stay integers)."""
    return t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)


class ModuleInstance(TaskInstance):
    """One task instance from a module, full-batch data and a loss: `loss_fn(model(inputs), targets)`.

    - `theta0` [P]: the module's parameters, flattened in `named_parameters()` order (float32);
    - `segments`: one segment per parameter tensor;
    - `layer_groups`: one [P] mask per top-level child module that owns parameters, named as
      `named_children()` names them ("0", "1", ... for an `nn.Sequential`, else the attributes);
    - `predict(theta [C, P])` -> [C, *model(inputs).shape]; `loss_of_predictions(pred)` -> [C].

    The instance takes `model` over: it is moved to `device`, cast to float32 and put in eval mode
    (see the module docstring for what is not supported). `loss_fn(pred, target)` must return a
    scalar (e.g. `torch.nn.functional.mse_loss`, `cross_entropy`); `inputs` may be one tensor or a
    tuple of the forward's positional arguments.
    """

    def __init__(self, model: nn.Module, inputs: Inputs, targets: torch.Tensor, loss_fn: LossFn,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.model = model.to(device=self.device, dtype=torch.float32).eval()
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        self.inputs = tuple(_float32(a, self.device) for a in args)
        self.targets = _float32(targets, self.device)
        self.loss_fn = loss_fn

        named = [(n, p) for n, p in self.model.named_parameters() if p.numel() > 0]
        if not named:
            raise ValueError("the module has no parameters to train")
        self.names = tuple(n for n, _ in named)
        self.shapes = tuple(tuple(p.shape) for _, p in named)
        bounds, start = [], 0
        for _, p in named:
            bounds.append((start, start + p.numel()))
            start += p.numel()
        self.segments = Segments(tuple(bounds))
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float32)
        self.buffers = {n: b for n, b in self.model.named_buffers()}

        self.layer_groups = {}
        for child, _ in self.model.named_children():
            mask = torch.zeros(self.n_params, dtype=torch.bool, device=self.device)
            for name, (a, b) in zip(self.names, bounds):
                if name.startswith(child + "."):
                    mask[a:b] = True
            if bool(mask.any()):
                self.layer_groups[child] = mask

        def forward(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, {**params, **self.buffers}, self.inputs)

        def loss_one(pred: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(pred, self.targets)

        self._forward = vmap(forward)
        self._loss = vmap(loss_one)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of theta [C, P] as {parameter name: [C, *shape]} (no copy; keeps autograd)."""
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must be [C, {self.n_params}], got {tuple(theta.shape)}")
        C = theta.shape[0]
        return {name: theta[:, a:b].reshape(C, *shape)
                for name, (a, b), shape in zip(self.names, self.segments.bounds, self.shapes)}

    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        return self._forward(self.unflatten(theta))

    def loss_of_predictions(self, pred: torch.Tensor) -> torch.Tensor:
        return self._loss(pred)

    def load(self, theta: torch.Tensor) -> nn.Module:
        """A copy of the module holding the flat parameters `theta` [P] (for inspection, export)."""
        model = copy.deepcopy(self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in self.unflatten(theta.reshape(1, -1)).items():
                params[name].copy_(t[0])
        return model

    def __repr__(self) -> str:
        return f"ModuleInstance({type(self.model).__name__}, P={self.n_params}, seed={self.seed})"


class ModuleTask(TaskFamily):
    """A task family from any torch module: `model(seed)`, `data(variant, seed)` and a loss.

    The ~20 lines that bring your own model to nos::

        import torch
        from torch import nn
        from nos.tasks.module import ModuleTask

        def model(seed: int) -> nn.Module:          # deterministic in seed
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))

        def data(noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(256, 10, generator=g)
            return x, x.sum(1, keepdim=True).sin() + noise * torch.randn(256, 1, generator=g)

        def make() -> ModuleTask:                  # nos evolve --task my_task.py:make
            return ModuleTask("sinsum", model=model, data=data,
                              loss=torch.nn.functional.mse_loss,
                              variants=(0.0, 0.1), variant_label="noise",
                              config={"n": 256, "width": 32})

    Instance (variant, seed): the module `model(seed)` (its initial weights are theta0) trained
    full-batch on `data(variant, seed)` = (inputs, targets) with `loss(pred, target)` (a scalar;
    mean reduction). Both callables **must be deterministic in their arguments** (seed your own
    generators; `torch.manual_seed` inside `model` is fine, nos forks the global RNG around the
    call): equal identities must mean equal instances. See `ModuleInstance` for the layout of theta
    and the module docstring for what a forward may not do (mutate buffers, draw random numbers).

    `config` is your JSON description of everything the callables depend on (sizes, widths, data
    version): `identity()` hashes it with the name, variants and variant label, and keys caches,
    database rows and protocols, so change it whenever the instances change. `lr_grid`,
    `search_lrs` and `sigmas` are the tuned baselines' choices (see `TaskFamily`); `search_variants`
    the search's default variants (None: all). RandOpt's layer groups are the module's top-level
    children that own parameters.
    """

    def __init__(self, name: str, model: Callable[[int], nn.Module],
                 data: Callable[[float, int], tuple[Inputs, torch.Tensor]], loss: LossFn, *,
                 variants: Sequence[float] = (1.0,), variant_label: str = "variant",
                 config: Mapping[str, Any] | None = None,
                 lr_grid: Sequence[float] = DEFAULT_LR_GRID,
                 search_lrs: Sequence[float] = DEFAULT_SEARCH_LRS,
                 sigmas: Sequence[float] = DEFAULT_SIGMAS,
                 search_variants: Sequence[float] | None = None,
                 description: str | None = None) -> None:
        if not name:
            raise ValueError("a task needs a name")
        if not variants:
            raise ValueError(f"task {name!r}: give at least one variant")
        self.name = name
        self.model_fn = model
        self.data_fn = data
        self.loss_fn = loss
        self.variants = tuple(float(v) for v in variants)
        self.variant_label = variant_label
        self.user_config = dict(config or {})
        try:
            json.dumps(self.user_config, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {name!r}: config must be plain JSON data ({e})") from None
        self.lr_grid = tuple(float(x) for x in lr_grid)
        self.search_lrs = tuple(float(x) for x in search_lrs)
        self.sigmas = tuple(float(x) for x in sigmas)
        if search_variants is not None:
            self.search_variants = self.check_variants(search_variants, "search_variants")
        self.description = description
        self._layers: tuple[str, ...] | None = None

    def config(self) -> dict[str, Any]:
        return {**self.user_config, "name": self.name, "variants": list(self.variants),
                "variant_label": self.variant_label}

    def build_model(self, seed: int, cache_dir: str | os.PathLike, variant: float) -> nn.Module:
        """The module of instance (variant, seed): `model(seed)`. Subclasses may override it to
        use the cache dir (to pretrain) or the variant (an input size)."""
        with torch.random.fork_rng(devices=[]):
            return self.model_fn(seed)

    def build_data(self, variant: float, seed: int) -> tuple[Inputs, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            return self.data_fn(variant, seed)

    def instance(self, variant: float, seed: int, device: torch.device | str = "cpu",
                 cache_dir: str | os.PathLike = "runs/cache") -> ModuleInstance:
        (variant,) = self.check_variants([variant])
        inputs, targets = self.build_data(variant, seed)
        model = self.build_model(seed, cache_dir, variant)
        return ModuleInstance(model, inputs, targets, self.loss_fn, device, seed)

    def randopt_layers(self) -> tuple[str, ...]:
        if self._layers is None:
            model = self.build_model(0, "runs/cache", self.variants[0])
            self._layers = tuple(name for name, child in model.named_children()
                                 if any(p.numel() > 0 for p in child.parameters()))
        return ("all", *self._layers)

    def describe(self) -> str:
        if self.description:
            return self.description
        return f"{self.name}: a torch module task ({self.variant_label} {', '.join(f'{v:g}' for v in self.variants)})"


# -----------------------------------------------------------------------------
# The sine rollout as an nn.Module (the same layout, hence the same theta, as nos.tasks.sine)


class InOutLinear(nn.Module):
    """`x @ weight + bias` with weight stored [in, out] (nos.tasks.sine's layout, not nn.Linear's)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias  # (vmap lowers this to a batched matmul: faster than addmm)


class SineRollout(nn.Module):
    """The sine task's MLP (k -> width -> width -> 1), rolled out autoregressively.

    forward(traj [B, n]) -> [B, n - k]: seeded with traj[:, :k], each prediction is appended to
    the window and fed back (only the first k columns of `traj` are read; n sets the length).
    Parameters, in order: first.weight [k, width], first.bias, middle.weight [width, width],
    middle.bias, last.weight [width, 1], last.bias -- `ParamLayout`'s w1, b1, ..., b3, so the
    flat vectors of the two are the same.
    """

    def __init__(self, k: int, width: int, activation: str) -> None:
        super().__init__()
        from .sine import _ACTIVATIONS

        self.k = k
        self.act = _ACTIVATIONS[activation]
        self.first = InOutLinear(k, width)
        self.middle = InOutLinear(width, width)
        self.last = InOutLinear(width, 1)

    def forward(self, traj: torch.Tensor) -> torch.Tensor:
        window = traj[:, : self.k]
        preds = []
        for _ in range(traj.shape[1] - self.k):
            nxt = self.last(self.act(self.middle(self.act(self.first(window)))))  # [B, 1]
            preds.append(nxt)
            window = torch.cat([window[:, 1:], nxt], dim=1)
        return torch.cat(preds, dim=1)


def sine_module(config: SineConfig, theta: torch.Tensor | None = None) -> SineRollout:
    """A `SineRollout` for a `SineConfig`, holding the flat sine weights `theta` [P] if given."""
    model = SineRollout(config.k, config.width, config.activation)
    if theta is not None:
        flat = theta.detach().reshape(-1).cpu().float()
        with torch.no_grad():
            start = 0
            for p in model.parameters():
                p.copy_(flat[start : start + p.numel()].view_as(p))
                start += p.numel()
        if start != flat.numel():
            raise ValueError(f"theta has {flat.numel()} numbers, the module {start}")
    return model


class _SineModuleTask(ModuleTask):
    def __init__(self, sine: SineConfig, **kwargs: Any) -> None:
        self.sine = sine
        super().__init__(**kwargs)

    def build_model(self, seed: int, cache_dir: str | os.PathLike, variant: float) -> nn.Module:
        from .sine import pretrain

        return sine_module(self.sine, pretrain(self.sine, seed, cache_dir, "cpu"))

    def randopt_layers(self) -> tuple[str, ...]:
        return ("all", "first", "middle", "last")  # without pretraining a model to find out


def sine_module_family(config: SineConfig | None = None) -> ModuleTask:
    """The sine post-training task (`nos.tasks.sine.WaveFamily`) through the module adapter.

    Instance (t_max, seed): `SineRollout` holding the weights pretrained with seed s (the same
    cache as the sine task), data = (target trajectory [1, n], its last n - k points [1, n - k]),
    MSE loss: the same loss as `SineTask(config, s, s, t_max).loss`, for the bench and the tests.
    """
    from torch.nn.functional import mse_loss

    from .sine import HORIZONS, SineConfig, target_trajectory

    sine = config or SineConfig()

    def data(horizon: float, seed: int) -> tuple[Inputs, torch.Tensor]:
        traj = target_trajectory(sine, seed, horizon).unsqueeze(0)
        return traj, traj[:, sine.k :]

    def no_model(seed: int) -> nn.Module:  # replaced by build_model (it needs the cache dir)
        raise NotImplementedError

    return _SineModuleTask(sine=sine, name=f"{sine.wave}_module", model=no_model, data=data,
                           loss=mse_loss, variants=HORIZONS, variant_label="t_max",
                           config={"sine": sine.key()}, search_variants=(2.0, 10.0),
                           description=f"the {sine.wave} task through the torch module adapter")
