"""FlashDeconv's per-spot intervals: a bootstrap over the genes.

The fit is a weighted least-squares regression across genes, so the genes are its independent observations:
each refit draws the selected genes with replacement (multiplicities m ~ Multinomial(P, 1/P)), which multiplies
each gene's term of H = Ỹ W² X̃ᵀ, of ‖ỹ‖² and of G = X̃ W² X̃ᵀ by m — the same as gene weights w·√m. Gene
selection, the spatial graph and λ are kept from the main fit and the solver starts from its abundances, so a
refit costs one pass over the counts and a few solver sweeps. The 5 % / 95 % quantiles of the refits' proportions
per spot and type are the nominal 90 % interval (widened to hold the point estimate where the refits' spread
misses it).
"""

from __future__ import annotations

import numpy as np

from .config import FlashConfig
from .core import FlashFit, fit_arrays

LEVEL_QUANTILES = (0.05, 0.95)


def gene_bootstrap(
    Y, X: np.ndarray, coords, config: FlashConfig, fit: FlashFit, colmap: np.ndarray, control=None
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) proportions for the spots of ``fit`` from ``config.n_bootstrap`` gene-resampled refits."""
    if fit.gene_weights is None:
        raise ValueError("the gene bootstrap needs gene_weighting 'expected'")
    rng = np.random.default_rng(config.seed)
    n_genes = fit.gene_idx.size
    n_boot = int(config.n_bootstrap)
    draws = np.empty((n_boot, *fit.proportions.shape))
    for b in range(n_boot):
        if control is not None:
            control.check_cancel()
            control.report("bootstrap", b / n_boot, f"refit {b + 1}/{n_boot} on resampled genes")
        multiplicity = rng.multinomial(n_genes, np.full(n_genes, 1.0 / n_genes))
        refit = fit_arrays(
            Y,
            X,
            coords,
            config,
            colmap=colmap,
            rows=fit.rows,
            gene_idx=fit.gene_idx,
            gene_weights=fit.gene_weights * np.sqrt(multiplicity),
            lambda_=fit.lambda_used,
            adjacency=fit.adjacency,
            beta0=fit.beta,
        )
        draws[b] = refit.proportions
    if control is not None:
        control.report("bootstrap", 1.0, f"{n_boot} refits")
    lower, upper = np.quantile(draws, LEVEL_QUANTILES, axis=0)
    return np.minimum(lower, fit.proportions), np.maximum(upper, fit.proportions)
