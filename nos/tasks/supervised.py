"""Two offline supervised task families built on `ModuleTask` (nothing is downloaded).

- `digits`: an MLP classifier (64 -> 32 -> 10, tanh) on scikit-learn's bundled 8x8 digits,
  full-batch cross-entropy (label smoothing 0.1) on a seeded subset of the 1,797 images
  (variants: its size, 128 and 512).
- `teacher_student`: a student MLP regresses a random teacher MLP on Gaussian inputs, MSE
  (variants: the input dimension).

Both start from the seed's freshly initialised network (no pretraining) and are cheap: one
forward + backward of 64 candidates takes ~4 ms (digits, 128 examples) / ~2 ms (teacher_student)
on a 2-core CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy, mse_loss

from .module import ModuleTask

# Independent random streams per instance seed (model init, data subset, teacher, inputs).
_STREAM_MODEL = 11
_STREAM_DATA = 12
_STREAM_TEACHER = 13


def derived_seed(stream: int, seed: int) -> int:
    """A 63-bit seed for one (stream, seed) pair (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([stream, seed]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seeded_generator(stream: int, seed: int) -> torch.Generator:
    """A CPU generator for one (stream, seed) pair (the same draws whatever the device)."""
    return torch.Generator(device="cpu").manual_seed(derived_seed(stream, seed))


def seeded_mlp(sizes: tuple[int, ...], activation: str, stream: int, seed: int) -> nn.Sequential:
    """nn.Sequential of Linear layers (nn.Linear's default init) with `activation` between them,
    initialised from the (stream, seed) pair: deterministic in the seed, the global RNG untouched."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(stream, seed))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(act())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# digits

DIGITS_WIDTH = 32
DIGITS_EXAMPLES = (128.0, 512.0)
LABEL_SMOOTHING = 0.1
# Measured (`measure_adam`: 200 steps of torch.optim.Adam from theta0, seeds 0 / 1, 2 threads; the
# final training loss; 2.3 at theta0, floor ~0.50 with label smoothing 0.1):
#   lr          1e-3   3e-3   1e-2   3e-2    1e-1    3e-1   1
#   128 s0:     0.592  0.530  0.508  0.5029  0.5038  0.517  0.551
#   128 s1:     0.593  0.528  0.508  0.5025  0.5029  0.516  1.63
#   512 s0:     0.635  0.557  0.523  0.5111  0.5102  0.535  0.597
#   512 s1:     0.668  0.568  0.525  0.5122  0.5115  0.538  0.584
# tuned lr 3e-2 (128) / 1e-1 (512): inside the grid. Without label smoothing the data are
# separable, the loss has no finite minimiser and the "best" lr was the largest tried (10).
DIGITS_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DIGITS_SEARCH_LRS = (3e-3, 3e-2, 3e-1)
# RandOpt around a fresh init: the weights are ~U(-1/sqrt(fan_in), ..) = ~0.1-0.2 in size
DIGITS_SIGMAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def smoothed_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing LABEL_SMOOTHING (a finite minimiser on separable data)."""
    return cross_entropy(pred, target, label_smoothing=LABEL_SMOOTHING)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images [N, 64] and labels [N] (read-only: callers index copies out of them)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def digits(examples: tuple[float, ...] = DIGITS_EXAMPLES, width: int = DIGITS_WIDTH,
           activation: str = "tanh") -> ModuleTask:
    """Classify scikit-learn's 8x8 digits with an MLP, full-batch cross-entropy (variants: examples).

    Instance (n, seed): the MLP 64 -> `width` -> 10 initialised with `seed`, trained on n images
    drawn without replacement with `seed` (standardised with that subset's per-pixel mean and
    std; constant pixels are left at 0). The loss is the cross-entropy with label smoothing 0.1:
    the subsets are separable, and plain cross-entropy would reward ever larger weights.
    """
    def model(seed: int) -> nn.Module:
        return seeded_mlp((64, width, 10), activation, _STREAM_MODEL, seed)

    def data(n: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _digits_arrays()
        if not 1 <= int(n) <= len(x):
            raise ValueError(f"digits has {len(x)} images, not {int(n)}")
        idx = torch.randperm(len(x), generator=seeded_generator(_STREAM_DATA, seed))[: int(n)].numpy()
        xs = x[idx]
        std = xs.std(axis=0)
        xs = (xs - xs.mean(axis=0)) / np.where(std > 0, std, 1.0)
        return torch.from_numpy(xs).float(), torch.from_numpy(y[idx])

    return ModuleTask(
        "digits", model=model, data=data, loss=smoothed_cross_entropy,
        variants=examples, variant_label="examples", search_variants=examples[:1],
        config={"dataset": "sklearn.load_digits", "width": width, "activation": activation,
                "standardise": "subset", "loss": "cross_entropy",
                "label_smoothing": LABEL_SMOOTHING, "version": 1},
        lr_grid=DIGITS_LR_GRID, search_lrs=DIGITS_SEARCH_LRS, sigmas=DIGITS_SIGMAS,
        description="classify scikit-learn's 8x8 digits with an MLP (examples "
                    + ", ".join(f"{v:g}" for v in examples) + ")")


# -----------------------------------------------------------------------------
# teacher_student

TS_DIMS = (8.0, 32.0)
TS_WIDTH = 32
TS_EXAMPLES = 256
# Measured (`measure_adam`: 200 steps of torch.optim.Adam from theta0, seeds 0 / 1; final MSE,
# ~0.8-1.1 at theta0):
#   lr          1e-3    3e-3    1e-2    3e-2    1e-1    3e-1    1
#   dim 8 s0:   0.016   0.0084  0.0032  0.0018  0.0014  0.0077  0.076
#   dim 8 s1:   0.019   0.0080  0.0016  0.00085 0.0007  0.0088  0.057
#   dim 32 s0:  0.0095  0.0014  4.8e-5  3.2e-8  1.4e-7  0.0053  0.12
#   dim 32 s1:  0.015   0.0031  1.1e-4  1e-8    1e-8    0.0046  0.11
# tuned lr 1e-1 (dim 8) / 3e-2..1e-1 (dim 32): inside the grid.
TS_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
TS_SEARCH_LRS = (3e-3, 3e-2, 3e-1)
TS_SIGMAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def teacher_student(dims: tuple[float, ...] = TS_DIMS, width: int = TS_WIDTH,
                    examples: int = TS_EXAMPLES, noise: float = 0.0) -> ModuleTask:
    """A student MLP regresses a random teacher MLP on Gaussian inputs, MSE (variants: input dim).

    Instance (d, seed): the teacher d -> `width` -> 1 (tanh, nn.Linear init, its own seed
    stream) labels `examples` inputs x ~ N(0, I_d) (standardised to unit variance, plus `noise`
    times N(0, 1)); the student, the same architecture from another stream of `seed`, learns it.
    """
    def model(seed: int) -> nn.Module:  # the first variant's (the family builds its own per dim)
        return seeded_mlp((int(dims[0]), width, 1), "tanh", _STREAM_MODEL, seed)

    def data(d: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = seeded_generator(_STREAM_DATA, seed)
        x = torch.randn(examples, int(d), generator=gen)
        teacher = seeded_mlp((int(d), width, 1), "tanh", _STREAM_TEACHER, seed)
        with torch.no_grad():
            y = teacher(x)
        y = (y - y.mean()) / y.std()
        return x, y + noise * torch.randn(y.shape, generator=gen)

    return _TeacherStudent(
        width, "teacher_student", model=model, data=data, loss=mse_loss,
        variants=dims, variant_label="dim", search_variants=dims[:1],
        config={"width": width, "examples": examples, "noise": noise, "activation": "tanh",
                "loss": "mse", "version": 1},
        lr_grid=TS_LR_GRID, search_lrs=TS_SEARCH_LRS, sigmas=TS_SIGMAS,
        description="regress a random teacher MLP with a student MLP (dim "
                    + ", ".join(f"{v:g}" for v in dims) + ")")


class _TeacherStudent(ModuleTask):
    """The student's input size is the variant, so its model depends on the variant too."""

    def __init__(self, width: int, *args: Any, **kwargs: Any) -> None:
        self.width = width
        super().__init__(*args, **kwargs)

    def build_model(self, seed: int, cache_dir: str | os.PathLike, variant: float) -> nn.Module:
        return seeded_mlp((int(variant), self.width, 1), "tanh", _STREAM_MODEL, seed)


# -----------------------------------------------------------------------------
# measuring the lr grids


def measure_adam(family: ModuleTask | Any, variant: float, seed: int, lrs: tuple[float, ...],
                 steps: int = 200) -> dict[float, float]:
    """Final loss of `steps` steps of torch.optim.Adam at each lr on one instance (the numbers in
    the comments above; also used by nos.tasks.functions)."""
    inst = family.instance(variant, seed)
    out = {}
    for lr in lrs:
        theta = inst.theta0.clone().unsqueeze(0).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            inst.loss(theta).sum().backward()
            opt.step()
        with torch.no_grad():
            out[lr] = float(inst.loss(theta)[0])
    return out
