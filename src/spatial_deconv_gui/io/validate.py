"""Checks a spatial slide and a reference before any engine sees them.

Every problem carries a stable ``code`` (for tests and scripts), the file it concerns, a message that
names the problem with the numbers involved, and a one-line fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .. import keys
from .chunked import ChunkedCounts
from .count_stats import CountStats, count_stats
from .errors import InputError
from .read import counts_matrix, find_coordinates, labelled, read_h5ad
from .slide import read_slide_adata

MIN_SHARED_FRACTION = 0.10
MIN_CELLS_PER_TYPE = 25
# The torch engines hold counts in float32, whose integers are exact up to 2**24; a single gene in a single spot
# never reaches that many UMIs, so a larger value is a summed or corrupt matrix, not counts.
MAX_COUNT = 2**24


@dataclass
class Problem:
    code: str
    where: str
    message: str
    fix: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.where}] {self.message} Fix: {self.fix}"


@dataclass
class ValidationReport:
    problems: list[Problem] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    # each spot's total of |counts| from the check's one pass (None until checked): runs reuse it to find the
    # spots without counts instead of summing the matrix again
    spot_totals: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def codes(self) -> list[str]:
        return [p.code for p in self.problems]

    def add(self, code: str, where: str, message: str, fix: str, severity: str = "error"):
        self.problems.append(Problem(code, where, message, fix, severity))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems], "summary": self.summary}

    def format(self) -> str:
        if not self.problems:
            return "OK: no problems found."
        head = "OK with warnings:" if self.ok else f"{sum(p.severity == 'error' for p in self.problems)} problem(s):"
        return "\n".join([head] + [f"  - {p.severity.upper()}: {p}" for p in self.problems])

    def raise_if_failed(self):
        if not self.ok:
            first = next(p for p in self.problems if p.severity == "error")
            raise InputError(self.format(), code=first.code)


def _load(
    obj, where: str, report: ValidationReport, slide: bool = False, options: dict | None = None
) -> ad.AnnData | None:
    if obj is None or isinstance(obj, ad.AnnData):
        return obj
    try:
        return read_slide_adata(obj, **(options or {})) if slide else read_h5ad(obj)
    except InputError as exc:
        report.add(exc.code, where, exc.problem, exc.fix or "")
        return None


def _check_counts(
    x: sp.csr_matrix, where: str, report: ValidationReport, layer: str | None, counts: bool = True
) -> np.ndarray | None:
    """Values every method refuses (NaN, infinite) and, when ``counts`` is needed, what raw UMI counts cannot be.

    Returns each row's total of |x| (None for a matrix of non-numbers), from the same single pass.
    """
    src = f"layers['{layer}']" if layer else "X"
    dtype = np.dtype(x.dtype) if isinstance(x, ChunkedCounts) else x.data.dtype
    if dtype.kind not in "biuf":
        if x.shape[0] * x.shape[1]:
            report.add(
                "non_numeric_counts",
                where,
                f"{src} holds {dtype} values, not numbers.",
                "store raw integer counts in X (or name a counts layer).",
            )
        return None
    if isinstance(x, ChunkedCounts):  # a slide read by chunks of spots: the chunks' stats add up
        stats = CountStats.merged([count_stats(block, MAX_COUNT) for _, _, block in x.chunks()])
    else:
        stats = count_stats(x, MAX_COUNT)
    if stats.n_nan or stats.n_inf:
        report.add(
            "nan_counts",
            where,
            f"{src} holds {stats.n_nan} NaN and {stats.n_inf} infinite value(s).",
            "use raw integer counts; replace missing values with 0 or drop those spots/genes.",
        )
    if not counts:
        return stats.row_abs_totals
    if stats.n_negative:
        report.add(
            "negative_counts",
            where,
            f"{src} holds {stats.n_negative} negative value(s) (min {stats.min_finite:g}).",
            "use raw UMI counts (adata.raw or a 'counts' layer), not scaled or centred data.",
        )
    if stats.n_fractional:
        report.add(
            "non_integer_counts",
            where,
            f"{src} holds {stats.n_fractional} non-integer value(s); the data look normalised or log-transformed.",
            "use raw UMI counts (adata.raw or a 'counts' layer), or pass --layer counts.",
        )
    if stats.n_huge:
        report.add(
            "huge_counts",
            where,
            f"{src} holds {stats.n_huge} value(s) above {MAX_COUNT:,} (largest {stats.max_finite:.4g}): no gene "
            "reaches that many UMIs in one spot or cell.",
            "check that the matrix holds raw UMI counts per spot and gene, not sums over samples or a damaged value.",
        )
    return stats.row_abs_totals


def _check_numi(adata: ad.AnnData, column: str | None, totals: np.ndarray, where: str, report: ValidationReport):
    """The library-size column the engines divide by, when the file has one: finite and positive where counted."""
    if not column or column not in adata.obs:
        return
    try:
        values = np.asarray(adata.obs[column], dtype=float)
    except (TypeError, ValueError):
        report.add(
            "bad_numi",
            where,
            f"obs[{column!r}] (the total UMI per observation) is not numeric.",
            "fix or drop the column, or pass --numi-col none to use the row sums (--ref-numi-col for the reference).",
        )
        return
    bad = (~np.isfinite(values) | (values <= 0)) & (totals > 0)  # empty spots are left out of the fit anyway
    if bad.any():
        report.add(
            "bad_numi",
            where,
            f"obs[{column!r}] (the total UMI per observation) is missing, infinite or not positive for "
            f"{int(bad.sum())} observation(s) that have counts.",
            "fix or drop the column, or pass --numi-col none to use the row sums (--ref-numi-col for the reference).",
        )


def empty_spots(adata: ad.AnnData, layer: str | None = None, totals: np.ndarray | None = None) -> np.ndarray:
    """Spots whose counts are all zero: every method leaves them out, and they come back as NaN rows.

    ``totals``: each spot's total of |counts| when already known (:attr:`ValidationReport.spot_totals`)."""
    if totals is None or len(totals) != adata.n_obs:
        totals = count_stats(counts_matrix(adata, layer), MAX_COUNT).row_abs_totals
    return np.asarray(totals) == 0


