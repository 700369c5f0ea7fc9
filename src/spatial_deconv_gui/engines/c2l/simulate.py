"""A single-cell reference made of several batches with known truth, for cell2location's batch regression.

Each batch ``e`` has its own detection efficiency ``y_e`` and an additive background ``s_eg`` (ambient RNA,
proportional to the pooled expression); cell types are spread unevenly over the batches, so per-type means
mix type expression with batch effects. Counts follow the regression model itself::

    x_cg ~ NB(mean (mu_{f(c)g} + s_{e(c)g}) y_{e(c)} l_c, size alpha)      l_c ~ LogNormal(0, cell_sd)

``mu_fg`` (expected counts per cell of each type at detection 1) is the truth signatures are scored against;
a cell2location-style fit recovers it up to one global scale (detection and expression trade off).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ... import keys


@dataclass(frozen=True)
class BatchedReferenceTruth:
    profiles: np.ndarray  # types x genes, expected counts per cell at detection 1
    detection: np.ndarray  # batches
    background: np.ndarray  # batches x genes, expected background counts per cell at detection 1
    cell_types: list[str]
    batches: list[str]
    genes: list[str]


def simulate_batched_reference(
    n_genes: int = 300,
    n_types: int = 6,
    n_batches: int = 3,
    cells_per_type: int = 150,
    umi_per_cell: float = 1000.0,
    detection: tuple[float, ...] | None = None,
    background_per_cell: tuple[float, ...] | None = None,
    home_fraction: float = 0.7,
    dispersion: float = 8.0,
    cell_sd: float = 0.2,
    markers_per_type: int = 20,
    marker_fold: float = 8.0,
    seed: int = 0,
) -> tuple[ad.AnnData, BatchedReferenceTruth]:
    """A reference AnnData (counts in ``X``, ``obs['cell_type']``, ``obs['batch']``) and its truth.

    Type ``f`` draws ``home_fraction`` of its cells from batch ``f mod n_batches`` and the rest evenly from the
    other batches. ``detection`` defaults to efficiencies spread geometrically from 0.35 to 2.5;
    ``background_per_cell`` (background counts per cell at detection 1) to 150, 5, 50, 150, 5, ...
    """
    rng = np.random.default_rng(seed)
    E, F_, G = int(n_batches), int(n_types), int(n_genes)
    if E < 1 or F_ < 2:
        raise ValueError("need at least one batch and two cell types")
    det = np.asarray(detection if detection is not None else np.geomspace(0.35, 2.5, E), dtype=float)
    bg = np.asarray(
        background_per_cell if background_per_cell is not None else [(150.0, 5.0, 50.0)[e % 3] for e in range(E)],
        dtype=float,
    )
    if det.shape != (E,) or bg.shape != (E,):
        raise ValueError("detection and background_per_cell need one value per batch")

    base = rng.gamma(shape=0.6, scale=1.0, size=G) + 0.02
    prof = np.tile(base, (F_, 1)) * rng.lognormal(0.0, 0.3, size=(F_, G))
    for f in range(F_):
        markers = rng.choice(G, size=min(markers_per_type, G), replace=False)
        prof[f, markers] *= marker_fold
    profiles = prof / prof.sum(1, keepdims=True) * umi_per_cell
    ambient = profiles.mean(0) / profiles.mean(0).sum()
    background = bg[:, None] * ambient[None, :]

    types = [f"type{f}" for f in range(F_)]
    batch_names = [f"batch{e}" for e in range(E)]
    lab, bat = [], []
    for f in range(F_):
        share = np.full(E, (1 - home_fraction) / max(E - 1, 1)) if E > 1 else np.ones(1)
        if E > 1:
            share[f % E] = home_fraction
        n = rng.multinomial(cells_per_type, share / share.sum())
        for e in range(E):
            lab += [f] * int(n[e])
            bat += [e] * int(n[e])
    lab, bat = np.array(lab), np.array(bat)
    size_factor = rng.lognormal(0.0, cell_sd, size=lab.size) if cell_sd > 0 else np.ones(lab.size)
    mean = (profiles[lab] + background[bat]) * det[bat, None] * size_factor[:, None]
    counts = rng.poisson(rng.gamma(shape=dispersion, scale=mean / dispersion)).astype(np.int32)
    names = [f"cell{i:06d}" for i in range(lab.size)]
    genes = [f"Gene{g:04d}" for g in range(G)]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                keys.CELL_TYPE: pd.Categorical(np.array(types)[lab], categories=types),
                "batch": pd.Categorical(np.array(batch_names)[bat], categories=batch_names),
                keys.NUMI: counts.sum(1),
            },
            index=names,
        ),
        var=pd.DataFrame(index=genes),
    )
    adata.uns["description"] = "simulated multi-batch single-cell reference (engines.c2l.simulate)"
    return adata, BatchedReferenceTruth(profiles, det, background, types, batch_names, genes)


def signature_error(signatures: np.ndarray, truth: np.ndarray, min_truth: float = 0.1) -> dict[str, float]:
    """How far fitted signatures (types x genes) are from the true profiles, up to one global scale.

    The scale ``c`` is the median log ratio over entries with truth >= ``min_truth``; after dividing by it:
    ``log1p_r`` (Pearson r of log1p values over all entries), ``mean_abs_log2`` (mean |log2 ratio| over those
    entries) and ``type_scale_spread`` (range over types of each type's median log2 ratio: how unevenly the
    types are scaled; 0 for a perfect fit).
    """
    sig, tru = np.asarray(signatures, float), np.asarray(truth, float)
    ok = tru >= min_truth
    lr = np.log(np.maximum(sig, 1e-12)) - np.log(np.maximum(tru, 1e-12))
    c = float(np.median(lr[ok]))
    scaled = sig / np.exp(c)
    lr2 = (lr - c) / np.log(2)
    per_type = np.array([np.median(lr2[f][ok[f]]) for f in range(sig.shape[0])])
    return {
        "log1p_r": float(np.corrcoef(np.log1p(scaled).ravel(), np.log1p(tru).ravel())[0, 1]),
        "mean_abs_log2": float(np.mean(np.abs(lr2[ok]))),
        "type_scale_spread": float(per_type.max() - per_type.min()),
        "global_scale": float(np.exp(c)),
    }
