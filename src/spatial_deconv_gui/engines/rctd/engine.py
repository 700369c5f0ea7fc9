"""RCTD end to end: reference profiles -> gene lists -> pixel filters -> platform effect -> sigma -> pixels."""

from __future__ import annotations

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
from ..base import DeconvResult, PartialResult, RunControl, thread_cap
from ..devices import DeviceOutOfMemory, is_out_of_memory, torch_device
from .config import RCTDConfig, check_config
from .genes import select_de_genes
from .intervals import observed_information, pair_intervals, simplex_intervals
from .likelihood import build_tables
from .modes import SPOT_CLASSES, SolverSettings, fit_doublet, fit_full, fit_multi
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
    order: read from the source chunk by chunk, holding at most one chunk plus one batch."""

    def __init__(self, source: ChunkedCounts, fitted: np.ndarray, cols: np.ndarray):
        self._chunks = source.chunks()
        self._fitted = fitted
        self._cols = cols
        self._pending = sp.csr_matrix((0, len(cols)))
        self._start = 0  # fitted index of the first pending row

    def take(self, lo: int, hi: int) -> sp.csr_matrix:
        if lo < self._start:
            raise ValueError("batches must be asked in order")
        while self._start + self._pending.shape[0] < hi:
            # rows before lo are done (an out-of-memory retry asks lo again, never earlier): drop them first
            self._pending = self._pending[lo - self._start :]
            self._start = lo
            c_lo, c_hi, block = next(self._chunks)
            keep = np.flatnonzero(self._fitted[c_lo:c_hi])
            if keep.size:
                self._pending = sp.vstack([self._pending, block[keep][:, self._cols]], format="csr")
        return self._pending[lo - self._start : hi - self._start]


def _categorical(values: list[str] | np.ndarray, categories: list[str]) -> pd.Categorical:
    return pd.Categorical(values, categories=list(categories))


def run_rctd(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: RCTDConfig = RCTDConfig(),
    control: RunControl | None = None,
) -> DeconvResult:
    """Run RCTD on ``spatial`` with cell-type profiles learned from ``reference``."""
    t_start = time.perf_counter()
    check_config(config)
    control = control or RunControl()
    device = torch_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    with thread_cap(config.n_threads):
        return _run(spatial, reference, config, control, device, dtype, t_start)


def _run(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: RCTDConfig,
    control: RunControl,
    device: torch.device,
    dtype: torch.dtype,
    t_start: float,
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
    ttable = table.to_torch(device, dtype)
    P_t = torch.as_tensor(P_reg, dtype=dtype, device=device)
    settings = SolverSettings(config.n_iter, config.n_iter_score, config.min_change, config.step_size, dtype, device)
    mode = config.mode
    type_class = None
    if config.class_df is not None:
        type_class = [str(config.class_df.get(t, t)) for t in types]
    n_fit_px = len(fit_idx)
    batch = config.batch_size or auto_batch_size(len(genes_reg), K, mode, device, 8 if dtype == torch.float64 else 4)
    max_types = config.max_multi_types

    # outputs over fitted pixels
    out: dict[str, np.ndarray] = {
        "weights": np.zeros((n_fit_px, K)),
        "conv": np.zeros(n_fit_px, dtype=bool),
    }
    if mode == "doublet":
        out.update(
            spot_class=np.zeros(n_fit_px, dtype=np.int64),
            first=np.zeros(n_fit_px, dtype=np.int64),
            second=np.zeros(n_fit_px, dtype=np.int64),
            first_cls=np.zeros(n_fit_px, dtype=bool),
            second_cls=np.zeros(n_fit_px, dtype=bool),
            wd=np.zeros((n_fit_px, 2)),
            min_score=np.zeros(n_fit_px),
            singlet_score=np.zeros(n_fit_px),
            conv_full=np.zeros(n_fit_px, dtype=bool),
        )
    elif mode == "multi":
        out.update(
            type_idx=np.full((n_fit_px, max_types), -1, dtype=np.int64),
            sub_w=np.zeros((n_fit_px, max_types)),
            conf=np.zeros((n_fit_px, max_types), dtype=bool),
            n_types=np.zeros(n_fit_px, dtype=np.int64),
            min_score=np.zeros(n_fit_px),
            conv_full=np.zeros(n_fit_px, dtype=bool),
        )
    props_fit = np.zeros((n_fit_px, K))
    if config.uncertainty:
        out["lower"] = np.zeros((n_fit_px, K))
        out["upper"] = np.zeros((n_fit_px, K))

    def run_batch(lo: int, hi: int, y_rows: sp.csr_matrix) -> None:
        y = torch.as_tensor(np.asarray(y_rows.todense(), dtype=np.float64), dtype=dtype, device=device)
        u = torch.as_tensor(numi[lo:hi], dtype=dtype, device=device)
        if mode == "full":
            w, conv = fit_full(P_t, y, u, ttable, settings)
            out["weights"][lo:hi] = w
            out["conv"][lo:hi] = conv
            s = w.sum(axis=1, keepdims=True)
            props_fit[lo:hi] = np.divide(w, s, out=np.full_like(w, 1.0 / K), where=s > 0)
            if config.uncertainty:
                info = observed_information(P_t, y, u, ttable, w)
                out["lower"][lo:hi], out["upper"][lo:hi] = simplex_intervals(
                    w, info, config.interval_draws, config.seed
                )
        elif mode == "doublet":
            r = fit_doublet(
                P_t, y, u, ttable, settings, config.confidence_threshold, config.doublet_threshold, type_class
            )
            out["weights"][lo:hi] = r.weights
            out["conv"][lo:hi] = r.converged_doublet
            out["conv_full"][lo:hi] = r.converged_full
            for key, val in (
                ("spot_class", r.spot_class),
                ("first", r.first_type),
                ("second", r.second_type),
                ("first_cls", r.first_class),
                ("second_cls", r.second_class),
                ("wd", r.weights_doublet),
                ("min_score", r.min_score),
                ("singlet_score", r.singlet_score),
            ):
                out[key][lo:hi] = val
            p = np.zeros((hi - lo, K))
            rows = np.arange(hi - lo)
            singlet = r.spot_class == 1
            # spacexr's doublet proportions: a singlet is all first type; otherwise the fitted pair weights
            p[rows, r.first_type] = np.where(singlet, 1.0, r.weights_doublet[:, 0])
            p[rows[~singlet], r.second_type[~singlet]] += r.weights_doublet[~singlet, 1]
            props_fit[lo:hi] = p
            if config.uncertainty:
                out["lower"][lo:hi], out["upper"][lo:hi] = pair_intervals(
                    P_t,
                    y,
                    u,
                    ttable,
                    r.first_type,
                    r.second_type,
                    r.pair_weights,
                    p,
                    config.interval_draws,
                    config.seed,
                )
        else:
            r = fit_multi(P_t, y, u, ttable, settings, config.confidence_threshold, config.doublet_threshold, max_types)
            out["weights"][lo:hi] = r.weights
            out["conv"][lo:hi] = r.converged_sub
            out["conv_full"][lo:hi] = r.converged_full
            out["type_idx"][lo:hi] = r.type_indices
            out["sub_w"][lo:hi] = r.sub_weights
            out["conf"][lo:hi] = r.confident
            out["n_types"][lo:hi] = r.n_types
            out["min_score"][lo:hi] = r.min_score
            p = np.zeros((hi - lo, K))
            for j in range(max_types):
                ok = r.type_indices[:, j] >= 0
                p[np.flatnonzero(ok), r.type_indices[ok, j]] += r.sub_weights[ok, j]
            props_fit[lo:hi] = p

    control.report("pixels", 0.0, f"fitting {n_fit_px} spots ({mode} mode)")
    lo = 0
    tried = [min(batch, n_fit_px)]
    fitted_rows = _FittedRows(source, fitted, reg_cols)
    while lo < n_fit_px:
        control.check_cancel()
        hi = min(lo + batch, n_fit_px)
        try:
            run_batch(lo, hi, fitted_rows.take(lo, hi))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            torch.cuda.empty_cache()
            if hi - lo <= 1:
                raise DeviceOutOfMemory.after("RCTD", device, tried) from exc
            batch = max(1, (hi - lo) // 2)
            tried.append(batch)
            warnings.warn(f"RCTD: CUDA out of memory, retrying with batch size {batch}", RuntimeWarning, stacklevel=2)
            continue
        control.report(
            "pixels",
            hi / n_fit_px,
            f"{hi}/{n_fit_px} spots",
            partial=PartialResult(fit_idx[lo:hi].copy(), props_fit[lo:hi].copy(), list(types)),
        )
        lo = hi

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
    return DeconvResult(
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
