"""Training: per cluster, each target gene as a sparse group lasso on its TFs, LR and TF-ligand features.

All features live in one matrix ``Phi = [TF expression | received ligand x receptor | received ligand x TF]``,
with the received ligands computed once for the slide. Per cluster the centred design and its standardised Gram
matrix are built once and shared by every target (a target uses a subset of the columns); the targets are then
solved batch by batch, all targets of a batch together, by working sets (:mod:`solve`): on a slide measured
genome-wide a target is offered ~1,800 modulators for ~50 cells of a cluster and keeps a few dozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ... import keys
from ..base import RunControl
from ..cluster import TASK_THREADS, PiecesFailed
from . import model_dir as md
from .config import TrainConfig
from .expression import FILTER_MIN, filtered
from .ligands import auto_radius, received_ligands
from .modulators import (
    PAIR_SEP_LR,
    PAIR_SEP_TFL,
    RADIUS_RULES,
    feature_radii,
    ligand_radii,
    received_channels,
    select_modulators,
    usable_lr,
)
from .percell import lasso_cells

# settings added after models were first written: left out of the settings hash at their defaults, so that a
# folder trained before they existed still resumes
_LATER_SETTINGS = {"max_ligands": None, "min_expressed_fraction": 0.0, "mode": "seed"}
# settings of the per-cell network: they change nothing in a seed model, so they stay out of its hash
PERCELL_SETTINGS = ("epochs", "learning_rate", "percell_l2", "holdout_fraction", "hybrid_min_gain", "seed")


def settings_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    if d.get("mode", "seed") == "seed":
        for k in PERCELL_SETTINGS:
            d.pop(k, None)
    for k, default in _LATER_SETTINGS.items():
        if d.get(k) == default:
            d.pop(k, None)
    return d


def settings_differences(manifest: dict, settings: dict) -> list[str]:
    """What a model folder's manifest and a new training's settings disagree on, in words (for the refusal to
    resume into a folder trained on other data or settings)."""

    def plain(value):  # as the manifest stores it (JSON), so a tuple and its list compare equal
        return json.loads(json.dumps(value, default=str))

    out = []
    if manifest.get("data_fingerprint") != settings["data"]:
        out.append("the data differ (expression, genes, coordinates or clusters)")
    old_cfg, new_cfg = plain(manifest.get("config", {})), plain(settings["config"])
    for key in sorted(set(old_cfg) | set(new_cfg)):
        was, now = old_cfg.get(key, _LATER_SETTINGS.get(key)), new_cfg.get(key, _LATER_SETTINGS.get(key))
        if was != now and key not in ("radius", "contact_radius"):
            out.append(f"{key} was {was!r}, now {now!r}")
    for key in ("radius", "contact_radius"):
        if plain(manifest.get(key)) != plain(settings[key]):
            out.append(f"{key} was {manifest.get(key)!r}, now {settings[key]!r}")
    if plain(manifest.get("checksums", {})) != plain(settings["checksums"]):
        out.append("the prior tables differ")
    if plain(manifest.get("targets", [])) != plain(settings["targets"]):
        out.append("the targets differ")
    return out


def data_fingerprint(expr: np.ndarray, var_names, coords: np.ndarray, clusters: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(expr, dtype=np.float64).tobytes())
    h.update("\x00".join(map(str, var_names)).encode())
    h.update(np.ascontiguousarray(coords, dtype=np.float64).tobytes())
    h.update("\x00".join(map(str, clusters)).encode())
    return h.hexdigest()


@dataclass
class FeatureSpace:
    """Global feature columns: model genes (as TF features), LR pairs and TF-ligand pairs."""

    genes: list[str]
    lr_pairs: list[tuple[str, str]]
    tfl_pairs: list[tuple[str, str]]
    ligands: list[str]
    radii: np.ndarray


def build_features(
    expr_m: np.ndarray,
    genes: list[str],
    coords: np.ndarray,
    lr_pairs,
    tfl_pairs,
    ligands: list[str],
    radii: np.ndarray,
    scale: float,
    mode: str,
    device,
    lr_radii=None,
    tfl_radii=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``[Phi_lr | Phi_tfl]`` and W (received values, N x channels) from model-gene expression.

    ``lr_radii`` / ``tfl_radii`` give the radius of each LR / TF-ligand feature; when left out, a feature uses
    its ligand's entry of ``radii`` (aligned with ``ligands``: one radius per ligand). W's columns are the
    ``(ligand, radius)`` channels of :func:`modulators.received_channels`, each computed once.
    """
    gi = {g: i for i, g in enumerate(genes)}
    F = filtered(expr_m)
    lrad = dict(zip(ligands, np.asarray(radii, dtype=np.float64).tolist()))
    lr_r = list(lr_radii) if lr_radii is not None else [lrad[a] for a, _ in lr_pairs]
    tfl_r = list(tfl_radii) if tfl_radii is not None else [lrad[a] for a, _ in tfl_pairs]
    chans, lr_ch, tfl_ch = received_channels(lr_pairs, tfl_pairs, lr_r, tfl_r)
    W = (
        received_ligands(
            coords,
            F[:, [gi[a] for a, _ in chans]],
            np.array([r for _, r in chans]),
            scale=scale,
            mode=mode,
            device=device,
        )
        if chans
        else np.zeros((expr_m.shape[0], 0))
    )
    lr = W[:, lr_ch] * F[:, [gi[b] for _, b in lr_pairs]]
    tfl = W[:, tfl_ch] * expr_m[:, [gi[b] for _, b in tfl_pairs]]
    return np.hstack([lr, tfl]), W


