"""Array-level flash fit: gene selection → transform + gene weights → spatial graph → λ → BCD.

The spatial counts stay in their CSR form throughout: the selected genes, the transform and the gene
weights are applied inside one streaming pass that produces only H = Ỹ X̃ᵀ (spots × types) and the
per-spot ‖ỹ_i‖², so memory is linear in the number of spots and the matrix is never copied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import graphs
from . import _kernels as K
from .config import FlashConfig, validate_config
from .genes import leverage_scores, reference_markers, spatial_hvg
from .representation import countsketch, expected_weights
from .solver import IterationReporter, SolveInfo, auto_lambda, bcd_solve, normalize

_PREPROCESS_CODE = {"log_cpm": K.LOG_CPM, "pearson": K.PEARSON, "raw": K.RAW}
_PEARSON_THETA = 100.0
PERMUTE_MIN_SPOTS = 4 * K.CHUNK  # below this the whole problem sits in cache: no reordering


@dataclass
class FlashFit:
    beta: np.ndarray  # fitted spots x types, raw abundances
    proportions: np.ndarray  # rows normalised to one
    rows: np.ndarray  # which input spots were fitted
    gene_idx: np.ndarray  # selected genes (columns of X)
    gene_weights: np.ndarray | None  # expected weights (None for the random CountSketch)
    leverage: np.ndarray
    lambda_used: float
    rho_used: float
    info: SolveInfo
    adjacency: sp.csr_matrix
    H: np.ndarray
    G: np.ndarray
    yty: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        i = self.info
        return {
            "lambda_used": self.lambda_used,
            "rho_used": self.rho_used,
            "n_iter": i.n_iter,
            "converged": bool(i.converged),
            "final_change": i.final_change,
            "objective": i.objective,
            "objective_history": np.array(i.objective_history, dtype=np.float64).reshape(-1, 2),  # (iteration, value)
            "n_genes_used": int(self.gene_idx.size),
            "n_spots_fitted": int(self.rows.size),
            "mean_neighbors": float(np.diff(self.adjacency.indptr).mean()) if self.rows.size else 0.0,
            "timings_s": dict(self.timings),
        }


def _as_csr(Y) -> sp.csr_matrix:
    Y = Y.tocsr() if sp.issparse(Y) else sp.csr_matrix(np.asarray(Y))
    if Y.data.dtype not in (np.int32, np.int64, np.float32, np.float64):
        Y = sp.csr_matrix((Y.data.astype(np.float64), Y.indices, Y.indptr), shape=Y.shape)
    return Y


def _check_values(name: str, values: np.ndarray):
    if values.size == 0:
        return
    lo, hi = values.min(), values.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < 0:
        raise ValueError(f"{name} contains negative values; counts and signatures must be non-negative")


def _select_genes(Y, colmap, rows, X, cfg: FlashConfig) -> np.ndarray:
    n_cols = X.shape[1]
    hvg = (
        spatial_hvg(Y.indptr, Y.indices, Y.data, colmap, rows, n_cols, cfg.n_hvg)
        if cfg.n_hvg > 0
        else np.empty(0, dtype=np.intp)
    )
    markers = reference_markers(X, cfg.n_markers_per_type)
    idx = np.union1d(hvg, markers).astype(np.intp)
    if idx.size == 0:
        raise ValueError("no genes selected: increase n_hvg or n_markers_per_type")
    return idx


def fit_arrays(
    Y,
    X: np.ndarray,
    coords,
    config: FlashConfig = FlashConfig(),
    *,
    colmap: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    gene_idx: np.ndarray | None = None,
    gene_weights: np.ndarray | None = None,
    lambda_: float | None = None,
    adjacency=None,
    control=None,
    cell_types: list[str] | None = None,
    spot_index: np.ndarray | None = None,
    beta0: np.ndarray | None = None,
) -> FlashFit:
    """Fit spots ``rows`` of ``Y`` (spots × genes, CSR or dense; default all) on signatures ``X`` (types × genes).

    ``colmap[j]`` is the column of ``X`` that column j of ``Y`` holds (−1: not shared); by default the
    columns coincide. ``gene_idx`` / ``gene_weights`` / ``lambda_`` / ``adjacency`` override the engine's
    own choices (to reproduce another run exactly). ``coords`` has one row per spot of ``Y``. ``beta0`` (one row
    per fitted spot) starts the solver from an earlier fit instead of uniform weights.
    """
    problems = validate_config(config)
    if problems:
        raise ValueError("; ".join(problems))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    Y = _as_csr(Y)
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    n_all = Y.shape[0]
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[0] != n_all:
        raise ValueError(f"coords must have one row per spot ({n_all}), got shape {coords.shape}")
    if colmap is None:
        if Y.shape[1] != X.shape[1]:
            raise ValueError(f"Y has {Y.shape[1]} genes but X has {X.shape[1]}: pass colmap or align them")
        colmap = np.arange(Y.shape[1], dtype=np.int64)
    colmap = np.ascontiguousarray(colmap, dtype=np.int64)
    rows = np.arange(n_all, dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    if X.shape[0] == 0:
        raise ValueError("the reference has no cell types")
    _check_values("spatial counts", Y.data)
    _check_values("reference signatures", X)
    report = control.report if control is not None else (lambda *a, **k: None)
    check = control.check_cancel if control is not None else (lambda: None)

    # 1. genes
    report("genes", 0.0, "selecting genes")
    if gene_idx is None:
        gene_idx = _select_genes(Y, colmap, rows, X, config)
    gene_idx = np.asarray(gene_idx, dtype=np.intp)
    Xs = X[:, gene_idx]
    lev = leverage_scores(Xs)
    P = gene_idx.size
    pos = np.full(X.shape[1], -1, dtype=np.int64)
    pos[gene_idx] = np.arange(P)
    selmap = np.where(colmap >= 0, pos[np.maximum(colmap, 0)], -1).astype(np.int64)
    timings["genes"] = time.perf_counter() - t0
    check()

    # 2. transform, gene representation and the one pass over Y
    report("transform", 0.0, f"{P} genes, {config.preprocess}, {config.gene_weighting} weighting")
    t1 = time.perf_counter()
    mode = _PREPROCESS_CODE[config.preprocess]
    n = rows.size
    lib = np.ones(n)
    col_scale = np.ones(P)
    if config.preprocess == "log_cpm":
        lib = K.row_sums(Y.indptr, Y.indices, Y.data, selmap, rows)
        lib[lib == 0] = 1.0
        Xt = np.log1p(Xs / (Xs.sum(axis=1, keepdims=True) + 1e-10) * 1e4)
    elif config.preprocess == "pearson":
        m = K.column_sums(Y.indptr, Y.indices, Y.data, selmap, rows, P) / max(n, 1) + 1e-6
        col_scale = 1.0 / np.sqrt(m + m * m / _PEARSON_THETA)
        mx = Xs.mean(axis=0, keepdims=True) + 1e-6
        Xt = Xs / np.sqrt(mx + mx * mx / _PEARSON_THETA)
    else:
        Xt = Xs.copy()
    empty_i = np.zeros(1, dtype=np.int64)
    empty_f = np.zeros(1)
    if config.gene_weighting == "expected":
        if gene_weights is None:
            gene_weights = expected_weights(lev, P, config.sketch_dim)
        w = np.asarray(gene_weights, dtype=np.float64)
        Xrep = Xt * w[None, :]
        B = np.ascontiguousarray(Xrep.T)
        H, yty = K.project(Y.indptr, Y.indices, Y.data, selmap, rows, mode, lib, col_scale, w, B, empty_i, empty_f, 0)
    else:
        bucket, value = countsketch(lev, P, config.sketch_dim, config.seed)
        Xrep = np.zeros((X.shape[0], config.sketch_dim))
        np.add.at(Xrep.T, bucket, (Xt * value[None, :]).T)  # X̃ Ω
        B = np.ascontiguousarray(value[:, None] * Xrep.T[bucket])  # Ω (X̃ Ω)ᵀ
        H, yty = K.project(
            Y.indptr,
            Y.indices,
            Y.data,
            selmap,
            rows,
            mode,
            lib,
            col_scale,
            np.ones(P),
            B,
            bucket,
            value,
            config.sketch_dim,
        )
        gene_weights = None
    G = Xrep @ Xrep.T
    timings["transform"] = time.perf_counter() - t1
    check()

    # 3. graph
    t2 = time.perf_counter()
    report("graph", 0.0, f"{config.spatial_method} graph")
    if adjacency is None:
        adjacency = graphs.spatial_graph(coords[rows], config.spatial_method, config.k_neighbors, config.radius)
    adjacency = sp.csr_matrix(adjacency)
    timings["graph"] = time.perf_counter() - t2
    check()

    # 4. penalties and solve
    t3 = time.perf_counter()
    if lambda_ is None:
        lambda_ = config.lambda_value()
    lam = auto_lambda(G, adjacency) if lambda_ is None else float(lambda_)
    rho_abs = float(config.rho_sparsity * np.mean(np.diag(G)))
    on_iter = None
    if control is not None:
        types = list(cell_types) if cell_types is not None else [str(k) for k in range(X.shape[0])]
        on_iter = IterationReporter(
            control, config.max_iter, config.tol, rows if spot_index is None else spot_index, types
        )
    report("solve", 0.0, f"λ = {lam:.4g}, ρ = {rho_abs:.4g}")
    # The Jacobi sweep is order independent: run it on spots laid out in raster strips so that neighbours
    # are near in memory (slides often list spots in an order with no locality at all). The graph itself is
    # built in input order, so kNN ties are still broken by the input index.
    perm = graphs.locality_order(coords[rows]) if rows.size > PERMUTE_MIN_SPOTS else None
    if perm is not None:
        if on_iter is not None:
            on_iter.spot_index = np.asarray(on_iter.spot_index)[perm]
        beta_p, info = bcd_solve(
            H[perm],
            G,
            yty[perm],
            adjacency[perm][:, perm],
            lam,
            rho_abs,
            config.max_iter,
            config.tol,
            beta0=None if beta0 is None else np.asarray(beta0)[perm],
            objective_every=config.objective_every,
            on_iter=on_iter,
        )
        beta = np.empty_like(beta_p)
        beta[perm] = beta_p
        del beta_p
    else:
        beta, info = bcd_solve(
            H,
            G,
            yty,
            adjacency,
            lam,
            rho_abs,
            config.max_iter,
            config.tol,
            beta0=beta0,
            objective_every=config.objective_every,
            on_iter=on_iter,
        )
    timings["solve"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    report("solve", 1.0, f"{'converged' if info.converged else 'stopped'} after {info.n_iter} iterations")
    return FlashFit(
        beta, normalize(beta), rows, gene_idx, gene_weights, lev, lam, rho_abs, info, adjacency, H, G, yty, timings
    )
