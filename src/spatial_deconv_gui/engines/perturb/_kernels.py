"""Numba kernels for exact Gaussian kernel sums on the CPU (received ligands).

``out[l, i] = sum_j exp(c * |t_i - s_j|^2) * v[l, j]`` with ``c = -1 / (2 r^2)``, evaluated row by row in
tiles of sources: each row computes the squared distances, the exponentials and the products in one pass over
L1-resident buffers, so no kernel block is ever written to memory (the torch path writes and re-reads a
``block x N`` matrix four times). The exponential is our own vectorisable implementation (Cody-Waite range
reduction by ln 2, degree-13 Taylor polynomial on |r| <= ln2/2, scaling by 2^k through the exponent bits),
accurate to about 1 ulp; arguments below ``-708.39`` (exp < 2.2e-308, the smallest normal double) give 0.

``gauss_sum_sym`` (targets = sources) evaluates each pair once and adds it in both directions. Threads: the
work is cut into ``4 x n_threads`` pieces (row ranges, or interleaved sets of tile pairs each with its own output
buffer) run by a pool of Python threads over the GIL-free serial kernels: the pieces go to threads as they
become free, and an idle thread sleeps instead of spinning, so a busy machine slows a run down gracefully
(numba's OpenMP workers spin-wait, which made two threads 2-3x slower than one under a load of 4 on 2 cores).

``propagation_hop`` is one propagation hop of the knockout simulation (``perturb.Propagator.hop``), cell by cell
over the non-zero coefficients. All kernels release the GIL.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_ARG_MIN = -708.39  # exp(_ARG_MIN) ~ 2.2e-308
_C = [1.0 / math.factorial(k) for k in range(14)]
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13 = _C


@njit(nogil=True, cache=True, inline="always")
def _sqdist_row(T, i, S, j0, n, c, arg):
    """arg[j] = c * |T[:, i] - S[:, j0 + j]|^2 for j < n."""
    t = T[0, i]
    s = S[0, j0 : j0 + n]
    for j in range(n):
        x = t - s[j]
        arg[j] = x * x
    for d in range(1, T.shape[0]):
        t = T[d, i]
        s = S[d, j0 : j0 + n]
        for j in range(n):
            x = t - s[j]
            arg[j] += x * x
    for j in range(n):
        arg[j] *= c


@njit(nogil=True, cache=True, fastmath={"contract"}, inline="always")
def _exp_row(arg, p, bits, n):
    """exp(arg[j]) = p[j] * 2^k[j]; the factor 2^k is written as the bits of a double into ``bits``."""
    for j in range(n):
        a = arg[j]
        small = a < _ARG_MIN
        a = _ARG_MIN if small else a
        k = math.floor(a * _LOG2E + 0.5)
        r = (a - k * _LN2_HI) - k * _LN2_LO
        q = _C13
        q = q * r + _C12
        q = q * r + _C11
        q = q * r + _C10
        q = q * r + _C9
        q = q * r + _C8
        q = q * r + _C7
        q = q * r + _C6
        q = q * r + _C5
        q = q * r + _C4
        q = q * r + _C3
        q = q * r + _C2
        q = q * r + _C1
        q = q * r + _C0
        p[j] = 0.0 if small else q
        bits[j] = (np.int64(k) + 1023) << 52


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, inline="always")
def _accumulate_row(i, j0, n, p, f, V, out_t, out_s, both):
    """out_t[:, i] += sum_j e_j V[:, j0+j]; if ``both``, out_s[:, j0+j] += e_j V[:, i] (e = p * f)."""
    for l in range(V.shape[0]):
        vr = V[l, j0 : j0 + n]
        acc = 0.0
        if both:
            vi = V[l, i]
            orow = out_s[l, j0 : j0 + n]
            for j in range(n):
                e = p[j] * f[j]
                acc += e * vr[j]
                orow[j] += e * vi
        else:
            for j in range(n):
                acc += (p[j] * f[j]) * vr[j]
        out_t[l, i] += acc


@njit(nogil=True, cache=True)
def gauss_sum_rows(T, S, V, c, tile, r0, r1, out):
    """out[l, i] += sum_j exp(c |T[:, i] - S[:, j]|^2) V[l, j] for targets r0 <= i < r1; T (D, NT), S (D, NS),
    V (L, NS), out (L, NT)."""
    ns = S.shape[1]
    arg = np.empty(tile)
    p = np.empty(tile)
    bits = np.empty(tile, np.int64)
    f = bits.view(np.float64)
    for j0 in range(0, ns, tile):
        n = min(ns, j0 + tile) - j0
        for i in range(r0, r1):
            _sqdist_row(T, i, S, j0, n, c, arg)
            _exp_row(arg, p, bits, n)
            _accumulate_row(i, j0, n, p, f, V, out, out, False)


@njit(nogil=True, cache=True)
def gauss_sum_sym_chunk(C, V, c, tile, ch, nchunk, out):
    """The symmetric sum over tile pairs number ``ch, ch + nchunk, ...`` (tile pairs I <= J in row order) into
    ``out`` (L, N): each pair is evaluated once and added in both directions."""
    n_all = C.shape[1]
    L = V.shape[0]
    nt = (n_all + tile - 1) // tile
    arg = np.empty(tile)
    p = np.empty(tile)
    bits = np.empty(tile, np.int64)
    f = bits.view(np.float64)
    q = 0
    for I in range(nt):
        i0 = I * tile
        i1 = min(n_all, i0 + tile)
        for J in range(I, nt):
            if q % nchunk == ch:
                j1 = min(n_all, J * tile + tile)
                for i in range(i0, i1):
                    js = i + 1 if I == J else J * tile  # strictly above the diagonal
                    n = j1 - js
                    if n > 0:
                        _sqdist_row(C, i, C, js, n, c, arg)
                        _exp_row(arg, p, bits, n)
                        _accumulate_row(i, js, n, p, f, V, out, out, True)
                    if I == J:
                        for l in range(L):
                            out[l, i] += V[l, i]  # exp(0) = 1
            q += 1


def _run(jobs, n_threads: int):
    if n_threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n_threads) as ex:
        for fut in [ex.submit(job) for job in jobs]:
            fut.result()


def gauss_sum(T, S, V, c, tile, n_threads=1):
    """out[l, i] = sum_j exp(c |T[:, i] - S[:, j]|^2) V[l, j]; T (D, NT), S (D, NS), V (L, NS) C-contiguous."""
    nt = T.shape[1]
    out = np.zeros((V.shape[0], nt))
    step = max(32, -(-nt // (4 * max(1, n_threads))))
    _run(
        [lambda r0=r0: gauss_sum_rows(T, S, V, c, tile, r0, min(nt, r0 + step), out) for r0 in range(0, nt, step)],
        n_threads,
    )
    return out


def gauss_sum_sym(C, V, c, tile, n_threads=1):
    """Same as ``gauss_sum(C, C, V, c)`` with each pair evaluated once; ``4 * n_threads`` chunks of tile pairs,
    each into its own buffer (summed at the end)."""
    nchunk = 1 if n_threads <= 1 else 4 * n_threads
    bufs = np.zeros((nchunk, V.shape[0], C.shape[1]))
    _run([lambda ch=ch: gauss_sum_sym_chunk(C, V, c, tile, ch, nchunk, bufs[ch]) for ch in range(nchunk)], n_threads)
    return bufs.sum(axis=0) if nchunk > 1 else bufs[0]


@njit(nogil=True, cache=True)
def propagation_hop(
    cl,
    D,
    dW,
    F,
    W,
    tf_ptr,
    tf_idx,
    tf_val,
    lr_ptr,
    lr_idx,
    lr_val,
    lr_r,
    lr_ch,
    tfl_ptr,
    tfl_idx,
    tfl_val,
    tfl_t,
    tfl_ch,
    out,
):
    """One propagation hop, cell by cell (serial: a few multiply-adds per coefficient and cell).

    Cell ``i`` of cluster ``k = cl[i]`` (``-1``: no model) gets, for every coefficient ``b`` of modulator ``m``
    on target ``t`` in cluster ``k`` (CSR per cluster: ``*_ptr[k, m] .. *_ptr[k, m + 1]`` into ``*_idx``
    (targets) and ``*_val`` (coefficients)):

      TF  m:           out[i, t] += b * D[i, m]
      LR  p = (L, R):  out[i, t] += b * ([F[i, R] > 0] W[i, c] D[i, R] + F[i, R] dW[i, c]),  c = lr_ch[p]
      TFL p = (L, T):  out[i, t] += b * (F[i, T] dW[i, c] + W[i, c] D[i, T]),             c = tfl_ch[p]
    """
    n = D.shape[0]
    for i in range(n):
        k = cl[i]
        if k < 0:
            continue
        o = out[i]
        d = D[i]
        for m in range(tf_ptr.shape[1] - 1):
            dm = d[m]
            if dm == 0.0:
                continue
            for e in range(tf_ptr[k, m], tf_ptr[k, m + 1]):
                o[tf_idx[e]] += tf_val[e] * dm
        for p in range(lr_ptr.shape[1] - 1):
            a = lr_ptr[k, p]
            b = lr_ptr[k, p + 1]
            if a == b:
                continue
            fr = F[i, lr_r[p]]
            c = lr_ch[p]
            q = fr * dW[i, c]
            if fr > 0.0:
                q = W[i, c] * d[lr_r[p]] + q
            if q == 0.0:
                continue
            for e in range(a, b):
                o[lr_idx[e]] += lr_val[e] * q
        for p in range(tfl_ptr.shape[1] - 1):
            a = tfl_ptr[k, p]
            b = tfl_ptr[k, p + 1]
            if a == b:
                continue
            c = tfl_ch[p]
            q = F[i, tfl_t[p]] * dW[i, c] + W[i, c] * d[tfl_t[p]]
            if q == 0.0:
                continue
            for e in range(a, b):
                o[tfl_idx[e]] += tfl_val[e] * q


@njit(nogil=True, cache=True)
def percell_hop(cl, D, dW, F, W, cptr, kind, row, tcol, seed, block, wrow, Z, Wr, lr_r, lr_ch, tfl_t, tfl_ch, out):
    """The per-cell part of a propagation hop (models of mode 'full' / 'hybrid', ``percell.PerCellBeta``): for
    every entry ``e`` of cell ``i``'s cluster (``cptr[k] .. cptr[k + 1]``), the coefficient's change in the cell,
    ``seed[e] * (Z[block[e], i] . Wr[wrow[e]])``, times the same derivative term as :func:`propagation_hop`
    (``kind`` 0 TF, 1 LR, 2 TF-ligand; ``row`` the gene column or pair index)."""
    n = D.shape[0]
    nd = Z.shape[2]
    for i in range(n):
        k = cl[i]
        if k < 0:
            continue
        for e in range(cptr[k], cptr[k + 1]):
            r = row[e]
            kd = kind[e]
            if kd == 0:
                q = D[i, r]
            elif kd == 1:
                fr = F[i, lr_r[r]]
                c = lr_ch[r]
                q = fr * dW[i, c]
                if fr > 0.0:
                    q = W[i, c] * D[i, lr_r[r]] + q
            else:
                c = tfl_ch[r]
                q = F[i, tfl_t[r]] * dW[i, c] + W[i, c] * D[i, tfl_t[r]]
            if q == 0.0:
                continue
            b = block[e]
            w = wrow[e]
            f = 0.0
            for j in range(nd):
                f += Z[b, i, j] * Wr[w, j]
            out[i, tcol[e]] += seed[e] * f * q
