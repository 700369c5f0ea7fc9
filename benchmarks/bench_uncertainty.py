"""Calibration of `run --uncertainty`: coverage of the truth by each method's nominal 90 % intervals, and their
mean width, on simulated slides (several depths and mixing levels) and on pseudo-spots pooled from real
single-cell references.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_uncertainty.py [--out FILE.json] [--quick]
        [--methods rctd flash c2l destvi ...] [--grid full|small]

Simulated slides: :func:`spatial_deconv_gui.simulate.simulate_dataset` with 400 spots x 400 genes, 6 types, UMI
per cell 50 / 200 / 800 and domain sharpness 1 (mixed spots) / 6 (mostly one type); truth is given as the cell
fractions and as the UMI fractions (each type's expected share of the counts; cells differ in size).
Pseudo-spots: the cells of each type of a shared reference (spacexr's Visium hippocampus and lymph-node
references) split in two halves; one half is the reference of the run, 300 spots each pool 2-8 cells of the other
half (types drawn from a Dirichlet(0.5) per spot), as they are and thinned to 20 % of the counts. Their truth is
given two ways: the cell fractions, and the UMI fractions (each type's share of the pooled whole-transcriptome
UMI, what RCTD's weights estimate). Coverage counts a (spot, type) as covered when q05 <= truth <= q95.

``--grid small`` (for the slow trained models, cell2location and DestVI, with their default early stopping) keeps
the same slides but fewer of them: 50 / 200 / 800 UMI per cell on mixed spots, 200 on mostly-pure ones, the
hippocampus pseudo-spots as pooled and thinned, the lymph-node ones as pooled; ``destvi-seeds3`` (an ensemble of
three seeds) runs on the hippocampus pseudo-spots only. ``--only`` picks data sets by their labels.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.simulate import simulate_dataset

DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not DATA.exists():
    DATA = Path("/work/shared/data")
METHODS = {
    "rctd": {"mode": "full", "cell_min": 10},
    "rctd-doublet": {"mode": "doublet", "cell_min": 10},
    "flash": {"n_bootstrap": 40},
    "c2l": {"n_cells_per_location": 6.0},  # the simulator's mean (pseudo-spots: 5)
    # a 100-epoch single-cell model and early stopping checked every 10 epochs from epoch 500: what the CPU allowed
    "destvi": {"sc_epochs": 100, "convergence_window": 100},
    "destvi-seeds3": {"sc_epochs": 100, "convergence_window": 100, "seeds": 3},
}
# the ensemble trains three models: only on this data set
ENSEMBLE_DATA = ("pseudo-spots visium_hippocampus_reference, counts x1.0",)
PSEUDO_REFERENCES = ("spacexr_visium_hippocampus_reference", "spacexr_visium_lymphnode_human_reference")


def pseudo_spots(reference: ad.AnnData, n_spots: int = 300, thin: float = 1.0, seed: int = 0):
    """(slide, reference half, cell-fraction truth, UMI-fraction truth) pooled from half the cells of each type."""
    rng = np.random.default_rng(seed)
    labels = reference.obs[keys.CELL_TYPE].astype(str).to_numpy()
    types = sorted(set(labels))
    pool_idx, ref_idx = [], []
    for t in types:
        cells = rng.permutation(np.flatnonzero(labels == t))
        half = len(cells) // 2
        ref_idx += list(cells[:half])
        pool_idx.append(cells[half:])
    counts = sp.csr_matrix(reference.X)
    numi = reference.obs[keys.NUMI].to_numpy(dtype=float)
    rows, cell_frac, umi_frac, spot_numi = [], [], [], []
    for _ in range(n_spots):
        n_cells = int(rng.integers(2, 9))
        mix = rng.dirichlet(np.full(len(types), 0.5))
        per_type = rng.multinomial(n_cells, mix)
        chosen, owner = [], []
        for k, m in enumerate(per_type):
            if m:
                picked = rng.choice(pool_idx[k], m, replace=True)
                chosen += list(picked)
                owner += [k] * m
        chosen, owner = np.array(chosen), np.array(owner)
        y = np.asarray(counts[chosen].sum(axis=0)).ravel()
        if thin < 1.0:
            y = rng.binomial(y.astype(np.int64), thin)
        rows.append(y)
        cell_frac.append(np.bincount(owner, minlength=len(types)) / len(owner))
        u = np.bincount(owner, weights=numi[chosen], minlength=len(types))
        umi_frac.append(u / u.sum())
        spot_numi.append(numi[chosen].sum() * thin)
    barcodes = [f"pseudo{i:04d}" for i in range(n_spots)]
    slide = ad.AnnData(
        X=sp.csr_matrix(np.vstack(rows).astype(np.int32)),
        obs=pd.DataFrame({keys.NUMI: spot_numi}, index=barcodes),
        var=pd.DataFrame(index=reference.var_names.copy()),
    )
    side = int(np.ceil(np.sqrt(n_spots)))
    slide.obsm[keys.SPATIAL] = np.column_stack([np.arange(n_spots) % side, np.arange(n_spots) // side]) * 100.0
    ref_half = reference[np.sort(ref_idx)].copy()
    return (
        slide,
        ref_half,
        pd.DataFrame(cell_frac, index=barcodes, columns=types),
        pd.DataFrame(umi_frac, index=barcodes, columns=types),
    )


def score(adata: ad.AnnData, key: str, truth: pd.DataFrame) -> dict:
    point = adata.obsm[keys.proportions(key)]
    cols = list(point.columns)
    truth = truth.reindex(columns=cols).to_numpy()
    point = point.to_numpy()
    lower = adata.obsm[keys.proportions_lower(key)].to_numpy()
    upper = adata.obsm[keys.proportions_upper(key)].to_numpy()
    fitted = ~np.isnan(point).any(axis=1)
    t, lo, hi, p = truth[fitted], lower[fitted], upper[fitted], point[fitted]
    covered = (t >= lo - 1e-12) & (t <= hi + 1e-12)
    present = t > 0
    return {
        "n_fitted": int(fitted.sum()),
        "coverage": float(covered.mean()),
        "coverage_present": float(covered[present].mean()),
        "coverage_absent": float(covered[~present].mean()) if (~present).any() else float("nan"),
        "mean_width": float((hi - lo).mean()),
        "mean_width_present": float((hi - lo)[present].mean()),
        "mae": float(np.abs(p - t).mean()),
        "point_inside": bool(((p >= lo) & (p <= hi)).all()),
    }


def run_one(slide, reference, method: str) -> tuple[ad.AnnData, float, float, dict]:
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    engine = method.split("-")[0]
    run = api.run_deconvolution(slide, reference, engine, params=dict(METHODS[method]), device="cpu", uncertainty=True)
    stop = {"stop": run.result.stop} if run.result.stop else {}
    return run.adata, time.perf_counter() - t_wall, time.process_time() - t_cpu, stop


def wanted(method: str, data: str, grid: str, only: list[str] | None = None) -> bool:
    if only and not any(part in data for part in only):
        return False
    return not (grid == "small" and method == "destvi-seeds3" and not data.startswith(ENSEMBLE_DATA))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/unc/bench_uncertainty.json")
    ap.add_argument("--quick", action="store_true", help="one depth, one mixing level, no pseudo-spots")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--grid", default="full", choices=("full", "small"))
    ap.add_argument("--only", nargs="+", help="run only the data sets whose label contains one of these strings")
    args = ap.parse_args()
    rows = []
    depths = (200,) if args.quick else (50, 200, 800)
    sharpness = (1.0,) if args.quick else (1.0, 6.0)
    # (umi per cell, sharpness, reference cells per type): the last runs ask how much of the shortfall is the
    # reference's noise (profiles averaged from 60 vs 1,000 cells)
    grid = [(umi, sharp, 60) for umi in depths for sharp in sharpness]
    if not args.quick and args.grid == "full":
        grid += [(200, sharp, 1000) for sharp in sharpness]
    if args.grid == "small":
        grid = [(umi, 1.0, 60) for umi in depths] + [(200, 6.0, 60)]
    pseudo = [(name, thin) for name in PSEUDO_REFERENCES for thin in (1.0, 0.2)]
    if args.grid == "small":
        pseudo = [(PSEUDO_REFERENCES[0], 1.0), (PSEUDO_REFERENCES[0], 0.2), (PSEUDO_REFERENCES[1], 1.0)]
    for umi, sharp, n_ref in grid:
        slide, reference = simulate_dataset(
            n_spots=400,
            n_genes=400,
            n_types=6,
            umi_per_cell=umi,
            domain_sharpness=sharp,
            cells_per_type=n_ref,
            seed=7,
        )
        mixing = float((slide.obsm[keys.TRUE_PROPORTIONS].to_numpy().max(axis=1)).mean())
        data = f"simulated umi/cell {umi}, sharpness {sharp}, reference {n_ref} cells/type"
        for method in args.methods:
            if not wanted(method, data, args.grid, args.only):
                continue
            adata, wall, cpu, stop = run_one(slide, reference, method)
            for label, slot in (
                ("cell fractions", keys.TRUE_PROPORTIONS),
                ("UMI fractions", keys.TRUE_UMI_FRACTIONS),
            ):
                row = {
                    "data": data,
                    "mean_umi": float(slide.obs[keys.NUMI].mean()),
                    "mean_top_fraction": mixing,
                    "truth": label,
                    "method": method,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "load": os.getloadavg()[0],
                    **stop,
                    **score(adata, method.split("-")[0], slide.obsm[slot]),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not args.quick:
        for name, thin in pseudo:
            full = ad.read_h5ad(DATA / f"{name}.h5ad")
            slide, reference, cell_truth, umi_truth = pseudo_spots(full, thin=thin, seed=1)
            data = f"pseudo-spots {name.removeprefix('spacexr_')}, counts x{thin}"
            for method in args.methods:
                if not wanted(method, data, args.grid, args.only):
                    continue
                adata, wall, cpu, stop = run_one(slide, reference, method)
                for label, truth in (("cell fractions", cell_truth), ("UMI fractions", umi_truth)):
                    row = {
                        "data": data,
                        "mean_umi": float(np.asarray(slide.X.sum(axis=1)).mean()),
                        "mean_top_fraction": float(cell_truth.to_numpy().max(axis=1).mean()),
                        "truth": label,
                        "method": method,
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "load": os.getloadavg()[0],
                        **stop,
                        **score(adata, method.split("-")[0], truth),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