def _resume_store(out_dir, targets: list[str], manifest: dict) -> dict:
    """Store checksums of what a resumed folder already holds: format 1-2 CSV tables become one shard, a shard
    whose checksum disagrees with the old manifest is dropped (its targets are refitted), a whole shard the old
    manifest does not name yet (killed between the shard's rename and the manifest write) is adopted."""
    from pathlib import Path

    old = md.read_manifest(out_dir) if (Path(out_dir) / md.MANIFEST).exists() else {}
    known = dict(old.get(md.STORE_CHECKSUMS, {})) if md.uses_store(old) else {}
    if md.csv_genes(out_dir, targets):
        migrated = md.migrate_csv_tables(out_dir, {**manifest, "targets": targets})
        if migrated is not None:
            known[migrated[0]] = migrated[1]
    sums = {}
    for key in md.scan_shards(out_dir):
        sha = md.file_sha256(Path(out_dir) / key)
        if key in known and known[key] != sha:
            (Path(out_dir) / key).unlink()
            continue
        sums[key] = sha
    return sums


def small_cluster_notice(small: dict, min_cells: int, held_out: dict | None = None) -> str:
    """The notice naming the clusters whose lasso sees fewer than ``min_cells`` cells (``small``: cluster -> cells
    it fits on; ``held_out``: cluster -> cells held out of that fit in full / hybrid mode)."""
    held_out = held_out or {}

    def cells(c, k):
        h = held_out.get(c, 0)
        return f"{k} cells" if not h else f"{k} cells fitted, {h} more held out to score the per-cell network"

    listed = ", ".join(f"{c!r} ({cells(c, k)})" for c, k in small.items())
    return (
        f"{len(small)} cluster(s) have fewer than min_cells = {min_cells} cells, too few for the lasso: {listed}. "
        "No gene gets a model there: each keeps its cluster mean and does not respond to a perturbation in those "
        "cells (lower --min-cells to fit them anyway)."
    )


def _eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def expressed_features(Phi: np.ndarray, clusters: np.ndarray, cluster_names, min_fraction: float) -> np.ndarray:
    """(C, F) whether each feature counts as expressed in each cluster: non-zero (above ``FILTER_MIN``) in at
    least ``min_fraction`` of the cluster's cells. A TF term is its TF's expression, an LR term the received
    ligand times the receptor, so an LR pair whose receptor is off in the cluster is not expressed there."""
    out = np.ones((len(cluster_names), Phi.shape[1]), dtype=bool)
    if min_fraction <= 0 or Phi.shape[1] == 0:
        return out
    for k, c in enumerate(cluster_names):
        m = clusters == c
        if m.any():
            out[k] = (np.abs(Phi[m]) > FILTER_MIN).mean(axis=0) >= min_fraction
    return out


