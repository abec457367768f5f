"""Vectorisable transcendental functions for the compiled kernels (numba; imported on first use).

Why: numba turns `math.exp`, `math.log`, `math.cos`, ... into scalar libm calls, and a loop with a
call in it is not vectorised: on this project's CPU a libm call costs 5-20 ns an element, while
the loops around it run at about 1 ns. The pip build of llvmlite has no vector math library
(Intel's SVML), so these functions are written out: range reduction by bit manipulation and
polynomials, in float64, with no calls and no data-dependent loops, so LLVM vectorises any loop
that uses them. Each takes a float32 or float64, computes in float64 (numba's `float()` would keep
a float32 a float32, so each converts with np.float64) and is accurate to about 1e-14 relative (far
below float32's 6e-8): its result rounded to float32 is float32's rounding of the exact value
(tests/test_vecmath.py holds every function to half an ulp of float64 numpy over all float32
magnitudes and the special values). torch's SLEEF functions are within 1 ulp, so the two paths
may differ in the last bit.

The polynomials are Taylor series cut where the next term is below 1e-16 of the result on the
reduced interval; the reductions are the textbook ones (exponent split for exp and log, quadrant
for cos, tan(pi/8) halving for atan); log1p, expm1, tanh, asinh and pow are built on exp and log.
erf, erfc and the Bessel function stay libm calls (they need long series or many rational pieces,
and few genomes use them). Only what the kernels need is here.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# inline="always": numba inlines the function into its caller before LLVM sees it, so a caller's loop
# has no call left to stop it being vectorised (LLVM's own inliner gives up on the larger ones)
_jit = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")

LN2 = 0.6931471805599453
_LOG2E = 1.4426950408889634
_SQRT2 = 1.4142135623730951
_HALF_PI = 1.5707963267948966
_TWO_OVER_PI = 0.6366197723675814
_QUARTER_PI = 0.7853981633974483
_TAN_PI_8 = 0.41421356237309503


def _bits_typing(typingctx: Any, x: Any) -> Any:
    """The IEEE bits of a float64 as an int64 (a bitcast: no instruction, vectorisable)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


def _from_bits_typing(typingctx: Any, x: Any) -> Any:
    """The float64 whose IEEE bits are the int64 x."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


_bits: Any = intrinsic(_bits_typing)
_from_bits: Any = intrinsic(_from_bits_typing)


@_jit
def exp(x: Any) -> Any:
    """e^x for x in float32's range: exact powers of two times a degree-12 Taylor polynomial on
    |r| <= ln2 / 2. +inf above 100 and e^-200 below -200 (float32 overflows and underflows to 0
    well inside), so the exponent never leaves float64's normal range. NaN stays NaN."""
    x = np.float64(x)  # numba's float() keeps a float32 a float32
    y = min(max(x, -200.0), 100.0)
    n = math.floor(y * _LOG2E + 0.5)
    r = y - n * LN2
    p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
            1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600))))))))))))
    scale = _from_bits((int(n) + 1023) << 52)
    out = p * scale
    if x > 100.0:
        out = math.inf
    return out if x == x else x


@_jit
def log(x: Any) -> Any:
    """The natural log of x >= 0 (a float32 value: normal in float64): x = 2^e * m with m in
    [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, odd series to
    s^23. log(0) = -inf, log(inf) = inf, NaN stays NaN."""
    x = np.float64(x)
    b = _bits(x)
    e = (b >> 52) - 1023
    m = _from_bits((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)  # [1, 2)
    if m > _SQRT2:
        m = m * 0.5
        e = e + 1
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = 1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (
        1.0 / 13 + s2 * (1.0 / 15 + s2 * (1.0 / 17 + s2 * (1.0 / 19 + s2 * (1.0 / 21 + s2 * (1.0 / 23)))))))))))
    out = 2.0 * s * p + e * LN2
    if x == 0.0:
        out = -math.inf
    if x == math.inf:
        out = math.inf
    return out if x == x else x


@_jit
def log1p(y: Any) -> Any:
    """log(1 + y) for y >= 0, accurate for tiny y too: log(u) * y / (u - 1) with u = 1 + y rounded
    (the rounding error of u cancels; D. Goldberg, 1991)."""
    y = np.float64(y)
    u = 1.0 + y
    d = u - 1.0
    r = y if d == 0.0 else log(u) * (y / d)
    return y if y == math.inf else r


