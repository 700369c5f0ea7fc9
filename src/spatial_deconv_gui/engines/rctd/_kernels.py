"""Numba kernels for the CPU hot paths: spline derivatives, PSD projection + bound-constrained QP, and
the fused per-problem derivative assembly for small type subsets (doublet / multi mode).

Every kernel releases the GIL and parallelises over independent problems (pixels), so a GUI thread
stays responsive while they run.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_QP_TOL = 1e-13
_PSD_FLOOR = 1e-3
_RIDGE = 1e-7


@njit(inline="always", nogil=True, cache=True)
def _spline_eval(yk: int, lam: float, coef, knots, mtab, n_int: int, x_max: float):
    """Value, first and second derivative of the spline of count row ``yk`` at ``lam`` (clamped to the grid)."""
    if lam < 1e-4:
        lam = 1e-4
    hi = x_max - 1e-4
    if lam > hi:
        lam = hi
    m = mtab[int(math.floor(math.sqrt(lam / 1e-6)))]
    row = yk * n_int + m
    c0 = coef[row, 0]
    c1 = coef[row, 1]
    c2 = coef[row, 2]
    c3 = coef[row, 3]
    a = lam - knots[m]
    d0 = c0 + a * (c1 + a * (c2 + a * c3))
    d1 = c1 + a * (2.0 * c2 + 3.0 * c3 * a)
    d2 = 2.0 * c2 + 6.0 * c3 * a
    return d0, d1, d2


@njit(parallel=True, nogil=True, cache=True)
def spline_derivs(y, lam, coef, knots, mtab, n_int, x_max, k_cap, d1_out, d2_out):
    """Elementwise first/second derivatives for 2-D ``y``/``lam`` (counts clipped at ``k_cap``)."""
    n, g = lam.shape
    for i in prange(n):
        for j in range(g):
            yk = int(min(y[i, j], k_cap))
            _, d1, d2 = _spline_eval(yk, lam[i, j], coef, knots, mtab, n_int, x_max)
            d1_out[i, j] = d1
            d2_out[i, j] = d2


@njit(parallel=True, nogil=True, cache=True)
def spline_nll(y, lam, coef, knots, mtab, n_int, x_max, k_cap, out):
    """Row sums of -log P(y | lam)."""
    n, g = lam.shape
    for i in prange(n):
        s = 0.0
        for j in range(g):
            yk = int(min(y[i, j], k_cap))
            d0, _, _ = _spline_eval(yk, lam[i, j], coef, knots, mtab, n_int, x_max)
            s -= d0
        out[i] = s


@njit(nogil=True, cache=True)
def _chol_solve_subset(D, c, free, out):
    """Solve ``D[F,F] s = c[F]`` (Cholesky; D is positive definite) and scatter into ``out``."""
    k = D.shape[0]
    idx = np.empty(k, dtype=np.int64)
    n = 0
    for j in range(k):
        if free[j]:
            idx[n] = j
            n += 1
    L = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = D[idx[i], idx[j]]
            for t in range(j):
                s -= L[i, t] * L[j, t]
            if i == j:
                L[i, i] = math.sqrt(max(s, 1e-300))
            else:
                L[i, j] = s / L[j, j]
    z = np.empty(n)
    for i in range(n):
        s = c[idx[i]]
        for t in range(i):
            s -= L[i, t] * z[t]
        z[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        s = z[i]
        for t in range(i + 1, n):
            s -= L[t, i] * z[t]
        z[i] = s / L[i, i]
    for j in range(k):
        out[j] = 0.0
    for i in range(n):
        out[idx[i]] = z[i]


@njit(nogil=True, cache=True)
def nonneg_qp(D, c, y):
    """Exact minimiser of ``0.5 y'Dy - c'y`` over ``y >= 0`` (primal active set, Lawson-Hanson style)."""
    k = c.shape[0]
    _nonneg_qp(D, c, y, np.zeros(k, dtype=np.bool_), np.empty(k))


@njit(nogil=True, cache=True)
def _nonneg_qp(D, c, y, free, s):
    # Starts from y = 0 and frees the variable with the most negative gradient; when an unconstrained solve on
    # the free set leaves the feasible region, steps to the boundary and drops the blocking variables.
    # Terminates in finitely many steps for positive definite D. ``free`` and ``s`` are scratch.
    k = c.shape[0]
    for j in range(k):
        y[j] = 0.0
        free[j] = False
    for _outer in range(3 * k + 5):
        best = _QP_TOL
        jbest = -1
        for j in range(k):
            if not free[j]:
                wj = c[j]
                for t in range(k):
                    wj -= D[j, t] * y[t]
                if wj > best:
                    best = wj
                    jbest = j
        if jbest < 0:
            return
        free[jbest] = True
        for _inner in range(k + 1):
            _chol_solve_subset(D, c, free, s)
            alpha = 2.0
            for j in range(k):
                if free[j] and s[j] <= 0.0:
                    den = y[j] - s[j]
                    a = y[j] / den if den > 0 else 0.0
                    if a < alpha:
                        alpha = a
            if alpha >= 1.0:
                for j in range(k):
                    y[j] = s[j]
                break
            any_free = False
            for j in range(k):
                if free[j]:
                    y[j] += alpha * (s[j] - y[j])
                    if y[j] <= 1e-14:
                        y[j] = 0.0
                        free[j] = False
                    else:
                        any_free = True
            if not any_free:
                break


@njit(nogil=True, cache=True)
def _psd_project_2(H, D):
    """D = V max(lam, floor) V' / max(lam_max, floor) for a symmetric 2 x 2 H, in closed form (no LAPACK)."""
    a, b, d = H[0, 0], 0.5 * (H[0, 1] + H[1, 0]), H[1, 1]
    m = 0.5 * (a + d)
    r = np.hypot(0.5 * (a - d), b)
    lo, hi = m - r, m + r
    nf = max(hi, _PSD_FLOOR)
    if lo >= _PSD_FLOOR:  # already above the floor: the projection is H itself
        D[0, 0], D[0, 1], D[1, 0], D[1, 1] = a, b, b, d
    elif hi <= _PSD_FLOOR:
        D[0, 0], D[0, 1], D[1, 0], D[1, 1] = _PSD_FLOOR, 0.0, 0.0, _PSD_FLOOR
    else:
        # only the low eigenvalue is raised: D = H + (floor - lo) v v' with v its unit eigenvector, taken from
        # the better-conditioned of the two rows of (H - lo I)
        if a >= d:
            v0, v1 = -b, a - lo
        else:
            v0, v1 = d - lo, -b
        nv = np.hypot(v0, v1)
        if nv == 0.0:
            v0, v1 = 1.0, 0.0
        else:
            v0, v1 = v0 / nv, v1 / nv
        lift = _PSD_FLOOR - lo
        D[0, 0] = a + lift * v0 * v0
        D[0, 1] = D[1, 0] = b + lift * v0 * v1
        D[1, 1] = d + lift * v1 * v1
    for i in range(2):
        for j in range(2):
            D[i, j] /= nf
        D[i, i] += _RIDGE
    return nf