def _store_of_batch(
    batch, cols_of, names_of_col, cluster_names, n_cells, r2, gated, icpt, coefs, percell=None
) -> md.CoefStore:
    """The store shard of a batch (:func:`model_dir.build_store`) from its arrays: ``coefs`` is one (targets x
    features) matrix per cluster; ``percell`` (full / hybrid) the batch's per-cell part from
    :func:`_percell_batch`."""
    lengths = np.array([c.size for c in cols_of], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(cols_of) if cols_of else np.zeros(0, np.int64)
    T, F = len(batch), names_of_col.size
    pos = np.full((T, F), -1, dtype=np.int32)  # each (target, feature column): its position among the target's
    rows = np.repeat(np.arange(T), lengths)
    pos[rows, flat] = (np.arange(flat.size) - ptr[rows]).astype(np.int32)
    nzt, nzc, nzm, nzv = [], [], [], []
    for k, coef in enumerate(coefs):
        r, f = np.nonzero(coef)
        nzt.append(r)
        nzc.append(np.full(r.size, k))
        nzm.append(pos[r, f])
        nzv.append(coef[r, f])
    nonzeros = tuple(np.concatenate(x) if x else np.zeros(0) for x in (nzt, nzc, nzm, nzv))
    pc = None
    if percell is not None:
        wt = percell["w_target"]
        pc = dict(
            pc_flag=percell["flag"],
            pc_r2=percell["r2"],
            pc_z=percell["z"][None].astype(np.float32),
            pc_w=percell["w"].astype(np.float32),
            pc_w_target=wt.astype(np.int32),
            pc_w_mod=pos[wt, percell["w_col"]].astype(np.int32),
            pc_w_block=np.zeros(wt.size, dtype=np.int32),
        )
    return md.build_store(batch, cluster_names, names_of_col, cols_of, n_cells, r2, gated, icpt, nonzeros, pc)


def _percell_batch(coefs, icpt, gated, Phi, Y, ctx, cfg) -> dict:
    """Per-cell coefficients of one batch (``percell.fit_percell``) and which targets keep them: every target
    with a model in full mode; in hybrid mode those where the network removes at least ``hybrid_min_gain`` of the
    seed's held-out squared error (``percell.heldout_gain``). Updates ``icpt`` (T x C) with the learnt intercepts of
    the kept targets."""
    from .percell import fit_percell, heldout_gain

    T = Y.shape[1]
    support = np.zeros((T, Phi.shape[1]), dtype=bool)
    for coef in coefs:
        support |= coef != 0
    m_t = support.sum(axis=1)
    rows, cols = np.nonzero(support)  # the (target, modulator) pairs with a seed in some cluster
    cc = ctx["cell_cluster"]
    seed_of = np.stack([coef[rows, cols] for coef in coefs])  # (C, K)
    A = Phi[:, cols] * seed_of[np.where(cc >= 0, cc, 0)]
    A[cc < 0] = 0.0
    modelled = ~gated
    fit = fit_percell(
        ctx["images"],
        cc,
        A,
        rows,
        Y,
        icpt.T,
        modelled,
        ctx["train"],
        ctx["holdout"],
        cfg.epochs,
        cfg.learning_rate,
        cfg.percell_l2,
        cfg.seed,
        device=cfg.device,
    )
    keep = (m_t > 0) & modelled.any(axis=1)
    if cfg.mode == "hybrid":
        keep &= heldout_gain(fit.r2_seed, fit.r2_full) >= cfg.hybrid_min_gain
    for t in np.flatnonzero(keep):
        icpt[t, modelled[t]] = fit.intercept[modelled[t], t]
    sel = keep[rows]
    return dict(
        flag=keep,
        r2=np.column_stack([fit.r2_seed, fit.r2_full]),
        z=fit.z,
        w=fit.w[sel],
        w_target=rows[sel],
        w_col=cols[sel],
    )


@dataclass(eq=False)
class ClusterFits:
    """What every batch of targets reads: per cluster its cells, its shared design (None: too few cells) and its
    expressed features, with the feature columns' groups and names (sent once to each Dask worker)."""

    masks: list
    designs: list
    expressed: np.ndarray
    col_group: np.ndarray
    names_of_col: np.ndarray
    cluster_names: list
    n_cells: np.ndarray
    cfg: TrainConfig
    task_threads: int | None = None  # solver threads per batch (set for Dask tasks; None: numba's count here)
    split: int | None = None  # cut each batch as for this many threads: the submitting process's count
    percell: dict | None = None  # full / hybrid: _percell_batch's context (features, images, held-out cells)


def _threads_here() -> int:
    import numba

    return max(1, numba.get_num_threads())


def fit_batch(batch: list[str], cols_of: list[np.ndarray], Y: np.ndarray, shared: ClusterFits) -> md.CoefStore:
    """The store shard of one batch of targets (``Y``: cells x targets, ``cols_of``: each target's feature
    columns), fitted in every cluster: the same in this process and on a Dask worker."""
    import numba  # lazy, as the solver's kernels: loading numba takes ~0.5 s, paid only when training

    from .solve import fit_cluster_targets

    cfg = shared.cfg
    n_threads = shared.task_threads or max(1, numba.get_num_threads())
    n_features = shared.names_of_col.size
    C = len(shared.cluster_names)
    T = len(batch)
    allowed = np.zeros((T, n_features), dtype=bool)
    allowed[np.repeat(np.arange(T), [c.size for c in cols_of]), np.concatenate(cols_of)] = True
    r2 = np.full((T, C), np.nan)
    gated = np.zeros((T, C), dtype=bool)
    icpt = np.zeros((T, C))
    coefs = []
    for k in range(C):
        Yk = Y[shared.masks[k]]
        ym = Yk.mean(axis=0) if shared.n_cells[k] else np.zeros(T)
        d = shared.designs[k]
        if d is None:  # too few cells: no model, the gene keeps its cluster mean
            gated[:, k] = True
            icpt[:, k] = ym
            coefs.append(np.zeros((T, n_features)))
            continue
        Yc = Yk - ym
        fit = fit_cluster_targets(
            d,
            Yc,
            allowed & shared.expressed[k][None, :],
            shared.col_group,
            cfg.l1_reg,
            cfg.group_reg,
            cfg.scale_reg,
            cfg.max_iter,
            cfg.tol,
            n_threads=n_threads,
            split=shared.split,
        )
        coef = fit.coef
        resid = Yc - d.P @ coef.T
        ss_res = (resid * resid).sum(axis=0)
        ss_tot = (Yc * Yc).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2[:, k] = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), 0.0)
        gate = ~(r2[:, k] >= cfg.r2_threshold)
        gated[:, k] = gate
        coef[gate] = 0.0
        icpt[:, k] = ym - coef @ d.pm
        coefs.append(coef)
    percell = None
    if shared.percell is not None:
        t_pc = time.perf_counter()
        percell = _percell_batch(coefs, icpt, gated, shared.percell["Phi"], Y, shared.percell, cfg)
        # in this process the context is the caller's own dict: the network's share of the time is reported
        shared.percell["seconds"] = shared.percell.get("seconds", 0.0) + time.perf_counter() - t_pc
    return _store_of_batch(
        batch,
        cols_of,
        shared.names_of_col,
        shared.cluster_names,
        np.broadcast_to(shared.n_cells, (T, C)).copy(),
        r2,
        gated,
        icpt,
        coefs,
        percell,
    )


