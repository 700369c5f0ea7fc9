"""The AnnData a perturbation run hands back: the slide (or the model's cells) with the shift in its slots.

Plain arrays in, so io stays upstream of the perturbation engine that computes them.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import keys


def model_cells_adata(
    expr: np.ndarray, clusters, cluster_names, obs_names, genes, coords: np.ndarray, obsm: dict
) -> ad.AnnData:
    """An AnnData of a model's own training cells, for runs given no slide."""
    out = ad.AnnData(
        X=np.array(expr, copy=True),
        obs=pd.DataFrame({"cluster": pd.Categorical(clusters, categories=cluster_names)}, index=obs_names),
        var=pd.DataFrame(index=genes),
    )
    out.obsm[keys.SPATIAL] = np.array(coords, copy=True)
    for key, v in obsm.items():
        if key != keys.SPATIAL:
            out.obsm[key] = v.copy()
    return out


def attach_perturbation(
    out: ad.AnnData, model_genes, delta: np.ndarray, cell_vectors: np.ndarray, cell_grid_vectors: np.ndarray
) -> list[str]:
    """Write Δ expression (sparse, on ``out``'s genes), the per-cell and grid-sampled vectors into ``out``;
    returns the model genes ``out`` lacks (their Δ is dropped)."""
    col = out.var_names.get_indexer(model_genes)
    have = col >= 0
    nz = np.nonzero(delta[:, have])
    mapped = col[have]
    out.layers[keys.PERTURB_DELTA] = sp.csr_matrix(
        (delta[:, have][nz].astype(np.float64), (nz[0], mapped[nz[1]])), shape=(out.n_obs, out.n_vars)
    )
    out.obsm[keys.PERTURB_VECTORS] = cell_vectors
    out.obsm["perturb_grid_vectors"] = cell_grid_vectors
    return [g for g, h in zip(model_genes, have) if not h]
