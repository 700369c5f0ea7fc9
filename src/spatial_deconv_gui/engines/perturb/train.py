"""Training: per cluster, each target gene as a sparse group lasso on its TFs, LR and TF-ligand features.

All features live in one matrix ``Phi = [TF expression | received ligand x receptor | received ligand x TF]``.
Per cluster we form the centred Gram blocks ``Phi_c^T Phi_c`` and ``Phi_c^T Y_c`` once; a target's problem is
then a sub-block, so the data are read once per cluster whatever the number of targets, and the lasso
problems (clusters x targets) are solved together in batches by :func:`lasso.fit_sgl_batch`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ... import keys
from ..base import RunControl
from . import model_dir as md
from .config import TrainConfig
from .lasso import fit_sgl_batch
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

_BATCH_ELEMENTS = 24_000_000  # doubles per lasso batch (~200 MB)
FILTER_MIN = 1e-9  # expression at or below this counts as absent (SpaceTravLR's get_filtered_df)


def filtered(x: np.ndarray) -> np.ndarray:
    return np.where(x > FILTER_MIN, x, 0.0)


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
) -> dict:
    """Fit every target and write the model directory; returns the manifest.

    ``expr`` is cells x genes (dense, the expression the model should use), ``clusters`` one label per cell.
    Finished genes of an existing directory trained on the same data and settings are skipped.
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
    )
    trained_targets = [t for t in targets if t in mods]
    # model genes: every target and every modulator gene (kept in data.h5ad, the perturbation's gene space)
    gene_set = set(trained_targets)
    for m in mods.values():
        gene_set |= m.genes
    genes = [g for g in var_names if g in gene_set]
    gi_all = {g: i for i, g in enumerate(var_names)}
    expr_m = np.asarray(expr[:, [gi_all[g] for g in genes]], dtype=np.float64)
    gi = {g: i for i, g in enumerate(genes)}
    lr_pairs = list(dict.fromkeys(p for m in mods.values() for p in m.lr))
    tfl_pairs = list(dict.fromkeys(p for m in mods.values() for p in m.tfl))
    ligands = list(dict.fromkeys([a for a, _ in lr_pairs] + [a for a, _ in tfl_pairs]))
    lr_use = usable_lr(lr, var_names) if lr is not None else None
    lrad = ligand_radii(lr_use, radius, contact) if lr is not None else {}
    radii = np.array([lrad[g] for g in ligands], dtype=np.float64)
    lr_r, tfl_r = feature_radii(lr_use, lr_pairs, tfl_pairs, radius, contact, cfg.radius_rule)
    channels, _, _ = received_channels(lr_pairs, tfl_pairs, lr_r, tfl_r)
    cluster_names = list(pd.unique(pd.Series(clusters)))
    cluster_names = sorted(cluster_names)

    fingerprint = data_fingerprint(expr_m, genes, coords, clusters)
    settings = {
        "config": cfg.to_dict(),
        "radius": radius,
        "contact_radius": contact,
        "checksums": checksums or {},
        "data": fingerprint,
        "targets": trained_targets,
    }
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    write_data = True
    if (out_dir / md.MANIFEST).exists():
        old = md.read_manifest(out_dir)
        write_data = old.get("settings_hash") != settings_hash or not (out_dir / md.DATA).exists()
        if old.get("settings_hash") != settings_hash:
            if not overwrite:
                older = int(old.get("format_version", 1)) < md.FORMAT_VERSION
                raise InputError(
                    f"{out_dir} holds a model trained on other data or settings"
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
        "format_version": md.FORMAT_VERSION,
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
    }
    manifest.update(extra or {})
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
        # global modulator columns: genes used as TFs (any group), then the pair features
        tf_genes = sorted({g for t in todo for g in mods[t].tfs}, key=gi.get)
        col_of = {("tf", g): k for k, g in enumerate(tf_genes)}
        off = len(tf_genes)
        for k, p in enumerate(lr_pairs):
            col_of[("lr", p)] = off + k
        off += len(lr_pairs)
        for k, p in enumerate(tfl_pairs):
            col_of[("tfl", p)] = off + k
        Phi = np.hstack([expr_m[:, [gi[g] for g in tf_genes]], phi_pairs])
        Y = expr_m[:, [gi[t] for t in todo]]
        t0 = time.perf_counter()
        grams = []
        for c in cluster_names:
            m = clusters == c
            nc = int(m.sum())
            P = torch.as_tensor(Phi[m])
            Yc = torch.as_tensor(Y[m])
            pm, ym = P.mean(0), Yc.mean(0)
            Pc, Ycc = P - pm, Yc - ym
            grams.append(
                {
                    "n": nc,
                    "A": (Pc.T @ Pc).numpy(),
                    "C": (Pc.T @ Ycc).numpy(),
                    "P": Pc.numpy(),
                    "yy": (Ycc * Ycc).sum(0).numpy(),
                    "pm": pm.numpy(),
                    "ym": ym.numpy(),
                }
            )
        timings["gram_s"] = time.perf_counter() - t0
        cols_of_target = {}
        for t in todo:
            mt = mods[t]
            cols_of_target[t] = np.array(
                [col_of[("tf", g)] for g in mt.tfs]
                + [col_of[("lr", p)] for p in mt.lr]
                + [col_of[("tfl", p)] for p in mt.tfl],
                dtype=np.int64,
            )
        C = len(cluster_names)
        n_max = max(gr["n"] for gr in grams)
        p_all = max(len(v) for v in cols_of_target.values())
        use_data = 2 * n_max < p_all  # fewer cells than modulators: products through the data are cheaper
        per_problem = (n_max if use_data else p_all) * p_all
        per_batch = max(1, min(cfg.problems_per_batch, max(1, _BATCH_ELEMENTS // max(per_problem, 1))) // max(C, 1))
        n_done = len(done)
        t0 = time.perf_counter()
        for b0 in range(0, len(todo), per_batch):
            control.check_cancel()
            batch = todo[b0 : b0 + per_batch]
            pmax = max(len(cols_of_target[t]) for t in batch)
            nb = len(batch) * C
            Xf = np.zeros((nb, n_max, pmax)) if use_data else None
            G = None if use_data else np.zeros((nb, pmax, pmax))
            cv = np.zeros((nb, pmax))
            nn = np.ones(nb)
            groups = np.full((nb, pmax), -1, dtype=np.int64)
            skip = np.zeros(nb, dtype=bool)
            for i, t in enumerate(batch):
                cols = cols_of_target[t]
                p = cols.size
                yk = b0 + i
                for k, gr in enumerate(grams):
                    j = i * C + k
                    if gr["n"] < cfg.min_cells:
                        skip[j] = True
                        continue
                    if use_data:
                        Xf[j, : gr["n"], :p] = gr["P"][:, cols]
                    else:
                        G[j, :p, :p] = gr["A"][np.ix_(cols, cols)]
                    cv[j, :p] = gr["C"][cols, yk]
                    nn[j] = gr["n"]
                    groups[j, :p] = mods[t].groups
            res = fit_sgl_batch(
                None if use_data else G,
                cv,
                nn,
                groups,
                cfg.l1_reg,
                cfg.group_reg,
                cfg.scale_reg,
                cfg.standardize,
                cfg.max_iter,
                cfg.tol,
                cfg.device if cfg.device != "auto" else None,
                X=Xf,
            )
            fits = []
            for i, t in enumerate(batch):
                cols = cols_of_target[t]
                p = cols.size
                yk = b0 + i
                coef = np.zeros((C, p))
                r2 = np.full(C, np.nan)
                icpt = np.zeros(C)
                gated = np.zeros(C, dtype=bool)
                ncell = np.zeros(C, dtype=int)
                for k, gr in enumerate(grams):
                    j = i * C + k
                    ncell[k] = gr["n"]
                    if skip[j]:
                        gated[k] = True
                        icpt[k] = gr["ym"][yk] if gr["n"] else 0.0
                        continue
                    w = res.coef[j, :p]
                    if use_data:
                        xw = Xf[j, : gr["n"], :p] @ w
                        quad = float(xw @ xw)
                    else:
                        quad = float(w @ G[j, :p, :p] @ w)
                    ss_res = gr["yy"][yk] - 2 * cv[j, :p] @ w + quad
                    ss_tot = gr["yy"][yk]
                    r2[k] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
                    if not (r2[k] >= cfg.r2_threshold):
                        gated[k] = True
                        w = np.zeros(p)
                    coef[k] = w
                    icpt[k] = gr["ym"][yk] - gr["pm"][cols] @ w
                fits.append((t, ncell, r2, gated, icpt, coef, mods[t].names))
            # one store shard per batch, then the manifest naming it: a kill in between leaves a whole shard
            # that the next run's scan adopts (see _resume_store)
            key, sha = md.write_shard(out_dir, md.store_from_fits(cluster_names, fits))
            manifest[md.STORE_CHECKSUMS][key] = sha
            md.write_manifest(out_dir, manifest)
            for t, *_ in fits:
                n_done += 1
                control.report("training", n_done / total, t)
        timings["lasso_s"] = time.perf_counter() - t0
    manifest["status"] = "complete"
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["train_time_s"] = round(time.perf_counter() - t_start, 3)
    md.write_manifest(out_dir, manifest)
    control.report("training", 1.0, "done")
    return manifest
