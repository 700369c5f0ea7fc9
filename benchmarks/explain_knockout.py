"""Issue 17, part 5: why a knockout moves (or does not move) a TF's targets.

For each gene: its counts on the slide, its within-cluster correlation with its GRN targets (what a lasso can pick
up), how many targets had it as a candidate modulator and how many kept a non-zero coefficient on it
(``perturb_api.gene_usage``), which targets those are and how much the model uses them in turn, and the genes
moved after each propagation step of its knockout.

    python benchmarks/explain_knockout.py --model /tmp/knock/model_full --slide /tmp/knock/ob_lognorm.h5ad \
        --counts ../shared/data/st_mouse_olfactory_bulb.h5ad --grn /tmp/knock/grn_abc.parquet --genes Myc,Zfp263
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spatial_deconv_gui import perturb_api as api  # noqa: E402
from spatial_deconv_gui.engines.perturb.perturb import iter_perturbation  # noqa: E402


def within_cluster_corr(X: np.ndarray, clusters: np.ndarray, tf_col: int, target_cols: list[int]) -> np.ndarray:
    out = []
    for c in np.unique(clusters):
        m = clusters == c
        x = X[m, tf_col]
        if x.std() == 0:
            continue
        for j in target_cols:
            y = X[m, j]
            if y.std() > 0:
                out.append(abs(np.corrcoef(x, y)[0, 1]))
    return np.asarray(out)


def explain(model, gene: str, grn: pd.DataFrame, slide: ad.AnnData, counts: ad.AnnData, cluster_col: str) -> dict:
    gi = {g: i for i, g in enumerate(model.genes)}
    prior = [t for t in dict.fromkeys(grn[grn.tf == gene].target) if t in gi and t != gene]
    usage = api.gene_usage(model, [gene]).iloc[0]
    direct = sorted(
        {model.genes[j] for B in model.B_tf for j, v in zip(B[gi[gene]].indices, B[gi[gene]].data) if v != 0}
    )
    users = api.gene_usage(model, direct) if direct else pd.DataFrame()
    vi = {g: i for i, g in enumerate(slide.var_names)}
    X = slide.X.toarray() if hasattr(slide.X, "toarray") else np.asarray(slide.X)
    cors = within_cluster_corr(
        X, slide.obs[cluster_col].astype(str).to_numpy(), vi[gene], [vi[t] for t in prior if t in vi]
    )
    c = counts[:, gene].X
    c = np.asarray(c.toarray() if hasattr(c, "toarray") else c).ravel()
    steps = []
    for st in iter_perturbation(model, [gene], 0.0, None, 4):
        a = np.abs(st.delta).max(axis=0)
        a[gi[gene]] = 0.0
        moved = a > 1e-6
        pm = np.array([a[gi[t]] for t in prior])
        steps.append(
            {
                "step": st.step,
                "genes_moved": int(moved.sum()),
                "genes_moved_above_1e-3": int((a > 1e-3).sum()),
                "own_targets_moved": int((pm > 1e-6).sum()),
                "own_targets_moved_above_1e-3": int((pm > 1e-3).sum()),
                "median_max_abs_delta_of_moved": float(np.median(a[moved])) if moved.any() else 0.0,
            }
        )
    return {
        "gene": gene,
        "grn_targets_in_model": len(prior),
        "umis_on_slide": int(c.sum()),
        "spots_with_umis": int((c > 0).sum()),
        "n_spots": int(c.size),
        "within_cluster_abs_corr_median": float(np.median(cors)) if cors.size else None,
        "within_cluster_abs_corr_share_above_0.3": float((cors > 0.3).mean()) if cors.size else None,
        "usage": {k: (v.item() if hasattr(v, "item") else v) for k, v in usage.to_dict().items()},
        "targets_with_nonzero_beta": direct,
        "their_use_by_the_model": users.to_dict("records") if len(users) else [],
        "knockout_steps": steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--slide", required=True, help="the (log-normalised) slide the model was trained on")
    ap.add_argument("--counts", required=True, help="the raw counts of the same spots (for UMIs)")
    ap.add_argument("--grn", required=True)
    ap.add_argument("--genes", required=True)
    ap.add_argument("--cluster-col", default="layer")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model = api.load_model(args.model)
    slide = ad.read_h5ad(args.slide)
    counts = ad.read_h5ad(args.counts)
    counts = counts[list(slide.obs_names)]
    grn = pd.read_parquet(args.grn)
    out = [explain(model, g, grn, slide, counts, args.cluster_col) for g in args.genes.split(",")]
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
