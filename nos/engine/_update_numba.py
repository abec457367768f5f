"""The compiled part of `nos.engine.fused` (numba; imported on first use). Read `fused` first.

One call evaluates the update graphs of candidates lo..hi-1 for one step. Per candidate, the live
nodes run in slot order, each as one tight loop over the P parameters, into a [MAX_NODES, P]
scratch that stays in L1/L2; the moments buffer, the lr and the sign come last, in the same pass.
The formulas are `search_space.ops` / `search_space.operands`, op for op, in float32 (constants as
float32, no fast-math, so no contraction into FMAs) and with torch's NaN handling (clamps and
maximum/minimum propagate NaN). Transcendental functions are `_vecmath`'s (vectorisable, evaluated
in float64 and rounded once; erf, erfc and the Bessel function are libm's) rather than torch's
SLEEF, so a value may differ in its last bit; the tests hold the two paths to 1e-6.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from . import _vecmath as vm

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")

# numba keys its disk cache of these kernels on this file alone, not on the `_vecmath` functions
# inlined into them, so an edit there would leave the old code cached. An edit there comes with a
# new stamp here (tests/test_vecmath.py checks it), and this file's change recompiles them.
VECMATH_STAMP = "9f4c8a4da9e0872f"  # sha256 of _vecmath.py, first 16 hex digits

# The op and operand codes the kernel knows, by position. `nos.engine.fused` maps names to codes
# and sends a batch with any other name to the eager interpreter, so a new op cannot be silently
# mis-evaluated here.
UNARY_NAMES = (
    "neg", "log_abs", "sqrt_abs", "exp", "abs", "sigmoid", "inv_1p_abs", "softplus", "erf", "erfc",
    "asinh", "tanh", "atan", "reciprocal", "bessel_i1e", "relu", "min0", "softsign", "sign",
)
# ops that need more than their input, coded after the plain unary ones
SPECIAL_NAMES = ("dropout50", "dropout30", "dropout10", "clip_by_norm", "ema", "delta", "running_max")
BINARY_NAMES = ("add", "sub", "mul", "max", "min", "div", "div_sqrt", "clip", "interp", "pow_abs")
OP_NAMES = UNARY_NAMES + SPECIAL_NAMES + BINARY_NAMES
FIRST_SPECIAL = len(UNARY_NAMES)
FIRST_BINARY = FIRST_SPECIAL + len(SPECIAL_NAMES)
OPERAND_NAMES = (
    "g", "g2", "g3", "m", "v", "y", "one", "two", "zero", "w_1e6", "w_1e5", "w_1e4", "w_1e3",
    "sign_g", "sign_m", "qh_gm", "qh_g2v", "aggmo", "lion_mix", "noise", "v99",
)

_F = np.float32
BIG = _F(1e15)
_DROP_P = (_F(0.5), _F(0.3), _F(0.1))
_MOMENTUM = _F(0.9)
_FLOAT32_MAX = 3.4028234663852886e38
_WEIGHT_DECAY = (_F(1e-6), _F(1e-5), _F(1e-4), _F(1e-3))
# the moments of `update_moments`, in the order of the `need` bits: m, v, y, m99, v99; their
# values sit in the rows (0, 1, 2, 3, 5) of the kernel's moment scratch, m99_prev in row 4
MOMENT_NAMES = ("m", "v", "y", "m99", "v99")
_BETAS_64 = (0.9, 0.999, 0.999, 0.99, 0.99)
_BETAS = tuple(_F(b) for b in _BETAS_64)
_ONE_MINUS_BETAS = tuple(_F(1.0 - b) for b in _BETAS_64)  # as torch casts the Python scalar
_POWERS = (1, 2, 3, 1, 2)


@_jit
def _clamp_big(x: Any) -> Any:
    """torch.clamp(x, -1e15, 1e15): NaN stays NaN."""
    if x > BIG:
        return BIG
    if x < -BIG:
        return -BIG
    return x


@_jit
def _sign(x: Any) -> Any:
    if x > 0:
        return _F(1.0)
    if x < 0:
        return _F(-1.0)
    return x  # 0, -0 and NaN stay as they are, as torch.sign's


@_jit
def _maximum(a: Any, b: Any) -> Any:
    if a != a:
        return a
    return a if a > b else b


@_jit
def _minimum(a: Any, b: Any) -> Any:
    if a != a:
        return a
    return a if a < b else b


@_jit
def i1e(z: Any) -> Any:
    """torch.special.i1e (exp(-|x|) I1(x)) of a float32, computed in float64: the power series
    of I1 up to |x| = 25 (positive terms, no cancellation), and beyond it the asymptotic series
    e^-x I1(x) ~ (2 pi x)^-1/2 sum_k (-1)^k a_k / x^k, a_k = prod_{i<=k} (4 - (2i - 1)^2) / (k! 8^k),
    whose terms there fall below 1e-16 within ~15 steps."""
    x = float(z)
    ax = abs(x)
    if ax != ax or ax == 0.0:
        return z
    if ax <= 25.0:
        h = 0.5 * ax
        q = h * h
        term = h
        s = h
        for k in range(1, 200):
            term *= q / (k * (k + 1))
            s += term
            if term < 1e-17 * s:
                break
        r = s * math.exp(-ax)
    else:
        term = 1.0
        s = 1.0
        for k in range(1, 40):
            term *= -(4.0 - (2 * k - 1) ** 2) / (8.0 * k * ax)
            s += term
            if abs(term) < 1e-17:
                break
        r = s / math.sqrt(2.0 * math.pi * ax)
    return _F(r if x > 0 else -r)


@_jit
def _unary(op: int, x: Any, out: Any) -> None:
    """out = OPS[UNARY_NAMES[op]](x), elementwise; one loop per op, so each loop is tight."""
    P = x.shape[0]
    one = _F(1.0)
    if op == 0:  # neg
        for p in range(P):
            out[p] = -x[p]
    elif op == 1:  # log_abs
        for p in range(P):
            a = abs(x[p])
            out[p] = vm.log(_F(1e-30) if a < _F(1e-30) else a)
    elif op == 2:  # sqrt_abs
        for p in range(P):
            out[p] = math.sqrt(abs(x[p]))
    elif op == 3:  # exp
        for p in range(P):
            out[p] = vm.exp(_F(40.0) if x[p] > _F(40.0) else x[p])
    elif op == 4:  # abs
        for p in range(P):
            out[p] = abs(x[p])
    elif op == 5:  # sigmoid
        for p in range(P):
            e = _F(vm.exp(-x[p]))  # rounded to float32 as torch's is: inf (so 0) below about -88.7
            out[p] = 1.0 / (1.0 + np.float64(e))
    elif op == 6:  # inv_1p_abs
        for p in range(P):
            out[p] = one / (one + abs(x[p]))
    elif op == 7:  # softplus (beta 1, threshold 20, as torch's)
        for p in range(P):
            out[p] = x[p] if x[p] > _F(20.0) else vm.log1p(vm.exp(x[p]))
    elif op == 8:  # erf
        for p in range(P):
            out[p] = math.erf(x[p])
    elif op == 9:  # erfc
        for p in range(P):
            out[p] = math.erfc(x[p])
    elif op == 10:  # asinh
        for p in range(P):
            out[p] = vm.asinh(x[p])
    elif op == 11:  # tanh
        for p in range(P):
            out[p] = vm.tanh(x[p])
    elif op == 12:  # atan
        for p in range(P):
            out[p] = vm.atan(x[p])
    elif op == 13:  # reciprocal: sign(x) / max(|x|, 1e-15)
        for p in range(P):
            a = abs(x[p])
            out[p] = _sign(x[p]) / (_F(1e-15) if a < _F(1e-15) else a)
    elif op == 14:  # bessel_i1e
        for p in range(P):
            out[p] = i1e(x[p])
    elif op == 15:  # relu
        for p in range(P):
            out[p] = _F(0.0) if x[p] < 0 else x[p]
    elif op == 16:  # min0
        for p in range(P):
            out[p] = _F(0.0) if x[p] > 0 else x[p]
    elif op == 17:  # softsign
        for p in range(P):
            out[p] = x[p] / (one + abs(x[p]))
    else:  # sign
        for p in range(P):
            out[p] = _sign(x[p])


@_jit
def _binary(op: int, x: Any, y: Any, out: Any) -> None:
    """out = OPS[BINARY_NAMES[op]](x, y), elementwise."""
    P = x.shape[0]
    if op == 0:  # add
        for p in range(P):
            out[p] = _clamp_big(x[p] + y[p])
    elif op == 1:  # sub
        for p in range(P):
            out[p] = _clamp_big(x[p] - y[p])
    elif op == 2:  # mul
        for p in range(P):
            out[p] = _clamp_big(x[p] * y[p])
    elif op == 3:  # max
        for p in range(P):
            out[p] = _maximum(x[p], y[p])
    elif op == 4:  # min
        for p in range(P):
            out[p] = _minimum(x[p], y[p])
    elif op == 5:  # div: x / (y + 1e-8), the denominator kept at least 1e-15 away from zero
        for p in range(P):
            d = y[p] + _F(1e-8)
            if abs(d) < _F(1e-15):
                d = _F(1e-15)
            out[p] = _clamp_big(x[p] / d)
    elif op == 6:  # div_sqrt
        for p in range(P):
            out[p] = x[p] / math.sqrt(_F(1.0) + y[p] * y[p])
    elif op == 7:  # clip x to +-|y|
        for p in range(P):
            a = abs(y[p])
            out[p] = _maximum(_minimum(x[p], a), -a)
    elif op == 8:  # interp
        for p in range(P):
            out[p] = _F(0.95) * x[p] + _F(0.05) * y[p]
    else:  # pow_abs
        for p in range(P):
            r = vm.pow_abs(x[p], y[p])
            out[p] = BIG if r > BIG else r


@_jit
def _operand(code: int, gc: Any, wc: Any, mom: Any, noise_c: Any, tmp: Any) -> Any:
    """The operand OPERAND_NAMES[code] of one candidate: gc its (clipped) gradient, wc its
    weights, mom its moments (see MOMENT_NAMES); a row of those where the operand is one, else
    computed into tmp (the formulas of `search_space.operands`, in their order of evaluation)."""
    P = tmp.shape[0]
    if code == 0:
        return gc
    if code == 3:
        return mom[0]
    if code == 4:
        return mom[1]
    if code == 5:
        return mom[2]
    if code == 19:
        return noise_c
    if code == 20:
        return mom[5]
    if code == 1:  # g2
        for p in range(P):
            tmp[p] = gc[p] * gc[p]
    elif code == 2:  # g3
        for p in range(P):
            tmp[p] = gc[p] * gc[p] * gc[p]
    elif code <= 8:  # one, two, zero
        tmp[:] = _F(1.0) if code == 6 else (_F(2.0) if code == 7 else _F(0.0))
    elif code <= 12:  # w_1e6 .. w_1e3
        scale = _WEIGHT_DECAY[code - 9]
        for p in range(P):
            tmp[p] = scale * wc[p]
    elif code == 13:  # sign_g
        for p in range(P):
            tmp[p] = _sign(gc[p])
    elif code == 14:  # sign_m
        mc = mom[0]
        for p in range(P):
            tmp[p] = _sign(mc[p])
    elif code == 15:  # qh_gm
        mc = mom[0]
        for p in range(P):
            tmp[p] = _F(0.3) * gc[p] + _F(0.7) * mc[p]
    elif code == 16:  # qh_g2v
        vc = mom[1]
        for p in range(P):
            tmp[p] = _F(0.05) * gc[p] * gc[p] + _F(0.95) * vc[p]
    elif code == 17:  # aggmo
        mc = mom[0]
        sc = mom[3]
        for p in range(P):
            tmp[p] = (gc[p] + mc[p] + sc[p]) / _F(3.0)
    else:  # lion_mix
        pc = mom[4]
        for p in range(P):
            tmp[p] = _F(0.1) * gc[p] + _F(0.9) * pc[p]
    return tmp


@_jit
def _moment(which: int, gc: Any, state: Any, first: bool, corr: Any, out: Any) -> None:
    """`update_moments` for one moment of one candidate: state (the EMA) advanced in place, out
    its bias-corrected value (m99: its raw value)."""
    beta, rest = _BETAS[which], _ONE_MINUS_BETAS[which]
    power = _POWERS[which]
    for p in range(gc.shape[0]):
        gp = gc[p] if power == 1 else (gc[p] * gc[p] if power == 2 else gc[p] * gc[p] * gc[p])
        cur = rest * gp if first else beta * state[p] + rest * gp
        state[p] = cur
        out[p] = cur / corr if which != 3 else cur


@_jit
def _mix32(x: int) -> int:
    """`nos.engine.rng.rng_mix32` on one int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


