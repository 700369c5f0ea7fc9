"""RCTD end to end: reference profiles -> gene lists -> pixel filters -> platform effect -> sigma -> pixels."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ... import keys
from ...io.chunked import ChunkedCounts, from_matrix
from ...io.inputs import ReferenceInput, SpatialInput
from ...io.partial import PartialStore, array_digest
from ..base import DeconvResult, PartialResult, RunControl, thread_cap
from ..cluster import TASK_THREADS, Cluster, PiecesFailed, ranges
from ..devices import DeviceOutOfMemory, is_out_of_memory, torch_device
from .chunks import PixelModel, fit_chunk, output_arrays
from .config import RCTDConfig, check_config
from .genes import select_de_genes
from .likelihood import build_tables
from .modes import SPOT_CLASSES, SolverSettings
from .reference import build_profiles
from .sigma import estimate_sigma, fit_bulk

KEY = "rctd"


def _slot(name: str) -> str:
    """obs / obsm / uns names of RCTD's own outputs (spacexr's results fields), beyond keys.py's common ones."""
    return f"{KEY}_{name}"


FILTERED = "filtered"


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def auto_batch_size(n_genes: int, n_types: int, mode: str, device: torch.device, itemsize: int = 8) -> int:
    """Pixels per batch so that the batch's working set stays within a quarter of free memory."""
    per_pixel = itemsize * (8 * n_genes + 6 * n_types * n_types + 16 * n_types)
    if mode == "doublet":
        per_pixel += itemsize * 10 * 4 * n_genes * (1 if device.type == "cpu" else 3)
    elif mode == "multi":
        per_pixel += itemsize * 16 * 6 * n_genes * (1 if device.type == "cpu" else 3)
    n = _available_memory(device) // 4 // max(per_pixel, 1)
    # on CPU larger batches gain little and make progress/cancel coarse
    hi = 4096 if device.type == "cpu" else 65536
    return int(max(64, min(n, hi)))


def _as_chunked(counts, chunk_spots: int | None) -> ChunkedCounts:
    if isinstance(counts, ChunkedCounts):
        return counts
    # an in-memory matrix: large chunks (row slices cost a copy of the block, nothing else)
    return from_matrix(counts, chunk_spots or IN_MEMORY_CHUNK_SPOTS)


IN_MEMORY_CHUNK_SPOTS = 200_000


class _FittedRows:
    """The fitted spots' counts on the regression genes, in fitted order, for batches [lo, hi) asked in increasing
    order: read from the source chunk by chunk, holding at most one chunk plus one batch. Rows before an asked
    batch are skipped, and a source chunk holding none of the rows still wanted is not read (a resumed run
    skips its finished chunks)."""

    def __init__(self, source: ChunkedCounts, fitted: np.ndarray, cols: np.ndarray):
        self._source = source
        self._bounds = iter(source.bounds())
        self._fitted = fitted
        self._cols = cols
        self._pending = sp.csr_matrix((0, len(cols)))
        self._start = 0  # fitted index of the first pending row

    def take(self, lo: int, hi: int) -> sp.csr_matrix:
        if lo < self._start:
            raise ValueError("batches must be asked in order")
        while self._start + self._pending.shape[0] < hi:
            # rows before lo are done (an out-of-memory retry asks lo again, never earlier): drop them first
            end = self._start + self._pending.shape[0]
            drop = min(lo, end) - self._start
            self._pending = self._pending[drop:]
            self._start += drop
            c_lo, c_hi = next(self._bounds)
            keep = np.flatnonzero(self._fitted[c_lo:c_hi])
            skip = min(max(0, lo - end), keep.size)  # this chunk's rows before lo (nothing is pending then)
            self._start += skip
            keep = keep[skip:]
            if keep.size:
                block = self._source.block(c_lo, c_hi)
                self._pending = sp.vstack([self._pending, block[keep][:, self._cols]], format="csr")
        return self._pending[lo - self._start : hi - self._start]


def _categorical(values: list[str] | np.ndarray, categories: list[str]) -> pd.Categorical:
    return pd.Categorical(values, categories=list(categories))


