"""Counter-based random numbers: a pure function of (seed, step, stream, element index).

Random operations (the noise operand, dropout, the noise schedule) must give a candidate the same
numbers whether it is trained alone or stacked with 1,000 others, on CPU or CUDA, and the exported
optimizer file must reproduce them. A stateful generator cannot promise that; hashing a counter
can, with a handful of vectorised integer ops. The mixer is a 32-bit integer hash in the style of
"lowbias32" (C. Wellons, "Prospecting for hash functions", 2018), with multipliers below 2^31 so
every product fits in int64 without overflow.

These functions are copied verbatim into exported optimizer files: keep them torch/math only.
"""

from __future__ import annotations

import torch

STREAM_NOISE_OPERAND = 1
STREAM_PERTURBATION = 2
STREAM_DROPOUT = 100  # + node index


def rng_mix32(x):
    """Avalanche a tensor of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


def rng_uniform(seed, step, stream, index):
    """U[0, 1) numbers of shape [len(seed), len(index)].

    seed, stream: int64 tensors of shape [C] (one per candidate); step: int; index: int64 [n].
    """
    key = rng_mix32((seed & 0xFFFFFFFF) ^ rng_mix32((stream * 0x3C6EF372 + step) & 0xFFFFFFFF))
    x = rng_mix32((key[:, None] + (index[None, :] * 0x27D4EB2F)) & 0xFFFFFFFF)
    x = rng_mix32(x ^ 0x165667B1)
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


def rng_normal(seed, step, stream, index):
    """Standard normal numbers (Box-Muller on two counter-based uniform streams)."""
    u1 = 1.0 - rng_uniform(seed, step, stream, index)  # (0, 1]: log is finite
    u2 = rng_uniform(seed, step, stream + 0x10000, index)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