@_jit
def _uniform(key: int, p: int) -> Any:
    """`rng_uniform`'s number for element p, from the key of (seed, step, stream)."""
    h = _mix32(_mix32((key + p * 0x27D4EB2F) & 0xFFFFFFFF) ^ 0x165667B1)
    return _F(h >> 8) * _F(1.0 / 16777216.0)


@_jit
def _key(seed: int, step: int, stream: int) -> int:
    return _mix32((seed & 0xFFFFFFFF) ^ _mix32((stream * 0x3C6EF372 + step) & 0xFFFFFFFF))



@_jit
def _dropout(which: int, x: Any, seed: int, step: int, stream: int, out: Any) -> None:
    """`op_dropout` with `rng_uniform`'s numbers (the same integers, so the same mask)."""
    p_drop = _DROP_P[which]
    keep_scale = _F(1.0) - p_drop
    key = _key(seed, step, stream)
    for p in range(x.shape[0]):
        out[p] = _clamp_big(x[p] / keep_scale) if _uniform(key, p) >= p_drop else _F(0.0)


@_jit
def _stateful(which: int, x: Any, prev: Any, first: bool, out: Any) -> None:
    """ema / delta / running_max: out is the node's value, prev (the node's state) is updated."""
    P = x.shape[0]
    if which == 0:  # ema, beta 0.9, zero-initialised
        for p in range(P):
            s = _F(0.1) * x[p] if first else _F(0.9) * prev[p] + _F(0.1) * x[p]
            out[p] = s
            prev[p] = s
    elif which == 1:  # delta
        for p in range(P):
            out[p] = x[p] if first else _clamp_big(x[p] - prev[p])
            prev[p] = x[p]
    else:  # running_max
        for p in range(P):
            s = x[p] if first else _maximum(prev[p], x[p])
            out[p] = s
            prev[p] = s