def _fit_targets(
    todo,
    mods,
    expr_m,
    gi,
    clusters,
    cluster_names,
    phi_pairs,
    lr_pairs,
    tfl_pairs,
    cfg,
    control,
    out_dir,
    manifest,
    n_done,
    total,
    stores,
    cluster=None,
    percell_ctx=None,
) -> tuple[float, float]:
    """Fit the ``todo`` targets batch by batch (one store shard each); returns (fit seconds, design seconds).

    Per cluster the shared design and its Gram matrix are built once for all targets; each batch of targets
    is then solved by working sets (:func:`solve.fit_cluster_targets`), here or, with ``cluster``, as one Dask
    task per batch (the same batches, so the same shards)."""
    from .solve import cluster_design

    t0 = time.perf_counter()
    # global modulator columns: genes used as TFs (any target), then the LR pairs, then the TF-ligand pairs
    tf_genes = sorted({g for t in todo for g in mods[t].tfs}, key=gi.get)
    tf_col = {g: k for k, g in enumerate(tf_genes)}
    n_tf, n_lr = len(tf_genes), len(lr_pairs)
    shared = next(iter(mods.values())).pairs
    lr_col_of_shared = np.full(len(shared), -1, dtype=np.int64)
    pair_pos = {p: k for k, p in enumerate(lr_pairs)}
    for k, p in enumerate(shared):
        if p in pair_pos:
            lr_col_of_shared[k] = n_tf + pair_pos[p]
    tfl_col = {p: n_tf + n_lr + k for k, p in enumerate(tfl_pairs)}
    names_of_col = np.array(
        list(tf_genes)
        + [f"{a}{PAIR_SEP_LR}{b}" for a, b in lr_pairs]
        + [f"{a}{PAIR_SEP_TFL}{b}" for a, b in tfl_pairs],
        dtype=object,
    )
    col_group = np.array([0] * n_tf + [1] * n_lr + [2] * len(tfl_pairs), dtype=np.int64)
    cols_of_target = {
        t: np.concatenate(
            [
                np.array([tf_col[g] for g in mods[t].tfs], dtype=np.int64),
                lr_col_of_shared[mods[t].lr_index],
                np.array([tfl_col[p] for p in mods[t].tfl], dtype=np.int64),
            ]
        )
        for t in todo
    }
    Phi = np.hstack([expr_m[:, [gi[g] for g in tf_genes]], phi_pairs])
    expressed = expressed_features(Phi, clusters, cluster_names, cfg.min_expressed_fraction)
    C = len(cluster_names)
    masks = [clusters == c for c in cluster_names]
    if percell_ctx is not None:  # full / hybrid: the seeds too are fitted on the training cells only
        masks = [m & percell_ctx["train"] for m in masks]
    n_cells = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    designs = [
        cluster_design(Phi[m], cfg.standardize) if n_cells[k] >= cfg.min_cells else None for k, m in enumerate(masks)
    ]
    gram_s = time.perf_counter() - t0
    if percell_ctx is not None:
        percell_ctx["Phi"] = Phi
    fits_shared = ClusterFits(
        masks, designs, expressed, col_group, names_of_col, cluster_names, n_cells, cfg, percell=percell_ctx
    )
    per_batch = max(1, int(cfg.problems_per_batch) // max(C, 1))
    batches = [todo[b0 : b0 + per_batch] for b0 in range(0, len(todo), per_batch)]
    t_fit = time.perf_counter()
    done_now = 0

    def keep(batch, store) -> None:
        nonlocal n_done, done_now
        # one store shard per batch, then the manifest naming it: a kill in between leaves a whole shard
        # that the next run's scan adopts (see _resume_store)
        key, sha = md.write_shard(out_dir, store)
        if stores is not None:
            stores[key] = store
        manifest[md.STORE_CHECKSUMS][key] = sha
        md.write_manifest(out_dir, manifest)
        # the batch's targets finish together: the time per target so far gives the rest
        done_now += len(batch)
        eta = _eta((time.perf_counter() - t_fit) / done_now * (len(todo) - done_now))
        for t in batch:
            n_done += 1
            control.report("training", n_done / total, f"{t} ({n_done}/{total} targets, ETA {eta})")

    def piece(batch):
        return (list(batch), [cols_of_target[t] for t in batch], expr_m[:, [gi[t] for t in batch]])

    if cluster is None:
        for batch in batches:
            control.check_cancel()
            if percell_ctx is not None:
                control.report(
                    "training", n_done / total, f"per-cell network: {len(batch)} targets ({cfg.epochs} epochs)"
                )
            keep(batch, fit_batch(*piece(batch), fits_shared))
    else:
        try:
            cluster.run(
                fit_batch,
                [piece(batch) for batch in batches],
                shared=cluster.share(
                    dataclasses.replace(fits_shared, task_threads=TASK_THREADS, split=_threads_here())
                ),
                on_result=lambda i, store: keep(batches[i], store),
                control=control,
                name="perturb-targets",
            )
        except PiecesFailed as exc:  # the other batches' shards are written: training again fits only these
            lost = [t for i in sorted(exc.failed) for t in batches[i]]
            raise exc.named(lost, "target genes (training again in the same folder fits only them)") from None
    return time.perf_counter() - t_fit, gram_s


def _percell_summary(out_dir, manifest: dict, stores: dict, cfg: TrainConfig) -> dict:
    """What the manifest says of the per-cell part: per target whether it kept the per-cell coefficients ('cnn')
    or the seed ('seed'), and the held-out R² of both (also in the store, ``pc_r2``)."""
    from pathlib import Path

    from .percell import heldout_gain

    kept, r2_seed, r2_full = {}, {}, {}
    for key in manifest[md.STORE_CHECKSUMS]:
        st = stores.get(key) or md.read_shard(Path(out_dir) / key, ("targets", "pc_flag", "pc_r2"))
        if st.pc_flag is None:
            continue
        for t, f, (a, b) in zip(st.targets.tolist(), st.pc_flag.tolist(), st.pc_r2.tolist()):
            kept[t] = "cnn" if f else "seed"
            r2_seed[t] = a if np.isfinite(a) else None  # JSON has no NaN
            r2_full[t] = b if np.isfinite(b) else None
    with np.errstate(invalid="ignore"):
        gains = heldout_gain(
            np.array([np.nan if r2_seed[t] is None else r2_seed[t] for t in kept], dtype=np.float64),
            np.array([np.nan if r2_full[t] is None else r2_full[t] for t in kept], dtype=np.float64),
        )
    return {
        "rule": (
            f"held out {cfg.holdout_fraction:g} of each cluster's cells (seed {cfg.seed}); seeds and network fitted on "
            "the rest; "
            + (
                "every target with a model keeps per-cell coefficients"
                if cfg.mode == "full"
                else "a target keeps per-cell coefficients when they cut its held-out squared error by at least "
                f"{cfg.hybrid_min_gain:g} of the seed's: (R²cnn - R²seed) / (1 - R²seed) >= {cfg.hybrid_min_gain:g}"
            )
        ),
        "n_cnn": int(sum(v == "cnn" for v in kept.values())),
        "n_seed": int(sum(v == "seed" for v in kept.values())),
        "median_heldout_error_cut": float(np.nanmedian(gains)) if np.isfinite(gains).any() else None,
        "kept": kept,
        "heldout_r2_seed": r2_seed,
        "heldout_r2_cnn": r2_full,
    }


def train(
    expr: np.ndarray,
    var_names,
    coords: np.ndarray,
    clusters,
    grn: pd.DataFrame,
    lr: pd.DataFrame | None,
    out_dir,
    targets=None,
    tfl: pd.DataFrame | None = None,
    config: TrainConfig | None = None,
    control: RunControl | None = None,
    checksums: dict | None = None,
    extra: dict | None = None,
    obsm: dict | None = None,
    obs_names=None,
    overwrite: bool = False,
    built: dict | None = None,
    cluster=None,
) -> dict:
    """Fit every target and write the model directory; returns the manifest.

    ``expr`` is cells x genes (dense, the expression the model should use), ``clusters`` one label per cell.
    Finished genes of an existing directory trained on the same data and settings are skipped. ``built``, a
    dict, receives what the run built so that a caller need not read the folder back: ``stores`` (store
    shard key -> :class:`model_dir.CoefStore` of the shards written now), ``received`` (cells x channels, or
    None when nothing was trained now), ``expr`` / ``genes`` / ``coords`` / ``clusters`` / ``obs_names`` /
    ``obsm`` (what ``data.h5ad`` holds). With ``cluster`` (a connected :class:`..cluster.Cluster`) the batches of
    targets are fitted as tasks on it; the shards are written here as they arrive, the same as in-process.
    """
    from pathlib import Path

    import anndata as ad

    from ...io.errors import InputError
    from ...io.write import write_h5ad_atomic

    cfg = config or TrainConfig()
    control = control or RunControl()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    var_names = [str(v) for v in var_names]
    clusters = np.asarray(clusters).astype(str)
    coords = np.asarray(coords, dtype=np.float64)
    n = expr.shape[0]
    if targets is None:
        targets = list(dict.fromkeys(t for t in grn.target if t in set(var_names)))
    targets = [str(t) for t in targets]
    missing = [t for t in targets if t not in set(var_names)]
    if missing:
        raise InputError(
            f"{len(missing)} target genes are not in the data: {missing[:10]}.",
            "pick targets among the measured genes.",
            code="unknown_gene",
        )
    if cfg.radius_rule not in RADIUS_RULES:
        raise InputError(
            f"radius_rule must be one of {RADIUS_RULES}, got {cfg.radius_rule!r}.",
            "use 'pair' (each LR pair at its own radius) or 'ligand' (SpaceTravLR's).",
            code="bad_option",
        )
    if cfg.mode not in md.MODES:
        raise InputError(
            f"mode must be one of {md.MODES}, got {cfg.mode!r}.",
            "use seed (cluster coefficients), full (per-cell) or hybrid.",
            code="bad_option",
        )
    if cfg.mode != "seed":
        if not 0.0 <= cfg.holdout_fraction < 1.0 or (cfg.mode == "hybrid" and cfg.holdout_fraction <= 0):
            raise InputError(
                f"holdout_fraction {cfg.holdout_fraction} does not work with mode {cfg.mode!r}.",
                "use a fraction in (0, 1) for hybrid (it needs held-out cells to choose), [0, 1) for full.",
                code="bad_option",
            )
        if cfg.epochs < 0 or not cfg.learning_rate > 0:
            raise InputError(
                f"epochs {cfg.epochs} / learning_rate {cfg.learning_rate}: need epochs >= 0 and a positive rate.",
                "use e.g. --epochs 300 --learning-rate 0.01.",
                code="bad_option",
            )
    radius = float(cfg.radius) if cfg.radius else auto_radius(coords)
    contact = float(cfg.contact_radius) if cfg.contact_radius else radius / 4.0

    control.report("modulators", 0.0, "selecting modulators")
    mods, orphans = select_modulators(
        var_names,
        targets,
        grn,
        lr,
        expr,
        clusters,
        tfl=tfl,
        receptor_thresh=cfg.receptor_thresh,
        tf_ligand_cutoff=cfg.tf_ligand_cutoff,
        max_ligands=cfg.max_ligands,
    )
    trained_targets = [t for t in targets if t in mods]
    shared_pairs = next(iter(mods.values())).pairs if mods else []
    used = np.zeros(len(shared_pairs), dtype=bool)
    for t in trained_targets:
        used[mods[t].lr_index] = True
    lr_pairs = [shared_pairs[k] for k in np.flatnonzero(used)]  # first appearance over targets = shared order
    tfl_pairs = list(dict.fromkeys(p for t in trained_targets for p in mods[t].tfl))
    # model genes: every target and every modulator gene (kept in data.h5ad, the perturbation's gene space)
    gene_set = set(trained_targets)
    for t in trained_targets:
        gene_set.update(mods[t].tfs)
    for a, b in lr_pairs + tfl_pairs:
        gene_set.update((a, b))
    genes = [g for g in var_names if g in gene_set]
    gi_all = {g: i for i, g in enumerate(var_names)}
    expr_m = np.asarray(expr[:, [gi_all[g] for g in genes]], dtype=np.float64)
    gi = {g: i for i, g in enumerate(genes)}
    ligands = list(dict.fromkeys([a for a, _ in lr_pairs] + [a for a, _ in tfl_pairs]))
    lr_use = usable_lr(lr, var_names) if lr is not None else None
    lrad = ligand_radii(lr_use, radius, contact) if lr is not None else {}
    radii = np.array([lrad[g] for g in ligands], dtype=np.float64)
    lr_r, tfl_r = feature_radii(lr_use, lr_pairs, tfl_pairs, radius, contact, cfg.radius_rule)
    channels, _, _ = received_channels(lr_pairs, tfl_pairs, lr_r, tfl_r)
    cluster_names = list(pd.unique(pd.Series(clusters)))
    cluster_names = sorted(cluster_names)
    # the cells each cluster's lasso is fitted on: in full / hybrid mode the held-out ones only score the fit
    fitted = lasso_cells(clusters, cfg.mode, cfg.holdout_fraction, cfg.seed)
    sizes = {c: int((fitted & (clusters == c)).sum()) for c in cluster_names}
    small = {c: k for c, k in sizes.items() if k < cfg.min_cells}
    if small:
        held = {c: int((~fitted & (clusters == c)).sum()) for c in small}
        warnings.warn(small_cluster_notice(small, cfg.min_cells, held), UserWarning, stacklevel=2)

    fingerprint = data_fingerprint(expr_m, genes, coords, clusters)
    settings = {
        "config": settings_config(cfg),
        "radius": radius,
        "contact_radius": contact,
        "checksums": checksums or {},
        "data": fingerprint,
        "targets": trained_targets,
    }
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    write_data = True
    kept_received_mode = None
    if (out_dir / md.MANIFEST).exists():
        old = md.read_manifest(out_dir)
        write_data = old.get("settings_hash") != settings_hash or not (out_dir / md.DATA).exists()
        if old.get("settings_hash") == settings_hash and (out_dir / md.RECEIVED).exists():
            # a resumed run with nothing left to fit computes no received ligands: the saved ones stay valid
            kept_received_mode = old.get("received_ligands_mode")
        if old.get("settings_hash") != settings_hash:
            old_mode = old.get("mode", "seed")
            if not overwrite and old_mode != cfg.mode:
                raise InputError(
                    f"{out_dir} holds a model trained with mode {old_mode!r}; this run asks for mode {cfg.mode!r} "
                    "(a folder holds one mode: training cannot resume it in another).",
                    f"choose a new folder for the {cfg.mode} model, or pass overwrite to replace it.",
                    code="model_dir_mismatch",
                )
            if not overwrite:
                older = int(old.get("format_version", 1)) < md.STORE_VERSION
                differs = settings_differences(old, settings)
                raise InputError(
                    f"{out_dir} holds a model trained on other data or settings"
                    + (f" ({'; '.join(differs)})" if differs else "")
                    + (
                        " (written by an older version: it still loads, but training cannot resume in it)"
                        if older
                        else ""
                    )
                    + ".",
                    "choose a new folder, or pass overwrite to replace it.",
                    code="model_dir_mismatch",
                )
            import shutil

            shutil.rmtree(out_dir / md.COEFS, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / md.COEFS).mkdir(exist_ok=True)

    manifest = {
        "format": "spatial-deconv-gui perturbation model",
        # a seed model stays format 3 (readable by the versions before per-cell coefficients)
        "format_version": md.STORE_VERSION if cfg.mode == "seed" else md.PERCELL_VERSION,
        "mode": cfg.mode,
        "status": "training",
        "settings_hash": settings_hash,
        "config": cfg.to_dict(),
        "radius": radius,
        "contact_radius": contact,
        "scale_factor": float(cfg.scale_factor),
        "n_cells": int(n),
        "clusters": cluster_names,
        "genes": genes,
        "targets": trained_targets,
        "orphans": orphans,
        "ligands": ligands,
        "ligand_radius": {g: float(r) for g, r in zip(ligands, radii)},
        "radius_rule": cfg.radius_rule,
        "lr_radius": {f"{a}{PAIR_SEP_LR}{b}": float(r) for (a, b), r in zip(lr_pairs, lr_r)},
        "tfl_radius": {f"{a}{PAIR_SEP_TFL}{b}": float(r) for (a, b), r in zip(tfl_pairs, tfl_r)},
        "received_channels": [[a, float(r)] for a, r in channels],
        "checksums": checksums or {},
        "data_fingerprint": fingerprint,
        "data_file": md.DATA,
        "n_modulators": {t: len(mods[t]) for t in trained_targets},
        "small_clusters": small,
    }
    manifest.update(extra or {})
    if kept_received_mode is not None:
        manifest["received_ligands_mode"] = kept_received_mode
    if write_data:
        obs = pd.DataFrame(
            {md.CLUSTER_OBS: pd.Categorical(clusters, categories=cluster_names)},
            index=[str(o) for o in (obs_names if obs_names is not None else range(n))],
        )
        data = ad.AnnData(X=expr_m.copy(), obs=obs, var=pd.DataFrame(index=genes))
        data.obsm[keys.SPATIAL] = coords
        for k, v in (obsm or {}).items():
            if k != keys.SPATIAL:
                data.obsm[k] = np.asarray(v, dtype=np.float64)
        write_h5ad_atomic(data, out_dir / md.DATA, compression=None)
    manifest[md.STORE_CHECKSUMS] = _resume_store(out_dir, trained_targets, manifest)
    md.write_manifest(out_dir, manifest)
    md.remove_csv_tables(out_dir, trained_targets)  # migrated into a shard the manifest now names

    done = md.finished_genes(out_dir, trained_targets)
    todo = [t for t in trained_targets if t not in done]
    stores: dict = {}
    total = max(len(trained_targets), 1)
    control.report("received ligands", 0.0, f"{len(ligands)} ligands")
    control.check_cancel()
    timings = {"received_ligands_s": 0.0, "gram_s": 0.0, "lasso_s": 0.0}
    if todo:
        t0 = time.perf_counter()
        phi_pairs, _W = build_features(
            expr_m,
            genes,
            coords,
            lr_pairs,
            tfl_pairs,
            ligands,
            radii,
            cfg.scale_factor,
            cfg.ligand_mode,
            cfg.device,
            lr_radii=lr_r,
            tfl_radii=tfl_r,
        )
        timings["received_ligands_s"] = time.perf_counter() - t0
        from ...io.write import atomic_path
        from .ligands import choose_mode

        with atomic_path(out_dir / md.RECEIVED, ".npy") as tmp:  # reused as the perturbation's starting point
            np.save(tmp, _W)
        manifest["received_ligands_mode"] = choose_mode(n, cfg.ligand_mode)
        control.check_cancel()
        percell_ctx = None
        if cfg.mode != "seed":
            from .percell import neighbourhood_images

            cell_cluster = np.asarray(pd.Categorical(clusters, categories=cluster_names).codes, dtype=np.int64)
            percell_ctx = {
                "train": fitted,
                "holdout": ~fitted,
                "cell_cluster": cell_cluster,
                "images": neighbourhood_images(coords, cell_cluster, len(cluster_names), radius),
            }
        fit_s, gram_s = _fit_targets(
            todo,
            mods,
            expr_m,
            gi,
            clusters,
            cluster_names,
            phi_pairs,
            lr_pairs,
            tfl_pairs,
            cfg,
            control,
            out_dir,
            manifest,
            n_done=len(done),
            total=total,
            stores=stores,
            cluster=cluster,
            percell_ctx=percell_ctx,
        )
        timings["gram_s"] = gram_s
        timings["lasso_s"] = fit_s
        if percell_ctx is not None:
            timings["percell_s"] = percell_ctx.get("seconds", 0.0)
            timings["lasso_s"] = fit_s - timings["percell_s"]
    if cfg.mode != "seed":
        manifest["percell"] = _percell_summary(out_dir, manifest, stores, cfg)
    if built is not None:
        built.update(
            stores=stores,
            received=_W if todo else None,
            expr=expr_m,
            genes=genes,
            coords=coords,
            clusters=clusters,
            obs_names=[str(o) for o in (obs_names if obs_names is not None else range(n))],
            obsm={keys.SPATIAL: coords, **{k: np.asarray(v, dtype=np.float64) for k, v in (obsm or {}).items()}},
        )
    manifest["status"] = "complete"
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["train_time_s"] = round(time.perf_counter() - t_start, 3)
    md.write_manifest(out_dir, manifest)
    control.report("training", 1.0, "done")
    return manifest
