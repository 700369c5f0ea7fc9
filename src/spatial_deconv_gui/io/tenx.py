"""10x Genomics count matrices: the feature-barcode HDF5 (Cell Ranger / Space Ranger / Xenium) and MEX folders.

Written by hand because the format is small and stable, and reading it through scanpy would add scanpy (and its
import time) to every slide that opens; the layouts follow 10x's documentation of the HDF5 and MEX outputs.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from .errors import InputError

GENE_EXPRESSION = "Gene Expression"


def _strings(values) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _assemble(counts: sp.csr_matrix, barcodes, gene_ids, gene_names, feature_types) -> ad.AnnData:
    """Cells x genes AnnData with symbols (made unique) as var names; only gene-expression features."""
    var = pd.DataFrame({"gene_ids": gene_ids, "feature_types": feature_types})
    keep = var["feature_types"].to_numpy() == GENE_EXPRESSION
    if not keep.any():  # old matrices have no feature types; every row is a gene
        keep[:] = True
    var = var.loc[keep].reset_index(drop=True)
    names = pd.Index(np.asarray(gene_names, dtype=object)[keep])
    adata = ad.AnnData(
        X=counts[:, np.flatnonzero(keep)].tocsr(),
        var=var.set_axis(names.astype(str)),
        obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)),
    )
    adata.var_names_make_unique()
    return adata


def read_10x_h5(path: str | os.PathLike) -> ad.AnnData:
    """A 10x feature-barcode matrix (HDF5, v2 or v3 layout) as barcodes x genes CSR counts (int32)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                gene_ids = _strings(feats["id"][:])
                names = _strings(feats["name"][:])
                types = (
                    _strings(feats["feature_type"][:])
                    if "feature_type" in feats
                    else np.full(len(gene_ids), GENE_EXPRESSION, dtype=object)
                )
            else:  # v2: one group per genome
                genomes = list(f.keys())
                if not genomes:
                    raise KeyError("no 'matrix' group and no genome group")
                g = f[genomes[0]]
                gene_ids = _strings(g["genes"][:])
                names = _strings(g["gene_names"][:])
                types = np.full(len(gene_ids), GENE_EXPRESSION, dtype=object)
            n_genes, n_cells = (int(v) for v in g["shape"][:])
            data = g["data"][:]
            indices = g["indices"][:]
            indptr = g["indptr"][:]
            barcodes = _strings(g["barcodes"][:])
    except (OSError, KeyError) as exc:
        raise InputError(
            f"{path.name} is not a readable 10x feature-barcode HDF5 matrix ({type(exc).__name__}: {exc}).",
            "use the filtered_feature_bc_matrix.h5 that Space Ranger / Xenium wrote.",
            code="bad_matrix",
        ) from exc
    # Stored genes x cells in CSC, i.e. cells x genes in CSR with the same three arrays.
    counts = sp.csr_matrix((data.astype(np.int32, copy=False), indices, indptr), shape=(n_cells, n_genes))
    return _assemble(counts, barcodes, gene_ids, names, types)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first(folder: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def read_10x_mex(folder: str | os.PathLike) -> ad.AnnData:
    """A 10x MEX folder (``matrix.mtx``, ``barcodes.tsv``, ``features.tsv`` or ``genes.tsv``, gzipped or not)."""
    folder = Path(folder)
    matrix = _first(folder, "matrix.mtx")
    barcodes_file = _first(folder, "barcodes.tsv")
    features_file = _first(folder, "features.tsv", "genes.tsv")
    missing = [
        n
        for n, p in (
            ("matrix.mtx[.gz]", matrix),
            ("barcodes.tsv[.gz]", barcodes_file),
            ("features.tsv[.gz] or genes.tsv[.gz]", features_file),
        )
        if p is None
    ]
    if missing:
        raise InputError(
            f"the MEX folder {folder} lacks {', '.join(missing)}.",
            "point to the complete filtered_feature_bc_matrix/ folder that Space Ranger wrote.",
            code="missing_matrix",
        )
    with _open_text(barcodes_file) as fh:
        barcodes = [line.rstrip("\n").split("\t")[0] for line in fh if line.strip()]
    with _open_text(features_file) as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    gene_ids = np.asarray([r[0] for r in rows], dtype=object)
    names = np.asarray([r[1] if len(r) > 1 else r[0] for r in rows], dtype=object)
    types = np.asarray([r[2] if len(r) > 2 else GENE_EXPRESSION for r in rows], dtype=object)
    try:
        with _open_text(matrix) if matrix.suffix != ".gz" else gzip.open(matrix, "rb") as fh:
            m = scipy.io.mmread(fh)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"{matrix.name} is not a readable Matrix Market file ({exc}).",
            "use the matrix.mtx.gz that Space Ranger wrote.",
            code="bad_matrix",
        ) from exc
    counts = sp.csr_matrix(m.T, dtype=np.int32)
    if counts.shape != (len(barcodes), len(gene_ids)):
        raise InputError(
            f"{matrix.name} is {m.shape[0]} x {m.shape[1]} but the folder lists {len(gene_ids)} features "
            f"and {len(barcodes)} barcodes.",
            "use the three files of one Space Ranger run.",
            code="bad_matrix",
        )
    return _assemble(counts, barcodes, gene_ids, names, types)


def write_10x_h5(
    path: str | os.PathLike, counts: sp.spmatrix, barcodes, gene_ids, gene_names, feature_types=None
) -> Path:
    """The v3 HDF5 layout, for fixtures and for round trips (barcodes x genes in, genes x barcodes stored)."""
    import h5py

    csr = sp.csr_matrix(counts)
    n_cells, n_genes = csr.shape
    feature_types = feature_types if feature_types is not None else [GENE_EXPRESSION] * n_genes
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        g.create_dataset("data", data=csr.data.astype(np.int32))
        g.create_dataset("indices", data=csr.indices.astype(np.int64))
        g.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.asarray([n_genes, n_cells], dtype=np.int32))
        ft = g.create_group("features")
        ft.create_dataset("id", data=np.asarray(gene_ids, dtype="S"))
        ft.create_dataset("name", data=np.asarray(gene_names, dtype="S"))
        ft.create_dataset("feature_type", data=np.asarray(feature_types, dtype="S"))
        ft.create_dataset("genome", data=np.asarray(["GRCh38"] * n_genes, dtype="S"))
    return Path(path)
