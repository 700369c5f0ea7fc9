"""All targets of one cluster at once: the sparse group lasso of every target on one shared design, by working
sets.

Every target of a cluster is regressed on columns of the same centred design ``P`` (cells x features: the TFs,
LR pairs and TF-ligand pairs of the slide); a target uses the subset ``allowed[t]`` of them (its own TFs, the LR
pairs not involving it, ...). On a real slide with a ligand-receptor database, a target has ~1,800 allowed
features for ~50 cells, while its fitted model keeps a few dozen. So instead of solving each problem at full
width, each target's problem is solved on a small *working set* of features and then checked against the
optimality (KKT) conditions of the full problem on all its allowed features at once - one product of the
shared design with all targets' coefficients - and features that violate them are added until none do. The
answer is the solution of the full problem (to the solver's tolerance), the cost that of the small ones.

Problem of target t (standardised features, as ``lasso.fit_sgl_batch``):
    min_w 0.5 w'A w - b_t'w + sum_g gw_tg ||w_g|| + l1 ||w||_1,  A = Xs'Xs, Xs = P / sd / sqrt(n), b_t = Xs'y_t/sqrt(n)
over its active features (allowed, and not constant in the cluster). Optimality at w with w_j = 0:
    group g of j non-zero:  |grad_j| <= l1;     group g zero:  || soft(grad_g, l1) ||_2 <= gw_tg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._sgl import gradient, sgl_fista
from .lasso import weights_from_sizes


@dataclass
class ClusterDesign:
    """The shared parts of one cluster: centred design, its standardisation and Gram matrix."""

    n: int
    P: np.ndarray  # (n, F) centred features
    pm: np.ndarray  # (F,) feature means
    diag: np.ndarray  # (F,) column sums of squares of P
    sd: np.ndarray  # (F,) standard deviation of each feature (1 where constant, or without standardisation)
    As: np.ndarray  # (F, F) standardised Gram / n
    Xs: np.ndarray | None  # (n, F) standardised data / sqrt(n), when cheaper than the Gram for gradients


def cluster_design(Phi_c: np.ndarray, standardize: bool = True) -> ClusterDesign:
    n = Phi_c.shape[0]
    pm = Phi_c.mean(axis=0)
    P = Phi_c - pm
    G = P.T @ P
    diag = np.clip(np.diagonal(G).copy(), 0.0, None)
    sd = np.sqrt(diag / n) if standardize else np.ones_like(diag)
    sd = np.where(sd > 0, sd, 1.0)
    As = G / np.outer(sd, sd) / n
    F = P.shape[1]
    Xs = P / sd / np.sqrt(n) if 2 * n < F else None
    return ClusterDesign(n, P, pm, diag, sd, As, Xs)


@dataclass
class ClusterFit:
    coef: np.ndarray  # (T, F) in original feature units (zero outside each target's active features)
    n_iter: np.ndarray  # (T,) FISTA iterations summed over working-set rounds
    converged: np.ndarray  # (T,)
    rounds: int
    max_width: int


def fit_cluster_targets(
    design: ClusterDesign,
    Yc: np.ndarray,
    allowed: np.ndarray,
    col_group: np.ndarray,
    l1_reg: float,
    group_reg: float,
    scale_reg: str = "inverse_group_size",
    max_iter: int = 2000,
    tol: float = 1e-6,
    n_threads: int = 1,
    start_width: int = 32,
    split: int | None = None,
    max_rounds: int = 30,
    prune: bool = True,
) -> ClusterFit:
    """Sparse group lasso of every column of ``Yc`` (n x T, centred) on the features ``allowed`` (T x F bool)
    of the shared design. ``col_group`` (F,) is each feature's group (0..K-1). ``split``: cut batches as for
    this many threads (default ``n_threads``; see :func:`._sgl.n_pieces`)."""
    T = Yc.shape[1]
    F = design.P.shape[1]
    K = int(col_group.max()) + 1 if F else 0
    n = design.n
    if T == 0 or F == 0:
        return ClusterFit(np.zeros((T, F)), np.zeros(T, np.int64), np.ones(T, bool), 0, 0)
    # active: allowed and not constant, relative to the largest column of the target's own problem
    dmax = np.where(allowed, design.diag[None, :], 0.0).max(axis=1)
    active = allowed & (design.diag[None, :] > 1e-12 * np.maximum(dmax, 1e-300)[:, None])
    sizes = np.stack([(active & (col_group == g)[None, :]).sum(axis=1) for g in range(K)], axis=1)
    gw = np.concatenate([weights_from_sizes(sizes, group_reg, scale_reg), np.zeros((T, 1))], axis=1)  # + dummy group
    b = (design.P.T @ Yc).T / design.sd[None, :] / n * active  # (T, F)
    W = np.zeros((T, F))
    n_iter = np.zeros(T, dtype=np.int64)
    converged = np.ones(T, dtype=bool)
    in_ws = np.zeros((T, F), dtype=bool)
    grad = -b  # gradient at W = 0
    gmask = [(col_group == g) for g in range(K)]
    rounds = 0
    max_width = 0
    l1 = float(l1_reg)
    slack = float(tol)
    while True:
        # candidates: active features outside the working set that violate optimality, scored by |grad| - l1;
        # a feature of a zero group is a candidate only when its group's condition fails
        score = np.abs(grad) - l1
        soft = np.where(active, np.maximum(score, 0.0), 0.0)
        gnorm = np.stack([np.sqrt((soft[:, gmask[g]] ** 2).sum(axis=1)) for g in range(K)], axis=1)
        nz_group = np.stack([(W[:, gmask[g]] != 0).any(axis=1) for g in range(K)], axis=1)
        group_open = nz_group | (gnorm > gw[:, :K] + slack)
        cand = active & ~in_ws & (score > slack) & group_open[:, col_group]
        n_cand = cand.sum(axis=1)
        if rounds >= max_rounds:  # never seen; the working sets then take every violator at once
            add = n_cand
        else:
            add = np.maximum(start_width, (W != 0).sum(axis=1) if prune else in_ws.sum(axis=1))
        todo = np.flatnonzero(n_cand > 0)
        if todo.size == 0:
            break
        # the `add` best-scoring candidates of each target join its working set
        sc = np.where(cand[todo], score[todo], -np.inf)
        k_add = int(min(F, add[todo].max()))
        if k_add < F:
            top = np.argpartition(-sc, k_add - 1, axis=1)[:, :k_add]
        else:
            top = np.broadcast_to(np.arange(F), (todo.size, F))
        # argpartition leaves the top k unordered: rank them, then keep each target's own number
        order = np.argsort(-np.take_along_axis(sc, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        rank_ok = np.take_along_axis(sc, top, axis=1) > -np.inf
        rank_ok &= np.arange(top.shape[1])[None, :] < add[todo][:, None]
        rows = np.repeat(todo, top.shape[1]).reshape(todo.size, -1)
        if prune and rounds < max_rounds // 2:
            # the working set keeps only the features in use: the ones left at zero go back to the candidates
            in_ws[todo] = W[todo] != 0
        in_ws[rows[rank_ok], top[rank_ok]] = True
        rounds += 1
        # solve the working-set problems of the targets that changed (the kernel gathers their Gram blocks)
        wid = in_ws[todo].sum(axis=1)
        kmax = int(wid.max())
        max_width = max(max_width, kmax)
        # column lists, padded with column 0 (masked out)
        cols = np.zeros((todo.size, kmax), dtype=np.int64)
        valid = np.arange(kmax)[None, :] < wid[:, None]
        r_idx, c_idx = np.nonzero(in_ws[todo])
        cols[valid] = c_idx
        bw = np.take_along_axis(b[todo], cols, axis=1) * valid
        gid = np.where(valid, col_group[cols], K)
        x0 = np.take_along_axis(W[todo], cols, axis=1) * valid
        x, it, conv = sgl_fista(
            design.As,
            cols,
            bw,
            gid,
            gw[todo],
            valid.astype(np.float64),
            wid,
            l1,
            max_iter,
            tol,
            x0=x0,
            n_threads=n_threads,
            split=split,
        )
        n_iter[todo] += it
        converged[todo] = conv
        Wt = np.zeros((todo.size, F))
        Wt[r_idx, c_idx] = x[valid]
        W[todo] = Wt
        # gradient of the full problems of the changed targets
        grad[todo] = gradient(design.Xs, design.As, cols, x, wid, b[todo], n_threads=n_threads, split=split)
    return ClusterFit(W / design.sd[None, :], n_iter, converged, rounds, max_width)