@_jit
def _input(ref: int, k: int, c: int, S: int, vals: Any, gc: Any, wc: Any, mom: Any, noise_c: Any,
           dec: Any, tmp: Any) -> Any:
    """A node's input: slot `ref` (< S) or the operand ref - S, times its edge decay dec[k, c]
    when k >= 0 (written into tmp unless it is there already)."""
    x = vals[ref] if ref < S else _operand(ref - S, gc, wc, mom, noise_c, tmp)
    if k >= 0:
        d = dec[k, c]
        for p in range(tmp.shape[0]):
            tmp[p] = x[p] * d
        return tmp
    return x


@_jit
def rows(ops: Any, refs: Any, edges: Any, state_rows: Any, node_idx: Any, need: Any, dec: Any,
         grad: Any, theta: Any, clip: Any, ms: Any, vs: Any, ys: Any, m99s: Any, v99s: Any,
         noise: Any, node_state: Any, seeds: Any, step: int, seg_ids: Any, n_seg: int,
         lr: Any, kinds: Any, has_buf: bool, buf: Any, lo: int, hi: int, out: Any) -> None:
    """out[c] = lr_t[c] * D(u_t)[c] for candidates lo..hi-1 (see `nos.engine.fused.FusedUpdate`).

    ops [C, S]: op code per slot (-1: no node there, or one the root does not depend on);
    refs, edges [C, S, 2]: input j as a node slot (< S) or S + an operand code, and the row of
    `dec` [K, C] holding its edge decay at this step (-1: none); state_rows [C, S]: the row of
    node_state [R, P] of a stateful node; node_idx [C, S]: the node's index in its genome (its
    dropout stream); need [C]: bit i set when the candidate reads moment i (MOMENT_NAMES order;
    their states ms .. v99s [C, P]); clip [C]: the global
    gradient clip (inf: none); kinds [C]: 0 plain, 1 momentum, 2 Nesterov (buf [C, P] is the
    buffer). Every state starts on step 0, as the eager path's `None` does."""
    S = ops.shape[1]
    P = out.shape[1]
    vals = np.empty((S, P), np.float32)
    mom = np.zeros((6, P), np.float32)
    gclip = np.empty(P, np.float32)
    tmp0 = np.empty(P, np.float32)
    tmp1 = np.empty(P, np.float32)
    sq = np.empty(n_seg, np.float32)
    first = step == 0
    states = (ms, vs, ys, m99s, v99s)
    corr = np.empty(5, np.float32)  # the bias corrections 1 - beta^t, as Python computes them
    for i in range(5):
        corr[i] = 1.0 - _BETAS_64[i] ** (step + 1)
    for c in range(lo, hi):
        gc = grad[c]
        if clip[c] < np.inf:  # the global clip: g * min(1, clip / (|g| + 1e-6))
            acc = 0.0
            for p in range(P):
                acc += float(gc[p]) * float(gc[p])
            # torch's float32 norm overflows to inf once the sum of squares passes float32's
            # largest value (the step is then clipped to zero): the same here, in every path
            norm = _F(math.sqrt(acc)) if acc <= _FLOAT32_MAX else _F(np.inf)
            scale = clip[c] / (norm + _F(1e-6))
            if scale > _F(1.0):
                scale = _F(1.0)
            for p in range(P):
                gclip[p] = gc[p] * scale
            gc = gclip
        wc = theta[c]
        noise_c = noise[c] if noise.shape[0] == grad.shape[0] else noise[0]  # else the unused stand-in
        nd = need[c]
        for i in range(5):
            if nd & (1 << i):
                row = 5 if i == 4 else i  # m99_prev sits in row 4, before v99
                if i == 3:
                    if first:
                        mom[4, :] = 0.0
                    else:
                        mom[4, :] = m99s[c]
                _moment(i, gc, states[i][c], first, corr[i], mom[row])
        for s in range(S):
            op = ops[c, s]
            if op < 0:
                continue
            x = _input(refs[c, s, 0], edges[c, s, 0], c, S, vals, gc, wc, mom, noise_c, dec, tmp0)
            dst = vals[s]
            if op >= FIRST_BINARY:
                y = _input(refs[c, s, 1], edges[c, s, 1], c, S, vals, gc, wc, mom, noise_c, dec, tmp1)
                _binary(op - FIRST_BINARY, x, y, dst)
            elif op < FIRST_SPECIAL:
                _unary(op, x, dst)
            elif op < FIRST_SPECIAL + 3:
                _dropout(op - FIRST_SPECIAL, x, seeds[c], step, 100 + node_idx[c, s], dst)
            elif op == FIRST_SPECIAL + 3:  # clip_by_norm: each parameter tensor to L2 norm <= 1
                sq[:] = 0.0
                for p in range(P):
                    sq[seg_ids[p]] += x[p] * x[p]
                for i in range(n_seg):
                    r = math.sqrt(sq[i])
                    sq[i] = _F(1.0) if r < _F(1.0) else r
                for p in range(P):
                    dst[p] = x[p] / sq[seg_ids[p]]
            else:
                _stateful(op - FIRST_SPECIAL - 4, x, node_state[state_rows[c, s]], first, dst)
        u = vals[S - 1]
        kind = kinds[c]
        rate = lr[c]
        oc = out[c]
        if not has_buf:
            for p in range(P):
                oc[p] = rate * u[p]
            continue
        bc = buf[c]
        for p in range(P):
            b = u[p] if first else _MOMENTUM * bc[p] + u[p]
            bc[p] = b
            if kind == 0:
                oc[p] = rate * u[p]
            elif kind == 1:
                oc[p] = rate * b
            else:  # Nesterov
                oc[p] = rate * (u[p] + _MOMENTUM * b)