def run_rctd(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: RCTDConfig = RCTDConfig(),
    control: RunControl | None = None,
    cluster: Cluster | None = None,
    partial_store: PartialStore | None = None,
) -> DeconvResult:
    """Run RCTD on ``spatial`` with cell-type profiles learned from ``reference``.

    With ``cluster`` (a connected :class:`~..cluster.Cluster`) the per-spot fits run as tasks there, in the
    chunks this process would use, after the shared platform-effect and sigma steps here; the answer is the
    same. Spots of a chunk that kept killing its workers are left unfitted and named by
    :class:`~..cluster.PiecesFailed` (its ``partial`` holds the result for the others).

    With ``partial_store`` (:class:`~...io.partial.PartialStore`) each finished chunk's results are written
    there as it comes (in completion order on a cluster) and the result is assembled from it; chunks it holds
    from an earlier, stopped run of the same plan are read back, not refitted."""
    t_start = time.perf_counter()
    check_config(config)
    control = control or RunControl()
    device = torch_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    with thread_cap(config.n_threads):
        return _run(spatial, reference, config, control, device, dtype, t_start, cluster, partial_store)


def _chunks_to_fit(n: int, batch: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunks of ``ranges(n, batch)`` not yet finished (``done``: finished row ranges), in order; a chunk only
    partly covered (ranges left by an out-of-memory split) gives the pieces it still lacks."""
    covered = np.zeros(n, dtype=bool)
    for lo, hi in done:
        covered[lo:hi] = True
    todo = []
    for lo, hi in ranges(n, batch):
        if covered[lo:hi].all():
            continue
        if not covered[lo:hi].any():
            todo.append((lo, hi))
            continue
        gaps = np.flatnonzero(np.diff(np.concatenate([[True], covered[lo:hi], [True]]).astype(np.int8)))
        todo += [(lo + int(a), lo + int(b)) for a, b in zip(gaps[::2], gaps[1::2])]
    return todo


def _fit_here(model, rows: _FittedRows, numi, todo, batch, finish, device, control) -> int:
    """The chunks ``todo`` one after the other in this process (halving a chunk on CUDA out-of-memory, and the
    later ones with it), their rows read as they come; returns the chunk size that went through."""
    queue = list(todo)
    tried = [batch]
    while queue:
        control.check_cancel()
        lo, hi = queue.pop(0)
        if hi - lo > batch:  # a smaller size went through after an out-of-memory error: keep to it
            queue[:0] = [(lo + a, lo + b) for a, b in ranges(hi - lo, batch)]
            continue
        try:
            res = fit_chunk(rows.take(lo, hi), numi[lo:hi], model)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            torch.cuda.empty_cache()
            if hi - lo <= 1:
                raise DeviceOutOfMemory.after("RCTD", device, tried) from exc
            batch = max(1, (hi - lo) // 2)
            tried.append(batch)
            warnings.warn(f"RCTD: CUDA out of memory, retrying with batch size {batch}", RuntimeWarning, stacklevel=2)
            queue.insert(0, (lo, hi))
            continue
        finish(lo, hi, res)
    return batch


def _fit_on_cluster(cluster: Cluster, model, rows: _FittedRows, numi, todo, finish, control):
    """The chunks ``todo`` as tasks on the cluster, each sent its own rows, read as tasks are submitted (a few
    per worker in flight, so this process holds a few chunks of counts at a time); returns the (lo, hi) of
    chunks the cluster gave up on and the :class:`PiecesFailed` saying why (None when every chunk finished)."""
    try:
        cluster.run(
            fit_chunk,
            ((rows.take(lo, hi), numi[lo:hi]) for lo, hi in todo),
            shared=cluster.share(dataclasses.replace(model, task_threads=TASK_THREADS)),
            on_result=lambda i, res: finish(*todo[i], res),
            control=control,
            name="rctd-spots",
            in_flight=2 * max(1, cluster.n_workers) + 1,
        )
    except PiecesFailed as exc:
        return [todo[i] for i in sorted(exc.failed)], exc
    return [], None


def _model_fingerprint(model: PixelModel, sigma: float, max_count: int, k_val, types) -> dict[str, Any]:
    """What every chunk's fit depends on besides its rows: the partial store resumes only chunks fitted with it."""
    s = model.settings
    return {
        "profiles": array_digest(model.profiles),
        "types": list(map(str, types)),
        "sigma": float(sigma),
        "max_count": int(max_count),
        "k_val": k_val,
        "solver": [s.n_iter, s.n_iter_score, s.min_change, s.step, str(s.dtype), str(s.device)],
        "mode": model.mode,
        "thresholds": [model.confidence_threshold, model.doublet_threshold],
        "type_class": model.type_class,
        "max_types": model.max_types,
        "intervals": [model.uncertainty, model.interval_draws, model.seed],
    }


def _run(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: RCTDConfig,
    control: RunControl,
    device: torch.device,
    dtype: torch.dtype,
    t_start: float,
    cluster: Cluster | None = None,
    partial_store: PartialStore | None = None,
) -> DeconvResult:
    # ---- reference ---------------------------------------------------------------------------------
    control.report("reference", 0.0, "building cell type profiles")
    ref = build_profiles(
        reference.counts,
        reference.genes,
        reference.cell_types,
        reference.n_umi,
        type_order=reference.type_names,
        cell_min=config.cell_min,
        n_max_cells=config.n_max_cells,
        umi_min=config.ref_umi_min,
        strict=config.strict,
        seed=config.seed,
    )
    types = ref.cell_types
    K = len(types)
    control.report("reference", 1.0, f"{K} cell types")
    control.check_cancel()

    # ---- pixel filters and genes -------------------------------------------------------------------
    # The counts are read in chunks of spots (ChunkedCounts): whole passes over the slide (totals, pseudo-bulk)
    # add up per chunk, and the pixel fits take their rows chunk by chunk, so a slide on disk larger than memory
    # runs with one chunk of counts in memory. An in-memory matrix goes through the same passes (row slices).
    control.report("genes", 0.0, "selecting informative genes")
    source = _as_chunked(spatial.counts, config.chunk_spots)
    n_spots = source.n_spots
    s_genes = np.asarray(spatial.genes).astype(str)
    numi_all = np.asarray(spatial.n_umi, dtype=np.float64)
    umi_ok = (numi_all >= config.umi_min) & (numi_all <= config.umi_max)
    total_counts = np.zeros(n_spots)
    bulk_first = np.zeros(len(s_genes))
    for lo, hi, block in source.chunks():  # pass 1: totals and the pseudo-bulk of the spots passing the UMI filters
        total_counts[lo:hi] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        ok = umi_ok[lo:hi] & (total_counts[lo:hi] >= config.counts_min)
        if ok.any():
            bulk_first += np.asarray(block[np.flatnonzero(ok)].sum(axis=0, dtype=np.float64)).ravel()
        control.check_cancel()
    first_pass = umi_ok & (total_counts >= config.counts_min)
    if not first_pass.any():
        raise ValueError(
            f"RCTD: no spot passes the filters (nUMI in [{config.umi_min}, {config.umi_max}], "
            f">= {config.counts_min} counts)"
        )
    genes_reg = select_de_genes(
        ref.profiles,
        ref.genes,
        s_genes,
        bulk_first,
        config.fc_cutoff_reg,
        config.gene_cutoff_reg,
        config.min_obs,
        label="regression",
    )
    genes_bulk = select_de_genes(
        ref.profiles,
        ref.genes,
        s_genes,
        bulk_first,
        config.fc_cutoff,
        config.gene_cutoff,
        config.min_obs,
        label="platform-effect",
    )
    s_pos = {g: i for i, g in enumerate(s_genes)}
    r_pos = {g: i for i, g in enumerate(ref.genes)}
    bulk_cols = np.array([s_pos[g] for g in genes_bulk])
    reg_cols_all = np.array([s_pos[g] for g in genes_reg], dtype=np.int64)
    bulk_counts_per_spot = np.zeros(n_spots)
    bulk_vec = np.zeros(len(bulk_cols))
    reg_max = 0.0
    for lo, hi, block in source.chunks():  # pass 2: platform-effect genes per spot, their bulk, the largest count
        on_bulk = block[:, bulk_cols]
        bulk_counts_per_spot[lo:hi] = np.asarray(on_bulk.sum(axis=1, dtype=np.float64)).ravel()
        keep = np.flatnonzero(first_pass[lo:hi] & (bulk_counts_per_spot[lo:hi] >= config.counts_min))
        if keep.size:
            bulk_vec += np.asarray(on_bulk[keep].sum(axis=0, dtype=np.float64)).ravel()
            on_reg = block[keep][:, reg_cols_all]
            if on_reg.nnz:
                reg_max = max(reg_max, float(on_reg.max()))
        control.check_cancel()
    fitted = first_pass & (bulk_counts_per_spot >= config.counts_min)
    fit_idx = np.flatnonzero(fitted)
    if len(fit_idx) == 0:
        raise ValueError(
            f"RCTD: no spot has >= {config.counts_min} counts on the {len(genes_bulk)} platform-effect genes"
        )
    control.report(
        "genes",
        1.0,
        f"{len(genes_reg)} regression / {len(genes_bulk)} platform genes, {len(fit_idx)} of {n_spots} spots kept",
    )
    control.check_cancel()

    # ---- platform effect ---------------------------------------------------------------------------
    control.report("platform effect", 0.0, "fitting pseudo-bulk")
    numi = numi_all[fit_idx]
    prof_bulk = ref.profiles[[r_pos[g] for g in genes_bulk]]
    bulk = fit_bulk(
        prof_bulk,
        bulk_vec,
        float(numi.sum()),
        n_iter=config.n_iter_bulk,
        min_change=config.min_change_bulk,
        step=config.step_size,
    )
    bulk_index = {g: i for i, g in enumerate(genes_bulk)}
    missing_reg = [g for g in genes_reg if g not in bulk_index]
    if missing_reg:  # cannot happen with spacexr's nested cutoffs; guard custom ones
        raise ValueError(
            "RCTD: regression cutoffs must be at least as strict as the platform-effect cutoffs "
            f"({len(missing_reg)} regression genes are not platform-effect genes)"
        )
    P_reg = bulk.profiles[[bulk_index[g] for g in genes_reg]]
    reg_cols = reg_cols_all
    control.report("platform effect", 1.0, "done")
    control.check_cancel()

    table_kw = dict(k_val=config.k_val, cache=config.table_cache, cache_dir=config.cache_dir, device=device)

    # ---- sigma -------------------------------------------------------------------------------------
    sigma_path: list[int] = []
    if config.sigma_override is not None:
        sigma = float(config.sigma_override)
        control.report("sigma", 1.0, f"sigma {sigma:.2f} (given)")
    else:
        control.report("sigma", 0.0, "estimating sigma")
        cand = np.flatnonzero(numi > config.umi_min_sigma)
        n_fit = min(config.n_fit, len(cand))
        if n_fit == 0:
            raise ValueError(
                f"RCTD: no kept spot has nUMI > umi_min_sigma={config.umi_min_sigma}, so sigma cannot "
                "be estimated. Lower umi_min_sigma or give sigma_override."
            )
        rng = np.random.default_rng(config.seed)
        pick = np.sort(rng.choice(cand, n_fit, replace=False)) if n_fit < len(cand) else cand
        y_fit = np.asarray(source.take_rows(fit_idx[pick])[:, reg_cols].todense(), dtype=np.float64)
        max_count = int(min(y_fit.max(initial=0), config.k_val))

        def get_tables(sig_list):
            return build_tables([s / 100.0 for s in sig_list], max_count, **table_kw)

        sigma_int, sigma_path = estimate_sigma(
            P_reg,
            y_fit,
            numi[pick],
            get_tables,
            n_epoch=config.n_epoch,
            n_iter=config.n_iter,
            min_change=config.min_change,
            step=config.step_size,
            seed=config.seed,
            device=device,
            dtype=dtype,
            progress=lambda f, m: control.report("sigma", f, m),
            check_cancel=control.check_cancel,
        )
        sigma = sigma_int / 100.0
        control.report("sigma", 1.0, f"sigma {sigma:.2f}")
    control.check_cancel()

    # ---- pixels ------------------------------------------------------------------------------------
    max_count = int(min(reg_max, config.k_val))
    table = build_tables([sigma], max_count, **table_kw)[0]
    settings = SolverSettings(config.n_iter, config.n_iter_score, config.min_change, config.step_size, dtype, device)
    mode = config.mode
    type_class = None
    if config.class_df is not None:
        type_class = [str(config.class_df.get(t, t)) for t in types]
    n_fit_px = len(fit_idx)
    batch = config.batch_size or auto_batch_size(len(genes_reg), K, mode, device, 8 if dtype == torch.float64 else 4)
    max_types = config.max_multi_types
    pixel_model = PixelModel(
        P_reg,
        table,
        settings,
        mode,
        config.confidence_threshold,
        config.doublet_threshold,
        type_class,
        max_types,
        bool(config.uncertainty),
        config.interval_draws,
        config.seed,
    )
    # Each finished chunk's results go to the partial store when there is one (written as they come, read back
    # once at the end; a rerun of the same run resumes from them), else into the arrays over fitted spots.
    store = partial_store
    out = output_arrays(pixel_model, n_fit_px) if store is None else None
    done: list[tuple[int, int]] = []
    if store is not None:
        plan = {
            "n_spots": int(n_spots),
            "fitted": array_digest(fit_idx),
            "numi": array_digest(numi),
            "model": _model_fingerprint(pixel_model, sigma, max_count, config.k_val, types),
        }
        batch, done = store.begin(plan, batch)
    todo = _chunks_to_fit(n_fit_px, batch, done)
    n_chunks = len(done) + len(todo)
    n_done = n_fit_px - sum(hi - lo for lo, hi in todo)
    where = "" if cluster is None else f" on {cluster.n_workers} Dask workers"
    resumed = f", {len(done)} of {n_chunks} chunks resumed from {store.folder}" if done else ""

    def finish(lo: int, hi: int, res: dict[str, np.ndarray]) -> None:
        nonlocal n_done
        if store is not None:
            store.write_chunk(lo, hi, res)
        else:
            for name, val in res.items():
                out[name][lo:hi] = val
        n_done += hi - lo
        control.report(
            "pixels",
            n_done / n_fit_px,
            f"{n_done}/{n_fit_px} spots{where}{resumed}",
            partial=PartialResult(fit_idx[lo:hi].copy(), res["props"].copy(), list(types)),
        )

    control.report("pixels", n_done / n_fit_px, f"fitting {n_fit_px} spots ({mode} mode){resumed}")
    lost_rows, failure = np.zeros(0, dtype=np.int64), None
    rows = _FittedRows(source, fitted, reg_cols)
    if cluster is not None:
        lost, failure = _fit_on_cluster(cluster, pixel_model, rows, numi, todo, finish, control)
        if lost:
            lost_rows = np.concatenate([np.arange(lo, hi) for lo, hi in lost])
    else:
        batch = _fit_here(pixel_model, rows, numi, todo, batch, finish, device, control)
    if store is not None:
        out = output_arrays(pixel_model, n_fit_px)
        store.assemble(out)
    props_fit = out.pop("props")
    if lost_rows.size:  # spots of chunks the cluster gave up on: left unfitted, like filtered spots
        kept_rows = np.setdiff1d(np.arange(n_fit_px), lost_rows)
        lost_spots = fit_idx[lost_rows]
        fit_idx, props_fit = fit_idx[kept_rows], props_fit[kept_rows]
        out = {name: val[kept_rows] for name, val in out.items()}
        n_fit_px = len(fit_idx)

    # ---- assemble ----------------------------------------------------------------------------------
    barcodes = pd.Index(np.asarray(spatial.barcodes).astype(str))
    proportions = np.full((n_spots, K), np.nan)
    proportions[fit_idx] = props_fit
    weights_full = np.full((n_spots, K), np.nan)
    weights_full[fit_idx] = out["weights"]
    converged = np.zeros(n_spots, dtype=bool)
    converged[fit_idx] = out["conv"]
    obs: dict[str, Any] = {_slot("converged"): converged}
    obsm: dict[str, Any] = {keys.weights(KEY): pd.DataFrame(weights_full, index=barcodes, columns=list(types))}
    if config.uncertainty:
        for slot, part in ((keys.proportions_lower(KEY), "lower"), (keys.proportions_upper(KEY), "upper")):
            full = np.full((n_spots, K), np.nan)
            full[fit_idx] = out[part]
            obsm[slot] = pd.DataFrame(full, index=barcodes, columns=list(types))
    type_cats = list(types) + [FILTERED]
    if mode == "doublet":
        sc = np.full(n_spots, FILTERED, dtype=object)
        sc[fit_idx] = np.array(SPOT_CLASSES, dtype=object)[out["spot_class"]]
        ft = np.full(n_spots, FILTERED, dtype=object)
        st = np.full(n_spots, FILTERED, dtype=object)
        tarr = np.array(types, dtype=object)
        ft[fit_idx] = tarr[out["first"]]
        st[fit_idx] = tarr[out["second"]]
        obs[keys.spot_class(KEY)] = _categorical(sc, list(SPOT_CLASSES) + [FILTERED])
        obs[_slot("first_type")] = _categorical(ft, type_cats)
        obs[_slot("second_type")] = _categorical(st, type_cats)
        for key, src in (
            (_slot("first_class"), "first_cls"),
            (_slot("second_class"), "second_cls"),
            (_slot("converged_full"), "conv_full"),
        ):
            v = np.zeros(n_spots, dtype=bool)
            v[fit_idx] = out[src]
            obs[key] = v
        for key, src in ((_slot("min_score"), "min_score"), (_slot("singlet_score"), "singlet_score")):
            v = np.full(n_spots, np.nan)
            v[fit_idx] = out[src]
            obs[key] = v
        wd = np.full((n_spots, 2), np.nan)
        wd[fit_idx] = out["wd"]
        obsm[_slot("weights_doublet")] = pd.DataFrame(wd, index=barcodes, columns=["first_type", "second_type"])
    elif mode == "multi":
        nt = np.zeros(n_spots, dtype=np.int64)
        nt[fit_idx] = out["n_types"]
        obs[_slot("n_types")] = nt
        ms = np.full(n_spots, np.nan)
        ms[fit_idx] = out["min_score"]
        obs[_slot("min_score")] = ms
        cf = np.zeros(n_spots, dtype=bool)
        cf[fit_idx] = out["conv_full"]
        obs[_slot("converged_full")] = cf
        sw = np.full((n_spots, max_types), np.nan)
        sw[fit_idx] = out["sub_w"]
        ti = np.full((n_spots, max_types), -1, dtype=np.int64)
        ti[fit_idx] = out["type_idx"]
        conf = np.zeros((n_spots, max_types), dtype=bool)
        conf[fit_idx] = out["conf"]
        obsm[_slot("sub_weights")] = sw
        obsm[_slot("cell_type_indices")] = ti
        obsm[_slot("conf_list")] = conf
        ft = np.full(n_spots, FILTERED, dtype=object)
        tarr = np.array(types, dtype=object)
        first_choice = out["type_idx"][:, 0]
        ft[fit_idx] = np.where(first_choice >= 0, tarr[np.maximum(first_choice, 0)], FILTERED)
        obs[_slot("first_type")] = _categorical(ft, type_cats)

    runtime = time.perf_counter() - t_start
    config_dict = {k: v for k, v in config.to_dict().items() if v is not None and k != "extra"}
    gene_counts = {"regression": int(len(genes_reg)), "platform_effect": int(len(genes_bulk))}
    params = {
        "mode": mode,
        "sigma": float(sigma),
        "sigma_path": [p / 100.0 for p in sigma_path],
        "n_genes_regression": gene_counts["regression"],
        "n_genes_platform_effect": gene_counts["platform_effect"],
        "n_spots": int(n_spots),
        "n_spots_fitted": int(n_fit_px),
        "dropped_cell_types": dict(ref.dropped_types),
        "n_reference_cells_low_umi": int(ref.n_cells_removed_low_umi),
        "bulk_proportions": dict(zip(types, map(float, bulk.proportions / bulk.proportions.sum()))),
        "batch_size": int(batch),
        "n_chunks": int(n_chunks),
        "n_chunks_resumed": len(done),
        "dtype": config.dtype,
        "config": config_dict,
    }
    uns = {
        _slot("mode"): mode,
        _slot("config"): config_dict,
        _slot("cell_type_names"): list(types),
        _slot("sigma"): float(sigma),
        _slot("gene_counts"): gene_counts,
        _slot("genes_regression"): list(map(str, genes_reg)),
        _slot("dropped_cell_types"): dict(ref.dropped_types),
    }
    control.report("pixels", 1.0, f"done in {runtime:.1f} s")
    result = DeconvResult(
        key=KEY,
        method="RCTD",
        mode=mode,
        cell_types=list(types),
        proportions=proportions,
        params=params,
        device=str(device),
        runtime_s=runtime,
        obs=obs,
        obsm=obsm,
        uns=uns,
    )
    if failure is not None:
        raise failure.named(list(barcodes[lost_spots]), "spots", partial=result)
    return result
