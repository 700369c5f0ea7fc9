"""Batched iteratively-reweighted Newton solver for RCTD's per-pixel weights.

Each iteration, for every still-active problem: predict the expected counts from the current weights,
take the first/second derivatives of the log-likelihood (spline of the Poisson-lognormal table, or the
Gaussian-on-log loss of the bulk fit), build the gradient and Hessian, project the Hessian to PSD,
solve the bound-constrained Newton QP (weights stay non-negative) and move 30% of the way. A problem
stops when the L1 change of its weights drops to ``min_change`` (spacexr's convergence rule), and is
then dropped from the batch so later iterations only pay for the slow ones.

Two problem layouts share the loop: :class:`SharedDesign` (every problem uses the same type columns,
e.g. full mode: the Hessian is one GEMM against the pairwise products of profile columns) and
:class:`SubsetDesign` (each problem has its own few types, e.g. doublet pairs and multi-mode lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _kernels
from .likelihood import TorchTable

PSD_FLOOR = 1e-3
RIDGE = 1e-7
QP_TOL = 1e-13


def _use_numba(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# PSD projection + QP step
# ---------------------------------------------------------------------------------------------------


def newton_step_torch(hess: torch.Tensor, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Batched PSD projection + ``min 0.5 x'Dx - g'x s.t. x >= -w`` (exact active-set), on any device."""
    evals, evecs = torch.linalg.eigh(hess)
    floored = torch.clamp(evals, min=PSD_FLOOR)
    nf = floored.max(dim=-1).values
    D = (evecs * (floored / nf[:, None])[:, None, :]) @ evecs.transpose(-1, -2)
    k = grad.shape[-1]
    eye = torch.eye(k, dtype=hess.dtype, device=hess.device)
    D = D + RIDGE * eye
    lb = -torch.clamp(w, min=0.0)
    c = grad / nf[:, None] - (D @ lb[:, :, None])[..., 0]
    return nonneg_qp_torch(D, c) + lb