# reassoc lets LLVM split these sums over vector lanes (a plain float loop is one serial chain of
# adds); in float64 the order changes nothing at float32's precision
_jit_sum = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})


@_jit_sum
def _sum(x: Any, a: int, b: int) -> float:
    acc = 0.0
    for p in range(a, b):
        acc += np.float64(x[p])
    return acc


@_jit_sum
def _sum_sq_dev(x: Any, a: int, b: int, mean: float) -> float:
    acc = 0.0
    for p in range(a, b):
        d = np.float64(x[p]) - mean
        acc += d * d
    return acc


@_jit
def _fill_normal(seed: int, step: int, stream: int, out: Any) -> None:
    """out = `rng_normal`'s numbers for one candidate (Box-Muller on the two counter streams)."""
    k1 = _key(seed, step, stream)
    k2 = _key(seed, step, stream + 0x10000)
    two_pi = _F(6.283185307179586)
    for p in range(out.shape[0]):  # no gather or call in this loop, so it is vectorised
        u1 = _F(1.0) - _uniform(k1, p)
        out[p] = vm.normal(u1, two_pi * _uniform(k2, p))  # the angle rounded to float32, as in torch


@_jit
def normals(rows: Any, seeds: Any, step: int, stream: int, std: Any, lo: int, hi: int, out: Any) -> None:
    """out[c] = std * N(0, 1) for c = rows[lo..hi-1]: `BatchedOptimizer._normal_rows` (the noise
    operand's numbers)."""
    for r in range(lo, hi):
        c = rows[r]
        oc = out[c]
        _fill_normal(seeds[c], step, stream, oc)
        for p in range(oc.shape[0]):
            oc[p] = std * oc[p]


