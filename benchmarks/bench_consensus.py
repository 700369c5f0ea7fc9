"""Does the methods' agreement flag the spots whose consensus is wrong? And is the consensus better than each method?

    PYTHONPATH=src .venv/bin/python benchmarks/bench_consensus.py [--out FILE.json] [--quick] [--with-c2l]

Data as in ``bench_uncertainty.py``: simulated slides (400 spots x 400 genes, 6 types, seed 7) at 50 / 200 / 800 UMI
per cell and domain sharpness 1 (mixed spots) / 6 (mostly one type), and pseudo-spots pooled from half the cells of
spacexr's hippocampus and lymph-node references (the other half is the run's reference), as pooled and thinned to
20 % of the counts. RCTD (full mode) and FlashDeconv run with ``uncertainty=True``; ``--with-c2l`` adds
cell2location on the simulated slides (minutes each on a CPU). The consensus is computed with interval weights and
with equal weights (:func:`spatial_deconv_gui.api.consensus`).

Per-spot error: the total-variation distance between a composition and the truth, ½ Σ_t |p_t − truth_t| (in
[0, 1]). Truth: each type's share of the counts (UMI fractions, what RCTD's weights estimate) and the cell
fractions. Reported per dataset: each method's mean error, the consensus's, Spearman's ρ between the per-spot
agreement and the consensus error (negative = agreement falls as the error rises), and the mean consensus error in
each fifth of the spots by agreement (lowest agreement first); with interval weights, the coverage of the truth
(per spot and type) by each method's and the consensus's 90 % intervals and their mean widths, the consensus's
with and without widening by the methods' spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy.stats import spearmanr

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.engines.consensus import combined_interval, total_variation
from spatial_deconv_gui.simulate import simulate_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_uncertainty import DATA, PSEUDO_REFERENCES, pseudo_spots  # noqa: E402  (a sibling script, not a package)

METHODS = {"rctd": {"mode": "full", "cell_min": 10}, "flash": {"n_bootstrap": 40}}
C2L = {"c2l": {}}


def run_methods(slide, reference, methods: dict) -> tuple[list[ad.AnnData], dict]:
    outs, cost = [], {}
    for method, params in methods.items():
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        uncertainty = method in api.methods_with_intervals()
        run = api.run_deconvolution(
            slide, reference, method, params=dict(params), device="cpu", uncertainty=uncertainty
        )
        cost[method] = (round(time.perf_counter() - t_wall, 1), round(time.process_time() - t_cpu, 1))
        outs.append(run.adata)
    return outs, cost


def score(runs: list[ad.AnnData], methods: list[str], truth) -> dict:
    cols = list(runs[0].obsm[keys.proportions(methods[0])].columns)
    t = truth.reindex(columns=cols).to_numpy(dtype=float)
    row = {}
    for adata, m in zip(runs, methods):
        row[f"error {m}"] = float(np.nanmean(total_variation(adata.obsm[keys.proportions(m)].to_numpy(), t)))
    for weighting in ("auto", "equal"):
        cons = api.consensus(runs, key=methods, weighting=weighting)
        p = cons.adata.obsm[keys.proportions(keys.CONSENSUS)].to_numpy()
        err = total_variation(p, t)
        agree = cons.adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy(dtype=float)
        ok = np.isfinite(err) & np.isfinite(agree)
        label = cons.result.mode
        row[f"error consensus ({label})"] = float(err[ok].mean())
        row[f"spearman agreement-error ({label})"] = float(spearmanr(agree[ok], err[ok]).statistic)
        order = np.argsort(agree[ok], kind="stable")
        row[f"error by agreement fifth ({label})"] = [float(err[ok][q].mean()) for q in np.array_split(order, 5)]
        row[f"agreement by fifth ({label})"] = [float(agree[ok][q].mean()) for q in np.array_split(order, 5)]
        row["n_spots"] = int(ok.sum())
        if cons.result.mode == "intervals":
            row.update(interval_scores(runs, methods, cols, t, cons.adata))
    return row


def _bounds(adata: ad.AnnData, key: str, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return tuple(  # clipped to [0, 1] as api.consensus does
        np.clip(adata.obsm[slot][cols].to_numpy(dtype=float), 0.0, 1.0)
        for slot in (keys.proportions_lower(key), keys.proportions_upper(key))
    )


def _coverage(lo, hi, truth, spots) -> tuple[float, float]:
    """Share of (spot, type) pairs whose truth lies in [lo, hi], and the mean width, over ``spots``."""
    spots = spots & np.isfinite(lo).all(axis=1) & np.isfinite(hi).all(axis=1)
    inside = (lo <= truth + 1e-12) & (truth <= hi + 1e-12)
    return float(inside[spots].mean()), float((hi - lo)[spots].mean())


def interval_scores(runs, methods, cols, truth, consensus_adata) -> dict:
    """Coverage of the truth (per spot and type) by the 90 % intervals of each method and of the consensus, with
    and without widening by the methods' spread, and their mean widths; the consensus's also on the fifth of the
    spots the methods agree least on."""
    out = {}
    point = consensus_adata.obsm[keys.proportions(keys.CONSENSUS)][cols].to_numpy(dtype=float)
    agree = consensus_adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy(dtype=float)
    fitted = np.isfinite(point).all(axis=1) & np.isfinite(truth).all(axis=1)
    least = fitted & np.isfinite(agree) & (agree <= np.nanquantile(agree[fitted], 0.2))
    for adata, m in zip(runs, methods):
        lo, hi = _bounds(adata, m, cols)
        out[f"coverage {m}"], out[f"width {m}"] = _coverage(lo, hi, truth, fitted)
    props = [a.obsm[keys.proportions(m)][cols].to_numpy(dtype=float) for a, m in zip(runs, methods)]
    bounds = [_bounds(a, m, cols) for a, m in zip(runs, methods)]
    variants = {
        "consensus": _bounds(consensus_adata, keys.CONSENSUS, cols),
        "consensus, no spread": combined_interval(props, [b[0] for b in bounds], [b[1] for b in bounds], spread=False),
    }
    for label, (lo, hi) in variants.items():
        out[f"coverage {label}"], out[f"width {label}"] = _coverage(lo, hi, truth, fitted)
        out[f"coverage {label}, least-agreeing fifth"], out[f"width {label}, least-agreeing fifth"] = _coverage(
            lo, hi, truth, least
        )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/consensus/bench_consensus.json")
    ap.add_argument("--quick", action="store_true", help="one simulated slide, no pseudo-spots")
    ap.add_argument("--with-c2l", action="store_true", help="add cell2location on the simulated slides")
    args = ap.parse_args()
    rows = []
    depths = (200,) if args.quick else (50, 200, 800)
    sharpness = (1.0,) if args.quick else (1.0, 6.0)
    datasets = []
    for umi in depths:
        for sharp in sharpness:
            slide, reference = simulate_dataset(
                n_spots=400, n_genes=400, n_types=6, umi_per_cell=umi, domain_sharpness=sharp, seed=7
            )
            truths = {
                "UMI fractions": slide.obsm[keys.TRUE_UMI_FRACTIONS],
                "cell fractions": slide.obsm[keys.TRUE_PROPORTIONS],
            }
            datasets.append((f"simulated umi/cell {umi}, sharpness {sharp}", slide, reference, truths, True))
    if not args.quick:
        for name in PSEUDO_REFERENCES:
            full = ad.read_h5ad(DATA / f"{name}.h5ad")
            for thin in (1.0, 0.2):
                slide, reference, cell_truth, umi_truth = pseudo_spots(full, thin=thin, seed=1)
                truths = {"UMI fractions": umi_truth, "cell fractions": cell_truth}
                label = f"pseudo-spots {name.removeprefix('spacexr_')}, counts x{thin}"
                datasets.append((label, slide, reference, truths, False))
    for label, slide, reference, truths, simulated in datasets:
        methods = {**METHODS, **(C2L if args.with_c2l and simulated else {})}
        runs, cost = run_methods(slide, reference, methods)
        for truth_label, truth in truths.items():
            row = {"data": label, "truth": truth_label, "methods": list(methods), "wall_cpu_s": cost}
            row.update(score(runs, list(methods), truth))
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
