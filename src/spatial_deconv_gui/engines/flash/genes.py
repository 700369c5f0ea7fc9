"""Gene selection for the flash engine: spatial HVGs ∪ reference markers, and reference leverage scores.

The rules are FlashDeconv's (v0.2.0) so that the same genes are chosen:

* HVGs: counts normalised to 10⁴ per spot and log1p'd; per-gene mean and sample variance; variances
  z-scored within 20 quantile bins of the (positive) means; genes with mean in [0.0125, 3] and z ≥ 0.5
  ranked by z, or, when fewer than ``n_top`` pass, the top ``n_top`` by z with no filter.
* Markers: on the row-normalised signature matrix, each gene belongs to the type where it is highest and
  is scored by (highest − second highest); each type keeps its ``n`` best genes (or, owning none, its
  ``n`` most expressed).
* Leverage: row norms of the left singular vectors of the type-centred signatures (genes × types),
  weighted by s²/(s² + 1e-6), normalised to sum to one.

Ties are always broken by ascending gene index (stable sorts), so the choice is platform independent.
"""

from __future__ import annotations

import numpy as np

from . import _kernels as K


def _desc(values: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")


def hvg_from_moments(
    mean: np.ndarray,
    var: np.ndarray,
    n_top: int,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
) -> np.ndarray:
    """Sorted indices of the ``n_top`` most variable genes given log-normalised means and variances."""
    n_genes = mean.size
    disp = np.zeros(n_genes)
    positive = mean[mean > 0]
    if positive.size >= 2:
        edges = np.unique(np.percentile(positive, np.linspace(0, 100, 21)))
        if edges.size >= 2:
            which = np.clip(np.digitize(mean, edges) - 1, 0, edges.size - 2)
            for b in range(edges.size - 1):
                members = which == b
                if members.sum() > 1:
                    v = var[members]
                    disp[members] = (v - v.mean()) / (v.std() + 1e-10)
    ok = np.flatnonzero((mean >= min_mean) & (mean <= max_mean) & (disp >= min_disp))
    if ok.size < n_top:
        chosen = _desc(disp)[:n_top]
    else:
        chosen = ok[_desc(disp[ok])[:n_top]]
    return np.sort(chosen)


def spatial_hvg(indptr, indices, data, colmap, rows, n_cols: int, n_top: int) -> np.ndarray:
    """HVGs of the spots ``rows`` over the columns mapped by ``colmap`` (indices into 0..n_cols-1)."""
    n = rows.size
    lib = K.row_sums(indptr, indices, data, colmap, rows)
    s1, s2 = K.lognorm_column_moments(indptr, indices, data, colmap, rows, lib, n_cols)
    mean = s1 / n
    if n >= 2:
        var = np.maximum(n / (n - 1) * (s2 / n - mean**2), 0.0)
    else:
        var = np.zeros(n_cols)
    return hvg_from_moments(mean, var, n_top)


def reference_markers(X: np.ndarray, n_per_type: int) -> np.ndarray:
    """Union of each type's ``n_per_type`` most specific genes (indices into the columns of ``X``)."""
    n_types, n_genes = X.shape
    if n_per_type <= 0 or n_types == 0:
        return np.empty(0, dtype=np.intp)
    rel = X / (X.sum(axis=1, keepdims=True) + 1e-10)
    if n_types == 1:
        return np.arange(min(n_per_type, n_genes))
    top2 = np.sort(rel, axis=0)[::-1][:2]
    specificity = top2[0] - top2[1]
    owner = np.argmax(rel, axis=0)
    picked = []
    for k in range(n_types):
        own = np.flatnonzero(owner == k)
        if own.size:
            picked.append(own[_desc(specificity[own])[:n_per_type]])
        else:
            picked.append(_desc(rel[k])[:n_per_type])
    return np.unique(np.concatenate(picked))


def leverage_scores(X: np.ndarray, reg: float = 1e-6) -> np.ndarray:
    """Per-gene leverage in the type-centred signature matrix (sums to ~1)."""
    Xc = X - X.mean(axis=0, keepdims=True)
    try:
        U, s, _ = np.linalg.svd(Xc.T, full_matrices=False)
    except np.linalg.LinAlgError:
        v = np.var(X, axis=0)
        return v / (v.sum() + reg)
    r = min(X.shape[0], X.shape[1], s.size)
    w = s[:r] ** 2 / (s[:r] ** 2 + reg)
    lev = (U[:, :r] ** 2) @ w
    return lev / (lev.sum() + reg)