@njit(nogil=True, cache=True)
def _psd_project(H, D):
    k = H.shape[0]
    if k == 2:
        return _psd_project_2(H, D)
    lam, V = np.linalg.eigh(np.ascontiguousarray(H))
    nf = _PSD_FLOOR
    for i in range(k):
        if lam[i] > nf:
            nf = lam[i]
    for i in range(k):
        for j in range(k):
            s = 0.0
            for t in range(k):
                s += V[i, t] * max(lam[t], _PSD_FLOOR) * V[j, t]
            D[i, j] = s / nf
        D[i, i] += _RIDGE
    return nf


@njit(nogil=True, cache=True)
def _psd_qp_one(H, g, w, out, D, c, lb, y, free, s):
    k = g.shape[0]
    nf = _psd_project(H, D)
    for i in range(k):
        lb[i] = -max(w[i], 0.0)
    for i in range(k):
        acc = g[i] / nf
        for j in range(k):
            acc -= D[i, j] * lb[j]
        c[i] = acc
    _nonneg_qp(D, c, y, free, s)
    for i in range(k):
        out[i] = y[i] + lb[i]


@njit(parallel=True, nogil=True, cache=True)
def psd_qp_batch(H, g, w, out):
    """For each problem: project the Hessian to PSD (eigenvalues floored at 1e-3), scale to unit 2-norm,
    add a 1e-7 ridge, and solve the Newton QP ``min 0.5 x'Dx - d'x`` subject to ``x >= -w``.

    Problems are taken in chunks so each thread allocates its scratch once, not once per problem.
    """
    nb, k = g.shape
    chunk = 64
    n_chunks = (nb + chunk - 1) // chunk
    for ch in prange(n_chunks):
        D = np.empty((k, k))
        Hb = np.empty((k, k))
        gb, wb, c, lb, y, s = np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k)
        free = np.zeros(k, dtype=np.bool_)
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            for i in range(k):
                gb[i] = g[b, i]
                wb[i] = w[b, i]
                for j in range(k):
                    Hb[i, j] = H[b, i, j]
            _psd_qp_one(Hb, gb, wb, out[b], D, c, lb, y, free, s)


