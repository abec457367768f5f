"""The compiled part of `nos.tasks.sine_kernel` (numba; imported on first use, so commands that
never roll the sine task out do not pay numba's import). Read `sine_kernel` first."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")


@_jit
def _tanh(z: Any) -> Any:
    """tanh of a float32, vectorisable (libm's tanhf is a scalar call that took half the
    kernel's time): x * P(s) / Q(s), s = x^2 / 81, evaluated in float64 on |x| < 9.01 (beyond,
    exactly +-1, as float32 rounds it; NaN stays NaN). P, Q: a (5, 4) rational fitted to
    tanh(x) / x by reweighted linear least squares on [0, 9]; max relative error 1.9e-9
    in float64, far below float32's 6e-8 (the tests compare it with torch.tanh)."""
    x = float(z)
    if x >= 9.01:  # tanh rounds to exactly 1 in float32 from about 9.01 on: its derivative 1 - t^2
        return np.float32(1.0)  # must then be exactly 0, as torch's is, or a saturated unit
    if x <= -9.01:  # leaks a gradient that overflows on a diverging candidate
        return np.float32(-1.0)
    s = x * x * (1.0 / 81.0)
    p = ((((-0.04330056733419846 * s + 1.3294089886917086) * s + 14.951481095807617) * s
          + 25.421648302428654) * s + 11.084838747537955) * s + 0.999999999388522
    q = (((55.793666530958006 * s + 209.90581999468978) * s + 178.91238018754572) * s
         + 38.08483801342325) * s + 1.0
    return np.float32(x * p / q)


@_jit
def rows(theta: Any, context: Any, target: Any, k: int, H: int, tanh: bool, want_grad: bool,
          lo: int, hi: int, loss: Any, grad: Any) -> None:
    """Loss (and gradient) of candidates lo..hi-1, written into `loss` / `grad` rows."""
    S = target.shape[1]
    ob1 = k * H
    ow2 = ob1 + H
    ob2 = ow2 + H * H
    ow3 = ob2 + H
    ob3 = ow3 + H
    seq = np.empty(k + S, np.float32)  # context then predictions: the windows, overlapped
    h1 = np.empty((S, H), np.float32)  # activations of every time step, for the backward
    h2 = np.empty((S, H), np.float32)
    z = np.empty(H, np.float32)
    w1t = np.empty((H, k), np.float32)  # transposed copies: the backward's products become
    w2t = np.empty((H, H), np.float32)  # contiguous multiply-adds (vectorised, no reassociation)
    gy = np.empty(S, np.float32)
    dz2 = np.empty((S, H), np.float32)  # d loss / d pre-activations, every time step
    dz1 = np.empty((S, H), np.float32)
    dh1 = np.empty(H, np.float32)
    win = np.empty((S, k), np.float32)  # the windows the first layer saw
    dx = np.empty(k, np.float32)
    for c in range(lo, hi):
        th = theta[c]
        w1 = th[0:ob1].reshape(k, H)  # [in, out]: row i is what input i adds to the layer
        w2 = th[ow2:ob2].reshape(H, H)
        for i in range(k):
            seq[i] = context[c, i]
        # ---- forward: the autoregressive rollout, one time step at a time
        for s in range(S):
            for j in range(H):
                z[j] = th[ob1 + j]
            _matvec(w1, seq[s:s + k], z, k, H)
            for j in range(H):
                h1[s, j] = _tanh(z[j]) if tanh else max(z[j], np.float32(0.0))
            for j in range(H):
                z[j] = th[ob2 + j]
            _matvec(w2, h1[s], z, H, H)
            for j in range(H):
                h2[s, j] = _tanh(z[j]) if tanh else max(z[j], np.float32(0.0))
            y = th[ob3]
            for j in range(H):
                y += h2[s, j] * th[ow3 + j]
            seq[k + s] = y
        total = 0.0  # float64 accumulator: the mean is exact to float32 rounding
        for s in range(S):
            d = np.float64(seq[k + s]) - np.float64(target[c, s])
            total += d * d
        loss[c] = np.float32(total / S)
        if not want_grad:
            continue
        # ---- backward through time: the state's gradients step by step, the weights' after
        g = grad[c]
        for i in range(k):
            for j in range(H):
                w1t[j, i] = th[i * H + j]
        for i in range(H):
            for j in range(H):
                w2t[j, i] = th[ow2 + i * H + j]
        scale = np.float32(2.0 / S)
        for s in range(S):
            gy[s] = scale * (seq[k + s] - target[c, s])
        for s in range(S - 1, -1, -1):
            dy = gy[s]  # direct term + what the windows of later steps fed back
            for j in range(H):
                a = h2[s, j]
                da = dy * th[ow3 + j]
                dz2[s, j] = da * (np.float32(1.0) - a * a) if tanh else (da if a > 0 else np.float32(0.0))
                dh1[j] = 0.0
            _matvec(w2t, dz2[s], dh1, H, H)
            for i in range(H):
                a = h1[s, i]
                d = dh1[i]
                dz1[s, i] = d * (np.float32(1.0) - a * a) if tanh else (d if a > 0 else np.float32(0.0))
            for i in range(k):
                dx[i] = 0.0
            _matvec(w1t, dz1[s], dx, H, k)
            for i in range(k):  # window position i of step s is prediction s + i - k
                if s + i >= k:
                    gy[s + i - k] += dx[i]
        # weights: sums over time steps of outer products, as matrix products (BLAS)
        for s in range(S):
            for i in range(k):
                win[s, i] = seq[s + i]
        g[0:ob1] = np.dot(win.T, dz1).ravel()
        g[ow2:ob2] = np.dot(h1.T, dz2).ravel()
        g[ow3:ob3] = np.dot(h2.T, gy)
        for j in range(H):
            b1 = np.float32(0.0)
            b2 = np.float32(0.0)
            for s in range(S):
                b1 += dz1[s, j]
                b2 += dz2[s, j]
            g[ob1 + j] = b1
            g[ob2 + j] = b2
        b3 = np.float32(0.0)
        for s in range(S):
            b3 += gy[s]
        g[ob3] = b3


@_jit
def _matvec(wt: Any, v: Any, out: Any, n: int, m: int) -> None:
    """out[:m] += sum_j v[j] * wt[j, :m], four rows at a time (fewer passes over `out`)."""
    j = 0
    while j + 4 <= n:
        a0, a1, a2, a3 = v[j], v[j + 1], v[j + 2], v[j + 3]
        for i in range(m):
            out[i] += a0 * wt[j, i] + a1 * wt[j + 1, i] + a2 * wt[j + 2, i] + a3 * wt[j + 3, i]
        j += 4
    while j < n:
        a = v[j]
        for i in range(m):
            out[i] += a * wt[j, i]
        j += 1
