"""Block coordinate descent for the graph-regularised, L1-penalised non-negative least squares problem

    min_{β ≥ 0}  ½‖Y − βX‖²_F + ½λ Tr(βᵀLβ) + ρ‖β‖₁ ,   L = D − A,

written in terms of H = Y Xᵀ (spots × types), G = X Xᵀ and ‖y_i‖² only, so Y is read once (by the caller).

Each iteration updates every spot from the previous iterate of its neighbours (Jacobi across spots: the
result does not depend on the thread schedule) with one Gauss–Seidel pass over the types within the spot.
The splitting satisfies M + Mᵀ − Q = diag(G) ⊗ I + λ (D + A) ⊗ I ⪰ 0 (D + A is the signless Laplacian), so
the objective never increases. The run stops when max |Δβ| / max |β_old| < tol.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from . import _kernels as K

REFRESH_EVERY = 25  # recompute G β from scratch this often (bounds rounding drift of the carried products)


@dataclass
class SolveInfo:
    converged: bool
    n_iter: int
    final_change: float
    objective: float
    objective_history: list[tuple[int, float]] = field(default_factory=list)
    lambda_used: float = 0.0
    rho_used: float = 0.0


def auto_lambda(G: np.ndarray, adjacency: sp.spmatrix, alpha: float = 0.005) -> float:
    """FlashDeconv's automatic λ: λ · mean degree = α · mean(diag G) (α = 0.005)."""
    deg = np.diff(sp.csr_matrix(adjacency).indptr)
    mean_deg = float(deg.mean()) if deg.size else 0.0
    return float(alpha * np.mean(np.diag(G)) / max(mean_deg, 1.0))


def objective(H, G, yty, beta, nbr_ptr, nbr_idx, lam: float, rho_abs: float) -> tuple[float, float, float, float]:
    """(total, fit, Tr(βᵀLβ), ‖β‖₁) with total = fit + ½λ·Tr + ρ‖β‖₁."""
    fit, lap, l1 = K.objective_terms(H, G, yty, beta, nbr_ptr, nbr_idx)
    return float(fit + 0.5 * lam * lap + rho_abs * l1), float(fit), float(lap), float(l1)


def kkt_residual(H, G, beta, adjacency, lam: float, rho_abs: float) -> np.ndarray:
    """Projected gradient of the objective: 0 at a KKT point (min(β, ∇) elementwise for β ≥ 0)."""
    A = sp.csr_matrix(adjacency)
    deg = np.diff(A.indptr).astype(np.float64)
    grad = -H + beta @ G + lam * (deg[:, None] * beta - A @ beta) + rho_abs
    return np.where(beta > 0, grad, np.minimum(grad, 0.0))


def normalize(beta: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to one; an all-zero row becomes uniform."""
    s = beta.sum(axis=1, keepdims=True)
    out = beta / np.maximum(s, 1e-10)
    zero = s[:, 0] == 0
    if zero.any():
        out[zero] = 1.0 / beta.shape[1]
    return out


def bcd_solve(
    H: np.ndarray,
    G: np.ndarray,
    yty: np.ndarray,
    adjacency: sp.spmatrix,
    lam: float,
    rho_abs: float,
    max_iter: int = 1000,
    tol: float = 1e-4,
    beta0: np.ndarray | None = None,
    objective_every: int = 10,
    on_iter: Callable[[int, float, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, SolveInfo]:
    """Solve from uniform 1/K (or ``beta0``); ``on_iter(it, rel_change, beta)`` runs between iterations
    (progress, cancellation: it may raise). The objective history holds every ``objective_every``-th iterate
    and the last (0: no history; the final value is always in ``SolveInfo.objective``)."""
    n, k = H.shape
    H = np.ascontiguousarray(H, dtype=np.float64)
    G = np.ascontiguousarray(G, dtype=np.float64)
    yty = np.ascontiguousarray(yty, dtype=np.float64)
    A = sp.csr_matrix(adjacency)
    ptr = A.indptr.astype(np.int64)
    idx = A.indices.astype(np.int64)
    if n == 0 or k == 0:
        return np.zeros((n, k)), SolveInfo(True, 0, 0.0, 0.0, [], lam, rho_abs)
    if beta0 is None:
        a = np.full((n, k), 1.0 / k)
    else:
        a = np.maximum(np.array(beta0, dtype=np.float64), 0.0)
        if a.shape != (n, k):
            raise ValueError(f"beta0 has shape {a.shape}, expected {(n, k)}")
    b = np.empty_like(a)
    nc = K.n_chunks(n)
    cdiff = np.zeros(nc)
    cabs = np.zeros(nc)
    cobj = np.zeros((nc, 3))
    R = np.empty_like(a)  # r = G β_i per spot, carried between sweeps
    sweep = K.bcd_sweep if nc > 1 else K.bcd_sweep_serial
    history: list[tuple[int, float]] = []
    converged = False
    rel = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        # the sweep also evaluates the objective of its input iterate (it - 1) when asked, almost for free
        want = objective_every > 0 and (it - 1) % objective_every == 0
        refresh = (it - 1) % REFRESH_EVERY == 0
        sweep(H, G, yty, a, b, R, refresh, ptr, idx, float(lam), float(rho_abs), cdiff, cabs, cobj, want)
        if want:
            fit, lap, l1 = cobj.sum(axis=0)
            history.append((it - 1, float(fit + 0.5 * lam * lap + rho_abs * l1)))
        rel = float(cdiff.max() / (cabs.max() + 1e-10))
        a, b = b, a
        converged = rel < tol
        if on_iter is not None:
            on_iter(it, rel, a)
        if converged:
            break
    final = objective(H, G, yty, a, ptr, idx, lam, rho_abs)[0]
    if objective_every > 0 and (not history or history[-1][0] != it):
        history.append((it, final))
    return a, SolveInfo(converged, it, rel, final, history, float(lam), float(rho_abs))


class IterationReporter:
    """Progress (log-scale distance to ``tol``), cancellation and throttled partial maps for a RunControl."""

    def __init__(
        self,
        control,
        max_iter: int,
        tol: float,
        spot_index: np.ndarray,
        cell_types: list[str],
        partial_every_s: float = 2.0,
    ):
        from ..base import PartialResult  # local: keep this module free of engine contracts

        self._partial_cls = PartialResult
        self.control = control
        self.max_iter = max(max_iter, 1)
        self.tol = tol
        self.spot_index = spot_index
        self.cell_types = cell_types
        self.partial_every_s = partial_every_s
        self._first: float | None = None
        self._best = 0.0
        self._last_partial = time.monotonic()
        self._wants_partial = getattr(control, "_callback", None) is not None

    def __call__(self, it: int, rel: float, beta: np.ndarray):
        c = self.control
        c.check_cancel()
        if self._first is None:
            self._first = max(rel, self.tol * 10)
        frac = it / self.max_iter
        if rel > 0 and math.isfinite(rel):
            span = math.log(self._first / self.tol)
            if span > 0:
                frac = max(frac, min(1.0, math.log(self._first / max(rel, self.tol)) / span))
        self._best = max(self._best, min(frac, 0.99))
        partial = None
        now = time.monotonic()
        if self._wants_partial and now - self._last_partial >= self.partial_every_s:
            self._last_partial = now
            partial = self._partial_cls(self.spot_index, normalize(beta), list(self.cell_types))
        c.report("solve", self._best, f"iteration {it}: relative change {rel:.2e}", partial=partial)