@njit(parallel=True, nogil=True, cache=True)
def subset_derivs(P, types, w, numi, y, rows, coef, knots, mtab, n_int, x_max, k_cap, grad, hess):
    """Gradient of log-likelihood and Hessian of its negative for problems on small type subsets.

    Problem ``b`` uses pixel row ``rows[b]`` of ``y`` and the columns ``types[b]`` of ``P``; nothing of
    size (problems x genes x types) is materialised.
    """
    nb, kk = types.shape
    g = P.shape[0]
    for b in prange(nb):
        u = numi[b]
        thr = max(1e-4, u * 1e-7)
        r = rows[b]
        for i in range(kk):
            grad[b, i] = 0.0
            for j in range(kk):
                hess[b, i, j] = 0.0
        for gi in range(g):
            pred = 0.0
            for i in range(kk):
                pred += P[gi, types[b, i]] * max(w[b, i], 0.0)
            pred = abs(pred) * u
            if pred < thr:
                pred = thr
            yk = int(min(y[r, gi], k_cap))
            _, d1, d2 = _spline_eval(yk, pred, coef, knots, mtab, n_int, x_max)
            for i in range(kk):
                pi = P[gi, types[b, i]]
                grad[b, i] += d1 * pi * u
                for j in range(i, kk):
                    hess[b, i, j] -= d2 * pi * P[gi, types[b, j]] * u * u
        for i in range(kk):
            for j in range(i + 1, kk):
                hess[b, j, i] = hess[b, i, j]


@njit(parallel=True, nogil=True, cache=True)
def subset_nll(P, types, w, numi, y, rows, coef, knots, mtab, n_int, x_max, k_cap, out):
    """-log-likelihood of each subset problem at its weights (prediction without the IRWLS floor)."""
    nb, kk = types.shape
    g = P.shape[0]
    for b in prange(nb):
        u = numi[b]
        r = rows[b]
        s = 0.0
        for gi in range(g):
            pred = 0.0
            for i in range(kk):
                pred += P[gi, types[b, i]] * w[b, i]
            yk = int(min(y[r, gi], k_cap))
            d0, _, _ = _spline_eval(yk, pred * u, coef, knots, mtab, n_int, x_max)
            s -= d0
        out[b] = s


