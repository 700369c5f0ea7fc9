"""run_flash: the engine entry point (SpatialInput + ReferenceInput → DeconvResult)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ... import keys
from ...io.inputs import ReferenceInput, SpatialInput
from ..base import DeconvResult, RunControl, thread_cap
from .bootstrap import gene_bootstrap
from .config import FlashConfig, validate_config
from .core import fit_arrays

KEY = "flash"
# flash's own slots, beyond keys.py's common ones
ABUNDANCES = f"{KEY}_abundances"  # obsm: unnormalised fitted abundances
FIT_INFO = f"{KEY}_fit"  # uns: genes used, gene weights, objective


def _first_positions(names: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, g in enumerate(map(str, names)):
        out.setdefault(g, i)
    return out


def align(spatial: SpatialInput, reference: ReferenceInput):
    """Shared genes (sorted), the spatial column map onto them and the per-type mean signatures."""
    common = np.intersect1d(np.asarray(spatial.genes, dtype=str), np.asarray(reference.genes, dtype=str))
    if common.size == 0:
        raise ValueError("the slide and the reference share no genes")
    sp_pos = _first_positions(spatial.genes)
    ref_pos = _first_positions(reference.genes)
    colmap = np.full(len(spatial.genes), -1, dtype=np.int64)
    colmap[[sp_pos[g] for g in common]] = np.arange(common.size)
    types = reference.type_names
    labels = np.asarray(reference.cell_types).astype(str)
    code = pd.Categorical(labels, categories=types).codes
    n_cells = labels.size
    ind = sp.csr_matrix((np.ones(n_cells), (code, np.arange(n_cells))), shape=(len(types), n_cells))
    ref = reference.counts.tocsr()[:, [ref_pos[g] for g in common]]
    sums = np.asarray((ind @ ref).todense(), dtype=np.float64)
    X = sums / np.bincount(code, minlength=len(types))[:, None]
    return common, colmap, X, types


def run_flash(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: FlashConfig = FlashConfig(),
    control: RunControl | None = None,
) -> DeconvResult:
    """Deconvolve ``spatial`` with FlashDeconv's method; see :mod:`spatial_deconv_gui.engines.flash`."""
    problems = validate_config(config)
    if problems:
        raise ValueError("; ".join(problems))
    control = control or RunControl()
    t0 = time.perf_counter()
    with thread_cap(config.n_threads):
        control.report("prepare", 0.0, "aligning genes and building signatures")
        common, colmap, X, types = align(spatial, reference)
        Y = spatial.counts
        if not (sp.issparse(Y) and Y.format == "csr"):
            Y = sp.csr_matrix(Y)
        n_all = Y.shape[0]
        rows = None
        if config.min_counts > 0:
            from . import _kernels as K

            tot = K.row_sums(Y.indptr, Y.indices, Y.data, colmap, np.arange(n_all, dtype=np.int64))
            rows = np.flatnonzero(tot >= config.min_counts).astype(np.int64)
            if rows.size == 0:
                raise ValueError(f"no spot has at least min_counts={config.min_counts} counts on shared genes")
        control.check_cancel()
        fit = fit_arrays(Y, X, spatial.coords, config, colmap=colmap, rows=rows, control=control, cell_types=types)
        interval = None
        if config.uncertainty:
            interval = gene_bootstrap(Y, X, spatial.coords, config, fit, colmap, control)

    props = np.full((n_all, len(types)), np.nan)
    props[fit.rows] = fit.proportions
    abund = np.full((n_all, len(types)), np.nan)
    abund[fit.rows] = fit.beta
    barcodes = np.asarray(spatial.barcodes, dtype=str)
    obsm = {ABUNDANCES: pd.DataFrame(abund, index=barcodes, columns=list(types))}
    if interval is not None:
        for slot, part in zip((keys.proportions_lower(KEY), keys.proportions_upper(KEY)), interval):
            full = np.full((n_all, len(types)), np.nan)
            full[fit.rows] = part
            obsm[slot] = pd.DataFrame(full, index=barcodes, columns=list(types))
    summary = fit.summary()
    params = config.to_dict()
    params.update(
        {
            k: summary[k]
            for k in (
                "lambda_used",
                "rho_used",
                "n_iter",
                "converged",
                "final_change",
                "objective",
                "n_genes_used",
                "n_spots_fitted",
            )
        }
    )
    fit_uns = dict(summary)
    fit_uns["genes_used"] = [str(g) for g in common[fit.gene_idx]]
    if fit.gene_weights is not None:
        fit_uns["gene_weights"] = np.asarray(fit.gene_weights, dtype=np.float64)
    return DeconvResult(
        key=KEY,
        method="flash",
        mode=None,
        cell_types=list(types),
        proportions=props,
        params=params,
        device="cpu",
        runtime_s=time.perf_counter() - t0,
        obsm=obsm,
        uns={FIT_INFO: fit_uns},
    )