def _check_names(adata: ad.AnnData, where: str, report: ValidationReport):
    for axis, names in (("obs", adata.obs_names), ("var", adata.var_names)):
        if not names.is_unique:
            dups = names[names.duplicated()].unique()
            report.add(
                f"duplicated_{axis}_names",
                where,
                f"{len(dups)} duplicated {axis} name(s), e.g. {list(map(str, dups[:5]))}.",
                f"make them unique with adata.{axis}_names_make_unique().",
            )


def validate(
    spatial,
    reference=None,
    *,
    cell_type_col: str = keys.CELL_TYPE,
    layer: str | None = None,
    reference_layer: str | None = None,
    coord_key: str | None = None,
    min_cells_per_type: int = MIN_CELLS_PER_TYPE,
    min_shared_fraction: float = MIN_SHARED_FRACTION,
    slide_options: dict | None = None,
    numi_column: str | None = keys.NUMI,
    reference_numi_column: str | None = keys.NUMI,
    counts: bool = True,
    counts_source: ChunkedCounts | None = None,
) -> ValidationReport:
    """Check a slide (AnnData, .h5ad, Space Ranger / Xenium folder, SpatialData .zarr) and optionally its
    reference; never modifies either. ``slide_options`` go to :func:`..io.slide.read_slide` (table, bin_size).

    This is the one check that ``validate``, ``run``, ``perturb train``, the widgets and the API go through.
    ``counts=False`` (perturbation training, which takes normalised expression) skips the checks that only raw
    counts must pass (negative, non-integer, huge values) and the warning about spots without counts. Spots with
    no counts at all are a warning: the runs leave them out and keep them in the output as NaN rows.
    ``counts_source``: the slide's counts read by chunks of spots (a slide opened with
    :func:`~.chunked.open_lazy_slide`, whose AnnData has no X); checked a chunk at a time.
    """
    report = ValidationReport()
    sp_name = os.path.basename(str(spatial)) if not isinstance(spatial, ad.AnnData) else "spatial"
    ref_name = (
        os.path.basename(str(reference))
        if reference is not None and not isinstance(reference, ad.AnnData)
        else "reference"
    )
    sdata = _load(spatial, sp_name, report, slide=True, options=slide_options)
    rdata = _load(reference, ref_name, report)

    if sdata is not None:
        _check_slide(sdata, rdata, sp_name, report, cell_type_col, layer, coord_key, numi_column, counts, counts_source)
    if rdata is not None:
        _check_reference(
            rdata, ref_name, report, cell_type_col, reference_layer, reference_numi_column, min_cells_per_type
        )

    if sdata is not None and rdata is not None and sdata.n_vars and rdata.n_vars:
        shared = np.intersect1d(np.asarray(sdata.var_names, dtype=str), np.asarray(rdata.var_names, dtype=str)).size
        denom = min(sdata.n_vars, rdata.n_vars)
        report.summary["shared_genes"] = int(shared)
        if shared / denom < min_shared_fraction:
            report.add(
                "few_shared_genes",
                f"{sp_name} + {ref_name}",
                f"only {shared} gene(s) are shared ({100 * shared / denom:.1f}% of the smaller gene list: "
                f"{sdata.n_vars} spatial, {rdata.n_vars} reference); at least {100 * min_shared_fraction:.0f}% "
                "are needed.",
                "use gene symbols (or Ensembl ids) in both var_names, and the same species.",
            )
    return report


