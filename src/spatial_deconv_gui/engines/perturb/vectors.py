"""Vector field of a simulated shift (velocyto / CellOracle style).

For cell i with simulated shift d_i and its k nearest neighbours j on the embedding:

    rho_ij = corr(d_i, x_j - x_i)                      (Pearson over genes)
    P_ij   = exp(rho_ij / T) / sum_j exp(rho_ij / T)    (temperature T)
    v_i    = sum_j P_ij u_ij - sum_j Q_ij u_ij          (u_ij: unit vector from i to j on the embedding)

where Q is the null model: uniform (``1/k``, the transition with no information) or, with
``null='permuted'``, the transition computed from the shift with its genes shuffled. Vectors are then
smoothed on a regular grid (Gaussian weights) and the grid field is also sampled back at each cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import RunControl
from .ligands import kernel_sum


def _knn(points: np.ndarray, k: int) -> np.ndarray:
    try:
        from ..graphs import knn_indices

        return knn_indices(points, k)
    except ImportError:  # pragma: no cover - graphs.py is shared with other engines
        from scipy.spatial import cKDTree

        _, nb = cKDTree(points).query(points, k=k + 1)
        return nb[:, 1:]


def _corr_rows(X: np.ndarray, nb: np.ndarray, D: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """rho[r, j] = corr(D[r], X[nb[r, j]] - X[rows[r]]) for a block of cells."""
    diff = X[nb[rows]] - X[rows][:, None, :]  # b x k x g
    diff = diff - diff.mean(axis=2, keepdims=True)
    d = D[rows] - D[rows].mean(axis=1, keepdims=True)  # b x g
    num = np.einsum("bkg,bg->bk", diff, d)
    den = np.sqrt(np.einsum("bkg,bkg->bk", diff, diff) * np.einsum("bg,bg->b", d, d)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / den, 0.0)
    return rho


@dataclass
class VectorField:
    cell_vectors: np.ndarray  # n x 2
    grid_points: np.ndarray  # G x 2
    grid_vectors: np.ndarray  # G x 2 (NaN where too few cells)
    cell_grid_vectors: np.ndarray  # n x 2, the smoothed field sampled at each cell
    params: dict


def transition_vectors(
    X: np.ndarray,
    delta: np.ndarray,
    embedding: np.ndarray,
    k: int = 30,
    temperature: float = 0.05,
    null: str = "uniform",
    seed: int = 0,
    control: RunControl | None = None,
) -> np.ndarray:
    control = control or RunControl()
    if null not in ("uniform", "permuted"):
        raise ValueError("null must be 'uniform' or 'permuted'")
    E = np.asarray(embedding, dtype=np.float64)[:, :2]
    n = E.shape[0]
    k = int(min(k, n - 1))
    nb = _knn(E, k)
    vec = E[nb] - E[:, None, :]
    norm = np.linalg.norm(vec, axis=2, keepdims=True)
    unit = np.where(norm > 0, vec / np.where(norm > 0, norm, 1.0), 0.0)
    moving = np.any(delta != 0, axis=1)
    rng = np.random.default_rng(seed)
    Dn = None
    if null == "permuted":
        Dn = np.take_along_axis(delta, rng.permuted(np.tile(np.arange(delta.shape[1]), (n, 1)), axis=1), axis=1)
    out = np.zeros((n, 2))
    block = max(1, int(4_000_000 // max(k * X.shape[1], 1)))
    for s in range(0, n, block):
        control.check_cancel()
        rows = np.arange(s, min(n, s + block))
        rho = _corr_rows(X, nb, delta, rows)
        P = np.exp((rho - rho.max(axis=1, keepdims=True)) / temperature)
        P /= P.sum(axis=1, keepdims=True)
        v = np.einsum("bk,bkd->bd", P, unit[rows])
        if Dn is None:
            v -= unit[rows].mean(axis=1)
        else:
            rn = _corr_rows(X, nb, Dn, rows)
            Q = np.exp((rn - rn.max(axis=1, keepdims=True)) / temperature)
            Q /= Q.sum(axis=1, keepdims=True)
            v -= np.einsum("bk,bkd->bd", Q, unit[rows])
        out[rows] = v
        control.report("vectors", min(1.0, (s + block) / n), "")
    out[~moving] = 0.0
    return out


def grid_smooth(
    embedding: np.ndarray, vectors: np.ndarray, n_grid: int = 40, smooth: float = 0.8, min_mass: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid points, grid vectors with NaN where the cell mass is low, smoothed field at each cell)."""
    E = np.asarray(embedding, dtype=np.float64)[:, :2]
    lo, hi = E.min(0), E.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    step = float(span.max()) / max(n_grid - 1, 1)
    nx = np.maximum(np.ceil(span / step).astype(int) + 1, 2)
    gx = lo[0] + step * np.arange(nx[0])
    gy = lo[1] + step * np.arange(nx[1])
    G = np.stack(np.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    sigma = smooth * step
    vals = np.hstack([vectors, np.ones((E.shape[0], 1))])
    acc = kernel_sum(G, E, vals, sigma)
    mass = acc[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        gv = acc[:, :2] / mass[:, None]
    gv[mass < min_mass * mass.max()] = np.nan
    # the smoothed field at each cell: bilinear interpolation of the grid sums (no N x N work)
    acc3 = acc.reshape(nx[0], nx[1], 3)
    rel = (E - lo) / step
    i0 = np.clip(np.floor(rel).astype(int), 0, nx - 2)
    f = rel - i0
    accc = (
        (1 - f[:, :1]) * (1 - f[:, 1:]) * acc3[i0[:, 0], i0[:, 1]]
        + f[:, :1] * (1 - f[:, 1:]) * acc3[i0[:, 0] + 1, i0[:, 1]]
        + (1 - f[:, :1]) * f[:, 1:] * acc3[i0[:, 0], i0[:, 1] + 1]
        + f[:, :1] * f[:, 1:] * acc3[i0[:, 0] + 1, i0[:, 1] + 1]
    )
    cv = accc[:, :2] / np.maximum(accc[:, 2:3], 1e-300)
    return G, gv, cv


def vector_field(
    X,
    delta,
    embedding,
    k: int = 30,
    temperature: float = 0.05,
    null: str = "uniform",
    n_grid: int = 40,
    smooth: float = 0.8,
    seed: int = 0,
    control: RunControl | None = None,
) -> VectorField:
    v = transition_vectors(X, delta, embedding, k=k, temperature=temperature, null=null, seed=seed, control=control)
    G, gv, cv = grid_smooth(embedding, v, n_grid=n_grid, smooth=smooth)
    return VectorField(
        v, G, gv, cv, {"k": k, "temperature": temperature, "null": null, "n_grid": n_grid, "smooth": smooth}
    )
