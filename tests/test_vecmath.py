"""The kernels' vectorisable transcendental functions (nos.engine._vecmath) against float64 numpy
and scipy: rounded to float32, each must give float32's rounding of the float64 reference (or a
neighbour of it) over every float32 magnitude and at the special values, and the Box-Muller
normals built on them must be closer to float64 than torch's float32 ones are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nos.engine import fused
from nos.engine.rng import rng_normal, rng_uniform

pytestmark = pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba is not installed")

SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.2e-38, 3.4e38, -3.4e38, 1.0, -1.0,
           0.5, 20.0, 40.0, 88.7, 89.0, -87.3, -103.9, -104.0, 100.0, -200.0, 1e-8, 0.4142135, 2.4142137]


def _float32_values(seed: int = 0) -> np.ndarray:
    """Both signs of every float32 magnitude (log-uniform from 1e-45 to 3e38), values of order 1
    (where the reductions switch branches) and the special values."""
    rng = np.random.default_rng(seed)
    mags = np.concatenate([10.0 ** rng.uniform(-45, 38.5, 50_000), rng.uniform(0, 30, 50_000)])
    return np.concatenate([mags, -mags, SPECIAL]).astype(np.float32)


def _kernel(name: str):  # type: ignore[no-untyped-def]
    import numba

    from nos.engine import _vecmath as vm

    f = getattr(vm, name)

    @numba.njit(error_model="numpy")
    def run(x: np.ndarray, out: np.ndarray) -> None:
        for i in range(x.shape[0]):
            out[i] = np.float32(f(x[i]))
    return run


def _ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|got - ref| in units of float32's spacing at ref (0 where both are the same inf or NaN)."""
    with np.errstate(over="ignore"):  # a reference beyond float32's range rounds to inf
        ref32 = ref.astype(np.float32)
    same = (got == ref32) | (np.isnan(got) & np.isnan(ref32))
    spacing = np.spacing(np.abs(ref32)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(got.astype(np.float64) - ref) / np.where(np.isfinite(spacing), spacing, 1.0)
    return np.where(same, 0.0, err)


CASES = {
    "exp": (np.exp, lambda x: x),
    "log": (np.log, np.abs),
    "log1p": (np.log1p, np.abs),
    "expm1": (np.expm1, lambda x: -np.abs(x)),
    "cos": (np.cos, lambda x: x[np.abs(x) < 7]),  # the kernels' angles are in [0, 2 pi)
    "atan": (np.arctan, lambda x: x),
    "asinh": (np.arcsinh, lambda x: x),
    "tanh": (np.tanh, lambda x: x),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_function_rounds_like_float64(name: str) -> None:
    ref_fn, domain = CASES[name]
    x = domain(_float32_values())
    out = np.empty_like(x)
    _kernel(name)(x, out)
    with np.errstate(all="ignore"):
        ref = ref_fn(x.astype(np.float64))
    err = _ulps(out, ref)
    # within half an ulp: float32's rounding of the exact value (an inf, NaN or 0 of the reference
    # that the function misses is an infinite error)
    assert err.max() <= 0.5 + 1e-6, (name, x[err.argmax()], out[err.argmax()], ref[err.argmax()])
    zero = (out == 0) & (ref == 0)  # -0 == +0 above: the sign of a zero result is checked apart
    assert np.array_equal(np.signbit(out[zero]), np.signbit(ref[zero])), (name, x[zero], out[zero])


def test_the_kernels_stamp_names_this_vecmath() -> None:
    """The compiled kernels inline `_vecmath`, and numba's cache looks at `_update_numba.py` only:
    its VECMATH_STAMP must be `_vecmath.py`'s hash, so that an edit here recompiles them."""
    import hashlib
    from pathlib import Path

    from nos.engine import _update_numba, _vecmath

    stamp = hashlib.sha256(Path(_vecmath.__file__).read_bytes()).hexdigest()[:16]
    assert _update_numba.VECMATH_STAMP == stamp, f"set VECMATH_STAMP = {stamp!r} in nos/engine/_update_numba.py"


def test_box_muller_is_closer_to_float64_than_torch_is() -> None:
    """The compiled normals (noise operand and perturbation) against Box-Muller in float64 of the
    same counter-based uniforms, and against torch's float32 `rng_normal`."""
    n = 1 << 16
    seeds = torch.tensor([3, 4, 5])
    rows = torch.tensor([0, 2])
    z = fused.normals(rows, seeds, 2, 1, 1.0, 3, n)
    assert torch.all(z[1] == 0)  # a row not asked for stays zero
    idx = torch.arange(n)
    s, stream = seeds[rows], torch.full((2,), 1)
    u1 = 1.0 - rng_uniform(s, 2, stream, idx).double()
    angle = (6.283185307179586 * rng_uniform(s, 2, stream + 0x10000, idx)).double()  # float32 product
    ref = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(angle)
    eps = torch.finfo(torch.float32).eps
    rel = ((z[rows].double() - ref).abs() / ref.abs()).max() / eps
    torch_rel = ((rng_normal(s, 2, stream, idx).double() - ref).abs() / ref.abs()).max() / eps
    assert rel <= 0.5 + 1e-6 and rel <= torch_rel
    half = fused.normals(rows, seeds, 2, 1, 0.01, 3, n)  # the noise operand's scale
    assert torch.equal(half[rows], torch.tensor(0.01, dtype=torch.float32) * z[rows])


def test_pow_abs_rounds_like_float64() -> None:
    import numba

    from nos.engine import _vecmath as vm

    @numba.njit(error_model="numpy")
    def run(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
        for i in range(x.shape[0]):
            out[i] = np.float32(vm.pow_abs(x[i], y[i]))

    rng = np.random.default_rng(1)
    base = np.concatenate([_float32_values(2)[:20_000], SPECIAL])
    expo = np.concatenate([rng.uniform(-3, 3, 20_000), 10.0 ** rng.uniform(-8, 2, 20_000) * rng.choice([-1, 1], 20_000),
                           SPECIAL]).astype(np.float32)
    x, y = (a.ravel() for a in np.meshgrid(base[::80], expo[::80]))  # every pair of a thinned grid
    x = np.concatenate([x, base]).astype(np.float32)
    y = np.concatenate([y, rng.choice(expo, base.size)]).astype(np.float32)
    out = np.empty_like(x)
    run(x, y, out)
    with np.errstate(all="ignore"):
        ref = np.power(np.abs(x.astype(np.float64)), y.astype(np.float64))
    err = _ulps(out, ref)
    assert err.max() <= 0.5 + 1e-6, (x[err.argmax()], y[err.argmax()], out[err.argmax()], ref[err.argmax()])
