"""The sine-rollout post-training task ("When does RandOpt work?", Ziming Liu, 2026).

Setup (Liu's post; the data family of Gan & Isola's 1-D toy in "Neural Thickets", 2026, code
github.com/sunrainyg/RandOpt; our own implementation where the post is silent):

1. *Pretraining.* An MLP of three linear layers maps the ``k`` most recent values of a
   sequence to the next one. It is trained with the one-step MSE on sine waves
   ``amp*sin(4t + phi) + offset`` (amp ~ U(.8, 1.2), phi ~ U(0, 2pi), offset ~ U(-.5, .5);
   the family of Gan & Isola's 1-D toy) sampled every ``dt = 0.05`` for ``t_max = 1``
   (20 points), with Adam at lr 1e-3.
2. *Post-training.* One fresh trajectory of the same family, of length ``horizon / dt``
   points (horizons 1, 2, 5, 10, 20). The model is seeded with the first ``k`` points and
   rolled out autoregressively (each prediction fed back); the loss is the MSE of the
   rollout against the trajectory, over every point except the ``k`` conditioning ones.

The post leaves ``k``, the width, the activation and the pretraining length unpublished; the
defaults here are those of our own independent implementation of the task (README, "The
sine-rollout task"):
``k = 8``, width 64, tanh, 3,000 pretraining steps.

All weights live in one flat vector of ``P`` numbers. The network is evaluated batched over a
leading *candidate* axis: ``theta`` of shape ``[C, P]`` is ``C`` independent networks, which is
what population methods (RandOpt, evolved optimizers run on many candidates at once) need.
Each candidate's computation only touches its own row, so a NaN in one row never leaks into
another row's loss or gradient.

The loss (and its gradient) runs through the fused kernel of `nos.tasks.sine_kernel` on CPU
float32 (one compiled pass per candidate, its weights kept in cache); `rollout` below is the
eager reference, used on CUDA, for predictions and with ``NOS_ROLLOUT=eager``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from nos.tasks import sine_kernel
from nos.tasks.api import StackedTask, TaskFamily, TaskInstance
from nos.tasks.segments import Segments

if TYPE_CHECKING:
    from nos.ui.progress import Reporter

# Bump when the pretraining procedure changes in a way the config does not capture, so that
# stale cached weights are never reused.
PRETRAIN_VERSION = 1

log = logging.getLogger(__name__)

# Independent random streams, so that e.g. target seed 0 is not the first pretraining draw.
_STREAM_INIT = 1
_STREAM_DATA = 2
_STREAM_TARGET = 3


# -----------------------------------------------------------------------------
# Configuration


DEFAULT_CACHE_DIR = "runs/cache"  # pretrained weights, keyed by the task configuration and seed


@dataclass(frozen=True)
class SineConfig:
    """Everything that determines the pretrained weights (and hence the task).

    Defaults follow the post (dt, t_max=1 pretraining, 3 linear layers, one-step MSE, Adam
    1e-3), the data family of Gan & Isola's 1-D toy ("Neural Thickets", 2026, code
    sunrainyg/RandOpt), and our own independent implementation for what the post leaves open
    (k=8, width 64, tanh, 3,000 steps).
    """

    wave: str = "sine"  # the curve family: one of WAVES (RandOpt's 1-D toy mixes sine, square, sawtooth)
    k: int = 8  # context: number of most recent values fed to the MLP
    width: int = 64  # hidden width of both hidden layers (k -> width -> width -> 1)
    activation: str = "tanh"  # "tanh" (ours) or "relu" (Gan & Isola's toy)
    dt: float = 0.05  # time between two consecutive points
    freq: float = 4.0  # angular frequency of the sine family
    amp_range: tuple[float, float] = (0.8, 1.2)
    phase_range: tuple[float, float] = (0.0, 2.0 * math.pi)
    offset_range: tuple[float, float] = (-0.5, 0.5)
    pretrain_t_max: float = 1.0  # length of pretraining sequences in time units (20 points)
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 256  # fresh sequences per step (each gives t_max/dt - k windows)

    def __post_init__(self) -> None:
        if self.wave not in WAVES:
            raise ValueError(f"wave must be one of {', '.join(WAVES)}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        if self.k < 1 or self.width < 1:
            raise ValueError("k and width must be positive")
        if n_points(self, self.pretrain_t_max) <= self.k:
            raise ValueError("pretraining sequences must be longer than the context k")

    def key(self) -> str:
        """Short stable hash of all fields (and PRETRAIN_VERSION): names the weight cache."""
        fields = dataclasses.asdict(self)
        if self.wave == "sine":  # the key of every sine config made before waves had a name
            del fields["wave"]
        fields["_version"] = PRETRAIN_VERSION
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def n_points(config: SineConfig, horizon: float) -> int:
    """Number of points in a sequence of length ``horizon`` time units: round(horizon/dt)."""
    return int(round(horizon / config.dt))


def _derived_seed(stream: int, seed: int) -> int:
    """A 63-bit seed for one (stream, seed) pair, via numpy's SeedSequence hashing."""
    words = np.random.SeedSequence([stream, seed]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def _generator(stream: int, seed: int) -> torch.Generator:
    """A CPU generator (CPU so that draws are identical whatever the compute device)."""
    return torch.Generator(device="cpu").manual_seed(_derived_seed(stream, seed))


# -----------------------------------------------------------------------------
# Flat parameter layout


class Segment(NamedTuple):
    """One named tensor inside the flat parameter vector: ``theta[..., start:end]``."""

    name: str
    start: int
    end: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ParamLayout:
    """Where each weight lives in the flat vector.

    Weights are stored ``[in, out]`` so that a layer is ``x @ W + b`` (batched: ``baddbmm``).
    Order: w1 [k, width], b1 [width], w2 [width, width], b2 [width], w3 [width, 1], b3 [1].
    ``layers`` groups the segments into the three linear layers, for per-layer RandOpt (the
    post's "first / second / third" table) and per-layer noise scaling.
    """

    segments: tuple[Segment, ...]
    layers: dict[str, tuple[str, ...]]

    @classmethod
    def for_config(cls, config: SineConfig) -> ParamLayout:
        k, h = config.k, config.width
        shapes = [("w1", (k, h)), ("b1", (h,)), ("w2", (h, h)), ("b2", (h,)),
                  ("w3", (h, 1)), ("b3", (1,))]
        segments, start = [], 0
        for name, shape in shapes:
            end = start + math.prod(shape)
            segments.append(Segment(name, start, end, shape))
            start = end
        layers: dict[str, tuple[str, ...]] = {"first": ("w1", "b1"), "middle": ("w2", "b2"), "last": ("w3", "b3")}
        return cls(tuple(segments), layers)

    @property
    def n_params(self) -> int:
        return self.segments[-1].end

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)

    def layer_names(self, layers: str) -> tuple[str, ...]:
        """Segment names selected by ``layers``: "all", "first", "middle" or "last"."""
        if layers == "all":
            return tuple(seg.name for seg in self.segments)
        if layers not in self.layers:
            raise ValueError(f"layers must be 'all' or one of {list(self.layers)}, got {layers!r}")
        return self.layers[layers]

    def mask(self, layers: str = "all", device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean [P] mask, True on the parameters of the chosen layer(s)."""
        mask = torch.zeros(self.n_params, dtype=torch.bool, device=device)
        for name in self.layer_names(layers):
            seg = self.segment(name)
            mask[seg.start : seg.end] = True
        return mask

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` [C, P] as {name: [C, *shape]} (no copy; keeps autograd)."""
        C = theta.shape[0]
        return {s.name: theta[:, s.start : s.end].reshape(C, *s.shape) for s in self.segments}


# -----------------------------------------------------------------------------
# The batched MLP

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply C networks to their own inputs: x [C, B, k] -> [C, B].

    ``params`` comes from ``ParamLayout.unflatten``; one ``baddbmm`` per layer, so the C
    candidates are evaluated together with no Python loop over them.
    """
    act = _ACTIVATIONS[activation]
    h = act(torch.baddbmm(params["b1"].unsqueeze(1), x, params["w1"]))
    h = act(torch.baddbmm(params["b2"].unsqueeze(1), h, params["w2"]))
    return torch.baddbmm(params["b3"].unsqueeze(1), h, params["w3"]).squeeze(-1)


def rollout(config: SineConfig, layout: ParamLayout, theta: torch.Tensor, context: torch.Tensor,
            steps: int) -> torch.Tensor:
    """Roll C networks out autoregressively from their own contexts [C, k]: -> [C, steps]."""
    params = layout.unflatten(theta)
    window = context
    preds = []
    for _ in range(steps):
        nxt = mlp_forward(params, window.unsqueeze(1), config.activation)  # [C, 1]
        preds.append(nxt)
        window = torch.cat([window[:, 1:], nxt], dim=1)
    return torch.cat(preds, dim=1)


def init_theta(config: SineConfig, generator: torch.Generator) -> torch.Tensor:
    """Flat [P] float32 initial weights, as torch.nn.Linear initialises them.

    nn.Linear uses kaiming_uniform(a=sqrt(5)) for the weight and U(-1/sqrt(fan_in), ..) for the
    bias, i.e. both U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    layout = ParamLayout.for_config(config)
    theta = torch.empty(layout.n_params)
    for seg in layout.segments:
        fan_in = config.k if seg.name in ("w1", "b1") else config.width
        bound = 1.0 / math.sqrt(fan_in)
        n = seg.end - seg.start
        theta[seg.start : seg.end] = (torch.rand(n, generator=generator) * 2 - 1) * bound
    return theta


# -----------------------------------------------------------------------------
# Data: the sine family


def sample_sine_params(config: SineConfig, generator: torch.Generator, n: int) -> torch.Tensor:
    """[n, 3] draws of (amp, phase, offset) from the configured uniform ranges."""
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    lo = torch.tensor([config.amp_range[0], config.phase_range[0], config.offset_range[0]],
                      dtype=torch.float64)
    hi = torch.tensor([config.amp_range[1], config.phase_range[1], config.offset_range[1]],
                      dtype=torch.float64)
    return lo + u * (hi - lo)


# The wave shapes of one period, as functions of the phase angle x (period 2 pi, values in [-1, 1]).
# "damped" is a sine whose amplitude decays as exp(-DAMPING t): the far future of a long rollout is
# quieter than its start, unlike every other shape.
DAMPING = 0.1
WAVES = ("sine", "square", "sawtooth", "triangle", "damped")


def _frac(x: torch.Tensor) -> torch.Tensor:
    """Position within the period, in [0, 1)."""
    return torch.remainder(x / (2 * math.pi), 1.0)


def sine_values(config: SineConfig, params: torch.Tensor, n: int) -> torch.Tensor:
    """Sequences [S, n] at t = 0, dt, ..., (n-1)dt for params [S, 3] = (amp, phase, offset);
    the curve is `config.wave` (a sine by default)."""
    t = torch.arange(n, dtype=params.dtype, device=params.device) * config.dt
    amp, phase, offset = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    x = config.freq * t + phase
    if config.wave == "sine":
        shape = torch.sin(x)
    elif config.wave == "square":
        shape = torch.where(torch.sin(x) >= 0, 1.0, -1.0).to(x.dtype)
    elif config.wave == "sawtooth":
        shape = 2 * _frac(x) - 1
    elif config.wave == "triangle":
        shape = 2 * torch.abs(2 * _frac(x) - 1) - 1
    else:  # damped
        shape = torch.exp(-DAMPING * t) * torch.sin(x)
    return amp * shape + offset


def one_step_windows(seqs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (k values -> next value) pairs of sequences [S, L]: inputs [S*(L-k), k], targets."""
    win = seqs.unfold(1, k + 1, 1).reshape(-1, k + 1)
    return win[:, :k], win[:, k]


def one_step_loss(config: SineConfig, theta: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Pretraining loss: one-step MSE of every candidate theta [C, P] on seqs [S, L] -> [C]."""
    layout = ParamLayout.for_config(config)
    x, y = one_step_windows(seqs.to(theta.dtype), config.k)
    C = theta.shape[0]
    pred = mlp_forward(layout.unflatten(theta), x.expand(C, *x.shape), config.activation)
    return ((pred - y) ** 2).mean(dim=1)


def target_trajectory(config: SineConfig, seed: int, horizon: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The post-training trajectory: [round(horizon/dt)] float32 points from t=0.

    One fresh draw of (amp, phase, offset) per ``seed`` (its own random stream, independent
    of pretraining); a longer horizon extends the same curve.
    """
    params = sample_sine_params(config, _generator(_STREAM_TARGET, seed), 1)
    return sine_values(config, params, n_points(config, horizon))[0].float().to(device)


# -----------------------------------------------------------------------------
# Pretraining (cached)


def pretrain_uncached(config: SineConfig, seed: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Train from scratch; returns flat [P] float32 weights on ``device``.

    Init and data come from seeded CPU generators (no global RNG): bit-identical on a given
    machine; across devices only up to floating-point reduction order.
    """
    theta = init_theta(config, _generator(_STREAM_INIT, seed)).to(device).unsqueeze(0)
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=config.pretrain_lr)
    L = n_points(config, config.pretrain_t_max)
    draws = sample_sine_params(config, _generator(_STREAM_DATA, seed),
                               config.pretrain_steps * config.pretrain_batch)
    draws = draws.view(config.pretrain_steps, config.pretrain_batch, 3).to(device)
    for step in range(config.pretrain_steps):
        seqs = sine_values(config, draws[step], L).float()  # fresh sequences every step
        loss = one_step_loss(config, theta, seqs)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return theta.detach()[0].clone()


def cache_path(config: SineConfig, seed: int, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir) / f"sine-{config.key()}-seed{seed}.npz"


def pretrain_cached(config: SineConfig, seed: int, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, bool]:
    """Pretrained weights [P] and whether they were loaded from the cache (False = trained).

    Cache file: ``cache_dir/sine-<config.key()>-seed<seed>.npz`` (numpy.savez, loaded with
    allow_pickle=False; written to a temporary file then renamed, so readers never see a
    half-written file). A file that cannot be trusted -- truncated, not an npz, weights of the
    wrong shape or type or not finite, another config's -- is never loaded: pretraining is
    deterministic, so the network is trained again (same weights) and the file replaced, with a
    warning in the log.
    """
    path = cache_path(config, seed, cache_dir)
    theta = _load_cached(config, path)
    if theta is not None:
        return torch.from_numpy(theta).to(device), True
    return _pretrain_and_cache(config, seed, path, device), False


def _load_cached(config: SineConfig, path: Path) -> np.ndarray | None:
    """The weights in a cache file; None when there is none or it cannot be trusted (logged)."""
    if not path.exists():
        return None
    try:
        # opened here, not by np.load: its own handle leaks when the file is not a zip
        with open(path, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)  # never pickle: a cache file is just data
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                problem: str | None = "not an npz archive"
            else:
                with loaded as f:
                    theta = f["theta"]
                    problem = _cache_problem(config, theta, f["config"])
    # Anything can be in a damaged file (a truncated zip, a bad CRC, a missing member, an
    # unknown compression, bytes that are not JSON): every failure means "not cached", at the
    # cost of one deterministic retraining. Loading runs no code (allow_pickle=False).
    except Exception as e:  # noqa: BLE001
        first = str(e).split(". ")[0][:80]  # numpy's pickle refusal goes on to say "if you trust the file ..."
        problem = f"unreadable: {type(e).__name__}: {first}"
    if problem is None:
        return theta
    log.warning(f"cached pretrained weights {path} cannot be used ({problem}); pretraining them again")
    return None


def _cache_problem(config: SineConfig, theta: np.ndarray, stored: np.ndarray) -> str | None:
    """What is wrong with a cache file's arrays (None: they are this config's weights)."""
    n_params = ParamLayout.for_config(config).n_params
    if theta.shape != (n_params,):
        return f"weights of shape {theta.shape}, not ({n_params},)"
    if theta.dtype != np.float32:
        return f"weights of type {theta.dtype}, not float32"
    if not np.isfinite(theta).all():
        return "weights that are not finite"
    # the file names the config only by a hash: the config written beside the weights must match
    # (compared as JSON, where the ranges' tuples are lists)
    if stored.shape != () or json.loads(str(stored)) != json.loads(json.dumps(dataclasses.asdict(config))):
        return "the weights of another configuration"
    return None


def _pretrain_and_cache(config: SineConfig, seed: int, path: Path, device: torch.device | str) -> torch.Tensor:
    """Train and write the cache file atomically: a temporary file in the same directory, then
    `os.replace`, so a kill mid-write leaves the old file (or none) and at most a stray *.tmp."""
    theta = pretrain_uncached(config, seed, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, theta=theta.cpu().numpy(), config=json.dumps(dataclasses.asdict(config)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return theta


def pretrain(config: SineConfig, seed: int, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Pretrained flat weights [P] float32 (trained once per (config, seed), then cached)."""
    return pretrain_cached(config, seed, cache_dir, device)[0]


def pretrain_missing(jobs: Iterable[tuple[SineConfig, int, str | os.PathLike]], device: torch.device | str = "cpu",
                     progress: Reporter | None = None) -> int:
    """Pretrain and cache every (config, seed, cache directory) whose weights are not cached yet,
    as one stage "pretraining" of `progress` counting networks: the networks a run would otherwise
    train on first use, minutes of silence on a first run. Same training, same cache files, same
    weights (`pretrain_cached`). Returns how many were trained."""
    todo: list[tuple[SineConfig, int, str]] = []
    for config, seed, cache_dir in jobs:
        job = (config, seed, str(cache_dir))
        # a file that exists but cannot be trusted counts as missing (`pretrain_cached`)
        if job not in todo and _load_cached(config, cache_path(config, seed, cache_dir)) is None:
            todo.append(job)
    if todo and progress is not None:
        progress.stage("pretraining", len(todo), "networks")
    for config, seed, cache_dir in todo:
        if progress is not None:
            progress.message(f"{config.wave} network of seed {seed}")
        _pretrain_and_cache(config, seed, cache_path(config, seed, cache_dir), device)
        if progress is not None:
            progress.advance(1)
    return len(todo)


# -----------------------------------------------------------------------------
# The post-training task


FUSED_CHUNK_ROWS = 64


def _fused_loss(config: SineConfig, theta: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE of the rollout through `sine_kernel` (gradient from the same pass when wanted)."""
    want_grad = torch.is_grad_enabled() and theta.requires_grad
    return sine_kernel.SineLoss.apply(theta, context, target, config.k, config.width, config.activation, want_grad)


class SineTask(TaskInstance):
    """Post-train the pretrained MLP to roll out one trajectory of ``horizon`` time units.

    ``loss(theta [C, P]) -> [C]`` is the post's post-training loss: MSE of the autoregressive
    rollout (seeded with the first k target points) against the remaining n - k points.
    """

    def __init__(self, config: SineConfig, pretrain_seed: int = 0,
                 target_seed: int = 0, horizon: float = 1.0, device: torch.device | str = "cpu",
                 cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, kernel: str | None = None) -> None:
        self.kernel = sine_kernel.default_kernel() if kernel is None else kernel
        if self.kernel not in sine_kernel.KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(sine_kernel.KERNELS)}, got {kernel!r}")
        self.config = config
        self.pretrain_seed = pretrain_seed
        self.target_seed = self.seed = target_seed
        self.horizon = horizon
        self.device = torch.device(device)
        self.layout = ParamLayout.for_config(config)
        self.theta0 = pretrain(config, pretrain_seed, cache_dir, self.device)
        self.target = target_trajectory(config, target_seed, horizon, self.device)
        if self.target.numel() <= config.k:
            raise ValueError(f"horizon {horizon} gives {self.target.numel()} points <= k={config.k}")
        self.layer_groups = {name: self.layout.mask(name, self.device) for name in self.layout.layers}

    @property
    def n_params(self) -> int:
        return self.layout.n_params

    @property
    def segments(self) -> Segments:  # type: ignore[override]
        """Per-tensor bounds of the flat vector, as the interpreter wants them."""
        return Segments(tuple((seg.start, seg.end) for seg in self.layout.segments))

    @property
    def chunk_rows(self) -> int | None:
        """Rows the trainer should train at a time (`nos.engine.trainer.train`): with the fused
        kernel the rollout costs the same per row at any batch, and the update's passes over a
        chunk of 64 rows (1.2 MB) stay in cache (`nos bench`); the eager rollout wants the whole batch."""
        return FUSED_CHUNK_ROWS if self.kernel == "fused" else None

    @property
    def n_points(self) -> int:
        """Length n of the target trajectory; the rollout predicts the last n - k of them."""
        return self.target.numel()

    def init_params(self, C: int) -> torch.Tensor:
        """[C, P] independent copies of the pretrained weights."""
        return self.theta0.unsqueeze(0).repeat(C, 1)

    def rollout(self, theta: torch.Tensor) -> torch.Tensor:
        """Autoregressive predictions [C, n - k] of C candidates theta [C, P].

        Seeded with target[:k]; each prediction is appended to the window and fed back. One
        batched forward per time step; differentiable w.r.t. theta (backprop through time).
        """
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must be [C, {self.n_params}], got {tuple(theta.shape)}")
        k, C = self.config.k, theta.shape[0]
        context = self.target[:k].to(theta.dtype).expand(C, k)
        return rollout(self.config, self.layout, theta, context, self.n_points - k)

    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        return self.rollout(theta)

    def loss_of_predictions(self, pred: torch.Tensor) -> torch.Tensor:
        """MSE [C] of predictions [C, n - k] against target[k:]."""
        return ((pred - self.target[self.config.k :].to(pred.dtype)) ** 2).mean(dim=1)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """Post-training loss [C] of candidates theta [C, P] (the fused kernel where it applies)."""
        if self.kernel == "fused" and sine_kernel.usable(theta) and theta.shape[1] == self.n_params:
            k, C = self.config.k, theta.shape[0]
            return _fused_loss(self.config, theta, self.target[:k].expand(C, k), self.target[k:].expand(C, -1))
        return self.loss_of_predictions(self.rollout(theta))

    def __repr__(self) -> str:
        return (f"SineTask(horizon={self.horizon}, n_points={self.n_points}, "
                f"pretrain_seed={self.pretrain_seed}, target_seed={self.target_seed}, "
                f"P={self.n_params}, config={self.config.key()})")


class StackedSineTask(StackedTask):
    """Several SineTasks of one horizon (e.g. held-out seeds) trained in one batch.

    Row i of theta belongs to task ``row_task[i]``: it starts from that task's pretrained weights
    and is scored on that task's target. Stacking seeds on the candidate axis makes one batched
    step serve them all (the rollout is sequential, so one rollout of all rows is much faster than
    one per seed, which is what the generic `StackedTask` would do).
    """

    def __init__(self, tasks: Sequence[TaskInstance], row_task: torch.Tensor) -> None:
        sine = [t for t in tasks if isinstance(t, SineTask)]
        first = sine[0]
        if len(sine) != len(tasks) or any(t.n_points != first.n_points or t.config != first.config for t in sine):
            raise ValueError("stacked tasks must be sine tasks sharing the config and the horizon")
        super().__init__(sine, row_task)
        self.tasks = sine
        self.config, self.layout = first.config, first.layout
        self.targets = torch.stack([t.target for t in sine])
        self.kernel = first.kernel
        self.chunk_rows = first.chunk_rows

    def rollout(self, theta: torch.Tensor) -> torch.Tensor:
        k = self.config.k
        context = self.targets[self.row_task, :k].to(theta.dtype)
        return rollout(self.config, self.layout, theta, context, self.targets.shape[1] - k)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fused" and sine_kernel.usable(theta) and theta.shape[1] == self.layout.n_params:
            k = self.config.k
            return _fused_loss(self.config, theta, self.targets[self.row_task, :k], self.targets[self.row_task, k:])
        pred = self.rollout(theta)
        return ((pred - self.targets[self.row_task, self.config.k :].to(pred.dtype)) ** 2).mean(dim=1)


# -----------------------------------------------------------------------------
# The family: one per wave shape

HORIZONS = (1.0, 2.0, 5.0, 10.0, 20.0)  # the post's t_max


class WaveFamily(TaskFamily):
    """Post-train a pretrained MLP to roll a wave out autoregressively (variants: the horizon t_max).

    Instance (t_max, seed s): the network pretrained with seed s on waves of the configured shape,
    fine-tuned on the target trajectory of seed s. Today's `sine` task is the default config; the
    other shapes (square, sawtooth, triangle, damped) are RandOpt's 1-D toy family and its kin.
    """

    variant_label = "t_max"
    variants = HORIZONS
    search_variants = (2.0, 10.0)  # one horizon where Adam shines, one where it struggles

    def __init__(self, config: SineConfig | None = None) -> None:
        self.sine = config or SineConfig()
        self.name = self.sine.wave

    def config(self) -> dict:
        return {"sine": self.sine.key()}

    def instance(self, variant: float, seed: int, device: torch.device | str = "cpu",
                 cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> SineTask:
        return SineTask(self.sine, seed, seed, variant, device, cache_dir)

    def stack(self, instances: Sequence[TaskInstance], row_task: torch.Tensor) -> StackedSineTask:
        return StackedSineTask(instances, row_task)

    def randopt_layers(self) -> tuple[str, ...]:
        return ("all", "first", "middle", "last")

    def describe(self) -> str:
        return f"post-train a pretrained MLP to roll out a {self.name} wave (t_max {', '.join(f'{h:g}' for h in HORIZONS)})"