@njit(parallel=True, nogil=True, cache=True)
def shared_weights(mix, y, rows, numi, coef, knots, mtab, n_int, x_max, k_cap, a_out, b_out):
    """Per (problem, gene) factors of the gradient and Hessian when all problems share one profile matrix.

    ``mix`` is ``P w`` per problem (a GEMM done outside). With ``lam = numi |P w|`` floored like spacexr,
    ``a = numi * dlogL/dlam`` and ``b = -numi^2 * d2logL/dlam2``: gradient = a @ P and the Hessian's pairwise
    terms = b @ (P_k * P_l), again GEMMs outside.
    """
    nb, g = mix.shape
    for i in prange(nb):
        r = rows[i]
        u = numi[r]
        thr = max(1e-4, u * 1e-7)
        for j in range(g):
            lam = abs(mix[i, j]) * u
            if lam < thr:
                lam = thr
            yk = int(min(y[r, j], k_cap))
            _, d1, d2 = _spline_eval(yk, lam, coef, knots, mtab, n_int, x_max)
            a_out[i, j] = d1 * u
            b_out[i, j] = -d2 * u * u


@njit(nogil=True, cache=True)
def _quantile_sorted(v, q):
    """numpy's default (linear) quantile of the sorted vector ``v``."""
    pos = q * (v.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.shape[0] - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


@njit(parallel=True, nogil=True, cache=True)
def simplex_interval_batch(w, info, normals, rel_floor, q_lo, q_hi, lower, upper):
    """Per problem b: draws from N(w[b], info[b]^-1) (the Laplace approximation of the likelihood in weight space),
    each projected onto w >= 0 in the metric of ``info[b]`` (where the quadratic model of the likelihood puts the
    constrained optimum for that draw) and normalised to proportions; ``lower`` / ``upper`` get the ``q_lo`` /
    ``q_hi`` quantiles of the draws per type.

    ``normals`` (draws x K standard normals) are shared by all problems so a run is reproducible; eigenvalues of
    ``info`` below ``rel_floor`` times the largest are raised to it (a direction the data hardly constrain gets a
    wide, not an infinite, spread).
    """
    nb, k = w.shape
    nd = normals.shape[0]
    for b in prange(nb):
        lam, V = np.linalg.eigh(np.ascontiguousarray(info[b]))
        lmax = 0.0
        for t in range(k):
            lmax = max(lmax, lam[t])
        if not lmax > 0.0:  # no curvature at all: the data say nothing about this spot
            for i in range(k):
                lower[b, i] = 0.0
                upper[b, i] = 1.0
            continue
        floor = rel_floor * lmax
        sd = np.empty(k)
        D = np.empty((k, k))
        for t in range(k):
            lt = max(lam[t], floor)
            sd[t] = 1.0 / math.sqrt(lt)
            lam[t] = lt / lmax
        for i in range(k):
            for j in range(k):
                acc = 0.0
                for t in range(k):
                    acc += V[i, t] * lam[t] * V[j, t]
                D[i, j] = acc
            D[i, i] += _RIDGE
        z = np.empty(k)
        c = np.empty(k)
        y = np.empty(k)
        s = np.empty(k)
        free = np.zeros(k, dtype=np.bool_)
        props = np.empty((k, nd))
        for d in range(nd):
            for i in range(k):
                acc = w[b, i]
                for t in range(k):
                    acc += V[i, t] * sd[t] * normals[d, t]
                z[i] = acc
            for i in range(k):
                acc = 0.0
                for j in range(k):
                    acc += D[i, j] * z[j]
                c[i] = acc
            _nonneg_qp(D, c, y, free, s)
            tot = 0.0
            for i in range(k):
                tot += y[i]
            for i in range(k):
                props[i, d] = y[i] / tot if tot > 0.0 else 1.0 / k
        for i in range(k):
            v = np.sort(props[i])
            lower[b, i] = _quantile_sorted(v, q_lo)
            upper[b, i] = _quantile_sorted(v, q_hi)
