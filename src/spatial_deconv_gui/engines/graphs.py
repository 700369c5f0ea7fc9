"""Spatial neighbour graphs shared by the engines (kNN, radius, grid), their Laplacian and Dirichlet energy.

All builders return a symmetric binary ``scipy.sparse.csr_matrix`` adjacency without self loops, for 2-D or
3-D coordinates. The kNN graph is a function of the coordinates alone: equidistant candidates at the k-th
distance are ranked by spot index, so the tree traversal order (which differs across platforms) never
decides which neighbour is kept.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

GraphMethod = Literal["knn", "radius", "grid"]
GRAPH_METHODS: tuple[str, ...] = ("knn", "radius", "grid")


def _as_coords(coords) -> np.ndarray:
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"coordinates must be a 2-D array (spots x dims), got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("coordinates contain NaN or infinite values")
    return c


def _symmetric(rows: np.ndarray, cols: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary symmetric adjacency from directed edges (duplicates and self loops dropped)."""
    keep = rows != cols
    r = np.concatenate([rows[keep], cols[keep]]).astype(np.int64, copy=False)
    c = np.concatenate([cols[keep], rows[keep]]).astype(np.int64, copy=False)
    a = sp.csr_matrix((np.ones(r.size, dtype=np.float64), (r, c)), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1.0
    a.sort_indices()
    return a


def knn_indices(coords, k: int) -> np.ndarray:
    """``(n, k)`` indices of each spot's k nearest other spots; ties ranked by (distance, index)."""
    c = _as_coords(coords)
    n = c.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, n_spots - 1] = [1, {n - 1}], got {k}")
    tree = cKDTree(c)
    out = np.empty((n, k), dtype=np.int64)
    pending = np.arange(n)
    m = min(k + 4, n)  # spares: the spot itself, and the ties of square and hexagonal lattices
    while pending.size:
        # query in slices so that the (rows x m) work arrays stay small on million-spot slides
        unresolved = []
        for s in range(0, pending.size, 262144):
            idx = pending[s : s + 262144]
            dist, nb = tree.query(c[idx], k=m)
            dist = np.asarray(dist).reshape(idx.size, m)
            nb = np.asarray(nb).reshape(idx.size, m).astype(np.int64, copy=False)
            dist = np.where(nb == idx[:, None], np.inf, dist)  # the spot itself never counts
            order = np.lexsort((nb, dist), axis=-1)
            dist = np.take_along_axis(dist, order, axis=1)
            nb = np.take_along_axis(nb, order, axis=1)
            # every candidate tied with the k-th distance was seen when a farther one was returned too
            done = (m == n) | (dist[:, m - 2] > dist[:, k - 1])
            out[idx[done]] = nb[done, :k]
            unresolved.append(idx[~done])
        pending = np.concatenate(unresolved) if unresolved else np.empty(0, dtype=np.int64)
        m = min(2 * m, n)
    return out


def knn_graph(coords, k: int = 6) -> sp.csr_matrix:
    """Symmetrised k-nearest-neighbour graph (an edge when either spot lists the other)."""
    c = _as_coords(coords)
    n = c.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return sp.csr_matrix((n, n), dtype=np.float64)
    nb = knn_indices(c, k)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    return _symmetric(rows, nb.ravel(), n)


def radius_graph(coords, radius: float) -> sp.csr_matrix:
    """Every pair of spots closer than ``radius`` (inclusive)."""
    if radius is None or not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    c = _as_coords(coords)
    n = c.shape[0]
    pairs = cKDTree(c).query_pairs(r=float(radius), output_type="ndarray")
    if len(pairs) == 0:
        return sp.csr_matrix((n, n), dtype=np.float64)
    return _symmetric(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), n)


def grid_graph(coords, spacing: float | None = None) -> sp.csr_matrix:
    """Lattice neighbours (hexagonal or square): a radius graph at 1.5x the grid spacing.

    The spacing is the median nearest-neighbour distance when not given.
    """
    c = _as_coords(coords)
    n = c.shape[0]
    if n <= 1:
        return sp.csr_matrix((n, n), dtype=np.float64)
    if spacing is None:
        d, _ = cKDTree(c).query(c, k=2)
        spacing = float(np.median(d[:, 1]))
    if not spacing > 0:
        raise ValueError("grid spacing is zero: duplicated coordinates?")
    return radius_graph(c, 1.5 * spacing)


