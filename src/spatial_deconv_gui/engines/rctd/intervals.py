"""RCTD's per-spot intervals: the curvature of the Poisson-lognormal likelihood at the fitted weights.

At the fit ŵ (weights, not yet normalised) the IRWLS already has the observed information
``I = -∂²log L/∂w∂wᵀ`` (:meth:`SharedDesign.derivatives`). The likelihood near ŵ is then approximated by
N(ŵ, I⁻¹) in weight space; each draw from it is projected onto w ≥ 0 in the metric of I (the constrained optimum
the quadratic model of the likelihood gives for that draw, so a type fitted at zero stays at zero for about half
the draws instead of being clipped independently of the others) and normalised to proportions. The 5 % and 95 %
quantiles of the draws per type are the nominal 90 % interval. Reference profiles, the platform effect and sigma
are taken as known, so the interval is conditional on them.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _kernels
from .irwls import SharedDesign
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


def simplex_intervals(
    weights: np.ndarray, information: np.ndarray, n_draws: int = 400, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) proportions per spot and type: the 5 % / 95 % quantiles of the projected, normalised draws,
    widened where needed so that the point estimate ŵ / Σŵ lies inside (the quantiles of a skewed projection can
    miss it by a hair)."""
    weights = np.ascontiguousarray(np.maximum(weights, 0.0), dtype=np.float64)
    information = np.ascontiguousarray(information, dtype=np.float64)
    b, k = weights.shape
    normals = np.random.default_rng(seed).standard_normal((int(n_draws), k))
    lower = np.empty((b, k))
    upper = np.empty((b, k))
    _kernels.simplex_interval_batch(
        weights, information, normals, REL_EIG_FLOOR, LEVEL_QUANTILES[0], LEVEL_QUANTILES[1], lower, upper
    )
    total = weights.sum(axis=1, keepdims=True)
    point = np.divide(weights, total, out=np.full_like(weights, 1.0 / k), where=total > 0)
    return np.minimum(lower, point), np.maximum(upper, point)
