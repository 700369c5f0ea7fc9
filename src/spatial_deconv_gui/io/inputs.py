"""Plain-array views of a spatial slide and a single-cell reference, as the engines consume them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class SpatialInput:
    """A slide: ``counts`` is spots x genes CSR (never modified), ``n_umi`` the per-spot total UMI.

    ``n_umi`` comes from an obs column (e.g. ``nUMI``) when the file has one, because a gene panel
    (MERFISH, Xenium) or a cut-down matrix undercounts the spot's real library size; else the row sum.
    """

    counts: sp.csr_matrix
    genes: np.ndarray
    barcodes: np.ndarray
    coords: np.ndarray
    n_umi: np.ndarray

    @property
    def n_spots(self) -> int:
        return self.counts.shape[0]


@dataclass(frozen=True)
class ReferenceInput:
    """A labelled single-cell reference: ``counts`` cells x genes CSR, ``cell_types`` one label per cell."""

    counts: sp.csr_matrix
    genes: np.ndarray
    cell_types: np.ndarray
    n_umi: np.ndarray

    @property
    def type_names(self) -> list[str]:
        return sorted(map(str, np.unique(self.cell_types)))
