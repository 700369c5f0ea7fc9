"""RCTD's per-spot intervals: the curvature of the Poisson-lognormal likelihood at the fitted weights.

At the fit ŵ (weights, not yet normalised) the IRWLS already has the observed information
``I = -∂²log L/∂w∂wᵀ`` (:meth:`SharedDesign.derivatives`). The likelihood near ŵ is then approximated by
N(ŵ, I⁻¹) in weight space; each draw from it is projected onto w ≥ 0 in the metric of I (the constrained optimum
the quadratic model of the likelihood gives for that draw, so a type fitted at zero stays at zero for about half
the draws instead of being clipped independently of the others) and normalised to proportions. The 5 % and 95 %
quantiles of the draws per type are the nominal 90 % interval. Reference profiles, the platform effect and sigma
are taken as known, so the interval is conditional on them. Doublet mode does the same for the chosen pair's
fit (:func:`pair_intervals`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _kernels
from .irwls import SharedDesign, SubsetDesign
from .likelihood import TorchTable

LEVEL_QUANTILES = (0.05, 0.95)
REL_EIG_FLOOR = 1e-6


def observed_information(
    P: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, table: TorchTable, weights: np.ndarray
) -> np.ndarray:
    """``-∂²log L/∂w²`` per spot at ``weights`` (B x K x K), the Hessian the IRWLS builds for its Newton steps."""
    design = SharedDesign(P, y, numi, table)
    w = torch.as_tensor(weights, dtype=P.dtype, device=P.device)
    _, hess = design.derivatives(w, torch.arange(w.shape[0], device=P.device))
    return hess.detach().cpu().numpy().astype(np.float64)


def pair_intervals(
    P: torch.Tensor,
    y: torch.Tensor,
    numi: torch.Tensor,
    table: TorchTable,
    first: np.ndarray,
    second: np.ndarray,
    pair_weights: np.ndarray,
    proportions: np.ndarray,
    n_draws: int = 400,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Doublet mode: the interval of the chosen pair's two shares, from the information of the pair fit (2 x 2);
    every other type is [0, 0], as its proportion is. A singlet's proportions (1, 0) lie at a corner the pair's
    draws rarely reach, so its interval runs from the pair's q05 to 1 for the first type and 0 to q95 for the
    second: the spread the pair fit leaves open."""
    b = len(first)
    rows = torch.arange(b, device=P.device)
    types = torch.as_tensor(np.stack([first, second], axis=1), dtype=torch.long, device=P.device)
    design = SubsetDesign(P, y, numi, rows, types, table)
    w = torch.as_tensor(np.maximum(pair_weights, 0.0), dtype=P.dtype, device=P.device)
    _, hess = design.derivatives(w, rows)
    point = proportions[np.arange(b)[:, None], np.stack([first, second], axis=1)]
    lo2, hi2 = simplex_intervals(pair_weights, hess.detach().cpu().numpy().astype(np.float64), n_draws, seed, point)
    lower = np.zeros_like(proportions)
    upper = np.zeros_like(proportions)
    for j, t in enumerate((first, second)):
        lower[np.arange(b), t] = lo2[:, j]
        upper[np.arange(b), t] = hi2[:, j]
    return lower, upper


def simplex_intervals(
    weights: np.ndarray, information: np.ndarray, n_draws: int = 400, seed: int = 0, point: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) proportions per spot and type: the 5 % / 95 % quantiles of the projected, normalised draws
    centred at ``weights``, widened where needed so that ``point`` (default ``weights`` normalised) lies inside
    (the quantiles of a skewed projection can miss it by a hair; a doublet-mode singlet sits at a corner)."""
    weights = np.ascontiguousarray(np.maximum(weights, 0.0), dtype=np.float64)
    information = np.ascontiguousarray(information, dtype=np.float64)
    b, k = weights.shape
    normals = np.random.default_rng(seed).standard_normal((int(n_draws), k))
    lower = np.empty((b, k))
    upper = np.empty((b, k))
    _kernels.simplex_interval_batch(
        weights, information, normals, REL_EIG_FLOOR, LEVEL_QUANTILES[0], LEVEL_QUANTILES[1], lower, upper
    )
    if point is None:
        total = weights.sum(axis=1, keepdims=True)
        point = np.divide(weights, total, out=np.full_like(weights, 1.0 / k), where=total > 0)
    return np.minimum(lower, point), np.maximum(upper, point)
