"""Row chunks of a compiled kernel on torch's thread count.

The numba kernels (`nos.tasks.sine_kernel`, `nos.engine.fused`) work on candidates lo..hi-1 and
release the GIL, and candidates are independent: splitting the rows over a few threads is all
the parallelism they need, and it follows `torch.set_num_threads` (`--threads`) like the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

MIN_ROWS_PER_THREAD = 4  # below this a thread's start costs more than its share of the rows


@functools.cache
def _pool(n: int) -> ThreadPoolExecutor:
    """A pool of n threads, kept for the process."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="nos-kernel")


def run_rows(kernel: Callable[..., None], n_rows: int, before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    """kernel(*before, lo, hi, *after) over row chunks [lo, hi) covering 0..n_rows-1."""
    n = max(1, min(torch.get_num_threads(), n_rows // MIN_ROWS_PER_THREAD or 1))
    if n == 1:
        kernel(*before, 0, n_rows, *after)
        return
    bounds = np.linspace(0, n_rows, n + 1).astype(int)
    jobs = [_pool(n).submit(kernel, *before, int(a), int(b), *after) for a, b in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()
