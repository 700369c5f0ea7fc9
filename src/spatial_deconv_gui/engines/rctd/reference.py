"""Cell-type expression profiles from a labelled single-cell reference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class ReferenceProfiles:
    """Mean of counts/nUMI over the cells of each type: ``profiles`` is genes x types."""

    genes: np.ndarray
    cell_types: list[str]
    profiles: np.ndarray
    n_cells: dict[str, int]
    dropped_types: dict[str, int] = field(default_factory=dict)
    n_cells_removed_low_umi: int = 0


def build_profiles(
    counts: sp.spmatrix,
    genes: np.ndarray,
    cell_types: np.ndarray,
    n_umi: np.ndarray,
    type_order: list[str] | None = None,
    cell_min: int = 25,
    n_max_cells: int = 10000,
    umi_min: float = 100,
    strict: bool = False,
    seed: int = 0,
) -> ReferenceProfiles:
    """Filter cells, check/drop rare types, downsample large types, and average normalised expression.

    Normalising by ``n_umi`` (the whole-transcriptome library size when the reference carries it) rather
    than by the row sum of a cut-down gene panel is what makes the profiles comparable to spatial nUMI.
    """
    counts = sp.csr_matrix(counts)
    labels = np.asarray(cell_types).astype(str)
    n_umi = np.asarray(n_umi, dtype=np.float64)
    if counts.shape[0] != labels.shape[0] or counts.shape[0] != n_umi.shape[0]:
        raise ValueError("reference counts, cell_types and n_umi disagree on the number of cells")
    keep = n_umi >= umi_min
    n_removed = int((~keep).sum())
    if not keep.any():
        raise ValueError(f"no reference cell has nUMI >= {umi_min}; lower ref_umi_min")
    order = list(type_order) if type_order is not None else sorted(set(labels[keep]))
    kept_labels = labels[keep]
    sizes = {t: int((kept_labels == t).sum()) for t in order}
    rare = {t: n for t, n in sizes.items() if n < cell_min}
    if rare:
        listing = ", ".join(f"{t} ({n})" for t, n in rare.items())
        if strict:
            raise ValueError(
                f"cell types with fewer than cell_min={cell_min} cells: {listing}. "
                "Lower cell_min, merge or remove these types, or set strict=False to drop them."
            )
        warnings.warn(
            f"RCTD: dropping cell types with fewer than cell_min={cell_min} cells: {listing}",
            RuntimeWarning,
            stacklevel=3,
        )
    types = [t for t in order if t not in rare]
    if len(types) < 2:
        raise ValueError(f"RCTD needs at least 2 cell types with >= {cell_min} cells; found {len(types)}")
    rng = np.random.default_rng(seed)
    idx_all = np.flatnonzero(keep)
    prof = np.zeros((counts.shape[1], len(types)))
    n_cells = {}
    for j, t in enumerate(types):
        idx = idx_all[kept_labels == t]
        if len(idx) > n_max_cells:
            idx = np.sort(rng.choice(idx, n_max_cells, replace=False))
        sub = counts[idx]
        scaled = sp.diags(1.0 / n_umi[idx]) @ sub
        prof[:, j] = np.asarray(scaled.sum(axis=0)).ravel() / len(idx)
        n_cells[t] = len(idx)
    return ReferenceProfiles(np.asarray(genes).astype(str), types, prof, n_cells, rare, n_removed)
