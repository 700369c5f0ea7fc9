"""Cluster-wise MAGIC-style imputation: diffuse expression over a kNN graph built within each cluster.

Per cluster: PCA of the (log-normalised) expression, k nearest neighbours in PC space, an adaptive Gaussian
affinity (bandwidth = distance to the ``ka``-th neighbour, MAGIC's alpha-decay simplified to a Gaussian),
symmetrised and row-normalised into a Markov matrix M, and the smoothed expression ``M^t X``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..base import RunControl


def _pca(X: np.ndarray, n_pcs: int) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    k = max(1, min(n_pcs, min(Xc.shape) - 1))
    if k >= min(Xc.shape):
        return Xc
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    return U[:, :k] * S[:k]


def markov_matrix(points: np.ndarray, k: int = 15, ka: int = 5) -> sp.csr_matrix:
    from ..graphs import knn_indices

    n = points.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return sp.identity(n, format="csr")
    nb = np.hstack([np.arange(n)[:, None], knn_indices(points, k)])  # self first, then k neighbours
    d = np.linalg.norm(points[nb] - points[:, None, :], axis=2)
    sigma = np.maximum(d[:, min(ka, k)], 1e-12)
    w = np.exp(-((d / sigma[:, None]) ** 2))
    rows = np.repeat(np.arange(n), k + 1)
    A = sp.csr_matrix((w.ravel(), (rows, nb.ravel())), shape=(n, n))
    A = A + A.T
    deg = np.asarray(A.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.maximum(deg, 1e-300)) @ A


def impute_clusterwise(
    X, clusters, k: int = 15, ka: int = 5, t: int = 3, n_pcs: int = 20, control: RunControl | None = None
) -> np.ndarray:
    """Smoothed copy of ``X`` (cells x genes, dense or sparse), diffusing only within each cluster."""
    control = control or RunControl()
    Xd = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    out = np.empty_like(Xd, dtype=np.float64)
    labels = np.asarray(clusters).astype(str)
    names = np.unique(labels)
    for i, c in enumerate(names):
        control.check_cancel()
        idx = np.flatnonzero(labels == c)
        Xc = Xd[idx]
        if idx.size < 3:
            out[idx] = Xc
            continue
        M = markov_matrix(_pca(Xc, n_pcs), k=k, ka=ka)
        Y = Xc
        for _ in range(t):
            Y = M @ Y
        out[idx] = Y
        control.report("imputation", (i + 1) / len(names), str(c))
    return out
