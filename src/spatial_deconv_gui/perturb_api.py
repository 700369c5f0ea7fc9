"""Spatial GRN perturbation (SpaceTravLR's method): one function per job.

* :func:`impute_expression` - cluster-wise MAGIC-style smoothing written as a layer.
* :func:`train_model` - fit per-cluster sparse group lasso models of each target gene on its TFs and the
  ligands its cell receives, into a resumable model directory.
* :func:`load_model` - read a model directory.
* :func:`run_perturbation` - knock out / overexpress genes, propagate, and return an AnnData copy with
  ``layers['perturb_delta']``, ``obsm['perturb_vectors']``, ``obsm['perturb_grid_vectors']`` and
  ``uns['perturb']``. :func:`perturbation_steps` yields each propagation step for streaming.
* :func:`gene_usage` - how many targets use each gene, with what total |coefficient| (before a knockout:
  a gene no target uses moves nothing but itself); :func:`usage_notices` says it in one line per gene, after
  :func:`usage_header`'s line naming the model's mode (per-cell models: |β| is each cluster's mean over its cells).
* :func:`knockout_screen` - each gene knocked out on its own with one loaded model, one row per gene of a
  Δ summary ranked by effect.
* :func:`interaction_lens` - one cell's modulators of one target with their β, and the neighbours sending each
  of its ligands (support sqrt(L·R), share of the received ligand); :func:`who_responds` - the first-step Δ of
  the targets a ligand knockout reaches, per cell.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .engines import cluster as dask_cluster
from .engines.base import RunControl
from .engines.perturb import priors as _priors
from .engines.perturb.config import TrainConfig
from .engines.perturb.impute import impute_clusterwise
from .engines.perturb.lens import CellLens, LensIndex, WhoResponds, cell_lens
from .engines.perturb.lens import who_responds as _who_responds
from .engines.perturb.percell import lasso_cells
from .engines.perturb.perturb import (
    PerturbModel,
    PerturbStep,
    iter_perturbation,
    model_propagator,
    usage_header,
    usage_notice,
)
from .engines.perturb.perturb import gene_usage as _gene_usage
from .engines.perturb.perturb import load_model as _load_model
from .engines.perturb.regrid import regrid as regrid_vectors
from .engines.perturb.vectors import vector_field
from .engines.registry import get_method
from .io.errors import InputError
from .io.perturbed import attach_perturbation, model_cells_adata
from .io.read import find_coordinates
from .io.slide import read_slide_adata
from .io.validate import validate

IMPUTED_LAYERS = ("imputed_count", "imputed", "magic", "smoothed")

__all__ = [
    "TrainConfig",
    "PerturbModel",
    "PerturbStep",
    "impute_expression",
    "train_model",
    "train_model_dir",
    "load_model",
    "run_perturbation",
    "perturbation_steps",
    "gene_usage",
    "usage_notices",
    "usage_header",
    "knockout_screen",
    "SCREEN_COLUMNS",
    "interaction_lens",
    "who_responds",
    "lens_index",
    "CellLens",
    "WhoResponds",
    "regrid_vectors",
]


def _control(control: RunControl | None, progress: Callable | None) -> RunControl:
    if control is not None:
        return control
    return RunControl(progress)


def _adata(spatial, slide_options: dict | None = None) -> ad.AnnData:
    return read_slide_adata(spatial, **(slide_options or {}))


def _clusters(adata: ad.AnnData, cluster_col: str) -> np.ndarray:
    if cluster_col not in adata.obs:
        raise InputError(
            f"obs has no column {cluster_col!r}; columns found: {list(adata.obs.columns)}.",
            "pass the cluster / cell-type column with --cluster-col.",
            code="missing_column",
        )
    s = adata.obs[cluster_col]
    if s.isna().any():
        raise InputError(
            f"{int(s.isna().sum())} cells have no {cluster_col!r} label.",
            "drop them (adata[~adata.obs[col].isna()]) or label them.",
            code="missing_labels",
        )
    return s.astype(str).to_numpy()


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def expression_matrix(adata: ad.AnnData, layer: str | None = None, genes=None) -> tuple[np.ndarray, str]:
    """Dense expression (cells x genes) for the model and a description of where it came from.

    ``layer=None`` picks an imputed layer when present, else ``X``; integer counts are log-normalised
    (``log1p`` of counts per 10,000) since the method expects normalised expression.
    """
    if layer is None:
        layer = next((k for k in IMPUTED_LAYERS if k in adata.layers), None)
    if layer is not None and layer not in adata.layers:
        raise InputError(
            f"layer {layer!r} not found; layers: {list(adata.layers.keys())}.",
            "name an existing layer or leave it out to use X.",
            code="missing_layer",
        )
    src = adata.layers[layer] if layer is not None else adata.X
    cols = None if genes is None else adata.var_names.get_indexer(list(genes))
    M = src if cols is None else src[:, cols]
    sample = src.data[:200000] if sp.issparse(src) else np.asarray(src).ravel()[:200000]
    counts_like = bool(sample.size) and (
        np.asarray(sample).dtype.kind in "iu" or (bool(np.all(np.mod(sample, 1) == 0)) and float(np.max(sample)) > 30)
    )
    where = f"layers['{layer}']" if layer is not None else "X"
    if counts_like:
        full = src.toarray() if sp.issparse(src) else np.asarray(src, dtype=np.float64)
        tot = full.sum(axis=1, keepdims=True)
        norm = np.log1p(full / np.maximum(tot, 1) * 1e4)
        out = norm if cols is None else norm[:, cols]
        return np.asarray(out, dtype=np.float64), f"log1p(counts per 10k of {where})"
    return np.asarray(_dense(M), dtype=np.float64), where


def impute_expression(
    adata: ad.AnnData,
    cluster_col: str,
    layer: str | None = None,
    key: str = "imputed",
    k: int = 15,
    t: int = 3,
    n_pcs: int = 20,
    progress=None,
    control=None,
) -> ad.AnnData:
    """Cluster-wise diffusion imputation written to ``adata.layers[key]`` (in place; returns ``adata``)."""
    ctl = _control(control, progress)
    X, _ = expression_matrix(adata, layer=layer if layer is not None else None)
    adata.layers[key] = impute_clusterwise(X, _clusters(adata, cluster_col), k=k, t=t, n_pcs=n_pcs, control=ctl)
    return adata


def _priors_frames(grn, lr, tfl, grn_columns, lr_columns, lr_resource, tfl_columns):
    grn_df, grn_sum = _priors.load_grn(grn, *(grn_columns or (None, None)))
    lr_df, lr_sum = (None, None)
    if lr is not None:
        lc = lr_columns or (None, None, None)
        lr_df, lr_sum = _priors.load_lr(lr, *lc, resource=lr_resource)
    tfl_df, tfl_sum = (None, None)
    if tfl is not None:
        tfl_df, tfl_sum = _priors.load_tfl(tfl, *(tfl_columns or (None, None, None)))
    sums = {"grn": grn_sum, "lr": lr_sum, "tfl": tfl_sum}
    for key, src in (("grn", grn), ("lr", lr), ("tfl", tfl)):
        if src is not None and not isinstance(src, pd.DataFrame):
            sums[f"{key}_file"] = str(Path(src).resolve())
        elif isinstance(src, pd.DataFrame):
            sums[key] = pd.util.hash_pandas_object(src, index=False).sum().item().__str__()
    return grn_df, lr_df, tfl_df, sums


def train_model(
    spatial,
    grn,
    lr,
    cluster_col: str,
    out: str | os.PathLike,
    *,
    tfl=None,
    layer: str | None = None,
    coord_key: str | None = None,
    targets=None,
    impute: bool = False,
    config: TrainConfig | None = None,
    grn_columns: tuple | None = None,
    lr_columns: tuple | None = None,
    lr_resource: str | None = None,
    tfl_columns: tuple | None = None,
    overwrite: bool = False,
    progress=None,
    control: RunControl | None = None,
    slide_options: dict | None = None,
    scheduler=None,
    n_workers: int | None = None,
    **params,
) -> PerturbModel:
    """Train the perturbation model of ``spatial`` (AnnData, or a slide in any format that
    :func:`..io.slide.read_slide` opens, with ``slide_options``) into the folder ``out``.

    ``grn``/``lr``/``tfl`` are prior tables (paths or DataFrames). ``params`` override :class:`TrainConfig`
    fields (``radius``, ``contact_radius``, ``radius_rule``, ``l1_reg``, ``max_ligands``, ...).
    ``radius_rule='pair'`` (default) receives each ligand-receptor pair's ligand at that pair's radius
    (secreted or contact), ``'ligand'`` at the radius of the ligand's first pair (SpaceTravLR's rule). Training
    resumes in an existing folder trained on the same data and settings (finished genes are skipped).
    Returns the model, built from what training computed (the folder is not read back). ``scheduler``
    (``"local"``, a Dask scheduler address or an open cluster; ``n_workers`` for ``"local"``) fits the batches
    of targets as tasks on Dask, with the same result (see :mod:`.engines.cluster`).
    """
    built: dict = {}
    manifest = train_model_dir(
        spatial,
        grn,
        lr,
        cluster_col,
        out,
        tfl=tfl,
        layer=layer,
        coord_key=coord_key,
        targets=targets,
        impute=impute,
        config=config,
        grn_columns=grn_columns,
        lr_columns=lr_columns,
        lr_resource=lr_resource,
        tfl_columns=tfl_columns,
        overwrite=overwrite,
        progress=progress,
        control=control,
        slide_options=slide_options,
        built=built,
        scheduler=scheduler,
        n_workers=n_workers,
        **params,
    )
    return model_from_training(out, manifest, built)


def model_from_training(out, manifest: dict, built: dict) -> PerturbModel:
    """The model a training run just wrote, from the arrays it kept (``train(..., built=...)``): the same
    object :func:`load_model` would read from the folder. Only store shards of an earlier, resumed run are
    read from disk."""
    from .engines.perturb import model_dir as md
    from .engines.perturb.perturb import (
        StoreTables,
        coefficients_from_store,
        model_from_coefficients,
        percell_from_manifest_store,
    )

    out = Path(out)
    kept = built.get("stores", {})
    parts = []
    for key, want in manifest[md.STORE_CHECKSUMS].items():
        if key in kept:
            parts.append(kept[key])
            continue
        got = md.file_sha256(out / key)
        if got != want:
            raise InputError(
                f"{out}: the coefficient store part {key} changed during training.",
                "run the same training command again.",
                code="bad_model_dir",
            )
        parts.append(md.read_shard(out / key))
    store = md.concat_stores(parts)
    targets = [str(t) for t in manifest["targets"]]
    genes = list(built["genes"])
    cluster_names = [str(c) for c in manifest["clusters"]]
    entries: dict = {}
    coefficients = coefficients_from_store(genes, cluster_names, targets, store, entries)
    percell = percell_from_manifest_store(out, manifest, genes, cluster_names, targets, store, entries)
    model = model_from_coefficients(
        manifest,
        genes,
        built["expr"],
        built["coords"],
        built["clusters"],
        coefficients,
        StoreTables(store, targets),
        path=out,
        obsm=built.get("obsm"),
        obs_names=built.get("obs_names"),
    )
    model.store = store  # as load_model sets it: gene_usage and the screen read the store
    model.percell = percell
    W = built.get("received")
    if W is None and (out / md.RECEIVED).exists():
        W = np.load(out / md.RECEIVED, allow_pickle=False)
    if W is not None and "received_ligands_mode" in manifest:
        names = [(str(a), float(r)) for a, r in manifest["received_channels"]]
        if W.shape == (len(built["expr"]), len(names)):
            model.received_cache = (names, W, manifest["received_ligands_mode"])
    return model


def train_model_dir(
    spatial,
    grn,
    lr,
    cluster_col: str,
    out: str | os.PathLike,
    *,
    tfl=None,
    layer: str | None = None,
    coord_key: str | None = None,
    targets=None,
    impute: bool = False,
    config: TrainConfig | None = None,
    grn_columns: tuple | None = None,
    lr_columns: tuple | None = None,
    lr_resource: str | None = None,
    tfl_columns: tuple | None = None,
    overwrite: bool = False,
    progress=None,
    control: RunControl | None = None,
    slide_options: dict | None = None,
    built: dict | None = None,
    scheduler=None,
    n_workers: int | None = None,
    **params,
) -> dict:
    """:func:`train_model` without building the model: writes the folder and returns its manifest (what the
    command line needs). ``built`` receives the arrays of the run (see ``engines.perturb.train.train``)."""
    ctl = _control(control, progress)
    adata = _adata(spatial, slide_options)
    # the one input check of every entry point; the model takes normalised expression, so counts need not be raw
    check_layer = layer if layer is not None and layer in adata.layers else None
    validate(adata, layer=check_layer, coord_key=coord_key, numi_column=None, counts=False).raise_if_failed()
    cfg = config or TrainConfig()
    if params:
        unknown = set(params) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown training options: {sorted(unknown)}")
        cfg = TrainConfig(**{**cfg.to_dict(), **params})
    clusters = _clusters(adata, cluster_col)
    found = find_coordinates(adata, coord_key)
    if found is None:
        raise InputError(
            "the slide has no coordinates.",
            "store them in obsm['spatial'] or name them with --coords.",
            code="missing_coordinates",
        )
    coords = found[0]
    grn_df, lr_df, tfl_df, sums = _priors_frames(grn, lr, tfl, grn_columns, lr_columns, lr_resource, tfl_columns)
    var = list(map(str, adata.var_names))
    vset = set(var)
    prior_genes = {"GRN": set(map(str, grn_df.tf)) | set(map(str, grn_df.target))}
    if lr_df is not None:
        prior_genes["ligand-receptor table"] = set(map(str, lr_df.ligand)) | set(map(str, lr_df.receptor))
    if tfl_df is not None:
        prior_genes["ligand-TF table"] = set(map(str, tfl_df.ligand)) | set(map(str, tfl_df.tf))
    _priors.check_prior_overlap(var, prior_genes)
    if targets is not None:
        targets = [str(t) for t in targets]
        _check_targets(targets, var, grn_df)
    needed = set(grn_df.tf) | set(grn_df.target if targets is None else targets)
    if lr_df is not None:
        needed |= set(lr_df.ligand) | set(lr_df.receptor)
    if tfl_df is not None:
        needed |= set(tfl_df.ligand) | set(tfl_df.tf)
    genes = [g for g in var if g in needed]
    if not genes:
        raise InputError(
            "none of the priors' genes are measured in the slide.",
            "check the species and the gene symbols of the prior tables.",
            code="no_overlap",
        )
    _check_cluster_sizes(clusters, cluster_col, cfg)
    if impute:
        X_all, where = expression_matrix(adata, layer=layer)
        keep = adata.var_names.get_indexer(genes)
        ctl.report("imputation", 0.0, "")
        X = impute_clusterwise(X_all[:, keep], clusters, control=ctl)
        where = f"cluster-wise imputation of {where}"
    else:
        X, where = expression_matrix(adata, layer=layer, genes=genes)
    if targets is None:
        targets = [g for g in dict.fromkeys(grn_df.target) if g in vset]
    obsm = {
        k: np.asarray(v)[:, :2]
        for k, v in adata.obsm.items()
        if k != "spatial"
        and getattr(v, "ndim", 0) == 2
        and np.asarray(v).shape[1] >= 2
        and np.issubdtype(np.asarray(v).dtype, np.number)
        and k.lower().startswith(("x_umap", "umap", "x_tsne"))
    }
    # the training code (and the lasso kernels) loads here, through the registry: a knockout never needs it
    _train, _ = get_method("perturb", kind="perturbation").load()

    with dask_cluster.using(scheduler, n_workers) as connected:
        return _train(
            X,
            genes,
            coords,
            clusters,
            grn_df,
            lr_df,
            out,
            targets=targets,
            tfl=tfl_df,
            config=cfg,
            control=ctl,
            checksums=sums,
            extra={
                "expression": where,
                "cluster_col": cluster_col,
                "coordinates": found[1],
                "obs_names_sha1": hashlib.sha1("\x00".join(map(str, adata.obs_names)).encode()).hexdigest(),
            },
            obsm=obsm,
            obs_names=list(map(str, adata.obs_names)),
            overwrite=overwrite,
            built=built,
            cluster=connected,
        )


def _listing(names, limit: int = 30) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_targets(targets: list[str], var: list[str], grn_df: pd.DataFrame) -> None:
    """A targets list naming genes the slide does not measure: every one of them, with the spelling the slide
    uses when only the case differs."""
    vset = set(var)
    unknown = [t for t in dict.fromkeys(targets) if t not in vset]
    if not unknown:
        return
    by_upper = {}
    for v in var:
        by_upper.setdefault(v.upper(), v)
    hints = [f"{t} (the slide has {by_upper[t.upper()]})" for t in unknown if t.upper() in by_upper]
    raise InputError(
        f"{len(unknown)} of the {len(set(targets))} target genes are not measured on the slide: "
        f"{_listing(unknown)}." + (f" Spelled differently on the slide: {_listing(hints, 10)}." if hints else ""),
        "remove them from the targets file, or fix their spelling (gene symbols are case-sensitive).",
        code="unknown_gene",
    )


def _check_cluster_sizes(clusters: np.ndarray, cluster_col: str, cfg: TrainConfig) -> None:
    """Every cluster too small for its lasso - counting the cells the lasso is fitted on, the held-out ones of
    full / hybrid mode left out: refuse (a model of nothing). Some: training names them (see
    ``engines.perturb.train``)."""
    fitted = lasso_cells(clusters, cfg.mode, cfg.holdout_fraction, cfg.seed)
    names, counts = np.unique(np.asarray(clusters).astype(str)[fitted], return_counts=True)
    every = set(map(str, np.unique(clusters)))
    counts = dict(zip(names.tolist(), counts.tolist()))
    min_cells = cfg.min_cells
    if every and all(counts.get(n, 0) < min_cells for n in every):
        held = " fitted (the rest held out to score the per-cell network)" if cfg.mode != "seed" else ""
        raise InputError(
            f"every {cluster_col!r} cluster has fewer than min_cells = {min_cells} cells{held} "
            f"({', '.join(f'{n}: {counts.get(n, 0)}' for n in sorted(every))}): no gene can get a model.",
            "use a coarser cluster column, or lower --min-cells"
            + (" or --holdout-fraction." if cfg.mode != "seed" else "."),
            code="clusters_too_small",
        )


def load_model(path: str | os.PathLike) -> PerturbModel:
    """Read a model directory written by :func:`train_model`."""
    return _load_model(path)


def _scope(model: PerturbModel, adata: ad.AnnData | None, cells, cell_type, cell_type_col, cluster):
    n = model.expr.shape[0]
    given = [x is not None for x in (cells, cell_type, cluster)]
    if sum(given) > 1:
        raise InputError("give at most one of cells, cell_type and cluster.", code="bad_scope")
    if cells is not None:
        arr = np.asarray(cells)
        if arr.dtype == bool:
            if arr.size != n:
                raise InputError(f"the cell mask has {arr.size} entries for {n} cells.", code="bad_cells")
            idx = np.flatnonzero(arr)
        elif arr.dtype.kind in "iu":
            idx = arr.astype(np.int64)
        else:
            pos = pd.Index(model.obs_names).get_indexer([str(c) for c in arr])
            if (pos < 0).any():
                bad = [str(c) for c, p in zip(arr, pos) if p < 0][:5]
                raise InputError(
                    f"cells {bad} are not in the model's data.", "use obs names or indices.", code="bad_cells"
                )
            idx = pos
        return idx, {"kind": "cells", "n_cells": int(len(idx))}
    if cluster is not None or cell_type is not None:
        value = str(cluster if cluster is not None else cell_type)
        if cluster is not None or cell_type_col is None:
            labels, col = model.clusters, model.manifest.get("cluster_col", "cluster")
        else:
            if adata is None or cell_type_col not in adata.obs:
                raise InputError(
                    f"no obs column {cell_type_col!r} to select cells from.",
                    "pass the slide (adata) that has it, or use the model's clusters.",
                    code="missing_column",
                )
            labels, col = adata.obs[cell_type_col].astype(str).to_numpy(), cell_type_col
        idx = np.flatnonzero(labels == value)
        if idx.size == 0:
            raise InputError(f"no cells with {col} == {value!r}; values: {sorted(set(labels))[:20]}.", code="bad_scope")
        return idx, {"kind": "cell_type", "column": col, "value": value, "n_cells": int(idx.size)}
    return None, {"kind": "all", "n_cells": int(n)}


def _embedding(model: PerturbModel, adata: ad.AnnData | None, embedding: str) -> np.ndarray:
    if embedding == "spatial":
        return model.coords[:, :2]
    for src in (adata.obsm if adata is not None else {}, model.obsm):
        if embedding in src:
            return np.asarray(src[embedding], dtype=np.float64)[:, :2]
    raise InputError(
        f"no embedding {embedding!r}.", "use 'spatial' or an obsm key such as 'X_umap'.", code="missing_embedding"
    )


def perturbation_steps(
    model,
    genes,
    values=0.0,
    *,
    cells=None,
    cell_type=None,
    cell_type_col=None,
    cluster=None,
    steps: int = 4,
    ligand_mode: str = "exact",
    device=None,
    adata=None,
    control: RunControl | None = None,
    progress=None,
) -> Iterator[PerturbStep]:
    """Yield each propagation step (``PerturbStep.delta``: cells x ``model.genes``) for streaming."""
    if not isinstance(model, PerturbModel):
        model = load_model(model)
    idx, _ = _scope(model, adata, cells, cell_type, cell_type_col, cluster)
    yield from iter_perturbation(
        model,
        genes,
        values,
        idx,
        steps,
        ligand_mode,
        device,
        control=_control(control, progress),
        propagator=model_propagator(model, ligand_mode=ligand_mode, device=device),
    )


def run_perturbation(
    model,
    genes,
    values=0.0,
    *,
    cells=None,
    cell_type=None,
    cell_type_col: str | None = None,
    cluster=None,
    steps: int = 4,
    ligand_mode: str = "exact",
    embedding: str = "spatial",
    k: int = 30,
    temperature: float = 0.05,
    null: str = "uniform",
    n_grid: int = 40,
    adata: ad.AnnData | None = None,
    device=None,
    on_step: Callable | None = None,
    progress=None,
    control: RunControl | None = None,
) -> ad.AnnData:
    """Simulate the perturbation and return an AnnData copy carrying the result.

    ``model`` is a :class:`PerturbModel` or a model folder; ``genes`` one gene or a list, ``values`` the
    expression to set (0 = knockout; one value or one per gene). The scope is every cell, or ``cells``
    (indices, obs names or a boolean mask), a ``cluster`` of the model, or ``cell_type`` (in
    ``adata.obs[cell_type_col]``, default the model's clusters). ``adata`` (same cells as the model) is the
    object copied; by default the model's own training data. ``on_step(PerturbStep)`` sees every step.
    """
    t0 = time.perf_counter()
    ctl = _control(control, progress)
    if not isinstance(model, PerturbModel):
        model = load_model(model)
    n = model.expr.shape[0]
    if adata is not None and adata.n_obs != n:
        raise InputError(
            f"the slide has {adata.n_obs} cells but the model {n}.",
            "pass the slide the model was trained on.",
            code="shape_mismatch",
        )
    idx, scope = _scope(model, adata, cells, cell_type, cell_type_col, cluster)
    genes_l = [genes] if isinstance(genes, str) else list(genes)
    vals = [float(values)] * len(genes_l) if np.isscalar(values) else [float(v) for v in values]
    prop = model_propagator(model, ligand_mode=ligand_mode, device=device)
    last = None
    for st in iter_perturbation(model, genes_l, vals, idx, steps, ligand_mode, device, control=ctl, propagator=prop):
        last = st
        if on_step is not None:
            on_step(st)
    delta = last.delta
    emb = _embedding(model, adata, embedding)
    ctl.report("vectors", 0.0, "")
    vf = vector_field(model.expr, delta, emb, k=k, temperature=temperature, null=null, n_grid=n_grid, control=ctl)
    if adata is None:
        out = model_cells_adata(
            model.expr, model.clusters, model.cluster_names, model.obs_names, model.genes, model.coords, model.obsm
        )
    else:
        out = adata.copy()
    missing = attach_perturbation(out, model.genes, delta, vf.cell_vectors, vf.cell_grid_vectors)
    out.uns["perturb"] = {
        "genes": genes_l,
        "values": vals,
        "scope": scope,
        "steps": int(steps),
        "parameters": {
            "ligand_mode": prop.mode,
            "embedding": embedding,
            "k": int(k),
            "temperature": float(temperature),
            "null": null,
            "n_grid": int(n_grid),
            "radius": float(model.manifest.get("radius", np.nan)),
            "contact_radius": float(model.manifest.get("contact_radius", np.nan)),
            "radius_rule": model.radius_rule,
            "received_channels": [f"{g}@{r:g}" for g, r in model.channels],
            "scale_factor": float(model.scale_factor),
            "model_dir": str(model.path) if model.path else "",
        },
        "grid_points": vf.grid_points,
        "grid_vectors": vf.grid_vectors,
        "model_genes_missing_from_output": missing,
        "runtime_s": round(time.perf_counter() - t0, 3),
    }
    ctl.report("vectors", 1.0, "done")
    return out


def gene_usage(model, genes) -> pd.DataFrame:
    """How much the model uses each of ``genes`` (one row per gene), to tell before a knockout whether it can
    move anything: ``in_model``, ``n_targets`` (targets with a non-zero coefficient on a modulator involving the
    gene: as a TF, a ligand or a receptor), ``total_abs_beta`` (sum of those |coefficients| over targets,
    clusters and modulators; for a target with per-cell coefficients each is the mean over the cluster's cells
    of its per-cell β, as ``beta_of`` says), ``n_targets_as_tf`` / ``_as_ligand`` / ``_as_receptor``, and
    ``n_candidate_targets`` (targets that had it as a modulator after the modulator screen, before the lasso);
    ``attrs['mode']`` is the mode that made the model. ``model`` is a :class:`PerturbModel` or a model folder."""
    if not isinstance(model, PerturbModel):
        model = load_model(model)
    return _gene_usage(model, genes)


def usage_notices(model, genes=None, *, usage: pd.DataFrame | None = None) -> list[str]:
    """One line per gene saying how many targets use it (and when none does, why a knockout moves nothing), from
    ``usage`` when given (a :func:`gene_usage` table: not computed again), else from ``gene_usage(model, genes)``.
    :func:`usage_header` says what the |β| in them is."""
    if usage is None:
        usage = gene_usage(model, genes)
    return [usage_notice(r) for _, r in usage.iterrows()]


SCREEN_COLUMNS = (
    "rank",
    "gene",
    "value",
    "n_cells",
    "total_abs_delta",
    "mean_abs_delta_per_cell",
    "max_abs_delta",
    "n_genes_moved",
    "top_genes",
    "n_targets",
    "total_abs_beta",
    "runtime_s",
)


def screen_row(model: PerturbModel, gene: str, value: float, delta: np.ndarray, moved_tol: float, top: int = 5):
    """The summary of one knockout's final Δ (cells x model genes), the perturbed gene's own column left out:
    total / per-cell mean / max |Δ|, genes whose |Δ| exceeds ``moved_tol`` in some cell, the ``top`` genes by
    summed |Δ| (``GENE:sum`` joined by ';')."""
    other = np.ones(len(model.genes), dtype=bool)
    other[model.genes.index(gene)] = False
    a = np.abs(delta[:, other])
    per_gene = a.sum(axis=0)
    names = np.asarray(model.genes)[other]
    order = np.argsort(-per_gene, kind="stable")[:top]
    return {
        "gene": gene,
        "value": float(value),
        "total_abs_delta": float(per_gene.sum()),
        "mean_abs_delta_per_cell": float(per_gene.sum() / max(delta.shape[0], 1)),
        "max_abs_delta": float(a.max()) if a.size else 0.0,
        "n_genes_moved": int((a.max(axis=0) > moved_tol).sum()) if a.size else 0,
        "top_genes": ";".join(f"{names[j]}:{per_gene[j]:.4g}" for j in order if per_gene[j] > moved_tol),
    }


@dataclass(eq=False)  # hashed by identity: each process builds the job's propagator once
class ScreenJob:
    """What every knockout of a screen reads (sent once to each Dask worker)."""

    model: PerturbModel
    cells: np.ndarray
    steps: int
    ligand_mode: str
    device: Any
    moved_tol: float
    keep_delta: bool


_PROPAGATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def screen_one(gene: str, value: float, job: ScreenJob, control: RunControl | None = None):
    """One knockout of a screen: its :func:`screen_row` (with its runtime) and, when the job keeps them, its
    final Δ (else None). A pure function of its arguments: the same here and on a Dask worker."""
    t0 = time.perf_counter()
    prop = _PROPAGATORS.get(job)
    if prop is None:
        prop = _PROPAGATORS[job] = model_propagator(job.model, ligand_mode=job.ligand_mode, device=job.device)
    last = None
    for last in iter_perturbation(  # noqa: B007
        job.model, [gene], [value], job.cells, job.steps, job.ligand_mode, job.device, control=control, propagator=prop
    ):
        pass
    row = screen_row(job.model, gene, value, last.delta, job.moved_tol)
    row["runtime_s"] = round(time.perf_counter() - t0, 3)
    return row, (last.delta if job.keep_delta else None)


def screen_pairs(genes, values) -> list[tuple[str, float]]:
    """The (gene, value) runs of a screen: each gene at one value, one gene at each value, or one value per gene."""
    genes_l = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    vals = [float(values)] * len(genes_l) if np.isscalar(values) else [float(v) for v in values]
    if len(vals) == 1 and len(genes_l) > 1:
        vals = vals * len(genes_l)
    elif len(genes_l) == 1 and len(vals) > 1:
        genes_l = genes_l * len(vals)
    if len(vals) != len(genes_l):
        raise InputError(
            f"{len(genes_l)} genes but {len(vals)} values.",
            "give one value, one per gene, or one gene with several values.",
            code="bad_perturbation",
        )
    pairs = list(zip(genes_l, vals))
    if len(set(pairs)) != len(pairs):
        raise InputError(
            "a gene is listed twice at the same value.", "list each gene (or value) once.", code="bad_perturbation"
        )
    return pairs


def _ranked(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in SCREEN_COLUMNS if c != "rank"])
    table = table.sort_values("total_abs_delta", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[list(SCREEN_COLUMNS)]


def knockout_screen(
    model,
    genes,
    values=0.0,
    *,
    cells=None,
    cell_type=None,
    cell_type_col: str | None = None,
    cluster=None,
    steps: int = 4,
    ligand_mode: str = "exact",
    device=None,
    adata: ad.AnnData | None = None,
    moved_tol: float = 1e-6,
    on_result: Callable | None = None,
    progress=None,
    control: RunControl | None = None,
    scheduler=None,
    n_workers: int | None = None,
    usage: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Knock out (or set to ``values``) each of ``genes`` on its own - separate runs, not one joint
    perturbation - with the model loaded once, and return one row per run (``SCREEN_COLUMNS``) ranked by
    ``total_abs_delta`` (sum of |Δ| over cells and genes after ``steps`` steps, the perturbed gene's own column
    left out; ``n_genes_moved`` counts genes with |Δ| > ``moved_tol`` in some cell; ``n_targets`` /
    ``total_abs_beta`` come from :func:`gene_usage`). ``values``: one for every gene, one per gene, or - with
    a single gene - several values, one run each (a dose screen). The scope options are those of
    :func:`run_perturbation`. ``on_result(gene, delta)`` sees each run's final Δ (cells x ``model.genes``).

    ``scheduler`` (``"local"``, a Dask scheduler address or an open cluster; ``n_workers`` for ``"local"``) runs
    the knockouts as Dask tasks, the model sent once to each worker; the table is the same. Runs lost to workers
    dying on them are named by :class:`~.engines.cluster.PiecesFailed`, whose ``partial`` is the others' table.
    ``usage``: the :func:`gene_usage` table of the genes when the caller has it already (not computed again).
    """
    ctl = _control(control, progress)
    if not isinstance(model, PerturbModel):
        model = load_model(model)
    pairs = screen_pairs(genes, values)
    genes_u = list(dict.fromkeys(g for g, _ in pairs))
    idx, scope = _scope(model, adata, cells, cell_type, cell_type_col, cluster)
    have = set() if usage is None else set(map(str, usage["gene"]))
    lack = [g for g in genes_u if g not in have]
    if lack:
        usage = _gene_usage(model, lack) if usage is None else pd.concat([usage, _gene_usage(model, lack)])
    usage = usage.drop_duplicates("gene").set_index("gene").loc[genes_u]
    unknown = usage.index[~usage["in_model"].to_numpy(bool)].tolist()
    if unknown:
        raise InputError(
            f"genes {unknown} are not in the model (not a target or modulator).",
            "perturb the model's genes (see its manifest 'genes').",
            code="unknown_gene",
        )
    job = ScreenJob(model, idx, int(steps), ligand_mode, device, float(moved_tol), on_result is not None)
    rows: list[dict | None] = [None] * len(pairs)
    n_done = 0

    def keep(i: int, got) -> None:
        nonlocal n_done
        row, delta = got
        g = pairs[i][0]
        row.update(
            n_cells=scope["n_cells"],
            n_targets=int(usage.loc[g, "n_targets"]),
            total_abs_beta=float(usage.loc[g, "total_abs_beta"]),
        )
        rows[i] = row
        n_done += 1
        ctl.report("screen", n_done / len(pairs), f"{g} ({n_done}/{len(pairs)})")
        if on_result is not None:
            on_result(g, delta)

    with dask_cluster.using(scheduler, n_workers) as connected:
        if connected is None:
            for i, (g, v) in enumerate(pairs):
                ctl.report("screen", i / len(pairs), g)
                keep(i, screen_one(g, v, job, control=ctl))
        else:
            try:
                connected.run(
                    screen_one, pairs, shared=connected.share(job), on_result=keep, control=ctl, name="knockout"
                )
            except dask_cluster.PiecesFailed as exc:
                lost = [f"{pairs[i][0]}={pairs[i][1]:g}" for i in sorted(exc.failed)]
                raise exc.named(lost, "knockouts", partial=_ranked([r for r in rows if r is not None])) from None
    ctl.report("screen", 1.0, "done")
    return _ranked(rows)


def lens_index(model) -> LensIndex:
    """What :func:`interaction_lens` and :func:`who_responds` need of a model, built once (a k-d tree of the
    cells, the coefficients by target, the received ligands): pass it to them when asking about many cells."""
    if not isinstance(model, PerturbModel):
        model = load_model(model)
    return LensIndex(model)


def interaction_lens(
    model, cell: int, gene: str, *, top: int | None = None, index: LensIndex | None = None
) -> CellLens:
    """What drives ``gene`` in ``cell`` (an index into the model's cells): ``.modulators``, one row per non-zero
    coefficient largest |β| first (``top`` of them) - TFs, ligand→receptor pairs (``L$R``), TF–ligand terms
    (``L#TF``) - with β (the coefficients of the cell's cluster), the feature's value in the cell, the term
    β·feature, the received ligand and whether the cell expresses the partner; ``.senders``, for each supported
    ligand term, every other cell within the term's radius that expresses the ligand, with its distance, kernel
    weight, share of the received ligand ((s/N)·exp(-d²/2r²)·L), support sqrt(L_sender·R_cell) and part of the
    term. ``model`` is a :class:`PerturbModel` or a model folder; ``index`` from :func:`lens_index`."""
    if index is None:
        index = lens_index(model)
    return cell_lens(index.model, cell, gene, top=top, index=index)


def who_responds(
    model,
    ligand: str,
    value: float = 0.0,
    *,
    cells=None,
    ligand_mode: str = "exact",
    device=None,
    index: LensIndex | None = None,
) -> WhoResponds:
    """Who responds to a ligand knockout: the first propagation step of setting ``ligand`` to ``value`` in
    ``cells`` (indices; default all) - ``.delta`` (cells x ``model.genes``: the first step of
    :func:`perturbation_steps`, computed by it), ``.targets`` (the targets it reaches, through which terms, mean
    and largest |Δ|), ``.of(gene)`` and ``.total_abs()`` per cell."""
    if index is None:
        index = lens_index(model)
    return _who_responds(index.model, ligand, value, cells=cells, ligand_mode=ligand_mode, device=device, index=index)
