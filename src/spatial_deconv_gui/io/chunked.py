"""A slide's counts read a block of spots at a time, for slides larger than memory.

:class:`ChunkedCounts` hands out CSR blocks of consecutive spots (:meth:`~ChunkedCounts.chunks`) or a sorted
selection of spots (:meth:`~ChunkedCounts.take_rows`), reading only those rows from where the counts live:

* an ``.h5ad`` or ``.zarr`` AnnData on disk (:func:`open_counts`): the ``X`` (or a layer) group of a CSR matrix
  (``indptr`` is read whole, ``indices`` / ``data`` a row range at a time) or a dense array (row slices) — the
  same code for h5py and zarr, whose groups and arrays slice alike; a SpatialData table is such a zarr group;
* a dask array (e.g. ``anndata.experimental.read_elem_lazy``, SpatialData tables opened lazily): a row block is
  computed when asked for;
* an in-memory matrix (CSR, CSC, dense): rows are sliced.

It keeps no block once handed out; :attr:`~ChunkedCounts.most_rows_held` records the largest block read, so a
test can check that no more than a chunk of spots was ever in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import InputError

DEFAULT_CHUNK_SPOTS = 50_000


class ChunkedCounts:
    """Spots x genes counts read ``chunk_spots`` spots at a time; see the module's docstring."""

    def __init__(self, shape: tuple[int, int], read_rows, chunk_spots: int = DEFAULT_CHUNK_SPOTS, dtype=None):
        if chunk_spots < 1:
            raise ValueError(f"chunk_spots must be >= 1, got {chunk_spots}")
        self.shape = (int(shape[0]), int(shape[1]))
        self._read_rows = read_rows  # (lo, hi) -> CSR block of rows lo..hi-1
        self.chunk_spots = int(chunk_spots)
        self.dtype = dtype
        self.most_rows_held = 0
        self.rows_read = 0

    @property
    def n_spots(self) -> int:
        return self.shape[0]

    def block(self, lo: int, hi: int) -> sp.csr_matrix:
        """Rows ``lo`` to ``hi - 1`` as CSR."""
        out = self._read_rows(lo, hi)
        if not (sp.issparse(out) and out.format == "csr"):
            out = sp.csr_matrix(out)
        self.most_rows_held = max(self.most_rows_held, hi - lo)
        self.rows_read += hi - lo
        return out

    def bounds(self):
        """(lo, hi) of each chunk, in order."""
        n = self.n_spots
        return [(lo, min(lo + self.chunk_spots, n)) for lo in range(0, n, self.chunk_spots)]

    def chunks(self):
        """(lo, hi, CSR block) for each chunk of consecutive spots, in order."""
        for lo, hi in self.bounds():
            yield lo, hi, self.block(lo, hi)

    def take_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The sorted spots ``rows`` as CSR, read chunk by chunk (at most a chunk of spots held at once besides the
        rows kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and np.any(np.diff(rows) < 0):
            raise ValueError("take_rows needs sorted rows")
        parts = []
        for lo, hi in self.bounds():
            a, b = np.searchsorted(rows, [lo, hi])
            if a == b:
                continue
            local = rows[a:b] - lo
            first, last = int(local[0]), int(local[-1]) + 1
            parts.append(self.block(lo + first, lo + last)[local - first])
        if not parts:
            return sp.csr_matrix((0, self.shape[1]))
        return sp.vstack(parts, format="csr")


def from_matrix(x, chunk_spots: int = DEFAULT_CHUNK_SPOTS) -> ChunkedCounts:
    """An in-memory matrix (CSR / CSC / dense) or a dask array, read ``chunk_spots`` rows at a time."""
    if hasattr(x, "dask") and hasattr(x, "compute"):  # a dask array: compute a row block when asked

        def read_rows(lo, hi):
            return x[lo:hi].compute()

    else:
        if sp.issparse(x) and x.format != "csr":
            x = sp.csr_matrix(x)

        def read_rows(lo, hi):
            # the whole matrix in one chunk is handed out as it is: a row slice would copy it
            return x if (lo, hi) == (0, x.shape[0]) and sp.issparse(x) else x[lo:hi]

    return ChunkedCounts(tuple(x.shape), read_rows, chunk_spots, getattr(x, "dtype", None))


def from_group(elem, chunk_spots: int = DEFAULT_CHUNK_SPOTS, where: str = "X") -> ChunkedCounts:
    """An AnnData matrix element on disk (an h5py or zarr group holding a CSR matrix, or a dense array)."""
    attrs = dict(elem.attrs)
    encoding = attrs.get("encoding-type", "array" if hasattr(elem, "shape") else None)
    if encoding == "array" or (encoding is None and hasattr(elem, "shape")):
        shape = tuple(elem.shape)

        def read_dense(lo, hi):
            return sp.csr_matrix(np.asarray(elem[lo:hi]))

        return ChunkedCounts(shape, read_dense, chunk_spots, elem.dtype)
    if encoding == "csc_matrix":
        raise InputError(
            f"{where} is stored by gene (CSC), so it cannot be read a block of spots at a time.",
            "write it by spot: adata.X = adata.X.tocsr(); adata.write_h5ad(...), or run without --chunk-spots.",
            code="csc_counts",
        )
    if encoding != "csr_matrix":
        raise InputError(
            f"{where} is a {encoding!r} element, not a count matrix.",
            "store the counts in X (CSR or dense), or name the layer that holds them.",
            code="missing_counts",
        )
    shape = tuple(int(v) for v in attrs["shape"])
    indptr = np.asarray(elem["indptr"][:], dtype=np.int64)
    data, indices = elem["data"], elem["indices"]

    def read_csr(lo, hi):
        a, b = int(indptr[lo]), int(indptr[hi])
        return sp.csr_matrix((data[a:b], indices[a:b], indptr[lo : hi + 1] - a), shape=(hi - lo, shape[1]))

    return ChunkedCounts(shape, read_csr, chunk_spots, data.dtype)


def _open_root(path: Path, table: str | None):
    """The AnnData group of an ``.h5ad`` file, an AnnData ``.zarr`` store or a SpatialData store's table."""
    if path.suffix == ".h5ad":
        import h5py

        return h5py.File(path, "r")
    import zarr

    root = zarr.open_group(str(path), mode="r")
    if "tables" not in root:
        return root
    names = sorted(root["tables"].group_keys())
    if table is None and len(names) == 1:
        table = names[0]
    if table is None or table not in names:
        raise InputError(
            f"{path.name} holds the tables {names}; which one is the slide?",
            "pass --table NAME.",
            code="several_tables",
        )
    return root["tables"][table]


def open_counts(
    path: str | os.PathLike, layer: str | None = None, chunk_spots: int = DEFAULT_CHUNK_SPOTS, table: str | None = None
) -> ChunkedCounts:
    """The counts of an ``.h5ad`` file, an AnnData ``.zarr`` store or a SpatialData ``.zarr`` table (``table``;
    the only one when None), opened for reading by chunks of spots. The file stays open while the result lives."""
    path = Path(path)
    root = _open_root(path, table)
    where = f"layers['{layer}']" if layer else "X"
    try:
        elem = root["layers"][layer] if layer else root["X"]
    except KeyError as exc:
        raise InputError(
            f"{path.name} has no {where}.",
            "store the counts in X or name the layer that holds them.",
            code="missing_counts",
        ) from exc
    return from_group(elem, chunk_spots, where)


def open_lazy_slide(
    path: str | os.PathLike, layer: str | None = None, chunk_spots: int = DEFAULT_CHUNK_SPOTS, table: str | None = None
):
    """A slide on disk as (annotations, counts): an AnnData with its obs, var, obsm and uns read into memory and
    no X, and the counts as :class:`ChunkedCounts` left on disk (see :func:`open_counts`)."""
    import anndata as ad
    from anndata.io import read_elem

    from .read import read_h5ad

    path = Path(path)
    if path.suffix == ".h5ad":
        read_h5ad(path, backed=True).file.close()  # the usual checks and messages for a missing or foreign file
    elif not path.is_dir():
        raise InputError(
            f"{path} is neither an .h5ad file nor a .zarr store.",
            "chunked reading (--chunk-spots) takes an .h5ad or a .zarr; convert the slide first.",
            code="not_h5ad",
        )
    root = _open_root(path, table)
    parts = {name: read_elem(root[name]) for name in ("obs", "var", "obsm", "uns") if name in root}
    adata = ad.AnnData(X=None, **parts)
    return adata, open_counts(path, layer, chunk_spots, table)