def spatial_graph(coords, method: str = "knn", k: int = 6, radius: float | None = None) -> sp.csr_matrix:
    """Dispatch to :func:`knn_graph`, :func:`radius_graph` or :func:`grid_graph`."""
    if method == "knn":
        if k < 0:
            raise ValueError(f"k must be non-negative, got {k}")
        return knn_graph(coords, k)
    if method == "radius":
        if radius is None:
            raise ValueError("spatial method 'radius' needs a radius")
        return radius_graph(coords, radius)
    if method == "grid":
        return grid_graph(coords)
    raise ValueError(f"unknown spatial graph method {method!r}: use one of {', '.join(GRAPH_METHODS)}")


def laplacian(adjacency: sp.spmatrix) -> sp.csr_matrix:
    """Unnormalised graph Laplacian L = D - A."""
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    deg = np.asarray(a.sum(axis=1)).ravel()
    return (sp.diags(deg) - a).tocsr()


def dirichlet_energy(values: np.ndarray, adjacency: sp.spmatrix) -> float:
    """Tr(Vᵀ L V) = ½ Σ_ij A_ij ‖v_i − v_j‖², the roughness of a map over the graph."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    deg = np.asarray(a.sum(axis=1)).ravel()
    return float(np.sum(deg[:, None] * v * v) - np.sum(v * (a @ v)))


def _spread2(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    for shift, mask in (
        (16, 0x0000FFFF0000FFFF),
        (8, 0x00FF00FF00FF00FF),
        (4, 0x0F0F0F0F0F0F0F0F),
        (2, 0x3333333333333333),
        (1, 0x5555555555555555),
    ):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def _spread3(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64) & np.uint64(0x1FFFFF)
    for shift, mask in (
        (32, 0x1F00000000FFFF),
        (16, 0x1F0000FF0000FF),
        (8, 0x100F00F00F00F00F),
        (4, 0x10C30C30C30C30C3),
        (2, 0x1249249249249249),
    ):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def locality_order(coords, kind: str = "strips") -> np.ndarray:
    """A permutation of the spots that puts graph neighbours close in memory, for order-independent
    (Jacobi) solvers. ``"strips"``: raster order over ~√n horizontal strips (layers for 3-D), so the
    neighbours of a spot lie in three sequential streams (prefetch friendly); ``"morton"``: Z-order curve."""
    c = _as_coords(coords)
    n, dim = c.shape
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if dim == 1:
        return np.argsort(c[:, 0], kind="stable").astype(np.int64)
    if dim > 3:
        return np.lexsort(c.T[::-1]).astype(np.int64)
    if kind == "strips":
        lo = c.min(axis=0)
        span = np.maximum(c.max(axis=0) - lo, 1e-300)
        per_axis = max(1, int(round(n ** (1.0 / dim))))
        keys = [c[:, 0]]
        for d in range(1, dim):
            keys.append(np.minimum(np.floor((c[:, d] - lo[d]) / span[d] * per_axis), per_axis - 1))
        return np.lexsort(keys).astype(np.int64)
    if kind != "morton":
        raise ValueError(f"unknown locality order {kind!r}: use 'strips' or 'morton'")
    lo = c.min(axis=0)
    span = np.maximum(c.max(axis=0) - lo, 1e-300)
    levels = (1 << 20) - 1
    q = np.floor((c - lo) / span * levels).astype(np.int64)
    if dim == 2:
        code = _spread2(q[:, 0]) | (_spread2(q[:, 1]) << np.uint64(1))
    else:
        code = _spread3(q[:, 0]) | (_spread3(q[:, 1]) << np.uint64(1)) | (_spread3(q[:, 2]) << np.uint64(2))
    return np.argsort(code, kind="stable").astype(np.int64)