def _check_shape(adata: ad.AnnData, where: str, report: ValidationReport, rows: str) -> bool:
    """Zero rows or zero genes: nothing else can be checked or fitted."""
    if adata.n_obs == 0:
        report.add(
            f"no_{rows}",
            where,
            f"the file has no {rows} (0 x {adata.n_vars}).",
            f"check that the right file was given and that a filter did not remove every {rows[:-1]}.",
        )
    if adata.n_vars == 0:
        report.add(
            "no_genes",
            where,
            f"the file has no genes ({adata.n_obs} x 0).",
            "check that the right file was given and that a filter did not remove every gene.",
        )
    return adata.n_obs > 0 and adata.n_vars > 0


def _check_coordinates(coords: np.ndarray, source: str, where: str, report: ValidationReport):
    if not np.isfinite(coords).all():
        report.add(
            "nan_coordinates",
            where,
            f"{int((~np.isfinite(coords)).any(axis=1).sum())} spot(s) have NaN or infinite coordinates (in {source}).",
            "drop those spots or fix their coordinates.",
        )


def check_drawable(adata: ad.AnnData, coords: np.ndarray, where: str, source: str = "obsm['spatial']"):
    """Raise one InputError when a slide cannot be drawn at all: no spots, or spots without finite coordinates.
    The napari reader checks this before making layers (the counts are checked when a run starts); the wording
    is :func:`validate`'s."""
    report = ValidationReport()
    _check_shape(adata, where, report, "spots")
    if adata.n_obs:
        _check_coordinates(np.asarray(coords, dtype=float), source, where, report)
    report.problems = [p for p in report.problems if p.code in ("no_spots", "nan_coordinates")]
    report.raise_if_failed()


