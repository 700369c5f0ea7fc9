"""Reading slides and references from .h5ad files, and turning AnnData into engine inputs."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import keys
from .errors import InputError
from .inputs import ReferenceInput, SpatialInput

COORD_OBSM_KEYS = (keys.SPATIAL, "X_spatial", "spatial_loc")
COORD_OBS_PAIRS = (("x", "y"), ("X", "Y"), ("x_coord", "y_coord"), ("array_col", "array_row"), ("imagecol", "imagerow"))
NUMI_COLUMN = keys.NUMI

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _looks_like_hdf5(path: Path) -> bool:
    # HDF5 files may carry a user block, so the signature can sit at 0, 512, 1024, ...
    with open(path, "rb") as fh:
        for offset in (0, 512, 1024, 2048):
            fh.seek(offset)
            if fh.read(8) == _HDF5_MAGIC:
                return True
    return False


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an AnnData file, turning every failure into one :class:`InputError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "check the path.", code="missing_file")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an .h5ad file.", "pass the .h5ad file inside it.", code="not_h5ad")
    if not _looks_like_hdf5(path):
        raise InputError(
            f"{path.name} is not an .h5ad (HDF5) file.",
            "convert it to AnnData first, e.g. scanpy.read_10x_h5 / read_csv then adata.write_h5ad().",
            code="not_h5ad",
        )
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for a damaged or foreign HDF5 file
        raise InputError(
            f"{path.name} is an HDF5 file but not a readable AnnData ({type(exc).__name__}: {exc}).",
            "write it with anndata's write_h5ad.",
            code="not_h5ad",
        ) from exc


def find_coordinates(adata: ad.AnnData, key: str | None = None) -> tuple[np.ndarray, str] | None:
    """Coordinates (n x 2 or 3, float) and where they came from, or None when the file has none.

    ``key`` may name an obsm entry or two obs columns as ``"xcol,ycol"``.
    """
    if key:
        if key in adata.obsm:
            return _as_coords(adata.obsm[key]), f"obsm['{key}']"
        cols = [c.strip() for c in key.split(",")]
        if len(cols) in (2, 3) and all(c in adata.obs for c in cols):
            return _as_coords(adata.obs[cols].to_numpy()), f"obs[{cols}]"
        raise InputError(
            f"coordinates {key!r} are neither an obsm key nor obs columns.",
            f"use one of obsm {list(adata.obsm.keys())} or two obs columns like 'x,y'.",
            code="missing_coordinates",
        )
    for k in COORD_OBSM_KEYS:
        if k in adata.obsm:
            return _as_coords(adata.obsm[k]), f"obsm['{k}']"
    for xs, ys in COORD_OBS_PAIRS:
        if xs in adata.obs and ys in adata.obs:
            return _as_coords(adata.obs[[xs, ys]].to_numpy()), f"obs[['{xs}', '{ys}']]"
    return None


def _as_coords(value) -> np.ndarray:
    arr = np.asarray(value.to_numpy() if isinstance(value, pd.DataFrame) else value, dtype=float)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise InputError(
            f"coordinates have shape {arr.shape}; expected (spots, 2) or (spots, 3).",
            "store x/y per spot in obsm['spatial'].",
            code="missing_coordinates",
        )
    return arr[:, :3] if arr.shape[1] > 3 else arr


def counts_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """The raw count matrix as CSR (a new object; the AnnData is untouched)."""
    if layer is not None:
        if layer not in adata.layers:
            raise InputError(
                f"layer {layer!r} not found.", f"use one of {list(adata.layers.keys()) or ['X']}.", code="missing_layer"
            )
        x = adata.layers[layer]
    else:
        x = adata.X
    if x is None:
        raise InputError(
            "the file has no expression matrix in X.", "store raw counts in X or name a layer.", code="missing_counts"
        )
    return sp.csr_matrix(x)


def n_umi(adata: ad.AnnData, counts: sp.csr_matrix, column: str | None = NUMI_COLUMN) -> np.ndarray:
    """Library size per observation: the obs column when present (whole-transcriptome UMI), else the row sum."""
    if column and column in adata.obs:
        return np.asarray(adata.obs[column], dtype=float)
    return np.asarray(counts.sum(axis=1)).ravel().astype(float)


def spatial_input(
    adata: ad.AnnData, layer: str | None = None, coord_key: str | None = None, numi_column: str | None = NUMI_COLUMN
) -> SpatialInput:
    found = find_coordinates(adata, coord_key)
    if found is None:
        raise InputError(
            "the spatial file has no spot coordinates.",
            "store them in obsm['spatial'] (spots x 2) or name them with --coords.",
            code="missing_coordinates",
        )
    counts = counts_matrix(adata, layer)
    return SpatialInput(
        counts=counts,
        genes=np.asarray(adata.var_names, dtype=str),
        barcodes=np.asarray(adata.obs_names, dtype=str),
        coords=found[0],
        n_umi=n_umi(adata, counts, numi_column),
    )


def chunked_spatial_input(
    adata: ad.AnnData,
    counts,
    coord_key: str | None = None,
    numi_column: str | None = NUMI_COLUMN,
    row_totals: np.ndarray | None = None,
) -> SpatialInput:
    """A slide whose counts are read by chunks of spots (``counts``: a :class:`~.chunked.ChunkedCounts`), with
    its annotations from ``adata``. nUMI: the obs column when present, else ``row_totals`` (validation's totals)
    or, when not given, the row sums from one pass over the chunks."""
    found = find_coordinates(adata, coord_key)
    if found is None:
        raise InputError(
            "the spatial file has no spot coordinates.",
            "store them in obsm['spatial'] (spots x 2) or name them with --coords.",
            code="missing_coordinates",
        )
    if numi_column and numi_column in adata.obs:
        numi = np.asarray(adata.obs[numi_column], dtype=float)
    elif row_totals is not None:
        numi = np.asarray(row_totals, dtype=float)
    else:
        numi = np.concatenate([np.asarray(b.sum(axis=1), dtype=float).ravel() for _, _, b in counts.chunks()])
    return SpatialInput(
        counts=counts,
        genes=np.asarray(adata.var_names, dtype=str),
        barcodes=np.asarray(adata.obs_names, dtype=str),
        coords=found[0],
        n_umi=numi,
    )


def labelled(labels) -> np.ndarray:
    """Which cells carry a cell type: not missing and not blank (the others are left out of the reference)."""
    series = pd.Series(np.asarray(labels, dtype=object))
    return (series.notna() & (series.astype(str).str.strip() != "")).to_numpy()


def reference_input(
    adata: ad.AnnData,
    cell_type_col: str = keys.CELL_TYPE,
    layer: str | None = None,
    numi_column: str | None = NUMI_COLUMN,
) -> ReferenceInput:
    if cell_type_col not in adata.obs:
        raise InputError(
            f"the reference has no obs column {cell_type_col!r}.",
            f"pass --cell-type-col with one of {list(adata.obs.columns)}.",
            code="unknown_cell_type_col",
        )
    counts = counts_matrix(adata, layer)
    labels = adata.obs[cell_type_col]
    keep = labelled(labels)
    return ReferenceInput(
        counts=counts[keep],
        genes=np.asarray(adata.var_names, dtype=str),
        cell_types=labels.astype(str).to_numpy()[keep],
        n_umi=n_umi(adata, counts, numi_column)[keep],
    )
