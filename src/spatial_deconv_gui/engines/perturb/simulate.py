"""A simulated tissue generated from a known sparse GRN with ligand signalling, and matching priors.

Cells sit uniformly on a square slide, split into spatial domains (the clusters). Genes play fixed roles:
transcription factors (one upstream TF drives a second TF: a cascade), ligands (one driven by a TF),
receptors and plain targets. Each target's expression, per cluster, is a sparse linear function of 1-2 TFs
and sometimes one ligand-receptor pair (received ligand x own receptor, the engine's model), plus noise.
The priors list every true link plus decoys (TFs and LR pairs with no effect), so training must pick.

Everything is deterministic in ``seed``; the default (1,500 cells x 60 genes) trains in seconds.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ... import keys
from .ligands import received_ligands
from .model_dir import CLUSTER_OBS


def simulate_grn_tissue(
    n_cells: int = 1500,
    n_genes: int = 60,
    seed: int = 0,
    n_clusters: int = 3,
    n_tfs: int = 10,
    n_ligands: int = 4,
    n_receptors: int = 4,
    radius: float = 80.0,
    contact_radius: float = 30.0,
    side: float = 1000.0,
    noise: float = 0.15,
    n_decoy_tfs: int = 3,
    upstream_targets: int = 8,
    beta_variation: float = 0.0,
) -> ad.AnnData:
    """Simulated spatial AnnData with a known sparse GRN + ligand signalling.

    Returns an AnnData with ``X`` (= ``layers['lognorm']``, non-negative log-scale expression),
    ``obs['cluster']``, ``obsm['spatial']`` and in ``uns['perturb_sim']``: ``true_modulators`` (target,
    cluster, modulator, kind, coef), ``grn_prior`` (tf, target), ``lr_prior`` (ligand, receptor, annotation),
    ``radius``, ``contact_radius``, ``scale_factor``, ``upstream_tf`` and its ``cascade_tf``.

    ``beta_variation`` a > 0 makes the coefficients of every other plain target (``varying_targets``: the odd
    ``Gene`` indices from ``2 * upstream_targets`` on) vary from cell to cell within a cluster with the cell's
    neighbourhood: cell i's coefficient is the cluster's times ``1 + a * (2 * mix_i - 1)``, mix_i the share of
    other clusters among the cells within ``radius`` of i (Gaussian-weighted; 0 inside a domain, about one half
    at a border), given in ``uns['perturb_sim']['cell_multiplier']``. ``true_modulators`` keeps the cluster's
    coefficient (the multiplier's base). At 0 (default) the tissue is the same as before, draw for draw.
    """
    n_fixed = n_tfs + n_ligands + n_receptors
    if n_genes < n_fixed + 4:
        raise ValueError(f"n_genes must be at least {n_fixed + 4} for {n_fixed} TF/ligand/receptor genes")
    if n_tfs < 4 or n_ligands < 2 or n_receptors < 2:
        raise ValueError("need at least 4 TFs, 2 ligands and 2 receptors")
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, side, size=(n_cells, 2))
    centers = rng.uniform(0.15 * side, 0.85 * side, size=(n_clusters, 2))
    d = ((xy[:, None, :] - centers[None]) ** 2).sum(-1)
    cl = d.argmin(1)
    cluster_names = np.array([f"domain_{k}" for k in range(n_clusters)])

    tfs = [f"Tf{i}" for i in range(n_tfs)]
    ligs = [f"Lig{i}" for i in range(n_ligands)]
    recs = [f"Rec{i}" for i in range(n_receptors)]
    tgts = [f"Gene{i}" for i in range(n_genes - n_fixed)]
    genes = tfs + ligs + recs + tgts
    gi = {g: i for i, g in enumerate(genes)}
    X = np.zeros((n_cells, len(genes)))

    def exo(n_cl_means_lo=0.8, hi=2.5, spread=0.45):
        means = rng.uniform(n_cl_means_lo, hi, size=n_clusters)
        return means[cl] * np.exp(spread * rng.standard_normal(n_cells) - spread**2 / 2)

    truth = []
    upstream, cascade, lig_driver = tfs[0], tfs[1], tfs[2]
    for t in tfs:
        if t != cascade:
            X[:, gi[t]] = exo()
    # the cascade: Tf1 = own variation + 0.5 * Tf0 in every cluster
    X[:, gi[cascade]] = exo(0.5, 1.5, 0.6) + 0.5 * X[:, gi[upstream]] + noise * rng.standard_normal(n_cells)
    for k in range(n_clusters):
        truth.append((cascade, cluster_names[k], upstream, "tf", 0.5))
    for lg in ligs:
        X[:, gi[lg]] = exo(0.5, 2.0)
    # Lig0 driven by Tf2
    X[:, gi[ligs[0]]] = exo(0.3, 1.0) + 0.8 * X[:, gi[lig_driver]] + noise * rng.standard_normal(n_cells)
    for k in range(n_clusters):
        truth.append((ligs[0], cluster_names[k], lig_driver, "tf", 0.8))
    for r in recs:
        X[:, gi[r]] = exo(0.6, 2.0, 0.7)

    # LR table: pair i -> (Lig_i, Rec_i) secreted; the last ligand signals by contact; decoys cross-paired
    lr_rows = []
    for i, lg in enumerate(ligs):
        ann = "Cell-Cell Contact" if i == n_ligands - 1 else "Secreted Signaling"
        lr_rows.append((lg, recs[i % n_receptors], ann))
        lr_rows.append((lg, recs[(i + 1) % n_receptors], ann))  # decoy pair
    lr_prior = (
        pd.DataFrame(lr_rows, columns=["ligand", "receptor", "annotation"])
        .drop_duplicates(subset=["ligand", "receptor"])
        .reset_index(drop=True)
    )
    lig_radius = {}
    for lg, ann in zip(lr_prior.ligand, lr_prior.annotation):
        lig_radius.setdefault(lg, radius if ann.startswith("Secreted") else contact_radius)

    # scale so that received ligand ~ local expression level: s = N / (expected kernel mass)
    density = n_cells / side**2
    scale = 1.0
    lig_vals = X[:, [gi[lg] for lg in ligs]]
    radii = np.array([lig_radius[lg] for lg in ligs])
    W = received_ligands(xy, lig_vals, radii, scale=1.0, mode="exact")
    col_scale = np.array([n_cells / (2 * np.pi * r * r * density) for r in radii])
    scale = float(col_scale[0])
    W = W * scale  # the engine will use a single scale factor (the secreted one)

    mult = np.ones(n_cells)
    if beta_variation > 0:  # no draws: the random stream (and the rest of the tissue) stays as at a = 0
        from scipy.spatial import cKDTree

        tree = cKDTree(xy)
        pairs = tree.query_pairs(2.0 * radius, output_type="ndarray")
        wgt = np.exp(-(((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(1)) / (2.0 * radius**2))
        other = (cl[pairs[:, 0]] != cl[pairs[:, 1]]).astype(np.float64)
        tot = np.bincount(pairs[:, 0], wgt, n_cells) + np.bincount(pairs[:, 1], wgt, n_cells)
        oth = np.bincount(pairs[:, 0], wgt * other, n_cells) + np.bincount(pairs[:, 1], wgt * other, n_cells)
        mix = np.where(tot > 0, oth / np.where(tot > 0, tot, 1.0), 0.0)
        mult = 1.0 + beta_variation * (2.0 * mix - 1.0)
    varying = []

    grn_rows = [(upstream, cascade), (lig_driver, ligs[0])]
    non_upstream = [t for t in tfs if t not in (upstream,)]
    for j, t in enumerate(tgts):
        if j < upstream_targets:
            true_tfs = [upstream] if j % 2 == 0 else [upstream, non_upstream[(j // 2) % len(non_upstream)]]
        elif j < 2 * upstream_targets:
            true_tfs = [cascade]
        else:
            true_tfs = list(rng.choice([x for x in tfs if x != upstream], size=rng.integers(1, 3), replace=False))
        decoys = list(rng.choice([x for x in tfs if x not in true_tfs], size=n_decoy_tfs, replace=False))
        for tf in true_tfs + decoys:
            grn_rows.append((tf, t))
        # one LR pair for every third target, active in a random non-empty subset of clusters
        lr_pair = None
        if j % 3 == 2:
            p = int(rng.integers(0, n_ligands))
            lr_pair = (ligs[p], recs[p % n_receptors], p)
            active = rng.random(n_clusters) < 0.7
            if not active.any():
                active[rng.integers(0, n_clusters)] = True
        y = np.full(n_cells, 0.0)
        vary = beta_variation > 0 and j >= 2 * upstream_targets and j % 2 == 1
        if vary:
            varying.append(t)
        for k in range(n_clusters):
            m = cl == k
            b0 = rng.uniform(0.5, 1.5)
            yk = b0 + noise * rng.standard_normal(m.sum())
            for tf in true_tfs:
                if tf in (upstream, cascade):
                    b = rng.uniform(0.5, 1.0)  # positive: the knockout test relies on the sign
                else:
                    b = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9)
                    if b < 0:  # keep the target positive (no clipping, the model stays linear)
                        yk = yk - b * np.quantile(X[m, gi[tf]], 0.999) * ((1.0 + beta_variation) if vary else 1.0)
                yk = yk + b * (mult[m] if vary else 1.0) * X[m, gi[tf]]
                truth.append((t, cluster_names[k], tf, "tf", float(b)))
            if lr_pair is not None and active[k]:
                lg, rc, p = lr_pair
                b = rng.uniform(0.4, 0.8)
                yk = yk + b * (mult[m] if vary else 1.0) * W[m, p] * X[m, gi[rc]]
                truth.append((t, cluster_names[k], f"{lg}${rc}", "lr", float(b)))
            y[m] = yk
        X[:, gi[t]] = np.clip(y, 0, None)

    grn_prior = pd.DataFrame(grn_rows, columns=["tf", "target"]).drop_duplicates().reset_index(drop=True)
    truth_df = pd.DataFrame(truth, columns=["target", "cluster", "modulator", "kind", "coef"])
    obs = pd.DataFrame(
        {CLUSTER_OBS: pd.Categorical(cluster_names[cl], categories=list(cluster_names))},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=X.copy(), obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["lognorm"] = X.copy()
    adata.obsm[keys.SPATIAL] = xy
    adata.var["role"] = ["tf"] * n_tfs + ["ligand"] * n_ligands + ["receptor"] * n_receptors + ["target"] * len(tgts)
    adata.uns[keys.PERTURB_SIM] = {
        "true_modulators": truth_df,
        "grn_prior": grn_prior,
        "lr_prior": lr_prior,
        "radius": float(radius),
        "contact_radius": float(contact_radius),
        "scale_factor": scale,
        "upstream_tf": upstream,
        "cascade_tf": cascade,
        "seed": int(seed),
        "beta_variation": float(beta_variation),
        "varying_targets": np.array(varying, dtype=str),
        "cell_multiplier": mult,
        "note": "contact-signalling LR features in the truth use the secreted scale factor",
    }
    # contact ligands were simulated with the secreted scale: W of the contact ligand is scaled by `scale` too,
    # which is what the engine computes with one scale factor
    return adata


def write_simulated_priors(adata: ad.AnnData, folder) -> dict[str, str]:
    """Write the simulated GRN and LR priors as CSV files; returns their paths."""
    from pathlib import Path

    from ...io.write import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sim = adata.uns[keys.PERTURB_SIM]
    out = {}
    for key in ("grn_prior", "lr_prior", "true_modulators"):
        p = folder / f"sim_{key}.csv"
        write_text_atomic(pd.DataFrame(sim[key]).to_csv(index=False), p)
        out[key] = str(p)
    return out