@_jit
def cos(x: Any) -> Any:
    """cos(x) for |x| below about 1e6 (the kernels call it on [0, 2 pi)): x = q pi/2 + r,
    |r| <= pi/4, then the cos or sin series of r (to r^14 / r^15) by the quadrant q."""
    x = np.float64(x)
    q = math.floor(x * _TWO_OVER_PI + 0.5)
    r = x - q * _HALF_PI
    r2 = r * r
    c = 1.0 + r2 * (-1.0 / 2 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (
        -1.0 / 3628800 + r2 * (1.0 / 479001600 + r2 * (-1.0 / 87178291200)))))))
    s = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 + r2 * (
        -1.0 / 39916800 + r2 * (1.0 / 6227020800 + r2 * (-1.0 / 1307674368000))))))))
    k = int(q) & 3
    v = c if (k & 1) == 0 else s
    return -v if (k == 1 or k == 2) else v


@_jit
def atan(x: Any) -> Any:
    """atan(x): |x| > 1 through pi/2 - atan(1/|x|), then t > tan(pi/8) through pi/4 + atan((t - 1) /
    (t + 1)), leaving |t| <= tan(pi/8) for the odd series to t^41 (its terms fall by 0.17 each)."""
    x = np.float64(x)
    a = abs(x)
    big = a > 1.0
    t = 1.0 / a if big else a
    mid = t > _TAN_PI_8
    t = (t - 1.0) / (t + 1.0) if mid else t
    z = -t * t
    p = 0.0
    for k in range(20, 0, -1):  # a fixed trip count: unrolled, still vectorisable
        p = z * (1.0 / (2 * k + 1) + p)
    r = t * (1.0 + p)
    if mid:
        r = r + _QUARTER_PI
    if big:
        r = _HALF_PI - r
    r = math.copysign(r, x)  # odd, and -0 stays -0 as in libm
    return r if x == x else x


@_jit
def asinh(x: Any) -> Any:
    """asinh(x) = sign(x) log1p(a + a^2 / (1 + sqrt(1 + a^2))), a = |x| (no cancellation for small
    a; a^2 stays finite for every float32)."""
    x = np.float64(x)
    a = abs(x)
    r = log1p(a + a * a / (1.0 + math.sqrt(1.0 + a * a)))
    if a == math.inf:
        r = math.inf
    r = math.copysign(r, x)  # odd, and -0 stays -0 as in libm
    return r if x == x else x


@_jit
def expm1(x: Any) -> Any:
    """e^x - 1 for x <= 0 (the kernels' only use), accurate near 0: (u - 1) x / log(u) with
    u = e^x rounded (its rounding error cancels, as in `log1p`); x below -100 gives -1."""
    x = max(np.float64(x), -100.0)
    u = exp(x)
    return x if u == 1.0 else (u - 1.0) * (x / log(u))


@_jit
def tanh(x: Any) -> Any:
    """tanh(x) = -e / (e + 2) with e = expm1(-2 |x|), the sign of x (no overflow: e is in [-1, 0])."""
    x = np.float64(x)
    e = expm1(-2.0 * abs(x))
    r = -e / (e + 2.0)
    r = math.copysign(r, x)  # odd, and -0 stays -0 as in libm
    return r if x == x else x


@_jit
def pow_abs(x: Any, y: Any) -> Any:
    """|x|^y as C's pow has it: e^(y log|x|), with pow's exact cases as selects (y = 0 or |x| = 1
    give 1 even against NaN; 0 and inf follow from log's -inf and inf)."""
    a = abs(np.float64(x))
    y = np.float64(y)
    r = exp(y * log(a))
    if a == 0.0 and y > 0.0:  # e^(-inf) is exp's floor, e^-200, not 0
        r = 0.0
    if a == math.inf and y < 0.0:
        r = 0.0
    return 1.0 if (y == 0.0 or a == 1.0) else r


@_jit
def normal(u1: Any, u2: Any) -> Any:
    """Box-Muller: sqrt(-2 log u1) cos(u2), u1 in (0, 1], u2 the angle in [0, 2 pi)."""
    return math.sqrt(-2.0 * log(u1)) * cos(u2)
