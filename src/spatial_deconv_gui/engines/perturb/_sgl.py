"""Numba kernel: many small sparse-group-lasso problems in Gram form, each by FISTA with adaptive restart and
backtracking (the algorithm of ``lasso.fit_sgl_batch``, problem by problem instead of in lock-step).

Each problem b minimises ``0.5 w'A w - b'w + sum_g gw[g] ||w_g||_2 + l1 ||w||_1`` over the features with
``mask = 1`` (the others stay 0). Problems run one after the other inside a kernel call, so a problem stops
as soon as it has converged and no padding or lock-step work is spent on it; calls on disjoint problem ranges
run on a pool of Python threads (the kernel releases the GIL).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _prox(z, step, l1, gidx, gw, mask, width, n_groups, norms, out):
    for j in range(width):
        v = z[j]
        a = abs(v) - step * l1
        out[j] = (a if v > 0 else -a) if a > 0 else 0.0
    for g in range(n_groups):
        norms[g] = 0.0
    for j in range(width):
        norms[gidx[j]] += out[j] * out[j]
    for g in range(n_groups):
        nrm = math.sqrt(norms[g])
        if nrm > 0:
            s = 1.0 - step * gw[g] / nrm
            norms[g] = s if s > 0 else 0.0
        else:
            norms[g] = 0.0
    for j in range(width):
        out[j] *= norms[gidx[j]] * mask[j]


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _matvec(A, x, width, out):
    # reassociation lets the row sums vectorise (the order of a sum is the only thing it changes)
    for i in range(width):
        s = 0.0
        for j in range(width):
            s += A[i, j] * x[j]
        out[i] = s


@njit(nogil=True, cache=True)
def sgl_fista_range(As, cols, bvec, gidx, gw, mask, width, l1, max_iter, tol, x, n_iter, converged, lo, hi):
    """Solve problems ``lo:hi`` in place: ``x`` (B, p) holds the start and receives the solution.

    Problem b's matrix is ``As[cols[b, :w], cols[b, :w]]`` (As (F, F) shared by all problems, gathered here
    into a local buffer), bvec (B, p), gidx (B, p) int64 group of each feature (padding: any group with weight
    0), gw (B, G) group weights, mask (B, p) 1.0 for a free feature, 0.0 for a fixed zero, width (B,) columns used.
    """
    p = cols.shape[1]
    Ab = np.empty((p, p))
    G = gw.shape[1]
    v = np.empty(p)
    Av = np.empty(p)
    Ax = np.empty(p)
    y = np.empty(p)
    Ay = np.empty(p)
    z = np.empty(p)
    xn = np.empty(p)
    Axn = np.empty(p)
    norms = np.empty(G)
    for b in range(lo, hi):
        w = width[b]
        cb = cols[b]
        for i in range(w):
            ci = cb[i]
            for j in range(w):
                Ab[i, j] = As[ci, cb[j]]
        bb = bvec[b]
        gi = gidx[b]
        gwb = gw[b]
        mk = mask[b]
        xb = x[b]
        # Lipschitz constant by power iteration; backtracking corrects an underestimate
        for j in range(w):
            v[j] = mk[j]
        L = 0.0
        for _ in range(30):
            _matvec(Ab, v, w, Av)
            nrm = 0.0
            for j in range(w):
                nrm += Av[j] * Av[j]
            nrm = math.sqrt(nrm)
            if nrm <= 1e-300:
                break
            for j in range(w):
                v[j] = Av[j] / nrm
        _matvec(Ab, v, w, Av)
        for j in range(w):
            L += v[j] * Av[j]
        L = max(L, 1e-12) * 1.01
        for j in range(w):
            xb[j] *= mk[j]
        _matvec(Ab, xb, w, Ax)
        for j in range(w):
            y[j] = xb[j]
            Ay[j] = Ax[j]
        t = 1.0
        done = False
        it = 0
        while it < max_iter:
            it += 1
            fy = 0.0
            for j in range(w):
                fy += 0.5 * y[j] * Ay[j] - bb[j] * y[j]
            for _ in range(30):
                step = 1.0 / L
                for j in range(w):
                    z[j] = y[j] - step * (Ay[j] - bb[j])
                _prox(z, step, l1, gi, gwb, mk, w, G, norms, xn)
                _matvec(Ab, xn, w, Axn)
                fx = 0.0
                lin = 0.0
                dd = 0.0
                for j in range(w):
                    fx += 0.5 * xn[j] * Axn[j] - bb[j] * xn[j]
                    d = xn[j] - y[j]
                    lin += (Ay[j] - bb[j]) * d
                    dd += d * d
                if not (fx > fy + lin + 0.5 * L * dd + 1e-12 * max(abs(fy), 1.0)):
                    break
                L *= 2.0
            rs = 0.0
            delta = 0.0
            xmax = 0.0
            for j in range(w):
                rs += (y[j] - xn[j]) * (xn[j] - xb[j])
                dj = abs(xn[j] - xb[j])
                if dj > delta:
                    delta = dj
                if abs(xn[j]) > xmax:
                    xmax = abs(xn[j])
            if rs > 0:
                tn = 1.0
                mom = 0.0
            else:
                tn = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
                mom = (t - 1.0) / tn
            for j in range(w):
                y[j] = xn[j] + mom * (xn[j] - xb[j])
                Ay[j] = Axn[j] + mom * (Axn[j] - Ax[j])
                xb[j] = xn[j]
                Ax[j] = Axn[j]
            t = tn
            if delta <= tol * max(xmax, 1.0):
                done = True
                break
        n_iter[b] = it
        converged[b] = done


def n_pieces(n_problems_threads: int) -> int:
    """How many ranges of problems a batch is cut into for ``n`` threads. The kernels' results depend on the
    ranges (fastmath), not on which thread runs them: a Dask task cuts as the submitting process would and
    runs the ranges on its one thread, so its answer is the in-process one."""
    return 1 if n_problems_threads <= 1 else 4 * n_problems_threads


def sgl_fista(As, cols, bvec, gidx, gw, mask, width, l1, max_iter, tol, x0=None, n_threads=1, split=None):
    """All problems of a batch; returns (x, n_iter, converged). See :func:`sgl_fista_range`. ``split``: cut the
    batch as for this many threads (default ``n_threads``)."""
    from ._kernels import _run

    B, p = bvec.shape
    x = np.zeros((B, p)) if x0 is None else np.array(x0, dtype=np.float64, order="C", copy=True)
    n_iter = np.zeros(B, dtype=np.int64)
    conv = np.zeros(B, dtype=np.bool_)
    if B == 0 or p == 0:
        return x, n_iter, np.ones(B, dtype=np.bool_)
    args = (
        np.ascontiguousarray(As, dtype=np.float64),
        np.ascontiguousarray(cols, dtype=np.int64),
        np.ascontiguousarray(bvec, dtype=np.float64),
        np.ascontiguousarray(gidx, dtype=np.int64),
        np.ascontiguousarray(gw, dtype=np.float64),
        np.ascontiguousarray(mask, dtype=np.float64),
        np.ascontiguousarray(width, dtype=np.int64),
        float(l1),
        int(max_iter),
        float(tol),
        x,
        n_iter,
        conv,
    )
    step = max(1, -(-B // n_pieces(n_threads if split is None else split)))
    _run([lambda lo=lo: sgl_fista_range(*args, lo, min(B, lo + step)) for lo in range(0, B, step)], n_threads)
    return x, n_iter, conv


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def gradient_range(Xs, As, use_data, cols, x, width, b, out, lo, hi):
    """out[t] = A w_t - b[t] for problems ``lo:hi``, w_t = x[t, :width[t]] on the columns ``cols[t]``:
    through the data, A w = Xs' (Xs w), when ``use_data``, else through the rows of the (symmetric) Gram ``As``."""
    n, F = Xs.shape[0], As.shape[0]
    z = np.empty(n)
    for t in range(lo, hi):
        w = width[t]
        o = out[t]
        bt = b[t]
        if use_data:
            for i in range(n):
                z[i] = 0.0
            for k in range(w):
                xk = x[t, k]
                if xk != 0.0:
                    c = cols[t, k]
                    for i in range(n):
                        z[i] += xk * Xs[i, c]
            for j in range(F):
                o[j] = -bt[j]
            for i in range(n):
                zi = z[i]
                row = Xs[i]
                for j in range(F):
                    o[j] += zi * row[j]
        else:
            for j in range(F):
                o[j] = -bt[j]
            for k in range(w):
                xk = x[t, k]
                if xk != 0.0:
                    row = As[cols[t, k]]
                    for j in range(F):
                        o[j] += xk * row[j]


def gradient(Xs, As, cols, x, width, b, n_threads=1, split=None):
    """(T, F) gradients of the full problems at the working-set solutions; see :func:`gradient_range`."""
    from ._kernels import _run

    T = cols.shape[0]
    out = np.empty((T, As.shape[0]))
    use_data = Xs is not None
    Xs_ = np.ascontiguousarray(Xs if use_data else np.zeros((0, As.shape[0])), dtype=np.float64)
    args = (
        Xs_,
        np.ascontiguousarray(As, dtype=np.float64),
        use_data,
        np.ascontiguousarray(cols, dtype=np.int64),
        np.ascontiguousarray(x, dtype=np.float64),
        np.ascontiguousarray(width, dtype=np.int64),
        np.ascontiguousarray(b, dtype=np.float64),
        out,
    )
    step = max(1, -(-T // n_pieces(n_threads if split is None else split)))
    _run([lambda lo=lo: gradient_range(*args, lo, min(T, lo + step)) for lo in range(0, T, step)], n_threads)
    return out