def _masked_solve(D: torch.Tensor, c: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    pair = free[:, :, None] & free[:, None, :]
    eye = torch.eye(D.shape[-1], dtype=D.dtype, device=D.device).expand_as(D)
    M = torch.where(pair, D, eye)  # identity rows/columns pin the bound variables at 0
    rhs = torch.where(free, c, torch.zeros_like(c))
    return torch.linalg.solve(M, rhs[..., None])[..., 0]


def nonneg_qp_torch(D: torch.Tensor, c: torch.Tensor, max_outer: int | None = None) -> torch.Tensor:
    """Exact ``argmin_{y>=0} 0.5 y'Dy - c'y`` for a batch of positive definite ``D`` (same algorithm as
    the numba kernel: free the most violating variable, solve on the free set, back off to the boundary
    and drop blocking variables when the solve is infeasible)."""
    B, k = c.shape
    y = torch.zeros_like(c)
    free = torch.zeros((B, k), dtype=torch.bool, device=c.device)
    done = torch.zeros(B, dtype=torch.bool, device=c.device)
    max_outer = max_outer or (3 * k + 5)
    for _ in range(max_outer):
        wneg = c - (D @ y[:, :, None])[..., 0]
        wneg = torch.where(free, torch.full_like(wneg, -torch.inf), wneg)
        best, jbest = wneg.max(dim=-1)
        done = done | (best <= QP_TOL)
        if bool(done.all()):
            break
        add = torch.nn.functional.one_hot(jbest, k).bool() & (~done)[:, None]
        free = free | add
        inner_active = ~done
        for _ in range(k + 1):
            s = _masked_solve(D, c, free)
            blocking = free & (s <= 0.0)
            den = y - s
            ratio = torch.where(
                blocking & (den > 0),
                y / torch.where(den > 0, den, torch.ones_like(den)),
                torch.where(blocking, torch.zeros_like(y), torch.full_like(y, 2.0)),
            )
            alpha = ratio.min(dim=-1).values
            ok = inner_active & (alpha >= 1.0)
            y = torch.where(ok[:, None], s, y)
            move = inner_active & ~ok
            if not bool(move.any()):
                break
            y_new = y + alpha[:, None] * (s - y)
            y = torch.where(move[:, None] & free, y_new, y)
            drop = move[:, None] & free & (y <= 1e-14)
            y = torch.where(drop, torch.zeros_like(y), y)
            free = free & ~drop
            inner_active = move & free.any(dim=-1)
            if not bool(inner_active.any()):
                break
    return y


def newton_step(hess: torch.Tensor, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if _use_numba(hess):
        out = np.empty(tuple(grad.shape), dtype=np.float64)
        _kernels.psd_qp_batch(
            np.ascontiguousarray(hess.detach().numpy()),
            np.ascontiguousarray(grad.numpy()),
            np.ascontiguousarray(w.numpy()),
            out,
        )
        return torch.from_numpy(out).to(grad.dtype)
    return newton_step_torch(hess, grad, w)


# ---------------------------------------------------------------------------------------------------
# problem layouts
# ---------------------------------------------------------------------------------------------------


class SharedDesign:
    """Problems that all use the profile matrix ``P`` (genes x K); problem b scales it by ``numi[b]``."""

    def __init__(self, P: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, table: TorchTable | None):
        self.P = P
        self.y = y
        self.numi = numi
        self.table = table
        k = P.shape[1]
        self.k = k
        iu, ju = torch.triu_indices(k, k, device=P.device)
        self.iu, self.ju = iu, ju
        self.PP = (P[:, iu] * P[:, ju]).contiguous()  # (G, K(K+1)/2)
        if P.device.type == "cpu":
            self._y_np = np.ascontiguousarray(y.numpy())
            self._u_np = np.ascontiguousarray(numi.numpy())

    def n_types(self) -> int:
        return self.k

    def derivatives(self, w: torch.Tensor, idx: torch.Tensor):
        if _use_numba(w):
            # fused prediction + spline on CPU; only the two GEMMs below stay in torch
            t = self.table
            mix = (torch.clamp(w, min=0.0) @ self.P.T).numpy()
            a = np.empty_like(mix)
            b = np.empty_like(mix)
            _kernels.shared_weights(
                mix, self._y_np, idx.numpy(), self._u_np, t.coef_np, t.x_np, t.mtab_np, t.n_int, t.x_max, t.k_cap, a, b
            )
            grad = torch.from_numpy(a) @ self.P
            htri = torch.from_numpy(b) @ self.PP
        else:
            y = self.y[idx]
            u = self.numi[idx]
            pred = (torch.clamp(w, min=0.0) @ self.P.T).abs() * u[:, None]
            thr = torch.clamp(u * 1e-7, min=1e-4)
            pred = torch.maximum(pred, thr[:, None])
            _, d1, d2 = self.table.derivatives(y, pred)
            grad = (d1 @ self.P) * u[:, None]
            htri = ((-d2) @ self.PP) * (u * u)[:, None]
        hess = torch.empty((w.shape[0], self.k, self.k), dtype=w.dtype, device=w.device)
        hess[:, self.iu, self.ju] = htri
        hess[:, self.ju, self.iu] = htri
        return grad, hess

    def score(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pred = (w @ self.P.T) * self.numi[idx][:, None]
        return _nll(self.table, self.y[idx], pred)


def _nll(table: TorchTable, y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    if _use_numba(pred):
        out = np.empty(pred.shape[0], dtype=np.float64)
        _kernels.spline_nll(
            y.numpy(),
            pred.numpy(),
            table.coef_np,
            table.x_np,
            table.mtab_np,
            table.n_int,
            table.x_max,
            table.k_cap,
            out,
        )
        return torch.from_numpy(out).to(pred.dtype)
    return table.neg_log_lik(y, pred)


class SubsetDesign:
    """Problem b fits pixel ``rows[b]`` (a row of ``y``) with the type columns ``types[b]`` of ``P``."""

    def __init__(
        self,
        P: torch.Tensor,
        y: torch.Tensor,
        numi: torch.Tensor,
        rows: torch.Tensor,
        types: torch.Tensor,
        table: TorchTable,
    ):
        self.P = P
        self.y = y
        self.numi_pix = numi
        self.rows = rows
        self.types = types
        self.table = table
        self.k = types.shape[1]

    def n_types(self) -> int:
        return self.k

    def _gathered(self, idx):
        # (B, G, k) profile columns per problem; only for the torch path
        return self.P[:, self.types[idx]].permute(1, 0, 2)

    def derivatives(self, w: torch.Tensor, idx: torch.Tensor):
        u = self.numi_pix[self.rows[idx]]
        if _use_numba(w):
            t = self.table
            B = w.shape[0]
            grad = np.empty((B, self.k))
            hess = np.empty((B, self.k, self.k))
            _kernels.subset_derivs(
                self.P.numpy(),
                self.types[idx].numpy(),
                w.numpy(),
                u.numpy(),
                self.y.numpy(),
                self.rows[idx].numpy(),
                t.coef_np,
                t.x_np,
                t.mtab_np,
                t.n_int,
                t.x_max,
                t.k_cap,
                grad,
                hess,
            )
            return torch.from_numpy(grad).to(w.dtype), torch.from_numpy(hess).to(w.dtype)
        S = self._gathered(idx)
        y = self.y[self.rows[idx]]
        pred = torch.einsum("bgk,bk->bg", S, torch.clamp(w, min=0.0)).abs() * u[:, None]
        thr = torch.clamp(u * 1e-7, min=1e-4)
        pred = torch.maximum(pred, thr[:, None])
        _, d1, d2 = self.table.derivatives(y, pred)
        grad = torch.einsum("bg,bgk->bk", d1, S) * u[:, None]
        hess = torch.einsum("bg,bgk,bgl->bkl", -d2, S, S) * (u * u)[:, None, None]
        return grad, hess

    def score(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        u = self.numi_pix[self.rows[idx]]
        if _use_numba(w):
            t = self.table
            out = np.empty(w.shape[0])
            _kernels.subset_nll(
                self.P.numpy(),
                self.types[idx].numpy(),
                w.numpy(),
                u.numpy(),
                self.y.numpy(),
                self.rows[idx].numpy(),
                t.coef_np,
                t.x_np,
                t.mtab_np,
                t.n_int,
                t.x_max,
                t.k_cap,
                out,
            )
            return torch.from_numpy(out).to(w.dtype)
        S = self._gathered(idx)
        pred = torch.einsum("bgk,bk->bg", S, w) * u[:, None]
        return self.table.neg_log_lik(self.y[self.rows[idx]], pred)


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class IRWLSResult:
    weights: torch.Tensor  # (B, K), not normalised
    converged: torch.Tensor  # (B,) bool
    n_iter: torch.Tensor  # (B,) iterations used


def solve_irwls(
    design,
    n_problems: int,
    n_iter: int = 50,
    min_change: float = 1e-3,
    step: float = 0.3,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> IRWLSResult:
    """Run the damped Newton iterations from uniform weights ``1/K`` until each problem converges."""
    k = design.n_types()
    w = torch.full((n_problems, k), 1.0 / k, dtype=dtype, device=device)
    converged = torch.zeros(n_problems, dtype=torch.bool, device=device)
    iters = torch.zeros(n_problems, dtype=torch.int32, device=device)
    active = torch.arange(n_problems, device=device)
    for _ in range(n_iter):
        if active.numel() == 0:
            break
        wa = w[active]
        grad, hess = design.derivatives(wa, active)
        delta = newton_step(hess, grad, wa).to(device)
        w_new = torch.clamp(wa, min=0.0) + step * delta
        change = (w_new - wa).abs().sum(dim=-1)
        w[active] = w_new
        iters[active] += 1
        done = change <= min_change
        converged[active[done]] = True
        active = active[~done]
    return IRWLSResult(w, converged, iters)
