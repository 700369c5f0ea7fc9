"""Batched sparse group lasso by FISTA (with adaptive restart and backtracking), in Gram form.

Every problem b (one cell cluster x one target gene) is

    min_w  1/(2 n_b) * || y_c - X_c w ||^2  +  sum_g lambda_g ||w_g||_2  +  l1 * ||w||_1

on column-centred data (the intercept is ``mean(y) - mean(X) w`` afterwards), which is the objective of the
``group_lasso`` package SpaceTravLR uses, with ``lambda_g = group_reg / sqrt(|g|)`` ("inverse_group_size"),
``group_reg * sqrt(|g|)`` ("group_size") or ``group_reg`` ("none"). Because the loss only needs
``G = X_c^T X_c`` and ``c = X_c^T y_c``, all problems of a batch are padded to the same width and solved
together with batched matrix-vector products; padding columns have zero Gram rows and stay at zero.
With ``standardize=True`` the penalties apply to coefficients of unit-variance features and the solution is
mapped back to the original units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..devices import torch_device

SCALE_REGS = ("inverse_group_size", "group_size", "none")
_CPU_CHUNK_ELEMENTS = 32_000  # problems x width per CPU chunk (torch parallelises above 32,768 elements)


@dataclass
class SGLResult:
    coef: np.ndarray  # (B, p) in original feature units
    n_iter: np.ndarray  # (B,)
    converged: np.ndarray  # (B,)
    objective: np.ndarray  # (B,) objective reached (in the solved, possibly standardised, space)


def group_weights(groups: np.ndarray, group_reg: float, scale_reg: str = "inverse_group_size") -> np.ndarray:
    """(B, K) penalty per group (0 for empty groups); ``groups`` is (B, p) with -1 for padding."""
    k = int(groups.max()) + 1 if groups.size and groups.max() >= 0 else 0
    sizes = np.stack([(groups == g).sum(axis=1) for g in range(k)], axis=1) if k else np.zeros((groups.shape[0], 0))
    return weights_from_sizes(sizes, group_reg, scale_reg)


def weights_from_sizes(sizes: np.ndarray, group_reg: float, scale_reg: str = "inverse_group_size") -> np.ndarray:
    """Penalty of each group from its size (0 for empty groups), as :func:`group_weights` gives it."""
    if scale_reg not in SCALE_REGS:
        raise ValueError(f"scale_reg must be one of {SCALE_REGS}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if scale_reg == "inverse_group_size":
            w = np.where(sizes > 0, group_reg / np.sqrt(np.maximum(sizes, 1)), 0.0)
        elif scale_reg == "group_size":
            w = group_reg * np.sqrt(sizes)
        else:
            w = np.where(sizes > 0, group_reg, 0.0)
    return w.astype(np.float64)


def sgl_objective(
    X: np.ndarray,
    y: np.ndarray,
    coef: np.ndarray,
    intercept: float,
    groups: np.ndarray,
    l1_reg: float,
    group_reg: float,
    scale_reg: str = "inverse_group_size",
) -> float:
    """The objective above for one problem with raw (uncentred) data and an explicit intercept."""
    r = X @ coef + intercept - y
    val = 0.5 * float(np.sum(r * r)) / X.shape[0]
    gw = group_weights(np.asarray(groups)[None, :], group_reg, scale_reg)[0]
    for g in range(gw.size):
        val += gw[g] * float(np.linalg.norm(coef[groups == g]))
    return val + l1_reg * float(np.abs(coef).sum())


def fit_sgl_batch(
    G: np.ndarray | None,
    c: np.ndarray,
    n: np.ndarray,
    groups: np.ndarray,
    l1_reg: float,
    group_reg: float,
    scale_reg: str = "inverse_group_size",
    standardize: bool = True,
    max_iter: int = 3000,
    tol: float = 1e-7,
    device=None,
    check_every: int = 10,
    X: np.ndarray | None = None,
) -> SGLResult:
    """Solve B sparse-group-lasso problems given centred Gram matrices ``G`` (B,p,p) and ``c`` (B,p).

    With ``X`` (B, n_max, p: centred data, zero rows as padding) instead of ``G``, products use the data
    (cheaper when clusters have fewer cells than there are modulators).
    """
    dev = torch_device(device)
    dt = torch.float64
    B, p = c.shape
    if B == 0 or p == 0:
        z = np.zeros((B, p))
        return SGLResult(z, np.zeros(B, int), np.ones(B, bool), np.zeros(B))
    n = np.asarray(n, dtype=np.float64)
    chunk = max(1, _CPU_CHUNK_ELEMENTS // p)
    if dev.type == "cpu" and B > chunk:
        # keep each chunk's vectors below torch's intra-op parallel grain: on a busy CPU its thread pool costs
        # far more than it saves for these small element-wise steps
        parts = [
            fit_sgl_batch(
                None if G is None else G[i : i + chunk],
                c[i : i + chunk],
                n[i : i + chunk],
                groups[i : i + chunk],
                l1_reg,
                group_reg,
                scale_reg,
                standardize,
                max_iter,
                tol,
                device,
                check_every,
                None if X is None else X[i : i + chunk],
            )
            for i in range(0, B, chunk)
        ]
        return SGLResult(
            np.concatenate([r.coef for r in parts]),
            np.concatenate([r.n_iter for r in parts]),
            np.concatenate([r.converged for r in parts]),
            np.concatenate([r.objective for r in parts]),
        )
    ct = torch.as_tensor(c, dtype=dt, device=dev)
    nt = torch.as_tensor(np.asarray(n, dtype=np.float64), dtype=dt, device=dev)
    grp = torch.as_tensor(groups, dtype=torch.long, device=dev)
    if X is not None:
        Xt = torch.as_tensor(X, dtype=dt, device=dev)
        diag = (Xt * Xt).sum(1)
    else:
        Gt = torch.as_tensor(G, dtype=dt, device=dev)
        diag = torch.diagonal(Gt, dim1=1, dim2=2).clamp_min(0)
    active = (grp >= 0) & (diag > 1e-12 * diag.amax(dim=1, keepdim=True).clamp_min(1e-300))
    if standardize:
        sd = torch.sqrt(diag / nt[:, None])
        sd = torch.where(active, sd, torch.ones_like(sd))
    else:
        sd = torch.ones_like(diag)
    cs = ct / sd
    am = active.to(dt)
    cs = cs * am
    bvec = cs / nt[:, None]
    if X is not None:
        Xs = Xt * (am / sd)[:, None, :] / torch.sqrt(nt)[:, None, None]
        XsT = Xs.transpose(1, 2).contiguous()
        if dev.type == "cpu":  # numpy's batched matmul uses BLAS gemv; torch's float64 bmm here is ~30x slower
            Xs_np, XsT_np = Xs.numpy(), XsT.numpy()

            def Amul(w):  # (X^T X / n) w
                return torch.from_numpy(np.matmul(XsT_np, np.matmul(Xs_np, w.numpy()[:, :, None]))[:, :, 0])
        else:

            def Amul(w):
                return torch.bmm(XsT, torch.bmm(Xs, w[:, :, None]))[:, :, 0]
    else:
        A = Gt / (sd[:, :, None] * sd[:, None, :]) * am[:, :, None] * am[:, None, :] / nt[:, None, None]
        if dev.type == "cpu":
            A_np = A.numpy()

            def Amul(w):
                return torch.from_numpy(np.matmul(A_np, w.numpy()[:, :, None])[:, :, 0])
        else:

            def Amul(w):
                return torch.bmm(A, w[:, :, None])[:, :, 0]

    gw_np = group_weights(np.where(active.cpu().numpy(), groups, -1), group_reg, scale_reg)
    K = gw_np.shape[1]
    gw = torch.as_tensor(gw_np, dtype=dt, device=dev)
    # group index per feature; inactive / padding features go to an extra dummy group K (never penalised)
    gidx = torch.where(active, grp, torch.full_like(grp, K))
    gw_ext = torch.cat([gw, torch.zeros((B, 1), dtype=dt, device=dev)], dim=1)

    def group_norms(w):
        return torch.sqrt(torch.zeros((B, K + 1), dtype=dt, device=dev).scatter_add_(1, gidx, w * w))

    def smooth(w):
        Aw = Amul(w)
        return 0.5 * (w * Aw).sum(1) - (bvec * w).sum(1), Aw - bvec

    def prox(z, step):
        w = torch.sign(z) * torch.clamp(z.abs() - step[:, None] * l1_reg, min=0.0)
        if K:
            norms = group_norms(w)
            shrink = torch.clamp(1.0 - step[:, None] * gw_ext / norms.clamp_min(1e-300), min=0.0)
            shrink = torch.where(norms > 0, shrink, torch.zeros_like(shrink))
            w = w * shrink.gather(1, gidx)
        return w * am

    def penalty(w):
        val = l1_reg * w.abs().sum(1)
        if K:
            val = val + (gw_ext * group_norms(w)).sum(1)
        return val

    # Lipschitz constant by power iteration; backtracking below corrects any underestimate
    v = torch.ones((B, p), dtype=dt, device=dev) * am
    for _ in range(30):
        v = Amul(v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    L = (v * Amul(v)).sum(1).clamp_min(1e-12) * 1.01

    x = torch.zeros((B, p), dtype=dt, device=dev)
    y = x.clone()
    Ax = torch.zeros_like(x)  # A x and A y are carried along (A is linear): one product per iteration
    Ay = torch.zeros_like(x)
    t = torch.ones(B, dtype=dt, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    for it in range(1, max_iter + 1):
        gy = Ay - bvec
        fy = 0.5 * (y * Ay).sum(1) - (bvec * y).sum(1)
        for _ in range(30):  # backtracking on L, per problem
            step = 1.0 / L
            xn = prox(y - step[:, None] * gy, step)
            Axn = Amul(xn)
            fx = 0.5 * (xn * Axn).sum(1) - (bvec * xn).sum(1)
            d = xn - y
            bad = fx > fy + (gy * d).sum(1) + 0.5 * L * (d * d).sum(1) + 1e-12 * fy.abs().clamp_min(1.0)
            bad = bad & ~done
            if not bool(bad.any()):
                break
            L = torch.where(bad, L * 2.0, L)
        xn = torch.where(done[:, None], x, xn)
        Axn = torch.where(done[:, None], Ax, Axn)
        restart = ((y - xn) * (xn - x)).sum(1) > 0
        tn = torch.where(restart, torch.ones_like(t), 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t)))
        mom = torch.where(restart, torch.zeros_like(t), (t - 1.0) / tn)
        delta = (xn - x).abs().amax(1)
        y = xn + mom[:, None] * (xn - x)
        Ay = Axn + mom[:, None] * (Axn - Ax)
        x, Ax, t = xn, Axn, tn
        n_iter = torch.where(done, n_iter, torch.full_like(n_iter, it))
        conv = delta <= tol * torch.clamp(x.abs().amax(1), min=1.0)
        done = done | conv
        if it % check_every == 0 and bool(done.all()):
            break
    obj = smooth(x)[0] + penalty(x)
    coef = (x / sd).cpu().numpy()
    return SGLResult(coef, n_iter.cpu().numpy(), done.cpu().numpy(), obj.cpu().numpy())
