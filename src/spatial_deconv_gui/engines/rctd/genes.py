"""Informative gene selection (spacexr's differential-expression filter)."""

from __future__ import annotations

import numpy as np

_FC_EPS = 1e-9


def mitochondrial_mask(genes: np.ndarray) -> np.ndarray:
    # spacexr greps "mt-" anywhere in the (mouse-style) symbol; human "MT-" genes are kept, as there
    return np.array(["mt-" in g for g in genes], dtype=bool)


def select_de_genes(
    profiles: np.ndarray,
    ref_genes: np.ndarray,
    spatial_genes: np.ndarray,
    bulk_counts: np.ndarray,
    fc_cutoff: float,
    expr_cutoff: float,
    min_obs: int = 3,
    min_genes: int = 10,
    label: str = "regression",
) -> np.ndarray:
    """Genes (as names, in reference order) that mark at least one cell type.

    A gene is kept for type t when its mean normalised expression in t exceeds ``expr_cutoff`` and its
    natural-log fold change against the unweighted mean of the other types exceeds ``fc_cutoff``.
    Candidates must be shared with the slide, not mitochondrial, and seen at least ``min_obs`` times in
    the (filtered) slide, since the platform-effect fit is noisy on genes that are almost never observed.
    ``bulk_counts`` is indexed like ``spatial_genes``.
    """
    ref_genes = np.asarray(ref_genes).astype(str)
    spatial_genes = np.asarray(spatial_genes).astype(str)
    n_start = min(len(ref_genes), len(spatial_genes))
    pos = {g: i for i, g in enumerate(spatial_genes)}
    candidate = ~mitochondrial_mask(ref_genes)
    shared = np.array([g in pos for g in ref_genes], dtype=bool)
    n_shared = int((candidate & shared).sum())
    if n_shared == 0:
        raise ValueError(
            "RCTD: the slide and the reference share no (non-mitochondrial) genes; "
            f"slide has {len(spatial_genes)} genes, reference {len(ref_genes)}"
        )
    cand_idx = np.flatnonzero(candidate & shared)
    obs = np.array([bulk_counts[pos[g]] for g in ref_genes[cand_idx]])
    cand_idx = cand_idx[obs >= min_obs]
    if len(cand_idx) < 0.1 * n_start:
        raise ValueError(
            f"RCTD: only {len(cand_idx)} genes are shared between slide ({len(spatial_genes)} genes) and "
            f"reference ({len(ref_genes)} genes) and observed >= min_obs={min_obs} times on the kept pixels; "
            "at least 10% must match. Check that gene identifiers use the same naming (symbols vs IDs, case)."
        )
    P = profiles[cand_idx]
    k = P.shape[1]
    keep = np.zeros(len(cand_idx), dtype=bool)
    for t in range(k):
        others = np.delete(P, t, axis=1).mean(axis=1)
        log_fc = np.log(P[:, t] + _FC_EPS) - np.log(others + _FC_EPS)
        keep |= (log_fc > fc_cutoff) & (P[:, t] > expr_cutoff)
    selected = ref_genes[cand_idx[keep]]
    if len(selected) < min_genes:
        raise ValueError(
            f"RCTD: only {len(selected)} {label} genes pass the differential-expression filter "
            f"(fc_cutoff={fc_cutoff}, expression cutoff={expr_cutoff}, {len(cand_idx)} shared genes observed "
            f">= {min_obs} times); need at least {min_genes}. Lower the cutoffs or use a larger gene panel."
        )
    return selected