def _check_slide(
    sdata, rdata, sp_name, report, cell_type_col, layer, coord_key, numi_column, counts, counts_source=None
):
    report.summary["spatial"] = {"n_spots": int(sdata.n_obs), "n_genes": int(sdata.n_vars)}
    try:
        found = find_coordinates(sdata, coord_key)
    except InputError as exc:
        report.add("shape_mismatch" if "shape" in exc.problem else exc.code, sp_name, exc.problem, exc.fix or "")
        found = ("bad", None)
    if found is None:
        if rdata is None and cell_type_col in sdata.obs:
            msg = "has no spot coordinates but has a cell-type column: it looks like a reference, not a slide."
        else:
            msg = "has no spot coordinates (looked in obsm 'spatial', 'X_spatial', 'spatial_loc' and obs x/y)."
        report.add(
            "missing_coordinates",
            sp_name,
            f"the spatial file {msg}",
            "store coordinates in obsm['spatial'] (spots x 2) or name them with --coords.",
        )
    elif found[1] is not None:
        _check_coordinates(found[0], found[1], sp_name, report)
    if not _check_shape(sdata, sp_name, report, "spots"):
        _check_names(sdata, sp_name, report)
        return
    try:
        sx = counts_source if counts_source is not None else counts_matrix(sdata, layer)
    except InputError as exc:
        report.add(exc.code, sp_name, exc.problem, exc.fix or "")
        sx = None
    if sx is not None:
        if sx.shape != (sdata.n_obs, sdata.n_vars):
            report.add(
                "shape_mismatch",
                sp_name,
                f"counts are {sx.shape} but the file has {sdata.n_obs} spots x {sdata.n_vars} genes.",
                "rewrite the file so X matches obs and var.",
            )
        totals = _check_counts(sx, sp_name, report, layer, counts)
        report.spot_totals = totals
        if totals is not None:
            n_empty = int((totals == 0).sum())
            if n_empty == sdata.n_obs:
                report.add(
                    "no_counts",
                    sp_name,
                    f"all {n_empty} spot(s) have no counts at all.",
                    "check that X (or --layer) holds the counts.",
                )
            elif n_empty and counts:
                report.add(
                    "empty_spots",
                    sp_name,
                    f"{n_empty} of {sdata.n_obs} spot(s) have no counts at all; they are left out of the fit "
                    "and kept in the result as NaN rows.",
                    "nothing to do, or drop them first: adata = adata[adata.X.sum(axis=1) > 0].copy().",
                    severity="warning",
                )
            report.summary["spatial"]["median_umi"] = float(np.median(totals))
            if counts:
                _check_numi(sdata, numi_column, totals, sp_name, report)
    _check_names(sdata, sp_name, report)


def _check_reference(rdata, ref_name, report, cell_type_col, reference_layer, numi_column, min_cells_per_type):
    report.summary["reference"] = {"n_cells": int(rdata.n_obs), "n_genes": int(rdata.n_vars)}
    has_shape = _check_shape(rdata, ref_name, report, "cells")
    if cell_type_col not in rdata.obs:
        report.add(
            "unknown_cell_type_col",
            ref_name,
            f"the reference has no obs column {cell_type_col!r}; its columns are {list(map(str, rdata.obs.columns))}.",
            "pass --cell-type-col with the column that holds the cell-type labels.",
        )
    elif has_shape:
        labels = rdata.obs[cell_type_col]
        ok = labelled(labels)
        vc = labels[ok].astype(str).value_counts()
        report.summary["reference"]["n_types"] = int(vc.size)
        if not ok.any():
            report.add(
                "no_cell_types",
                ref_name,
                f"the column {cell_type_col!r} holds no cell types: all {rdata.n_obs} value(s) are missing or blank.",
                "pass --cell-type-col with the column that holds the cell-type labels, or label the cells.",
            )
        else:
            if not ok.all():
                report.add(
                    "unlabelled_cells",
                    ref_name,
                    f"{int((~ok).sum())} of {rdata.n_obs} cell(s) have a missing or blank {cell_type_col!r}; they "
                    "are left out of the reference.",
                    "nothing to do, or label them.",
                    severity="warning",
                )
            if vc.size < 2:
                report.add(
                    "too_few_types",
                    ref_name,
                    f"the reference has {vc.size} cell type(s) in {cell_type_col!r}.",
                    "use a reference with at least two labelled cell types.",
                )
            small = vc[vc < min_cells_per_type]
            if len(small):
                listed = ", ".join(f"{k} ({v})" for k, v in small.items())
                report.add(
                    "small_cell_types",
                    ref_name,
                    f"{len(small)} cell type(s) have fewer than {min_cells_per_type} cells: {listed}.",
                    "merge or drop them, or lower the minimum (--cell-min); they would be dropped from the fit.",
                )
    if has_shape:
        try:
            rx = counts_matrix(rdata, reference_layer)
            totals = _check_counts(rx, ref_name, report, reference_layer)
            if totals is not None:
                _check_numi(rdata, numi_column, totals, ref_name, report)
        except InputError as exc:
            report.add(exc.code, ref_name, exc.problem, exc.fix or "")
    _check_names(rdata, ref_name, report)
