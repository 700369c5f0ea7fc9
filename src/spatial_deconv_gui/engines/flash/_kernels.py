"""Numba kernels of the flash engine: streaming passes over the raw CSR counts and the BCD sweep.

Every parallel loop runs over fixed-size chunks of spots, and every reduction adds per-chunk partials in
chunk order, so results do not depend on the number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 2048  # spots per parallel work item

# preprocessing codes (shared with preprocess.py)
LOG_CPM, PEARSON, RAW = 0, 1, 2
LIBRARY_SCALE = 1e4


def n_chunks(n: int) -> int:
    return max(1, (n + CHUNK - 1) // CHUNK)


@njit(parallel=True, nogil=True, cache=True)
def row_sums(indptr, indices, data, colmap, rows):
    """Per-row sum of the counts in the columns with ``colmap >= 0``."""
    n = rows.shape[0]
    out = np.zeros(n, dtype=np.float64)
    nc = (n + CHUNK - 1) // CHUNK
    for c in prange(nc):
        for r in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            i = rows[r]
            s = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                if colmap[indices[p]] >= 0:
                    s += data[p]
            out[r] = s
    return out


@njit(parallel=True, nogil=True, cache=True)
def lognorm_column_moments(indptr, indices, data, colmap, rows, lib, n_cols):
    """Column sums of x and x² with x = log1p(1e4 · y / max(lib, 1)), over mapped columns."""
    n = rows.shape[0]
    nc = (n + CHUNK - 1) // CHUNK
    s1 = np.zeros((nc, n_cols), dtype=np.float64)
    s2 = np.zeros((nc, n_cols), dtype=np.float64)
    for c in prange(nc):
        for r in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            i = rows[r]
            scale = LIBRARY_SCALE / max(lib[r], 1.0)
            for p in range(indptr[i], indptr[i + 1]):
                j = colmap[indices[p]]
                if j >= 0:
                    x = np.log1p(scale * data[p])
                    s1[c, j] += x
                    s2[c, j] += x * x
    t1 = np.zeros(n_cols, dtype=np.float64)
    t2 = np.zeros(n_cols, dtype=np.float64)
    for c in range(nc):
        for j in range(n_cols):
            t1[j] += s1[c, j]
            t2[j] += s2[c, j]
    return t1, t2


@njit(parallel=True, nogil=True, cache=True)
def column_sums(indptr, indices, data, colmap, rows, n_cols):
    """Column sums of the raw counts over mapped columns."""
    n = rows.shape[0]
    nc = (n + CHUNK - 1) // CHUNK
    s1 = np.zeros((nc, n_cols), dtype=np.float64)
    for c in prange(nc):
        for r in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            i = rows[r]
            for p in range(indptr[i], indptr[i + 1]):
                j = colmap[indices[p]]
                if j >= 0:
                    s1[c, j] += data[p]
    t1 = np.zeros(n_cols, dtype=np.float64)
    for c in range(nc):
        for j in range(n_cols):
            t1[j] += s1[c, j]
    return t1


@njit(parallel=True, nogil=True, cache=True)
def project(indptr, indices, data, colmap, rows, mode, lib, col_scale, gene_w, B, bucket, sign, n_buckets):
    """H = Ỹ B and the per-row ‖ỹ‖² of the solver's representation, never forming Ỹ.

    ``ỹ_ij = gene_w[j] · t(y_ij)`` with t the preprocessing (log-CPM on ``lib``, Pearson ``y · col_scale[j]``
    or raw). With ``n_buckets > 0`` (CountSketch) the representation is ``ỹ Ω``: gene j adds
    ``sign[j] · ỹ_ij`` to bucket ``bucket[j]``, ``B`` is ``Ω Xᵀ`` and the squared norm is taken over buckets.
    """
    n = rows.shape[0]
    K = B.shape[1]
    H = np.zeros((n, K), dtype=np.float64)
    yty = np.zeros(n, dtype=np.float64)
    nc = (n + CHUNK - 1) // CHUNK
    for c in prange(nc):
        acc = np.zeros(max(n_buckets, 1), dtype=np.float64)
        mark = np.zeros(max(n_buckets, 1), dtype=np.uint8)
        touched = np.empty(max(n_buckets, 1), dtype=np.int64)
        for r in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            i = rows[r]
            scale = 0.0
            if mode == 0:
                scale = LIBRARY_SCALE / lib[r]
            ss = 0.0
            nt = 0
            for p in range(indptr[i], indptr[i + 1]):
                j = colmap[indices[p]]
                if j < 0:
                    continue
                y = float(data[p])
                if mode == 0:
                    t = np.log1p(scale * y)
                elif mode == 1:
                    t = y * col_scale[j]
                else:
                    t = y
                v = t * gene_w[j]
                for k in range(K):
                    H[r, k] += v * B[j, k]
                if n_buckets > 0:
                    b = bucket[j]
                    if mark[b] == 0:
                        mark[b] = 1
                        touched[nt] = b
                        nt += 1
                    acc[b] += sign[j] * v
                else:
                    ss += v * v
            if n_buckets > 0:
                for q in range(nt):
                    b = touched[q]
                    ss += acc[b] * acc[b]
                    acc[b] = 0.0
                    mark[b] = 0
            yty[r] = ss
    return H, yty


BLOCK = 32  # spots updated in lockstep inside a chunk (the innermost loops run over them: SIMD)


@njit(parallel=True, nogil=True, cache=True)
def bcd_sweep(
    H, G, yty, beta_in, beta_out, R, refresh, nbr_ptr, nbr_idx, lam, rho, chunk_diff, chunk_abs, chunk_obj, want_obj
):
    """One Jacobi-across-spots sweep; within a spot one Gauss–Seidel pass over the cell types.

    For spot i and type k, with r = G β_i maintained incrementally and s the neighbours' sum (previous
    iterate):  β_ik ← max(0, H_ik − r_k + G_kk β_ik + λ s_k − ρ) / (G_kk + λ deg_i).
    Spots are processed in blocks of ``BLOCK`` held type-major, so every inner loop is a branch-free
    loop over the block's spots. ``R`` carries r = G β_i from one sweep to the next (it is exact up to
    rounding); with ``refresh`` it is recomputed from β. Writes per-chunk max |Δβ| and max |β_old| (convergence
    test) and, when ``want_obj``, the objective terms of the *input* iterate (fit, Tr(βᵀLβ), Σβ) at little extra cost.
    """
    n, K = beta_in.shape
    nc = (n + CHUNK - 1) // CHUNK
    for c in prange(nc):
        b = np.empty((K, BLOCK), dtype=np.float64)
        r = np.empty((K, BLOCK), dtype=np.float64)
        s = np.empty((K, BLOCK), dtype=np.float64)
        h = np.empty((K, BLOCK), dtype=np.float64)
        den_extra = np.empty(BLOCK, dtype=np.float64)
        delta = np.empty(BLOCK, dtype=np.float64)
        dmax = 0.0
        amax = 0.0
        fit = 0.0
        lap = 0.0
        l1 = 0.0
        end = min(n, (c + 1) * CHUNK)
        for i0 in range(c * CHUNK, end, BLOCK):
            m = min(BLOCK, end - i0)
            for q in range(m):
                i = i0 + q
                for k in range(K):
                    b[k, q] = beta_in[i, k]
                    h[k, q] = H[i, k]
                    s[k, q] = 0.0
                    r[k, q] = 0.0 if refresh else R[i, k]
                p0 = nbr_ptr[i]
                p1 = nbr_ptr[i + 1]
                den_extra[q] = lam * (p1 - p0)
                for p in range(p0, p1):
                    j = nbr_idx[p]
                    for k in range(K):
                        s[k, q] += beta_in[j, k]
                if want_obj:
                    for p in range(p0, p1):
                        j = nbr_idx[p]
                        for k in range(K):
                            d = beta_in[i, k] - beta_in[j, k]
                            lap += 0.5 * d * d
            if refresh:
                for k in range(K):
                    for l in range(K):
                        g = G[k, l]
                        for q in range(m):
                            r[k, q] += g * b[l, q]
            if want_obj:
                for q in range(m):
                    quad = 0.0
                    cross = 0.0
                    for k in range(K):
                        quad += b[k, q] * r[k, q]
                        cross += b[k, q] * h[k, q]
                        l1 += abs(b[k, q])
                    fit += 0.5 * yty[i0 + q] - cross + 0.5 * quad
            for k in range(K):
                gkk = G[k, k]
                for q in range(m):
                    old = b[k, q]
                    res = h[k, q] - r[k, q] + gkk * old + lam * s[k, q]
                    den = gkk + den_extra[q]
                    new = (res - rho) / den if (res > rho and den > 1e-10) else 0.0
                    b[k, q] = new
                    delta[q] = new - old
                for l in range(K):
                    g = G[l, k]
                    for q in range(m):
                        r[l, q] += delta[q] * g
            for q in range(m):
                i = i0 + q
                for k in range(K):
                    v = b[k, q]
                    o = beta_in[i, k]
                    beta_out[i, k] = v
                    R[i, k] = r[k, q]
                    d = abs(v - o)
                    if d > dmax:
                        dmax = d
                    a = abs(o)
                    if a > amax:
                        amax = a
        chunk_diff[c] = dmax
        chunk_abs[c] = amax
        chunk_obj[c, 0] = fit
        chunk_obj[c, 1] = lap
        chunk_obj[c, 2] = l1


@njit(parallel=True, nogil=True, cache=True)
def objective_terms(H, G, yty, beta, nbr_ptr, nbr_idx):
    """(½‖Y − βX‖², Tr(βᵀLβ), Σβ) from H = Y Xᵀ, G = X Xᵀ and ‖y_i‖², per-chunk partials added in order."""
    n, K = beta.shape
    nc = (n + CHUNK - 1) // CHUNK
    parts = np.zeros((nc, 3), dtype=np.float64)
    for c in prange(nc):
        fit = 0.0
        lap = 0.0
        l1 = 0.0
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            quad = 0.0
            cross = 0.0
            for k in range(K):
                bk = beta[i, k]
                l1 += abs(bk)
                cross += bk * H[i, k]
                acc = 0.0
                for l in range(K):
                    acc += G[k, l] * beta[i, l]
                quad += bk * acc
            fit += 0.5 * yty[i] - cross + 0.5 * quad
            for p in range(nbr_ptr[i], nbr_ptr[i + 1]):
                j = nbr_idx[p]
                for k in range(K):
                    d = beta[i, k] - beta[j, k]
                    lap += 0.5 * d * d  # each undirected edge is seen from both ends
        parts[c, 0] = fit
        parts[c, 1] = lap
        parts[c, 2] = l1
    out = np.zeros(3, dtype=np.float64)
    for c in range(nc):
        for t in range(3):
            out[t] += parts[c, t]
    return out


# Single-chunk problems gain nothing from a parallel launch, which costs milliseconds on a busy machine
# (every iteration waits for all workers to be scheduled): the same sweep compiled without threads.
bcd_sweep_serial = njit(nogil=True, cache=True)(bcd_sweep.py_func)