@_jit
def perturb(theta: Any, rows: Any, seeds: Any, step: int, stream: int, sigma: Any, layer_std: Any,
            bounds: Any, dest: Any, add: bool, lo: int, hi: int, out: Any) -> None:
    """The noise rule's sigma[c] * scale * N(0, 1) for c = rows[lo..hi-1] (`BatchedOptimizer.
    perturbation`: the numbers of `rng_normal`, Box-Muller; scale is the population std of each
    parameter tensor of theta[c], `bounds` [n_seg, 2] their [start, end), where layer_std[c], else
    1), written to out[dest[c]], or, where dest[c] < 0, into theta[c] itself; `add`: theta[c] +
    the noise rather than the noise alone. In place, each tensor's std is read before it is written."""
    z = np.empty(theta.shape[1], np.float32)
    for r in range(lo, hi):
        c = rows[r]
        th = theta[c]
        dst = th if dest[c] < 0 else out[dest[c]]
        _fill_normal(seeds[c], step, stream, z)
        for i in range(bounds.shape[0]):
            a, b = bounds[i, 0], bounds[i, 1]
            scale = sigma[c]
            if layer_std[c]:
                mean = _sum(th, a, b) / (b - a)
                scale = sigma[c] * _F(math.sqrt(_sum_sq_dev(th, a, b, mean) / (b - a)))
            if add:
                for p in range(a, b):
                    dst[p] = th[p] + scale * z[p]
            else:
                for p in range(a, b):
                    dst[p] = scale * z[p]


@_jit
def finite_rows(x: Any, lo: int, hi: int, out: Any) -> None:
    """out[c] = every entry of x[c] is finite (torch.isfinite(x).all(dim=1)), for c in lo..hi-1:
    one read of the rows, stopping at the first entry that is not."""
    for c in range(lo, hi):
        ok = True
        row = x[c]
        for p in range(row.shape[0]):
            if not math.isfinite(row[p]):
                ok = False
                break
        out[c] = ok
